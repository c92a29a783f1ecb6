"""Synthetic JPEG shard folders for the streaming benchmarks (bench/bench_streaming.py and its sections in
bench/streaming_elastic.py). Not a benchmark itself (``make bench`` runs only ``bench/bench_*.py``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from primaps_dist.data.synthetic import write_tar


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``uint8 [height, width, 3]``: smooth colour fields plus noise, so JPEG sizes are like photographs', not
    like flat test patterns."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    image += rng.integers(-24, 25, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(folder: Path, shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> int:
    """``shards`` tar shards ``NNNNNN.tar`` of ``per_shard`` photo-like JPEGs (quality 90) of ``size`` (width,
    height), keys ``s<shard>_<index>``, and make-shards' index.json; returns the shards' total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for shard in range(shards):
        members = []
        for index in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray(photo_like(rng, size[1], size[0])).save(buffer, format="JPEG", quality=90)
            members.append((f"s{shard}_{index:04d}.jpg", buffer.getvalue()))
        path = folder / f"{shard:06d}.tar"
        write_tar(path, members)
        entries.append({"name": path.name, "num_samples": per_shard, "num_bytes": path.stat().st_size})
    (folder / "index.json").write_text(json.dumps({"format": "primaps-dist-shards/1", "shards": entries}))
    return sum(entry["num_bytes"] for entry in entries)
