"""Tiny synthetic shards for tests and benchmarks (no image files needed).

Each sample's image encodes its label: class ``c`` is painted in the colour ``CLASS_COLOURS[c]`` (plus
mild noise), so a test can check that image and label stay aligned through crops, scales and flips.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASS_COLOURS = np.array(
    [[230, 25, 25], [25, 200, 25], [25, 25, 230], [230, 230, 25], [25, 230, 230], [230, 25, 230], [128, 128, 128]],
    dtype=np.uint8,
)


def encode_image(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """``uint8 [H, W]`` or ``[H, W, C]`` -> encoded bytes (PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def striped_sample(
    rng: np.random.Generator, height: int, width: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image ``uint8 [H, W, 3]``, label ``uint8 [H, W]``): vertical and horizontal class bands."""
    if num_classes > len(CLASS_COLOURS):
        raise ValueError(f"at most {len(CLASS_COLOURS)} classes, got {num_classes}")
    cols = np.sort(rng.integers(0, width, size=2))
    rows = np.sort(rng.integers(0, height, size=1))
    classes = rng.integers(0, num_classes, size=4)
    label = np.empty((height, width), dtype=np.uint8)
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    band = (x >= cols[0]).astype(int) + (x >= cols[1]).astype(int) + 0 * y
    label[:] = classes[band]
    label[rows[0] :, :] = np.where(band[rows[0] :, :] == 1, classes[3], label[rows[0] :, :])
    image = CLASS_COLOURS[label].astype(np.int16) + rng.integers(-8, 9, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_tar(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> None:
    """A tar file with ``(name, data)`` members in the given order (with end-of-archive marker)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_striped_shards(
    out_dir: str | os.PathLike,
    *,
    num_shards: int,
    per_shard: int,
    size: tuple[int, int] = (40, 48),
    num_classes: int = 4,
    seed: int = 0,
    fmt: str = "png",
    with_labels: bool = True,
) -> list[str]:
    """Write ``num_shards`` shards ``NNNNNN.tar`` of ``per_shard`` striped samples; returns their paths.

    Keys are ``s<shard>_<index>``; ``size`` is (height, width).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(num_shards):
        members = []
        for index in range(per_shard):
            image, label = striped_sample(rng, size[0], size[1], num_classes)
            key = f"s{shard}_{index:04d}"
            if fmt == "jpg":
                members.append((f"{key}.jpg", encode_image(image, "JPEG", quality=95)))
            else:
                members.append((f"{key}.png", encode_image(image)))
            if with_labels:
                members.append((f"{key}.label.png", encode_image(label)))
        path = out / f"{shard:06d}.tar"
        write_tar(path, members)
        paths.append(str(path))
    return paths
