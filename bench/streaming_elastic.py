"""Sections of bench/bench_streaming.py about the elastic training order (issue 12, items 2 and 3).

- ``elastic``: max prototype difference after K-means steps with W = 1, 2, 4 simulated ranks (each rank's batch
  from its own loader with 0 or 2 workers, its float64 statistics summed in rank order as the all-reduce does);
- ``egress``: bytes of shard visits started / data-set bytes per pass, W = 4 ranks x 2 workers (and W = 1);
- ``resume``: time to the first batch of a fresh loader vs one resumed late in its shards (workers included);
- ``rss``: peak RSS of a loader worker holding all streams' shuffle buffers, for two byte budgets and none;
- ``decode``: decode + crop images/s in one process: Cityscapes-size PNG (2048x1024) vs make-shards
  ``--resize-short 512 --quality 90`` JPEG.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _datasets import photo_like, write_dataset  # bench/ is on sys.path when bench_streaming.py runs
from primaps_dist.config import DataConfig


def _cfg(folder: Path, **values) -> DataConfig:
    base = dict(train_shards=str(folder), num_classes=4, crop_size=32, train_scale=[1.0, 1.5], num_workers=0,
                global_batch_size=8, shuffle_buffer=64)
    base.update(values)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------------ elastic


def _kmeans_prototypes(cfg: DataConfig, world: int, steps: int) -> torch.Tensor:
    from primaps_dist.data.loader import make_train_loader
    from primaps_dist.em.stats import PrototypeState, batch_stats
    from primaps_dist.prototypes import nearest_prototype

    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(3, 16, 4, stride=4).requires_grad_(False)  # fixed random features
    state = PrototypeState.from_prototypes(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
    loaders = [make_train_loader(cfg, rank=rank, world_size=world, seed=5) for rank in range(world)]
    for _ in range(steps):
        packed = None
        for loader in loaders:  # in rank order, as a sum all-reduce adds them
            features = backbone(next(loader)["image"])
            stats = batch_stats(features, nearest_prototype(features, state.prototypes), 5)
            packed = stats if packed is None else packed + stats
        state.update(packed, 0.5)
    for loader in loaders:
        loader.close()
    return state.prototypes.double()


def section_elastic(args: argparse.Namespace, workdir: Path) -> None:
    folder = workdir / "elastic"
    write_dataset(folder, 6, 24, (96, 72), seed=1)
    cfg = _cfg(folder, global_batch_size=8, crop_size=32)
    steps = 12
    reference = _kmeans_prototypes(cfg, 1, steps)
    print(f"== elastic: K-means prototypes after {steps} steps, global batch 8, vs W = 1 (0 workers)")
    worst = 0.0
    for world, workers in ((1, 2), (2, 0), (2, 2), (4, 0), (4, 2)):
        gap = (_kmeans_prototypes(replace(cfg, num_workers=workers), world, steps) - reference).abs().max().item()
        worst = max(worst, gap)
        print(f"W={world} workers={workers}: max |difference| {gap:.2e}")
    print(f"max prototype difference across W and workers: {worst:.2e} (guarantee: <= 1e-9)")


# ------------------------------------------------------------------------------------------ egress


def _egress(cfg: DataConfig, world: int, steps: int, dataset_bytes: int, total_samples: int) -> float:
    from primaps_dist.data.loader import make_train_loader

    loaders = [make_train_loader(cfg, rank=rank, world_size=world, seed=0) for rank in range(world)]
    for _ in range(steps):
        for loader in loaders:
            next(loader)
    opened = [path for loader in loaders for path in loader.opened]
    for loader in loaders:
        loader.close()
    passes = steps * cfg.global_batch_size / total_samples
    return sum(os.path.getsize(path) for path in opened) / (dataset_bytes * passes)


def section_egress(args: argparse.Namespace, workdir: Path) -> None:
    folder = workdir / "egress"
    shards, per_shard = 16, 32
    dataset_bytes = write_dataset(folder, shards, per_shard, (96, 72), seed=2)
    cfg = _cfg(folder, global_batch_size=16, shuffle_buffer=64)
    steps = 3 * shards * per_shard // 16  # three passes
    print(f"== egress: bytes of shard visits started / data-set bytes per pass ({shards} shards, 3 passes, "
          "global batch 16)")
    for world, workers in ((1, 0), (4, 2)):
        factor = _egress(replace(cfg, num_workers=workers), world, steps, dataset_bytes, shards * per_shard)
        print(f"W={world} x {workers} workers: egress factor {factor:.3f}")
    print("(above 1 only by the visits still open when the run stops: each shard visit is read by one worker)")


# ------------------------------------------------------------------------------------------ resume


def _first_batch_seconds(cfg: DataConfig, state: dict | None, start_step: int) -> float:
    from primaps_dist.data.loader import make_train_loader

    begin = time.perf_counter()
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0, start_step=start_step, resume_state=state)
    next(loader)
    seconds = time.perf_counter() - begin
    loader.close()
    return seconds


def section_resume(args: argparse.Namespace, workdir: Path) -> None:
    from primaps_dist.data.loader import collect_state, make_train_loader

    folder = workdir / "resume"
    write_dataset(folder, 8, 256, (320, 240), seed=3)  # as many shards as streams: whole-shard visits
    cfg = _cfg(folder, global_batch_size=8, num_workers=args.workers, crop_size=64, shuffle_buffer=64)
    late = 200  # 200 of 256 samples into every stream's current shard
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    state = None
    for _ in range(late):
        state = collect_state(next(loader), state)
    loader.close()
    fresh = min(_first_batch_seconds(cfg, None, 0) for _ in range(2))
    resumed = min(_first_batch_seconds(cfg, state, late) for _ in range(2))
    print(f"== resume: time to the first batch, {args.workers} workers, streams {late} samples into 256-sample shards")
    print(f"fresh {fresh:.3f} s, resumed late {resumed:.3f} s, ratio {resumed / fresh:.2f} (target <= 2)")


# ------------------------------------------------------------------------------------------ rss


def _worker_peak_rss_mb(cfg: DataConfig, steps: int) -> float:
    from primaps_dist.data.loader import make_train_loader

    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    for _ in range(steps):
        next(loader)
    workers = loader._iterator._workers  # the DataLoader's worker processes (private, bench only)
    peaks = []
    for worker in workers:
        with open(f"/proc/{worker.pid}/status") as status:
            line = next(text for text in status if text.startswith("VmHWM:"))
        peaks.append(int(line.split()[1]) / 1024)
    loader.close()
    return max(peaks)


def section_rss(args: argparse.Namespace, workdir: Path) -> None:
    folder = workdir / "rss"
    write_dataset(folder, 8, 80, (1024, 512), seed=4)
    base = _cfg(folder, global_batch_size=8, num_workers=1, crop_size=320, shuffle_buffer=100000)
    steps = 80
    overhead = _worker_peak_rss_mb(replace(base, shuffle_buffer=0), steps)
    print(f"== rss: peak RSS of the one loader worker holding all 8 streams (crop 320, 1024x512 JPEGs, {steps} steps)")
    print(f"no shuffle buffer: {overhead:.0f} MB (the fixed overhead)")
    for budget in (32, 128):
        peak = _worker_peak_rss_mb(replace(base, shuffle_buffer_mb=float(budget)), steps)
        print(f"budget {budget} MB: peak {peak:.0f} MB, above the overhead {peak - overhead:.0f} MB "
              f"= {(peak - overhead) / budget:.2f} x budget")


# ------------------------------------------------------------------------------------------ decode


def section_decode(args: argparse.Namespace, workdir: Path) -> None:
    from primaps_dist.data.shards import Encoded, Resize, resize_encoded
    from primaps_dist.data.transforms import decode_sample, train_crop_box

    rng = np.random.default_rng(5)
    pngs, jpegs = [], []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(photo_like(rng, 1024, 2048)).save(buffer, format="PNG", compress_level=3)
        pngs.append(buffer.getvalue())
        encoded = Encoded("k", "png", buffer.getvalue(), None, 2048, 1024, None)
        jpegs.append(resize_encoded(encoded, Resize(512, 90)).image_bytes)

    def rate(samples: list[bytes], ext: str) -> float:
        crop_rng = np.random.default_rng(0)
        begin = time.perf_counter()
        for _ in range(2):
            for data in samples:
                decode_sample({ext: data}, with_labels=False,
                              make_box=lambda size: train_crop_box(size, 320, (1.0, 1.5), True, crop_rng))
        return 2 * len(samples) / (time.perf_counter() - begin)

    png_rate, jpeg_rate = rate(pngs, "png"), rate(jpegs, "jpg")
    print("== decode + crop 320 per worker (one process): Cityscapes-size PNG vs --resize-short 512 JPEG q90")
    print(f"PNG 2048x1024: {png_rate:.1f} images/s ({np.mean([len(b) for b in pngs]) / 1e6:.2f} MB each); "
          f"JPEG 1024x512: {jpeg_rate:.1f} images/s ({np.mean([len(b) for b in jpegs]) / 1e6:.3f} MB each); "
          f"ratio {jpeg_rate / png_rate:.1f}x")


SECTIONS = {
    "elastic": section_elastic,
    "egress": section_egress,
    "resume": section_resume,
    "rss": section_rss,
    "decode": section_decode,
}
