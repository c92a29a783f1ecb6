"""``primaps-dist make-shards``: image (and label) folders -> WebDataset tar shards + ``index.json``.

Each sample is ``<key>.jpg`` or ``<key>.png`` (the original encoded bytes; other formats such as TIF or
STEGO's Potsdam ``.mat`` tiles are re-encoded losslessly as PNG) and, with labels, ``<key>.label.png``:
class ids as an 8-bit PNG, 255 = ignore, after the preset's mapping. Keys come from the image's path
relative to ``--images`` (separators -> ``__``, dots and other unsafe characters -> ``_``).
Samples are shuffled once with ``--seed`` so that every shard mixes the whole data set.

Nothing is dropped silently: a missing or ambiguous partner, an unreadable or undecodable file, a label
of another size than its image, or label ids outside the class range give one line on stderr naming the
file, are counted by reason, and the counts go into the summary and ``index.json``.

The module stays whole for now (~490 lines): discovery, encoding and writing are the three stages of the one
``make-shards`` command (reading and validating shards is :mod:`primaps_dist.data.shardio`'s job), and the
module is about to be rewritten for remote streaming.

Example::

    primaps-dist make-shards --images cityscapes/leftImg8bit/train --labels cityscapes/gtFine/train \\
        --preset cityscapes --out shards/cityscapes/train --shard-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from primaps_dist.data.label_presets import LabelPreset, generic_preset, get_preset, PRESETS
from primaps_dist.errors import UserError, run_cli
from primaps_dist.labels import IGNORE_INDEX

KEPT_IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
REENCODED_IMAGE_SUFFIXES = (".tif", ".tiff", ".bmp", ".webp", ".ppm", ".mat")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".mat")
SHARD_NAME = re.compile(r"^\d{6}\.tar$")
INDEX_FORMAT = "primaps-dist-shards/1"
_SIZE_HISTOGRAM_LIMIT = 50
_WINDOW = 64  # samples in flight per worker process

# Skip reasons (keys of index.json "skipped").
MISSING_LABEL = "missing_label"
AMBIGUOUS_LABEL = "ambiguous_label"
LABEL_WITHOUT_IMAGE = "label_without_image"
UNREADABLE_IMAGE = "unreadable_image"
UNDECODABLE_IMAGE = "undecodable_image"
UNREADABLE_LABEL = "unreadable_label"
SIZE_MISMATCH = "label_size_mismatch"
LABEL_OUT_OF_RANGE = "label_out_of_range"


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path | None
    key: str


@dataclass
class Problem:
    path: Path
    reason: str
    detail: str

    def line(self) -> str:
        return f"skipped {self.path}: {self.detail} [{self.reason}]"


@dataclass
class Encoded:
    """One validated sample, ready to be written."""

    key: str
    image_ext: str
    image_bytes: bytes
    label_bytes: bytes | None
    width: int
    height: int
    class_pixels: np.ndarray | None  # [256] int64 pixel count per mapped id


# ------------------------------------------------------------------------------------------ discovery


def _list_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    wanted = tuple(suffixes)
    found = [Path(dirpath) / name for dirpath, _, names in os.walk(root) for name in names]
    return sorted(path for path in found if path.suffix.lower() in wanted)


def safe_key(relative_without_suffix: str) -> str:
    """A WebDataset-safe key: no dots (they split extensions) and no slashes."""
    key = relative_without_suffix.replace(os.sep, "__").replace("/", "__")
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    return key if key and not key.startswith("_") else f"k{key}"


def _unique_keys(paths: Sequence[Path], root: Path) -> list[str]:
    keys, used = [], Counter()
    for path in paths:
        base = safe_key(str(path.relative_to(root).with_suffix("")))
        used[base] += 1
        keys.append(base if used[base] == 1 else f"{base}_{used[base]}")
    return keys


def find_images(images_dir: Path, preset: LabelPreset) -> list[Path]:
    suffixes = tuple(KEPT_IMAGE_SUFFIXES) + REENCODED_IMAGE_SUFFIXES
    return [path for path in _list_files(images_dir, suffixes) if preset.accepts_image(path.stem)]


def pair_images_and_labels(
    images: Sequence[Path], images_dir: Path, labels_dir: Path | None, preset: LabelPreset
) -> tuple[list[Pair], list[Problem]]:
    """Pair each image with its label by (relative folder, id), else by a unique id anywhere.

    The id is the file stem with the preset's suffix removed (Cityscapes ``_leftImg8bit`` /
    ``_gtFine_labelIds``). Returns the pairs (label None without ``labels_dir``) and the problems:
    images without (or with several) candidate labels, and labels no image claimed.
    """
    keys = _unique_keys(images, images_dir)
    if labels_dir is None:
        return [Pair(image, None, key) for image, key in zip(images, keys)], []
    labels = [path for path in _list_files(labels_dir, LABEL_SUFFIXES) if preset.accepts_label(path.stem)]
    exact: dict[tuple[str, str], Path] = {}
    by_id: dict[str, list[Path]] = {}
    for label in labels:
        label_id = preset.label_id(label.stem)
        exact[(str(label.parent.relative_to(labels_dir)), label_id)] = label
        by_id.setdefault(label_id, []).append(label)
    pairs, problems, used = [], [], set()
    for image, key in zip(images, keys):
        image_id = preset.image_id(image.stem)
        label = exact.get((str(image.parent.relative_to(images_dir)), image_id))
        if label is None:
            candidates = by_id.get(image_id, [])
            if len(candidates) > 1:
                shown = ", ".join(str(c) for c in candidates[:3])
                problems.append(Problem(image, AMBIGUOUS_LABEL, f"several labels match id {image_id!r}: {shown}"))
                continue
            label = candidates[0] if candidates else None
        if label is None:
            problems.append(Problem(image, MISSING_LABEL, f"no label with id {image_id!r} under {labels_dir}"))
            continue
        used.add(label)
        pairs.append(Pair(image, label, key))
    for label in labels:
        if label not in used:
            problems.append(Problem(label, LABEL_WITHOUT_IMAGE, "no image pairs with this label"))
    return pairs, problems


# ------------------------------------------------------------------------------------------ encoding


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _load_mat(path: Path, names: Sequence[str]) -> np.ndarray:
    from scipy.io import loadmat  # only for Potsdam .mat tiles

    content = loadmat(str(path))
    for name in names:
        if name in content:
            return np.asarray(content[name])
    raise ValueError(f"MATLAB file has none of the variables {', '.join(names)}")


def _encode_image(path: Path) -> tuple[str, bytes, int, int]:
    """(member ext, bytes, width, height); raises OSError (unreadable) or ValueError (undecodable)."""
    suffix = path.suffix.lower()
    if suffix == ".mat":
        try:
            pixels = _load_mat(path, ("img", "image"))
        except OSError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read MATLAB image ({err})") from None
        if pixels.ndim == 3:
            pixels = pixels[..., :3]
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        return "png", _png_bytes(np.ascontiguousarray(pixels)), pixels.shape[1], pixels.shape[0]
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise ValueError(f"image does not decode ({type(err).__name__}: {err})") from None
    width, height = image.size
    if suffix in KEPT_IMAGE_SUFFIXES:
        return KEPT_IMAGE_SUFFIXES[suffix], data, width, height
    converted = image if image.mode in ("RGB", "L") else image.convert("RGB")
    return "png", _png_bytes(np.asarray(converted)), width, height


def _read_label(path: Path) -> np.ndarray:
    """Raw label array: [H, W] ids, or [H, W, 3/4] colour codes. OSError / ValueError on failure."""
    if path.suffix.lower() == ".mat":
        try:
            return _load_mat(path, ("gt", "label"))
        except OSError:
            raise
        except Exception as err:
            raise ValueError(f"cannot read MATLAB label ({err})") from None
    data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise ValueError(f"label does not decode ({type(err).__name__}: {err})") from None
    return np.asarray(image)


def encode_pair(pair: Pair, preset: LabelPreset) -> Encoded | Problem:
    """Read, validate and encode one sample (runs in a worker process)."""
    try:
        image_ext, image_bytes, width, height = _encode_image(pair.image)
    except OSError as err:
        return Problem(pair.image, UNREADABLE_IMAGE, f"cannot read image ({err.strerror or err})")
    except ValueError as err:
        return Problem(pair.image, UNDECODABLE_IMAGE, str(err))
    if pair.label is None:
        return Encoded(pair.key, image_ext, image_bytes, None, width, height, None)
    try:
        raw = _read_label(pair.label)
        mapped, invalid = preset.map_ids(raw)
    except OSError as err:
        return Problem(pair.label, UNREADABLE_LABEL, f"cannot read label ({err.strerror or err})")
    except ValueError as err:
        return Problem(pair.label, UNREADABLE_LABEL, str(err))
    if mapped.shape != (height, width):
        sizes = f"label is {mapped.shape[1]}x{mapped.shape[0]}, image {pair.image} is {width}x{height}"
        return Problem(pair.label, SIZE_MISMATCH, sizes)
    if invalid:
        shown = ", ".join(map(str, invalid[:10]))
        what = f"preset {preset.name}" if preset.name else f"{preset.num_classes} classes"
        return Problem(pair.label, LABEL_OUT_OF_RANGE, f"label ids [{shown}] are not valid for {what}")
    counts = np.bincount(mapped.ravel(), minlength=256).astype(np.int64)
    return Encoded(pair.key, image_ext, image_bytes, _png_bytes(mapped), width, height, counts)


@dataclass(frozen=True)
class Resize:
    """``--resize-short``: store images with this short side (never enlarged) as JPEG of ``quality``; labels
    follow by nearest neighbour. 0 keeps the original bytes."""

    short: int = 0
    quality: int = 90


def resize_encoded(sample: Encoded, resize: Resize) -> Encoded:
    """The sample with its image scaled so that its short side is ``resize.short`` (JPEG) and its label to the
    same size (nearest, PNG); unchanged when it is already that small or ``resize.short`` is 0."""
    from primaps_dist.data.transforms import resized_for_short_side

    if not resize.short or min(sample.width, sample.height) <= resize.short:
        return sample
    size = resized_for_short_side((sample.width, sample.height), resize.short)
    image = Image.open(io.BytesIO(sample.image_bytes))
    image.draft("RGB", size)  # JPEG sources decode at a reduced scale when they can
    image = image.convert("RGB").resize(size, Image.BILINEAR, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=resize.quality)
    label_bytes = sample.label_bytes
    if label_bytes is not None:
        label = Image.open(io.BytesIO(label_bytes)).resize(size, Image.NEAREST)
        label_bytes = _png_bytes(np.asarray(label))
    return Encoded(sample.key, "jpg", buffer.getvalue(), label_bytes, size[0], size[1], sample.class_pixels)


def _encode_and_resize(pair: Pair, preset: LabelPreset, resize: Resize) -> Encoded | Problem:
    result = encode_pair(pair, preset)
    return resize_encoded(result, resize) if isinstance(result, Encoded) else result


def _encode_in_worker(args: tuple[Pair, str, int | None, tuple[str, ...] | None, Resize]) -> Encoded | Problem:
    pair, preset_name, num_classes, class_names, resize = args
    preset = get_preset(preset_name) if preset_name else generic_preset(num_classes, class_names)
    return _encode_and_resize(pair, preset, resize)


def _encoded_stream(
    pairs: Sequence[Pair],
    preset: LabelPreset,
    num_classes: int | None,
    class_names: tuple[str, ...] | None,
    workers: int,
    resize: Resize = Resize(),
) -> Iterator[Encoded | Problem]:
    """Results in ``pairs`` order (deterministic output), computed by ``workers`` processes."""
    if workers <= 1:
        for pair in pairs:
            yield _encode_and_resize(pair, preset, resize)
        return
    jobs = [(pair, preset.name, num_classes, class_names, resize) for pair in pairs]
    window = _WINDOW * workers
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), window):
            yield from pool.map(_encode_in_worker, jobs[start : start + window], chunksize=4)


# ------------------------------------------------------------------------------------------ writing


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"output directory {out} is not writable ({err.strerror or err})") from None


class _ShardSink:
    """Numbered shards ``NNNNNN.tar`` of at most ``shard_size`` samples, each written to a hidden
    temporary file and renamed when complete (a crash never leaves a half shard under a shard name)."""

    def __init__(self, out: Path, shard_size: int):
        self.out = out
        self.shard_size = shard_size
        self.counts: list[int] = []
        self.sizes: list[int] = []  # bytes per finished shard (the index lists them for remote readers)
        self._file = None
        self._writer = None
        self._temp: Path | None = None

    def write(self, sample: Encoded) -> None:
        import webdataset as wds

        if self._writer is None or self.counts[-1] >= self.shard_size:
            self._finish()
            name = f"{len(self.counts):06d}.tar"
            self._temp = self.out / f".{name}.partial"
            self._file = open(self._temp, "wb")
            # mtime fixed: the same inputs and seed give byte-identical shards.
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
            self.counts.append(0)
        record = {"__key__": sample.key, sample.image_ext: sample.image_bytes}
        if sample.label_bytes is not None:
            record["label.png"] = sample.label_bytes
        self._writer.write(record)
        self.counts[-1] += 1

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        final = self.out / f"{len(self.counts) - 1:06d}.tar"
        os.replace(self._temp, final)
        self.sizes.append(final.stat().st_size)
        self._writer = self._file = self._temp = None

    def close(self) -> list[str]:
        self._finish()
        return [f"{i:06d}.tar" for i in range(len(self.counts))]

    def abort(self) -> None:
        if self._writer is not None:
            self._file.close()
            self._temp.unlink(missing_ok=True)
            self._writer = self._file = self._temp = None


def _remove_stale_shards(out: Path, written: Sequence[str]) -> list[str]:
    """Delete numbered shards of an earlier, larger run in the same folder (they would be read too)."""
    keep = set(written)
    stale = sorted(name for name in os.listdir(out) if SHARD_NAME.match(name) and name not in keep)
    for name in stale:
        (out / name).unlink()
    return stale


def _size_summary(sizes: Counter) -> dict:
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    common = sizes.most_common(_SIZE_HISTOGRAM_LIMIT)
    return {
        "min_width": min(widths),
        "max_width": max(widths),
        "min_height": min(heights),
        "max_height": max(heights),
        "distinct_sizes": len(sizes),
        "histogram": {f"{w}x{h}": n for (w, h), n in common},
    }


def _load_class_names(path: str) -> tuple[str, ...]:
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--classes {path}: cannot read a JSON list of class names ({err})") from None
    names = content.get("classes", content.get("names")) if isinstance(content, dict) else content
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"--classes {path}: expected a JSON list of names or {{\"classes\": [...]}}")
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primaps-dist make-shards", description="Write WebDataset tar shards from image (and label) folders."
    )
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--labels", help="folder of label maps, paired with images by file stem")
    parser.add_argument("--out", required=True, help="output folder for NNNNNN.tar shards and index.json")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="dataset layout and label mapping")
    parser.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle (default 0)")
    parser.add_argument("--num-classes", type=int, help="without a preset: label ids must be < this (or 255)")
    parser.add_argument("--classes", help="without a preset: JSON file with the class names (sets --num-classes)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode and check samples")
    parser.add_argument("--resize-short", type=int, default=0,
                        help="store images with this short side as JPEG (labels follow), so training workers never "
                             "decode full-size PNGs; 0 = keep the original bytes (default)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of --resize-short images (default 90)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.resize_short < 0:
        raise UserError(f"--resize-short must be >= 0, got {args.resize_short}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")
    images_dir = Path(args.images)
    labels_dir = Path(args.labels) if args.labels else None
    out = Path(args.out)
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: directory not found")
    if labels_dir is not None and not labels_dir.is_dir():
        raise UserError(f"--labels {labels_dir}: directory not found")
    class_names: tuple[str, ...] | None = None
    if args.preset:
        if args.num_classes or args.classes:
            raise UserError("--num-classes/--classes cannot be combined with --preset (the preset defines the classes)")
        preset = get_preset(args.preset)
    else:
        if args.num_classes is not None and not 1 <= args.num_classes < IGNORE_INDEX:
            raise UserError(f"--num-classes must be in 1..254, got {args.num_classes}")
        class_names = _load_class_names(args.classes) if args.classes else None
        preset = generic_preset(args.num_classes, class_names)
    images = find_images(images_dir, preset)
    if not images:
        kinds = ", ".join(sorted(set(KEPT_IMAGE_SUFFIXES) | set(REENCODED_IMAGE_SUFFIXES)))
        hint = f" named like the {args.preset} preset expects" if args.preset else ""
        raise UserError(f"--images {images_dir}: no images{hint} found ({kinds})")
    pairs, problems = pair_images_and_labels(images, images_dir, labels_dir, preset)
    _prepare_output(out)
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    pairs = sorted(pairs, key=lambda pair: str(pair.image))
    random.Random(args.seed).shuffle(pairs)

    skipped = Counter(problem.reason for problem in problems)
    sizes: Counter = Counter()
    class_pixels = np.zeros(256, dtype=np.int64)
    sink = _ShardSink(out, args.shard_size)
    num_classes_arg = None if args.preset else args.num_classes
    try:
        for result in _encoded_stream(pairs, preset, num_classes_arg, class_names, args.workers,
                                      Resize(args.resize_short, args.quality)):
            if isinstance(result, Problem):
                print(result.line(), file=sys.stderr)
                skipped[result.reason] += 1
                continue
            sink.write(result)
            sizes[(result.width, result.height)] += 1
            if result.class_pixels is not None:
                class_pixels += result.class_pixels
    except BaseException:
        sink.abort()
        raise
    shard_names = sink.close()
    total_skipped = sum(skipped.values())
    if not shard_names:  # every input was unusable: bad input like any other, exit status 2 via run_cli
        raise UserError(f"no sample was written to {out} ({total_skipped} skipped, see above)")
    stale = _remove_stale_shards(out, shard_names)
    has_labels = labels_dir is not None
    used_ids = [i for i in range(IGNORE_INDEX) if class_pixels[i] > 0]
    if args.preset or class_names or args.num_classes:
        num_classes = preset.num_classes if (args.preset or class_names) else args.num_classes
        names = list(preset.class_names) if (args.preset or class_names) else None
    else:
        num_classes = (max(used_ids) + 1) if used_ids else None
        names = None
    index = {
        "format": INDEX_FORMAT,
        "num_samples": int(sum(sink.counts)),
        "shards": [
            {"name": name, "num_samples": count, "num_bytes": size}
            for name, count, size in zip(shard_names, sink.counts, sink.sizes)
        ],
        "shard_size": args.shard_size,
        "seed": args.seed,
        "resize_short": args.resize_short or None,
        "jpeg_quality": args.quality if args.resize_short else None,
        "preset": args.preset,
        "has_labels": has_labels,
        "num_classes": num_classes,
        "class_names": names,
        "ignore_index": IGNORE_INDEX,
        "class_pixel_counts": {str(i): int(class_pixels[i]) for i in used_ids} if has_labels else None,
        "ignored_pixels": int(class_pixels[IGNORE_INDEX]) if has_labels else None,
        "image_size": _size_summary(sizes),
        "skipped": dict(sorted(skipped.items())),
        "num_skipped": total_skipped,
        "images_dir": str(images_dir),
        "labels_dir": str(labels_dir) if labels_dir else None,
    }
    temp_index = out / ".index.json.partial"
    temp_index.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(temp_index, out / "index.json")
    reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items())) or "none"
    written = f"wrote {index['num_samples']} samples in {len(shard_names)} shards to {out}"
    print(f"{written}; skipped {total_skipped} ({reasons})")
    if stale:
        print(f"removed {len(stale)} stale shard(s) of an earlier run: {', '.join(stale[:5])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
