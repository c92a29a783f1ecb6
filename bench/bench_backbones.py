"""Backbone forward time per image, presets side by side in one run.

Usage:  python bench/bench_backbones.py [--cases dino_vits8@320 efficientnet_lite0@192 ...] [--batch 2]
                                        [--repeats 3] [--threads 2] [--device cpu|cuda] [--precision auto]

ViT presets use random weights (nothing is downloaded; the timing does not depend on the values), the offline
EfficientNet-Lite0 its packaged ImageNet weights. Prints milliseconds per image (median over repeats, after one
warm-up batch), the feature-map shape, and each case's time relative to the first case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from primaps_dist.backbones import build_backbone
from primaps_dist.backbones.presets import PRESETS
from primaps_dist.config import BackboneConfig

DEFAULT_CASES = ("dino_vits8@320", "efficientnet_lite0@192", "efficientnet_lite0@320", "dinov2_vits14@322")


def parse_case(text: str) -> tuple[str, int]:
    name, _, crop = text.partition("@")
    return name, int(crop) if crop else 320


def time_case(name: str, crop: int, batch: int, repeats: int, device: torch.device, precision: str):
    weights = "pretrained" if name == "efficientnet_lite0" else "random"
    extractor = build_backbone(BackboneConfig(name=name, weights=weights, precision=precision), device)
    images = torch.rand(batch, 3, crop, crop, device=device)
    shape = tuple(extractor(images).shape)  # warm-up
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        extractor(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(seconds) / batch, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="preset@crop, e.g. dino_vits8@320")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} batch={args.batch} repeats={args.repeats} precision={args.precision}")
    print(f"{'case':28s} {'ms/image':>10s} {'relative':>9s}  features")
    baseline = None
    for case in args.cases:
        name, crop = parse_case(case)
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        ms, shape = time_case(name, crop, args.batch, args.repeats, device, args.precision)
        baseline = baseline or ms
        print(f"{case:28s} {ms:10.1f} {ms / baseline:9.2f}  {list(shape)}")


if __name__ == "__main__":
    main()
