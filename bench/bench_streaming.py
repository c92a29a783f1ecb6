"""Streaming benchmarks (issue 12), one function per section; run all or some with ``--sections``.

Sections:

- ``local_vs_remote``: training-loader images/s from the same shards on the local disk, over HTTP
  (``python -m http.server`` on loopback) and over S3 (``moto_server`` on loopback), with the loader's prefetch
  of the next shard, and over S3 into a cold ``data.cache_dir``; also raw shard read MB/s (no decoding) per
  source. Rounds alternate the sources and the best round of each counts, so that load from other processes hits
  all of them alike. Prints remote / local ratios (target: >= 0.8).

- ``elastic``, ``egress``, ``resume``, ``rss``, ``decode``: the elastic training order (bench/streaming_elastic.py):
  max prototype difference across W and workers, egress factor at W = 4, time to the first batch fresh vs resumed
  late, peak worker RSS vs the shuffle-buffer byte budget, decode images/s of Cityscapes-size PNG vs resized JPEG.

Absolute numbers depend on the machine and its load; compare the ratios printed side by side.

Usage: python bench/bench_streaming.py [--sections local_vs_remote] [--shards 8] [--per-shard 32]
       [--size 512x384] [--workers 2] [--batches 24] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from primaps_dist.config import DataConfig  # noqa: E402
from primaps_dist.testing.http_server import HttpServerProcess, free_port, wait_for_port  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _datasets import write_dataset  # noqa: E402
from streaming_elastic import SECTIONS as ELASTIC_SECTIONS  # noqa: E402


# ------------------------------------------------------------------------------------------ shared helpers


def best_of(rounds: int, sources: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each source measured once per round, sources alternating; the best (highest) value of each."""
    best = {name: 0.0 for name in sources}
    for _ in range(rounds):
        for name, measure in sources.items():
            best[name] = max(best[name], measure())
    return best


# ------------------------------------------------------------------------------------------ local vs HTTP vs S3


class LoopbackServers:
    """``python -m http.server`` and ``moto_server`` serving ``folder`` (as ``s3://bench/data/``) on loopback."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.http = HttpServerProcess(folder)
        self.s3_port = free_port()
        self.moto: subprocess.Popen | None = None

    def __enter__(self) -> "LoopbackServers":
        self.http.start(wait=False)
        moto = Path(sys.executable).with_name("moto_server")
        self.moto = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.http.port)
        wait_for_port(self.s3_port)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_port}")
        import boto3

        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        for path in sorted(self.folder.iterdir()):
            client.upload_file(str(path), "bench", f"data/{path.name}")
        return self

    def __exit__(self, *exc) -> None:
        self.http.kill()
        if self.moto is not None:
            self.moto.kill()
            self.moto.wait()

    @property
    def specs(self) -> dict[str, str]:
        return {"local": str(self.folder), "http": f"{self.http.url}/", "s3": "s3://bench/data/"}


def loader_rate(spec: str, workers: int, batches: int, batch: int, crop: int, cache_dir: str = "") -> float:
    """Training-loader images/s (decode + crop included) after the first batch (worker start-up excluded).
    ``cache_dir``: a fresh (cold) data.cache_dir, so shards are downloaded whole during the measurement."""
    from primaps_dist.data.loader import make_train_loader

    if cache_dir:
        cache_dir = tempfile.mkdtemp(dir=cache_dir)
    cfg = DataConfig(train_shards=spec, num_classes=4, crop_size=crop, train_scale=[1.0, 1.0],
                     global_batch_size=batch, batch_size=batch, num_workers=workers, shuffle_buffer=64,
                     cache_dir=cache_dir)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    try:
        next(loader)
        start = time.perf_counter()
        images = sum(len(next(loader)["key"]) for _ in range(batches))
        return images / (time.perf_counter() - start)
    finally:
        loader.close()


def read_rate(spec: str) -> float:
    """Raw shard read MB/s through read_shard (tar parsing, no decoding), all shards in order."""
    from primaps_dist.data.shardio import read_shard
    from primaps_dist.data.sources import resolve_shards

    refs = resolve_shards(spec, DataConfig(train_shards=spec))
    start = time.perf_counter()
    total = sum(len(item.get("jpg", b"")) for ref in refs for item in read_shard(ref) if isinstance(item, dict))
    return total / (time.perf_counter() - start) / 1e6


def section_local_vs_remote(args: argparse.Namespace, workdir: Path) -> None:
    width, height = (int(v) for v in args.size.split("x"))
    folder = workdir / "remote_bench"
    total = write_dataset(folder, args.shards, args.per_shard, (width, height))
    print(f"== local vs HTTP vs S3 (loopback): {args.shards} shards x {args.per_shard} JPEGs {width}x{height}, "
          f"{total / 1e6:.1f} MB; loader: {args.workers} workers, batch {args.batch}, crop {args.crop}")
    with LoopbackServers(folder) as servers:
        specs = servers.specs
        reads = best_of(args.rounds, {name: (lambda s=spec: read_rate(s)) for name, spec in specs.items()})
        measures = {name: (lambda s=spec: loader_rate(s, args.workers, args.batches, args.batch, args.crop))
                    for name, spec in specs.items()}
        measures["s3+cache"] = lambda: loader_rate(specs["s3"], args.workers, args.batches, args.batch, args.crop,
                                                   cache_dir=str(workdir))
        loads = best_of(args.rounds, measures)
    print(f"{'source':<10}{'raw read MB/s':>16}{'ratio':>8}{'loader images/s':>18}{'ratio':>8}")
    for name in loads:
        raw = f"{reads[name]:>16.1f}{reads[name] / reads['local']:>8.2f}" if name in reads else f"{'':>24}"
        print(f"{name:<10}{raw}{loads[name]:>18.1f}{loads[name] / loads['local']:>8.2f}")
    worst = min(loads["http"], loads["s3"], loads["s3+cache"]) / loads["local"]
    print(f"remote loader / local, worst of the remote rows: {worst:.2f} (target >= 0.8)")


# ------------------------------------------------------------------------------------------ main


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "local_vs_remote": section_local_vs_remote,
    **ELASTIC_SECTIONS,  # elastic order, egress, resume, RSS vs budget, decode speed (bench/streaming_elastic.py)
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--size", default="512x384", help="image width x height")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    with tempfile.TemporaryDirectory(prefix="bench_streaming_") as tmp:
        for name in chosen:
            SECTIONS[name](args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
