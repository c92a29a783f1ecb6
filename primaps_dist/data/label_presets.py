"""Dataset label presets: folder layouts, file-name patterns and raw-id -> class-id mappings.

A preset turns a dataset's own label maps into the class ids used everywhere in primaps-dist
(``0..num_classes-1``, ``255`` = ignore). Raw ids that the dataset does not define are *invalid*:
:meth:`LabelPreset.map_ids` reports them instead of mapping them silently, so ``make-shards``
can count and name the file.

Presets
-------
``cityscapes``
    ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``. labelIds 7..33 -> 0..26 in order
    (the 27 classes of STEGO/PiCIE/PriMaPs); labelIds 0..6 (void) -> 255. Ids above 33 are invalid.
``cocostuff``
    ``images/**/<id>.jpg`` with ``annotations/**/<id>.png`` stuff-thing maps (COCO-Stuff-164k
    ``stuffthingmaps``: 0-based fine ids 0..181, 255 unlabelled) -> 27 coarse classes: 12 thing
    super-categories then 15 stuff super-categories. Source of the table and of the class names:
    STEGO, ``src/data.py`` (``Coco.fine_to_coarse``) and ``get_class_labels("cocostuff27")``
    (github.com/mhamilton723/STEGO), the mapping PiCIE introduced and PriMaPs evaluates with.
``potsdam``
    ISPRS Potsdam merged to 3 classes as in STEGO's ``Potsdam`` dataset (``src/data.py``):
    fine ids 0 impervious surfaces/road, 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter;
    ``{0, 4} -> 0`` (roads and cars), ``{1, 5} -> 1`` (buildings and clutter), ``{2, 3} -> 2``
    (vegetation and trees). STEGO stores tiles as MATLAB files ``imgs/<id>.mat`` (key ``img``,
    channels R, G, B, IR) and ``gt/<id>.mat`` (key ``gt``, fine ids); both are read here. Labels
    may also be single-channel PNG/TIF fine-id maps, or the original ISPRS colour-coded RGB
    label images (``top_potsdam_2_10_label.tif`` with ``top_potsdam_2_10_RGB.tif``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from primaps_dist.labels import IGNORE_INDEX

INVALID = -1  # marker in a lookup table: the raw id is not defined by the dataset

CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip

# STEGO's names; the two duplicated super-category names of the stuff half get a "-stuff" suffix.
COCOSTUFF27_CLASS_NAMES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip

# Coarse class of fine stuff-thing ids 0..181, listed in fine-id order (STEGO src/data.py, Coco.fine_to_coarse).
_COCOSTUFF_FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,           # 0..24
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5,     # 25..50
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0,               # 51..76
    1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4,                                                   # 77..90
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25,     # 91..112
    13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24,     # 113..134
    21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23,     # 135..156
    20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26,     # 157..178
    19, 19, 24,                                                                                 # 179..181
)  # fmt: skip

POTSDAM3_CLASS_NAMES = ("roads and cars", "buildings and clutter", "vegetation and trees")
_POTSDAM_FINE_TO_COARSE = (0, 1, 2, 2, 0, 1)  # fine ids 0..5 (see module docstring)
# ISPRS colour code of the fine classes, in fine-id order.
POTSDAM_FINE_COLOURS = (
    (255, 255, 255),  # impervious surfaces
    (0, 0, 255),  # building
    (0, 255, 255),  # low vegetation
    (0, 255, 0),  # tree
    (255, 255, 0),  # car
    (255, 0, 0),  # clutter / background
)


def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Lookup table ``[size]`` int16: raw id -> class id, 255 for ignore, INVALID for undefined ids."""
    table = np.full(size, INVALID, dtype=np.int16)
    for raw, mapped in mapping.items():
        table[raw] = mapped
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def cityscapes_lut() -> np.ndarray:
    mapping = {raw: IGNORE_INDEX for raw in range(7)}
    mapping.update({raw: raw - 7 for raw in range(7, 34)})
    return _lut(mapping)


def cocostuff27_lut() -> np.ndarray:
    return _lut(dict(enumerate(_COCOSTUFF_FINE_TO_COARSE)))


def potsdam3_lut() -> np.ndarray:
    return _lut(dict(enumerate(_POTSDAM_FINE_TO_COARSE)))


def potsdam_colours_to_fine(rgb: np.ndarray) -> np.ndarray:
    """ISPRS colour-coded label ``[H, W, 3]`` uint8 -> fine ids ``[H, W]`` uint8 (unknown colours -> 255)."""
    codes = rgb[..., 0].astype(np.int32) << 16 | rgb[..., 1].astype(np.int32) << 8 | rgb[..., 2].astype(np.int32)
    fine = np.full(codes.shape, IGNORE_INDEX, dtype=np.uint8)
    for fine_id, (r, g, b) in enumerate(POTSDAM_FINE_COLOURS):
        fine[codes == (r << 16 | g << 8 | b)] = fine_id
    return fine


def _strip_suffix(stem: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if suffix and stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


@dataclass(frozen=True)
class LabelPreset:
    """How one dataset names its files and encodes its labels.

    ``image_suffixes``/``label_suffixes``: stem endings stripped to get the id that pairs an image with
    its label (``"aachen_000000_000019_leftImg8bit"`` and ``"aachen_000000_000019_gtFine_labelIds"``
    both give ``"aachen_000000_000019"``). ``label_stem_filter``: only label files whose stem passes
    are considered (Cityscapes ships colour/instance maps next to labelIds).
    """

    name: str
    class_names: tuple[str, ...]
    lut: np.ndarray = field(repr=False)
    image_suffixes: tuple[str, ...] = ()
    label_suffixes: tuple[str, ...] = ()
    label_stem_filter: Callable[[str], bool] | None = field(default=None, repr=False)
    image_stem_filter: Callable[[str], bool] | None = field(default=None, repr=False)
    colour_decoder: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_id(self, stem: str) -> str:
        return _strip_suffix(stem, self.image_suffixes)

    def label_id(self, stem: str) -> str:
        return _strip_suffix(stem, self.label_suffixes)

    def accepts_label(self, stem: str) -> bool:
        return self.label_stem_filter is None or self.label_stem_filter(stem)

    def accepts_image(self, stem: str) -> bool:
        return self.image_stem_filter is None or self.image_stem_filter(stem)

    def map_ids(self, raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Raw label map ``[H, W]`` (integers, or ``[H, W, 3]`` colour codes where the preset has them)
        -> (class ids ``[H, W]`` uint8, sorted list of raw ids the dataset does not define)."""
        if raw.ndim == 3:
            if self.colour_decoder is None:
                raise ValueError(f"preset {self.name!r} expects single-channel label maps, got shape {raw.shape}")
            raw = self.colour_decoder(raw[..., :3])
        return map_with_lut(raw, self.lut)


def map_with_lut(raw: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Apply ``lut`` ([256] int16 with INVALID markers) to integer ids ``raw`` [H, W].

    Returns (mapped uint8 [H, W], sorted invalid raw ids); invalid and out-of-table ids map to 255.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {raw.shape}")
    if raw.dtype == np.uint8:
        mapped = lut[raw]
        out_of_table = np.zeros(0, dtype=np.int64)
    else:
        ids = raw.astype(np.int64)
        inside = (ids >= 0) & (ids < lut.shape[0])
        mapped = np.full(ids.shape, INVALID, dtype=np.int16)
        mapped[inside] = lut[ids[inside]]
        out_of_table = np.unique(ids[~inside])
    invalid_mask = mapped == INVALID
    invalid = sorted(set(np.unique(raw[invalid_mask]).tolist()) | set(out_of_table.tolist()))
    mapped = np.where(invalid_mask, IGNORE_INDEX, mapped).astype(np.uint8)
    return mapped, [int(v) for v in invalid]


def _identity_lut(num_classes: int | None) -> np.ndarray:
    """Generic datasets: ids 0..num_classes-1 and 255 are valid (all 0..255 when num_classes is None)."""
    table = np.arange(256, dtype=np.int16)
    if num_classes is not None:
        table[num_classes:IGNORE_INDEX] = INVALID
    return table


def generic_preset(num_classes: int | None = None, class_names: tuple[str, ...] | None = None) -> LabelPreset:
    """No dataset layout: image and label pair by identical stem; ids are kept as they are."""
    if class_names is not None:
        num_classes = len(class_names)
    names = class_names if class_names is not None else tuple(str(i) for i in range(num_classes or 0))
    return LabelPreset(name="", class_names=names, lut=_identity_lut(num_classes))


PRESETS: dict[str, LabelPreset] = {
    "cityscapes": LabelPreset(
        name="cityscapes",
        class_names=CITYSCAPES_CLASS_NAMES,
        lut=cityscapes_lut(),
        image_suffixes=("_leftImg8bit",),
        label_suffixes=("_gtFine_labelIds", "_gtCoarse_labelIds"),
        label_stem_filter=lambda stem: stem.endswith("_labelIds"),
        image_stem_filter=lambda stem: stem.endswith("_leftImg8bit"),
    ),
    "cocostuff": LabelPreset(
        name="cocostuff",
        class_names=COCOSTUFF27_CLASS_NAMES,
        lut=cocostuff27_lut(),
    ),
    "potsdam": LabelPreset(
        name="potsdam",
        class_names=POTSDAM3_CLASS_NAMES,
        lut=potsdam3_lut(),
        image_suffixes=("_RGBIR", "_RGB", "_IRRG"),
        label_suffixes=("_label_noBoundary", "_label"),
        colour_decoder=potsdam_colours_to_fine,
    ),
}


def get_preset(name: str) -> LabelPreset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown label preset {name!r}; known: {', '.join(PRESETS)}") from None
