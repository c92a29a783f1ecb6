"""Dense CRF benchmark: torch backend vs the pydensecrf reference, side by side in one run.

Usage:  python bench/bench_crf.py [--batch 8] [--size 320] [--labels 6] [--repeats 2] [--threads 1 2]
                                  [--downsample 1 2 4]

Prints, for PriMaPs-like log-probabilities on real photos (scikit-image's bundled images) and for each
``downsample`` factor of the torch backend (1 = every update at full resolution): argmax agreement with
pydensecrf, seconds per batch for both backends (wall and process CPU time, the latter is the steadier
number on a shared machine), the throughput ratio per torch thread count, the split of the torch time
(set-up: lattice build + Gaussian, vs the 10 iterations), the CUDA time when a GPU is present, and the
peak extra memory of one call (fresh subprocess). For scale, it also prints how far pydensecrf itself
moves with fewer iterations (3 and 5 instead of 10). pydensecrf is single-threaded; the torch default
is 1 thread (on a loaded 2-core host more threads oversubscribe badly). About 2 min.
The samples come from primaps_dist.testing.crf_samples (shared with tests/test_crf.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

from primaps_dist.testing.crf_samples import sample_batch

# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Best-of-``repeats`` (wall seconds, process CPU seconds) of ``fn()`` after one warm-up call."""
    fn()
    _synchronize(device)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        _synchronize(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def torch_build(logits: torch.Tensor, images: torch.Tensor, downsample: int = 1) -> None:
    """What :func:`primaps_dist.crf.dense_crf` builds before its iterations (default parameters)."""
    from primaps_dist.crf import grid_size, pairwise_operators
    from primaps_dist.crf.defaults import REFERENCE

    grid = grid_size(*logits.shape[2:], downsample)
    pairwise_operators(images, grid, gaussian_sxy=REFERENCE.gaussian_sxy, gaussian_weight=REFERENCE.gaussian_weight,
                       bilateral_sxy=REFERENCE.bilateral_sxy, bilateral_srgb=REFERENCE.bilateral_srgb,
                       bilateral_weight=REFERENCE.bilateral_weight)


def pydensecrf_batch(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    from primaps_dist.crf import dense_crf

    return dense_crf(logits, images, backend="pydensecrf")


def peak_memory_mib(batch: int, size: int, labels: int, device: str, downsample: int = 1) -> float:
    """Peak extra memory (MiB) of one torch CRF call, measured in a fresh process.

    CPU: growth of the peak resident set (VmHWM, reset just before the call); CUDA: max allocated.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import bench_crf as b; "
        f"print(b._peak_memory_child({batch}, {size}, {labels}, {device!r}, {downsample}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_memory_child(batch: int, size: int, labels: int, device: str, downsample: int = 1) -> float:
    from primaps_dist.crf import dense_crf

    torch.set_num_threads(1)
    logits, images = sample_batch(batch, size, labels)
    logits, images = logits.to(device), images.to(device)
    dense_crf(logits[:1, :, :8, :8].contiguous(), images[:1, :, :8, :8].contiguous())  # load kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        dense_crf(logits, images, downsample=downsample)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (Linux >= 4.0)
        before = _resident_mib("VmRSS")
        dense_crf(logits, images, downsample=downsample)
        return _resident_mib("VmHWM") - before
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        dense_crf(logits, images, downsample=downsample)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--labels", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs (after a warm-up)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU thread counts to time")
    parser.add_argument("--downsample", type=int, nargs="+", default=[1, 2, 4],
                        help="crf.downsample factors of the torch backend to measure")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    args = parser.parse_args(argv)

    from primaps_dist.crf import dense_crf

    logits, images = sample_batch(args.batch, args.size, args.labels)
    shape = f"batch {args.batch} x {args.labels} labels x {args.size}x{args.size}"
    print(f"dense CRF, 10 iterations, reference parameters, {shape}; times are best of {args.repeats}")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")

    torch.set_num_threads(1)
    reference = pydensecrf_batch(logits, images)
    no_crf = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    print(f"unary argmax alone vs pydensecrf: {100 * no_crf:.2f} %")
    for iterations in (3, 5):
        fewer = dense_crf(logits, images, iterations=iterations, backend="pydensecrf")
        moved = (fewer.argmax(1) == reference.argmax(1)).float().mean().item()
        print(f"pydensecrf with {iterations} iterations vs 10: {100 * moved:.2f} %")
    ref_wall, ref_cpu = timed(lambda: pydensecrf_batch(logits, images), args.repeats)
    print(f"pydensecrf (1 process):    {ref_wall:6.2f} s wall  {ref_cpu:6.2f} s CPU per batch")
    for factor in args.downsample:
        torch.set_num_threads(1)
        ours = dense_crf(logits, images, downsample=factor)
        agreement = (ours.argmax(1) == reference.argmax(1)).float().mean(dim=(1, 2))
        print(f"torch, downsample {factor}: argmax agreement with pydensecrf {100 * agreement.mean():.2f} % "
              f"(worst image {100 * agreement.min():.2f} %)")
        for threads in args.threads:
            torch.set_num_threads(threads)
            wall, cpu = timed(lambda: dense_crf(logits, images, downsample=factor), args.repeats)
            build_wall, _ = timed(lambda: torch_build(logits, images, factor), args.repeats)
            print(
                f"    {threads} thread(s): {wall:6.2f} s wall {cpu:6.2f} s CPU per batch   "
                f"throughput x{ref_wall / wall:.2f} of pydensecrf (wall), x{ref_cpu / cpu:.2f} (CPU time); "
                f"set-up {build_wall:5.2f} s ({100 * build_wall / wall:.0f} %)"
            )
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        logits_gpu, images_gpu = logits.to(device), images.to(device)
        for factor in args.downsample:
            wall, _ = timed(lambda: dense_crf(logits_gpu, images_gpu, downsample=factor), args.repeats, device)
            build_wall, _ = timed(lambda: torch_build(logits_gpu, images_gpu, factor), args.repeats, device)
            print(
                f"torch {torch.cuda.get_device_name()}, downsample {factor}: {wall:6.3f} s per batch, "
                f"set-up {build_wall:6.3f} s, throughput x{ref_wall / wall:.1f} of pydensecrf"
            )
    if not args.no_memory:
        for factor in args.downsample:
            cpu_peak = peak_memory_mib(args.batch, args.size, args.labels, "cpu", factor)
            print(f"peak extra memory of one torch CPU call, downsample {factor}: {cpu_peak:.0f} MiB "
                  f"({cpu_peak / args.batch:.0f} MiB per image)")
            if torch.cuda.is_available():
                gpu_peak = peak_memory_mib(args.batch, args.size, args.labels, "cuda", factor)
                print(f"peak extra GPU memory of one call, downsample {factor}: {gpu_peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
