"""Throughput of batched PriMaPs (``mask_logits``) vs the per-image reference loop, and peak memory.

The reference is the straightforward per-image implementation in ``primaps_dist/testing/primaps_reference.py`` with
the paper's solver (``torch.pca_lowrank(q=3, niter=100)`` per proposal, its sign as returned); the
agreement of the label maps with it (adjusted Rand index, proposal counts) is printed over 3 seeds. Both run on the same CPU
with the same thread count, interleaved (ours, reference chunk, ours, ...), so machine load affects
both alike; the ratio of per-image times is printed. Peak memory per image is measured in fresh
subprocesses (RSS high-water mark, or CUDA allocator peak on GPU).

    python bench/bench_primaps.py                      # 32 maps of 384x40x40, planted regions + noise
    python bench/bench_primaps.py --features real      # EfficientNet-Lite0 features of bundled photos
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from primaps_dist.primaps import mask_logits, principal_masks  # noqa: E402
from primaps_dist.primaps.native import forced_mode, native_kernel  # noqa: E402
from primaps_dist.testing.primaps_reference import (  # noqa: E402
    oracle_agreement,
    planted_features,
    reference_logits,
    reference_proposals,
)


def make_features(args: argparse.Namespace, batch: int, channels: int) -> torch.Tensor:
    if args.features == "real":
        from primaps_dist.testing.photo_features import PHOTOS, photo_features

        names = [PHOTOS[i % len(PHOTOS)] for i in range(batch)]
        return photo_features(names, stage=args.stage)[1].contiguous()
    return planted_features(batch, channels=channels, size=args.size, regions=args.regions, noise=args.noise,
                            seed=args.seed)


def reference_label_maps(features: torch.Tensor) -> tuple[list[np.ndarray], list[int]]:
    maps, counts = [], []
    for index in range(features.shape[0]):
        proposals = reference_proposals(features[index], seed=0)
        maps.append(reference_logits(proposals).argmax(0).numpy())
        counts.append(len(proposals))
    return maps, counts


def peak_memory_child(batch: int, channels: int, size: int, device: str) -> None:
    """Runs in a subprocess: prints the peak extra memory (bytes) of mask_logits on [batch, C, size, size]."""
    features = torch.randn(batch, channels, size, size, device=device) + 0.5
    # Planted structure so the run takes a realistic number of rounds.
    features[:, :, : size // 2] += 2.0 * torch.randn(1, channels, 1, 1, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mask_logits(features)
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - base)
        return
    mask_logits(features[:1, :, :4, :4])  # load kernels outside the measurement
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the RSS high-water mark (VmHWM)
        handle.write("5")
    mask_logits(features)
    print(_rss_bytes("VmHWM") - base)


def _rss_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(batch: int, channels: int, size: int, device: str, threads: int) -> int:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({threads}); "
            f"from bench.bench_primaps import peak_memory_child; "
            f"peak_memory_child({batch}, {channels}, {size}, {device!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--regions", type=int, default=24, help="planted regions per map")
    parser.add_argument("--noise", type=float, default=1.0, help="noise std of planted maps")
    parser.add_argument("--features", choices=("planted", "real"), default="planted")
    parser.add_argument("--stage", type=int, default=3, help="EfficientNet-Lite0 stage for --features real")
    parser.add_argument("--ref-images", type=int, default=6, help="images the reference loop processes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours, interleaved with the reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-channels", type=int, default=768)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    features = make_features(args, args.batch, args.channels).to(args.device)
    native = native_kernel(features.device) is not None
    print(f"features {tuple(features.shape)} ({args.features}), device {args.device}, threads {args.threads}, "
          f"proposal path: {'C++ kernel (primaps/native)' if native else 'batched torch loop'}")
    mask_logits(features[:2])  # warm-up

    # CPU time of this process is the primary measure (other processes on a shared machine inflate
    # wall time); wall time is printed too.
    ours_cpu, ours_wall, reference_cpu, reference_wall, reference_maps, reference_counts = [], [], 0.0, 0.0, [], []
    batched_cpu, batched_same = [], True
    chunks = np.array_split(np.arange(min(args.ref_images, args.batch)), args.repeats)
    logits = None
    for chunk in chunks:
        wall, cpu = time.perf_counter(), time.process_time()
        logits = mask_logits(features)
        if features.is_cuda:
            torch.cuda.synchronize()
        ours_cpu.append(time.process_time() - cpu)
        ours_wall.append(time.perf_counter() - wall)
        if native:  # the batched loop too (the path accelerators take), side by side
            cpu = time.process_time()
            with forced_mode("0"):
                batched_logits = mask_logits(features)
            batched_cpu.append(time.process_time() - cpu)
            batched_same &= torch.equal(batched_logits.argmax(1), logits.argmax(1))
        wall, cpu = time.perf_counter(), time.process_time()
        maps, counts = reference_label_maps(features[chunk].cpu())
        reference_cpu += time.process_time() - cpu
        reference_wall += time.perf_counter() - wall
        reference_maps += maps
        reference_counts += counts

    _, counts = principal_masks(features)
    counts = counts.cpu().numpy()
    checked = len(reference_maps)
    labels = logits.argmax(1).cpu().numpy()
    print(f"proposals per image (ours, all {args.batch}): mean {counts.mean():.1f}, min {counts.min()}, "
          f"max {counts.max()}")
    # Untimed: the oracle (pca_lowrank as published) is randomised, so agreement is measured over seeds.
    agreement = oracle_agreement(features[:checked].cpu(), labels[:checked], counts[:checked], seeds=(0, 1, 2))
    print(f"reference subset ({checked} images): counts {reference_counts} vs ours {counts[:checked].tolist()}; "
          f"{agreement.summary()}")
    ratios = {}
    for name, ours, reference in (("cpu", ours_cpu, reference_cpu), ("wall", ours_wall, reference_wall)):
        ours_per_image = float(np.median(ours)) / args.batch
        reference_per_image = reference / checked
        ratios[name] = reference_per_image / ours_per_image
        print(f"[{name:4s}] ours {np.median(ours):.3f} s per batch of {args.batch} (runs "
              f"{np.round(ours, 3).tolist()}) = {1000 * ours_per_image:.1f} ms/image; reference "
              f"{1000 * reference_per_image:.1f} ms/image -> throughput ratio {ratios[name]:.1f}x")
    print(f"throughput ratio (reference / ours, per image, CPU time): {ratios['cpu']:.1f}x")
    if native:
        ratios["cpu_batched"] = reference_cpu / checked / (float(np.median(batched_cpu)) / args.batch)
        print(f"[cpu ] batched torch loop {np.median(batched_cpu):.3f} s per batch -> throughput ratio "
              f"{ratios['cpu_batched']:.1f}x; C++ kernel / batched: {np.median(batched_cpu) / np.median(ours_cpu):.2f}x "
              f"faster; same label maps: {batched_same}")

    if not args.skip_memory:
        channels, size = args.memory_channels, args.size
        one = measure_peak(1, channels, size, args.device, args.threads)
        many = measure_peak(9, channels, size, args.device, args.threads)
        print(f"peak memory, C={channels}, {size}x{size}: batch 1 {one / 2**20:.1f} MiB, batch 9 "
              f"{many / 2**20:.1f} MiB -> {(many - one) / 8 / 2**20:.1f} MiB per additional image "
              f"(input features {channels * size * size * 4 / 2**20:.1f} MiB/image not included)")
    summary = {"ratio_cpu": ratios["cpu"], "ratio_wall": ratios["wall"], "ari_mean": float(agreement.ari.mean()),
               "ari_min": float(agreement.ari.min()), "ari_mean_reproducible": float(agreement.ari[agreement.stable].mean()),
               "counts_equal": float(agreement.counts_equal.mean()),
               "proposals_mean": float(counts.mean()), "native": native,
               "ratio_cpu_batched": ratios.get("cpu_batched")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
