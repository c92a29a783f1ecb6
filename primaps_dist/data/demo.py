"""``primaps-dist make-demo-data``: a labelled texture-mosaic data set made from real pixels.

Every image is a mosaic of 3..6 regions of irregular shape (a warped, anisotropic Voronoi partition
plus a few blobs); each region is filled with one of the classes of a *source set*, whose pixels come
from photographs and textures bundled with scikit-image (no download). Each fill is a randomly scaled,
rotated and shifted view of the class source with colour jitter, so labels are exact per pixel.

Source sets (``--source``):

* ``demo`` (default), 6 classes: brick, grass and gravel textures (greyscale, tinted with a class
  colour), cat fur (``chelsea``), deep-field stars (``hubble_deep_field``) and evening sky (``rocket``).
* ``photos2``, 5 classes from other photos, none shared with ``demo``, untinted: wood grain (the table
  of ``coffee``), a retina fundus (``retina``), ``coins``, printed text (``page``) and the lunar
  surface (``moon``). A second evaluation set: a method tuned on ``demo`` must also work here. Its
  mosaics use their own random streams, so their layouts differ from ``demo``'s too.

Layout::

    OUT/classes.json                      {"classes": [...], "seed": S, "size": N, ...}
    OUT/train/images/train_000000.png     RGB, N x N
    OUT/train/labels/train_000000.png     8-bit class ids 0..5
    OUT/val/images/..., OUT/val/labels/...

Deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from primaps_dist.errors import UserError, run_cli


@dataclass(frozen=True)
class TextureClass:
    name: str
    load: Callable[[], np.ndarray]  # -> uint8 [H, W] or [H, W, 3]
    tint: tuple[float, float, float] | None = None  # colour multiplied into greyscale sources


def _skimage(name: str, rows: slice = slice(None), cols: slice = slice(None)) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return np.asarray(getattr(skimage.data, name)())[rows, cols]

    return load


CLASSES: tuple[TextureClass, ...] = (
    TextureClass("brick", _skimage("brick"), tint=(1.05, 0.55, 0.40)),
    TextureClass("grass", _skimage("grass"), tint=(0.55, 0.95, 0.35)),
    TextureClass("gravel", _skimage("gravel"), tint=(0.95, 0.88, 0.75)),
    TextureClass("fur", _skimage("chelsea", slice(0, 300), slice(0, 130))),  # cat cheek fur, left of the eye
    TextureClass("stars", _skimage("hubble_deep_field")),
    TextureClass("sky", _skimage("rocket", slice(0, 120), slice(96, 298))),  # dusk sky above the launch pad
)
CLASS_NAMES = tuple(c.name for c in CLASSES)

PHOTOS2_CLASSES: tuple[TextureClass, ...] = (
    TextureClass("wood", _skimage("coffee", slice(40, 400), slice(488, 600))),  # table right of the saucer
    TextureClass("retina", _skimage("retina", slice(350, 1050), slice(350, 1050))),  # vessels and fovea
    TextureClass("coins", _skimage("coins")),
    TextureClass("text", _skimage("page")),
    TextureClass("moon", _skimage("moon")),
)


@dataclass(frozen=True)
class SourceSet:
    classes: tuple[TextureClass, ...]
    photos: str  # the scikit-image samples used (for classes.json)
    stream: int | None = None  # mixed into every sample's seed; None keeps the original demo streams


SOURCE_SETS: dict[str, SourceSet] = {
    "demo": SourceSet(CLASSES, "brick, grass, gravel, chelsea, hubble_deep_field, rocket"),
    "photos2": SourceSet(PHOTOS2_CLASSES, "coffee, retina, coins, page, moon", stream=2),
}


SOURCE_SIDE = 768  # sources are mirror-padded to at least this, so any rotated view stays inside


def load_sources(classes: Sequence[TextureClass] = CLASSES) -> list[Image.Image]:
    """Class sources as RGB PIL images (greyscale textures tinted), mirror-padded to SOURCE_SIDE."""
    sources = []
    for texture in classes:
        try:
            pixels = texture.load()
        except Exception as err:  # a scikit-image build without bundled data would try to download
            raise UserError(f"scikit-image sample {texture.name!r} is not available offline ({err})") from None
        rgb = pixels.astype(np.float32) / 255.0
        if rgb.ndim == 2:
            tint = np.asarray(texture.tint or (1.0, 1.0, 1.0), dtype=np.float32)
            rgb = np.clip(rgb[..., None] * tint, 0.0, 1.0)
        rgb = (rgb[..., :3] * 255.0 + 0.5).astype(np.uint8)
        while min(rgb.shape[:2]) < SOURCE_SIDE:
            pad_y = min(rgb.shape[0] - 1, max(0, SOURCE_SIDE - rgb.shape[0]))
            pad_x = min(rgb.shape[1] - 1, max(0, SOURCE_SIDE - rgb.shape[1]))
            rgb = np.pad(rgb, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
        sources.append(Image.fromarray(np.ascontiguousarray(rgb)))
    return sources


def _smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth random field ``float32 [size, size]`` with about unit amplitude: a sum of 8 random plane
    waves of about ``cells`` periods across the image (each built separably from 1-D sines)."""
    coords = np.arange(size, dtype=np.float32) / size
    field = np.zeros((size, size), dtype=np.float32)
    for _ in range(8):
        frequency = rng.uniform(0.5, 1.0) * cells * 2 * np.pi
        direction = rng.uniform(0, 2 * np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        along_y = frequency * np.sin(direction) * coords + phase
        along_x = frequency * np.cos(direction) * coords
        # sin(a + b) = sin(a) cos(b) + cos(a) sin(b), with a along y and b along x
        field += np.outer(np.sin(along_y), np.cos(along_x)) + np.outer(np.cos(along_y), np.sin(along_x))
    return field / 2.0


def region_map(rng: np.random.Generator, size: int, num_regions: int) -> np.ndarray:
    """Irregular partition ``int64 [size, size]`` with ids 0..num_regions-1 (each id non-empty).

    A power diagram of random sites under per-site anisotropic metrics, with smoothly warped
    distances (wavy borders), plus up to two blobs (level sets of smooth noise) painted on top.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    distances = np.empty((num_regions, size, size), dtype=np.float32)
    for k in range(num_regions):
        cy, cx = rng.uniform(0.05, 0.95, size=2)
        angle = rng.uniform(0, np.pi)
        stretch = rng.uniform(0.5, 2.0)
        dy, dx = ys - cy, xs - cx
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        distances[k] = np.sqrt(stretch * u * u + v * v / stretch)
        distances[k] += rng.uniform(0.03, 0.08) * _smooth_noise(rng, size, rng.uniform(1.0, 3.0))
        distances[k] -= rng.uniform(0.0, 0.1)  # power-diagram weight: uneven region sizes
    regions = np.argmin(distances, axis=0)
    for _ in range(int(rng.integers(0, 3))):
        blob = _smooth_noise(rng, size, rng.uniform(0.7, 1.6))
        regions[blob > np.quantile(blob, rng.uniform(0.85, 0.95))] = int(rng.integers(num_regions))
    # Renumber so that ids are 0..n-1 in order of appearance; ids that vanished are dropped.
    _, first = np.unique(regions, return_index=True)
    order = np.argsort(first)
    lookup = np.zeros(num_regions, dtype=np.int64)
    lookup[np.unique(regions)[order]] = np.arange(len(order))
    return lookup[regions]


def texture_view(rng: np.random.Generator, source: Image.Image, size: int) -> np.ndarray:
    """Random scaled/rotated/shifted view of ``source``: float32 ``[size, size, 3]`` in 0..1, colour-jittered."""
    scale = rng.uniform(0.6, 1.4)  # source pixels per output pixel
    angle = rng.uniform(0, 2 * np.pi)
    reach = size / 2 * np.sqrt(2) * scale + 2  # half-diagonal of the view in source pixels
    width, height = source.size
    centre_x = rng.uniform(reach, width - reach)
    centre_y = rng.uniform(reach, height - reach)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    # output (x, y) -> source (a x + b y + c, d x + e y + f): rotation and scale about the view centre
    half = size / 2
    coefficients = (cos, -sin, centre_x - cos * half + sin * half, sin, cos, centre_y - sin * half - cos * half)
    view = np.asarray(source.transform((size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR))
    view = view.astype(np.float32) / 255.0
    brightness = rng.uniform(0.85, 1.15)
    contrast = rng.uniform(0.8, 1.2)
    saturation = rng.uniform(0.8, 1.2)
    grey = view.mean(axis=-1, keepdims=True)
    view = grey + (view - grey) * saturation
    mean = view.mean()
    view = (view - mean) * contrast + mean
    return np.clip(view * brightness, 0.0, 1.0)


def make_sample(
    rng: np.random.Generator, sources: Sequence[Image.Image], size: int, must_have: int
) -> tuple[np.ndarray, np.ndarray]:
    """One mosaic: (image ``uint8 [size, size, 3]``, labels ``uint8 [size, size]``); class ``must_have`` appears."""
    num_classes = len(sources)
    regions = region_map(rng, size, int(rng.integers(3, 7)))
    num_regions = int(regions.max()) + 1
    region_class = rng.integers(0, num_classes, size=num_regions)
    region_class[int(rng.integers(num_regions))] = must_have
    labels = region_class[regions].astype(np.uint8)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for cls in np.unique(labels):
        mask = labels == cls
        image[mask] = texture_view(rng, sources[int(cls)], size)[mask]
    return (image * 255.0 + 0.5).astype(np.uint8), labels


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


SPLIT_CODES = {"train": 1, "val": 2}


def generate(
    out: Path, *, seed: int = 0, train: int = 192, val: int = 48, size: int = 256, source: str = "demo"
) -> dict:
    """Write the ``source`` set (a key of SOURCE_SETS) under ``out``; returns the classes.json content."""
    if source not in SOURCE_SETS:
        raise UserError(f"--source must be one of {', '.join(SOURCE_SETS)}, got {source!r}")
    chosen = SOURCE_SETS[source]
    classes = chosen.classes
    sources = load_sources(classes)
    for split, count in (("train", train), ("val", val)):
        image_dir, label_dir = out / split / "images", out / split / "labels"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            key = [int(seed) % (1 << 63), SPLIT_CODES[split], index]
            rng = np.random.default_rng(key if chosen.stream is None else key + [chosen.stream])
            image, labels = make_sample(rng, sources, size, must_have=index % len(sources))
            name = f"{split}_{index:06d}.png"
            (image_dir / name).write_bytes(_png(image))
            (label_dir / name).write_bytes(_png(labels))
    info = {
        "classes": [c.name for c in classes],
        "num_classes": len(classes),
        "source": source,
        "seed": seed,
        "size": size,
        "train": train,
        "val": val,
        "sources": f"scikit-image bundled data: {chosen.photos}",
    }
    (out / "classes.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primaps-dist make-demo-data", description="Generate the labelled texture-mosaic demo set."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=192, help="training images (default 192)")
    parser.add_argument("--val", type=int, default=48, help="validation images (default 48)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--source", default="demo", choices=sorted(SOURCE_SETS),
                        help="source photos: demo (6 classes, default) or photos2 (5 other classes)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train < 0 or args.val < 0:
        raise UserError("--train and --val must be >= 0")
    if args.size < 32:
        raise UserError(f"--size must be >= 32, got {args.size}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    info = generate(out, seed=args.seed, train=args.train, val=args.val, size=args.size, source=args.source)
    shape = f"{args.size}x{args.size}, {info['num_classes']} classes"
    print(f"wrote {args.train} train + {args.val} val images ({shape}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
