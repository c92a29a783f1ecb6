"""Reading user image files for prediction and visualisation (not the training stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from primaps_dist.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(root: Path) -> Iterator[Path]:
    """Image files under ``root`` (a file or a directory, searched recursively), in sorted order."""
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise UserError(f"{root}: no such file or directory")
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path


def read_rgb(path: Path) -> np.ndarray:
    """``uint8 [H, W, 3]``; greyscale, palette and RGBA images are converted. Raises UserError naming the file."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable image ({err.__class__.__name__})") from None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> ``float32 [1, 3, H, W]`` in 0..1."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def resize_short_side(images: torch.Tensor, short: int) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` so that min(H, W) == short (bilinear, antialiased)."""
    height, width = images.shape[-2:]
    scale = short / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad right/bottom (reflect) so both sides are multiples of ``multiple``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
