"""Shard write and read throughput on the demo data (CPU).

Prints: demo generation rate, make-shards write rate (images/s, MB/s), raw tar read rate, and loader
read rates (decode + transform, images/s) for the training and evaluation loaders with 0 and 2
workers; plus, on large JPEGs, the gain of reduced-scale JPEG decoding (draft mode), measured side by
side in the same run. Absolute numbers depend on the machine and its load; compare ratios.

Usage: python bench/bench_shards.py [--train 96] [--size 256] [--batches 12]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from primaps_dist.config import DataConfig
from primaps_dist.data import demo, shards, transforms
from primaps_dist.data.loader import make_eval_loader, make_train_loader
from primaps_dist.data.shardio import read_shard, resolve_shards


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.tar"))


def train_rate(cfg: DataConfig, batches: int) -> float:
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    next(loader)  # start-up (worker processes) is not throughput
    _, seconds = timed(lambda: [next(loader) for _ in range(batches)])
    loader.close()
    return batches * cfg.batch_size / seconds


def eval_rate(cfg: DataConfig) -> float:
    loader = make_eval_loader(cfg, rank=0, world_size=1)
    count, seconds = timed(lambda: sum(len(batch["key"]) for batch in loader))
    return count / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, seconds = timed(lambda: demo.generate(root / "demo", seed=0, train=args.train, val=0, size=args.size))
        print(f"demo generation: {args.train / seconds:8.1f} images/s ({args.train} images {args.size}x{args.size})")

        out = root / "shards"
        with contextlib.redirect_stdout(io.StringIO()):
            _, seconds = timed(
                lambda: shards.main(
                    ["--images", str(root / "demo/train/images"), "--labels", str(root / "demo/train/labels"),
                     "--out", str(out), "--shard-size", "32"]
                )
            )  # fmt: skip
        megabytes = folder_bytes(out) / 1e6
        rate = f"{args.train / seconds:8.1f} images/s, {megabytes / seconds:6.1f} MB/s"
        print(f"make-shards write: {rate} (PNG + label, 1 process)")

        shard_list = resolve_shards(str(out), "bench")
        count, seconds = timed(lambda: sum(1 for path in shard_list for _ in read_shard(path)))
        print(f"raw tar read:      {count / seconds:8.1f} samples/s")

        crop = args.size * 3 // 4
        base = dict(train_shards=str(out), val_shards=str(out), num_classes=6, crop_size=crop, batch_size=8,
                    eval_batch_size=8, shuffle_buffer=64, train_scale=[1.0, 1.25])  # fmt: skip
        for workers in (0, 2):
            cfg = DataConfig(**base, num_workers=workers)
            print(f"train loader:      {train_rate(cfg, args.batches):8.1f} images/s (crop {crop}, {workers} workers)")
            print(f"eval loader:       {eval_rate(cfg):8.1f} images/s (crop {crop}, {workers} workers)")

        # Large JPEGs (as in COCO/Cityscapes-size photos) with a 320 crop: draft-mode decoding vs full decoding.
        big = root / "big"
        big.mkdir()
        for name in sorted(os.listdir(root / "demo/train/images"))[:24]:
            picture = Image.open(root / "demo/train/images" / name).resize((1600, 1200), Image.BILINEAR)
            picture.save(big / name.replace(".png", ".jpg"), quality=90)
        with contextlib.redirect_stdout(io.StringIO()):
            shards.main(["--images", str(big), "--out", str(root / "big_shards"), "--shard-size", "8"])
        cfg = DataConfig(**{**base, "train_shards": str(root / "big_shards"), "crop_size": 320}, num_workers=0)
        with_draft = train_rate(cfg, args.batches // 2)
        original = transforms.draft_for
        transforms.draft_for = lambda image, box: None
        try:
            without_draft = train_rate(cfg, args.batches // 2)
        finally:
            transforms.draft_for = original
        print(
            f"1600x1200 JPEG -> crop 320: {with_draft:6.1f} images/s with draft decoding, {without_draft:6.1f} without "
            f"(x{with_draft / without_draft:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
