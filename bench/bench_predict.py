"""Segmenter throughput on CPU: batched windows versus one image at a time, measured side by side.

The demo backbone (EfficientNet-Lite0 layers [2, 3], random weights: the speed does not depend on them) with
random prototypes. Images are ``--size`` squared; at sizes above ``--crop`` each image is several sliding windows.
Prints images/s per-image and batched, their ratio, and that both give the same maps.

Usage: python bench/bench_predict.py [--crop 192] [--size 192] [--count 32] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from primaps_dist import Segmenter
from primaps_dist.config import load_config
from primaps_dist.config import REPO_ROOT
from primaps_dist.segmenter.standalone import window_starts


def build(crop: int, batch_size: int) -> Segmenter:
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"data.crop_size={crop}", "backbone.weights=random"])
    from primaps_dist.backbones import build_backbone

    backbone = build_backbone(cfg.backbone, "cpu")
    prototypes = torch.nn.functional.normalize(torch.randn(cfg.data.num_classes, backbone.out_channels,
                                                           generator=torch.Generator().manual_seed(0)), dim=1)
    return Segmenter.from_parts(cfg, backbone, prototypes, device="cpu", batch_size=batch_size)


def rate(fn, count: int, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        begin = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - begin)
    return count / best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    segmenter = build(args.crop, args.batch_size)
    images = list(np.random.default_rng(0).integers(0, 256, (args.count, args.size, args.size, 3), dtype=np.uint8))
    segmenter.segment(images[:2])  # warm-up (allocator, kernels)
    per_image, single = rate(lambda: [segmenter.segment([image])[0] for image in images], args.count, args.repeats)
    batched, together = rate(lambda: segmenter.segment(images), args.count, args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(single, together))
    agree = float(np.mean([(a == b).float().mean().item() for a, b in zip(single, together)]))
    windows = len(window_starts(args.size, args.crop)) ** 2
    print(f"segmenter on CPU ({args.threads} threads): {args.count} images {args.size}x{args.size}, crop {args.crop} "
          f"({windows} windows per image), batch {args.batch_size} windows")
    print(f"per-image {per_image:8.2f} images/s")
    print(f"batched   {batched:8.2f} images/s")
    print(f"ratio batched / per-image: {batched / per_image:.2f}x; maps identical: {same} (pixel agreement {agree:.6f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
