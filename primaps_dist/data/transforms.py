"""Per-sample decoding and geometric transforms (CPU, numpy/PIL), shared by the loaders and make-shards.

Images come out as ``uint8 [S, S, 3]`` RGB and labels as ``uint8 [S, S]`` (255 = ignore); the loader
stacks them and converts to float/int64 tensors. Every random choice is drawn from a
``numpy.random.Generator`` that the caller seeds per sample, so a sample's crop depends only on the
seeds and its stream position (needed for deterministic resume).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")
LABEL_EXTENSION = "label.png"


class SampleError(ValueError):
    """A sample that cannot be used (undecodable, missing image, size mismatch); it is skipped and counted."""


def find_image_member(sample: dict) -> str | None:
    """The member suffix that holds the image (``"jpg"``, ``"png"``, ...), or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily (header only); SampleError when it is not an image."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises a zoo of types for garbage input
        raise SampleError(f"not a decodable image ({type(err).__name__}: {err})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode and convert any PIL mode (L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Alpha is dropped (not composited); 16/32-bit greyscale is scaled down by its value range.
    """
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
            grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(grey, mode="L").convert("RGB")
        return image.convert("RGB")
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(f"image does not decode ({type(err).__name__}: {err})") from None


def decode_label(data: bytes) -> np.ndarray:
    """Encoded single-channel label map -> ``uint8 [H, W]``; SampleError for colour or >8-bit ids."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise SampleError(f"label does not decode ({type(err).__name__}: {err})") from None
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise SampleError(f"label must be a single-channel id map, got PIL mode {image.mode}")
    ids = np.asarray(image)
    if ids.dtype != np.uint8:
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise SampleError(f"label ids must be in 0..255, found {int(ids.min())}..{int(ids.max())}")
        ids = ids.astype(np.uint8)
    return ids


@dataclass(frozen=True)
class CropBox:
    """Where the output crop comes from: the image is resized to ``resized`` (w, h) and the
    ``size`` x ``size`` window at ``(left, top)`` is kept, optionally mirrored."""

    resized: tuple[int, int]
    left: int
    top: int
    size: int
    flip: bool = False

    def source_box(self, original: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop window in original-image pixel coordinates (PIL ``box`` argument)."""
        sx = original[0] / self.resized[0]
        sy = original[1] / self.resized[1]
        return (self.left * sx, self.top * sy, (self.left + self.size) * sx, (self.top + self.size) * sy)


def resized_for_short_side(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(w, h) scaled so that min(w, h) == short (the long side rounded, never below short)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if width <= height:
        return short, max(short, int(round(height * short / width)))
    return max(short, int(round(width * short / height))), short


def train_crop_box(
    size: tuple[int, int], crop: int, scale_range: tuple[float, float], hflip: bool, rng: np.random.Generator
) -> CropBox:
    """Random-scale crop: short side -> crop * U(scale_range), random window, flip with p = 0.5.

    Exactly four draws from ``rng`` in a fixed order (scale, left, top, flip) whatever the options.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    scale = rng.uniform(low, high) if high > low else low
    short = max(crop, int(math.floor(crop * scale + 0.5)))
    resized = resized_for_short_side(size, short)
    left = int(rng.integers(0, resized[0] - crop + 1))
    top = int(rng.integers(0, resized[1] - crop + 1))
    flip = bool(rng.random() < 0.5) and hflip
    return CropBox(resized=resized, left=left, top=top, size=crop, flip=flip)


def eval_crop_box(size: tuple[int, int], crop: int, resize_short: int = 0) -> CropBox:
    """Short side -> ``resize_short`` (or ``crop``), then the centred ``crop`` x ``crop`` window."""
    short = resize_short or crop
    if short < crop:
        raise ValueError(f"resize_short {short} is smaller than the crop {crop}")
    resized = resized_for_short_side(size, short)
    return CropBox(resized=resized, left=(resized[0] - crop) // 2, top=(resized[1] - crop) // 2, size=crop)


def draft_for(image: Image.Image, box: CropBox) -> None:
    """Let JPEG decode at a reduced DCT scale when the crop needs far fewer pixels (deterministic)."""
    if image.format != "JPEG":
        return
    width, height = image.size
    if box.resized[0] * 2 <= width and box.resized[1] * 2 <= height:
        image.draft("RGB", box.resized)


def apply_crop_image(image: Image.Image, original: tuple[int, int], box: CropBox) -> np.ndarray:
    """Resize + crop (+ flip) an RGB PIL image -> ``uint8 [S, S, 3]`` (bilinear, antialiased)."""
    source = box.source_box(original)
    if image.size != original:  # decoded at a reduced draft scale: rescale the window
        fx, fy = image.size[0] / original[0], image.size[1] / original[1]
        source = (source[0] * fx, source[1] * fy, source[2] * fx, source[3] * fy)
    out = np.asarray(image.resize((box.size, box.size), Image.BILINEAR, box=source))
    if box.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def apply_crop_label(label: np.ndarray, box: CropBox) -> np.ndarray:
    """Resize + crop (+ flip) a label ``uint8 [H, W]`` with nearest neighbour -> ``uint8 [S, S]``."""
    height, width = label.shape
    source = box.source_box((width, height))
    # Nearest neighbour by index arithmetic: the source pixel under each output pixel centre.
    xs = np.floor(source[0] + (np.arange(box.size) + 0.5) * (source[2] - source[0]) / box.size).astype(np.int64)
    ys = np.floor(source[1] + (np.arange(box.size) + 0.5) * (source[3] - source[1]) / box.size).astype(np.int64)
    out = label[np.clip(ys, 0, height - 1)[:, None], np.clip(xs, 0, width - 1)[None, :]]
    if box.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def decode_sample(
    sample: dict,
    *,
    with_labels: bool,
    make_box,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one raw WebDataset sample and crop it.

    ``sample``: ``{"jpg"|"png"|...: bytes, optionally "label.png": bytes}``. ``make_box(size) -> CropBox``
    chooses the crop from the original (w, h). Returns (image ``uint8 [S, S, 3]``, label ``uint8 [S, S]``
    or None when labels are not requested or the sample has none). Raises SampleError.
    """
    ext = find_image_member(sample)
    if ext is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
        raise SampleError(f"no image member (has {members})")
    image = open_image(sample[ext])
    original = image.size
    label = None
    if with_labels and LABEL_EXTENSION in sample:
        label = decode_label(sample[LABEL_EXTENSION])
        if label.shape != (original[1], original[0]):
            raise SampleError(
                f"label size {label.shape[1]}x{label.shape[0]} differs from image size {original[0]}x{original[1]}"
            )
    box = make_box(original)
    draft_for(image, box)
    rgb = to_rgb(image)
    out_image = apply_crop_image(rgb, original, box)
    out_label = apply_crop_label(label, box) if label is not None else None
    return out_image, out_label
