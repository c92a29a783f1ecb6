"""The elastic training order: which sample sits at which place of which global batch.

The global sample sequence is a function of (seed, data set, global batch size G, step) only; how many
ranks, nodes or loader workers read it does not enter (MosaicML Streaming calls this elastic determinism).

* The data set is a list of shards with known sample counts (:func:`shard_sample_counts`: make-shards'
  ``index.json``, else the tar headers of local shards).
* *Units* are the shards, or with fewer shards than streams, ``ceil(L / shards)`` contiguous sample ranges of
  each shard (:func:`make_units`). Slots 0, 1, 2, ...: slot ``i`` holds unit ``perm_e[i mod n]`` with
  ``e = i div n`` and ``perm_e`` a permutation of the n units seeded by (seed, salt, e): epochs.
* ``L`` logical streams (``data.streams``, default G). Stream ``s`` reads the slots ``s, s + L, s + 2L, ...``
  one after the other, sequentially within each unit; the samples of one visit come out in the order of a
  shuffle buffer of ``capacity`` samples (:func:`emission_order`), emptied at the end of the visit.
* Step t's global batch takes the next ``q = G / L`` usable samples of every stream; unusable samples
  (corrupt, missing) are skipped and counted, so the batch size stays G and the skips are the same on any
  number of GPUs.
* The crop of a sample is drawn from a generator seeded by (seed, salt, slot, index in shard).
* Ranks own contiguous blocks of ``L / W`` streams, loader workers own streams round-robin within the rank,
  so each unit visit is read by exactly one worker: with at least as many shards as streams the egress factor is 1
  (bytes fetched / data-set bytes per pass), plus the unread head of the current shard re-read once after a
  resume (local shards skip it by the tar headers). With fewer shards than streams a remote shard is read by
  each of its ranges' streams up to that range's end, unless ``data.cache_dir`` holds it.

A position is ``{stream: [visit, emitted]}``: resuming re-reads the current shard up to its place (tar
bytes only; samples already handed out are not decoded) and nothing before it.
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from primaps_dist.errors import ConfigError

_TAG_SLOTS = 0x534C_4F54
_TAG_VISIT = 0x5649_5354
_TAG_CROP = 0x4352_4F50


def _u63(value: int) -> int:
    return int(value) % (1 << 63)


# ------------------------------------------------------------------------------------------ sample counts


def _index_counts(folder: str) -> dict[str, int]:
    """``{shard file name: num_samples}`` from make-shards' index.json in ``folder`` (empty without one)."""
    path = os.path.join(folder, "index.json")
    try:
        with open(path) as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return {}
    shards = index.get("shards") if isinstance(index, dict) else None
    counts = {}
    for entry in shards or []:
        if isinstance(entry, dict) and isinstance(entry.get("num_samples"), int):
            counts[str(entry.get("name"))] = entry["num_samples"]
    return counts


def count_tar_samples(path: str) -> int:
    """Samples in a local tar shard by its headers (member data is skipped, not read): the number of runs of
    consecutive members with the same key that have an extension, up to a member cut off by the end of the file;
    0 for an unreadable or empty file."""
    from webdataset.tariterators import base_plus_ext

    count, previous = 0, None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as archive:
            for info in archive:
                if not info.isreg():
                    continue
                prefix, _ = base_plus_ext(info.name)
                if info.offset_data + info.size > size:  # cut off: its sample is incomplete
                    count -= int(prefix is not None and prefix == previous)
                    break
                if prefix is not None and prefix != previous:
                    count += 1
                previous = prefix
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    return count


def _count_by_reading(shard: str) -> int:
    from .shardio import read_shard

    return sum(isinstance(item, dict) for item in read_shard(shard))


def shard_sample_counts(shards: list[str] | tuple[str, ...]) -> list[int]:
    """Samples per shard: the data-set index's count carried by a :class:`~.sources.ShardRef`, else make-shards'
    ``index.json`` next to local shards, else a header scan of a local shard (:func:`count_tar_samples`), else
    (a remote shard or ``pipe:`` without an index) one full read of the shard."""
    by_folder: dict[str, dict[str, int]] = {}
    counts = []
    for shard in shards:
        known = getattr(shard, "n_samples", None)
        if known is None and os.path.isfile(str(shard)):
            folder, name = os.path.split(str(shard))
            if folder not in by_folder:
                by_folder[folder] = _index_counts(folder)
            known = by_folder[folder].get(name)
            if known is None:
                known = count_tar_samples(str(shard))
        counts.append(int(known) if known is not None else _count_by_reading(shard))
    return counts


# ------------------------------------------------------------------------------------------ the layout


@dataclass(frozen=True)
class Layout:
    """Streams, batch split and buffer size of one training run (see the module docstring)."""

    global_batch: int  # G
    streams: int  # L
    world_size: int  # W
    capacity: int  # shuffle-buffer samples per stream (1 = file order)

    @property
    def per_stream(self) -> int:
        """Samples each stream gives to every global batch (q = G / L)."""
        return self.global_batch // self.streams

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    def rank_streams(self, rank: int) -> range:
        block = self.streams // self.world_size
        return range(rank * block, (rank + 1) * block)

    def worker_streams(self, rank: int, worker: int, num_workers: int) -> list[int]:
        return list(self.rank_streams(rank))[worker::max(1, num_workers)]


def make_layout(data_cfg, world_size: int, sample_bytes: int) -> Layout:
    """The run's :class:`Layout` from ``data.global_batch_size`` (0: ``data.batch_size`` x W), ``data.streams``
    (0: G), ``data.shuffle_buffer`` (samples, all streams together) and ``data.shuffle_buffer_mb`` (their byte
    budget: a worker holds at most all L buffers, each of ``sample_bytes`` per sample). ConfigError when the
    numbers do not divide."""
    global_batch = int(getattr(data_cfg, "global_batch_size", 0) or 0) or data_cfg.batch_size * world_size
    if global_batch % world_size:
        raise ConfigError("data.global_batch_size",
                          f"{global_batch} is not divisible by the number of ranks {world_size}")
    streams = int(getattr(data_cfg, "streams", 0) or 0) or global_batch
    if global_batch % streams:
        raise ConfigError("data.streams", f"{streams} does not divide data.global_batch_size={global_batch}")
    if streams % world_size:
        raise ConfigError("data.streams", f"{streams} is not divisible by the number of ranks {world_size} "
                                          f"(set data.streams to a multiple of it)")
    capacity = max(1, data_cfg.shuffle_buffer // streams) if data_cfg.shuffle_buffer > 0 else 1
    budget_mb = float(getattr(data_cfg, "shuffle_buffer_mb", 0) or 0)
    if budget_mb > 0:
        capacity = max(1, min(capacity, int(budget_mb * 2**20) // (streams * max(1, sample_bytes))))
    return Layout(global_batch, streams, world_size, capacity)


# ------------------------------------------------------------------------------------------ the order


@functools.lru_cache(maxsize=64)
def _epoch_permutation(seed: int, salt: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    rng = np.random.default_rng([_TAG_SLOTS, _u63(seed), _u63(salt), epoch])
    return tuple(int(i) for i in rng.permutation(num_shards))


def shard_of_slot(seed: int, salt: int, slot: int, num_shards: int) -> int:
    """The unit (see :func:`make_units`) at ``slot``: epoch permutation ``slot div n`` at ``slot mod n``."""
    epoch, offset = divmod(slot, num_shards)
    return _epoch_permutation(seed, salt, epoch, num_shards)[offset]


def make_units(counts: list[int] | tuple[int, ...], streams: int) -> tuple[tuple[int, int, int], ...]:
    """What slots hold: ``(shard, first sample, end)`` ranges. With fewer shards than streams each shard is split
    into ``ceil(L / n)`` contiguous ranges, so that the streams of one epoch read different samples (otherwise
    several streams would read the same shard at once, in different epochs, and a batch could hold a sample
    twice); an empty shard stays one empty unit (its problems are reported once)."""
    parts = max(1, -(-streams // max(1, len(counts))))
    units = []
    for shard, count in enumerate(counts):
        ranges = [split_range(count, parts, part) for part in range(parts)]
        kept = [(shard, start, end) for start, end in ranges if end > start]
        units.extend(kept or [(shard, 0, 0)])
    return tuple(units)


def emission_order(count: int, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``capacity`` samples hands out items ``0..count-1`` read in file
    order, as int64 ``[count]``. When ``order[e]`` is handed out, at most ``e + capacity`` items have been
    read, so a reader holds at most ``capacity`` decoded samples."""
    if capacity <= 1 or count <= 1:
        return np.arange(count, dtype=np.int64)
    buffer: list[int] = []
    order: list[int] = []
    for item in range(count):
        if len(buffer) < capacity:
            buffer.append(item)
            continue
        slot = int(rng.integers(capacity))
        order.append(buffer[slot])
        buffer[slot] = item
    while buffer:
        slot = int(rng.integers(len(buffer)))
        buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
        order.append(buffer.pop())
    return np.asarray(order, dtype=np.int64)


def visit_order(seed: int, salt: int, slot: int, count: int, capacity: int) -> np.ndarray:
    return emission_order(count, capacity, np.random.default_rng([_TAG_VISIT, _u63(seed), _u63(salt), slot]))


def crop_rng(seed: int, salt: int, slot: int, index: int) -> np.random.Generator:
    """The generator of one sample's crop: a function of its place in the data, not of who reads it."""
    return np.random.default_rng([_TAG_CROP, _u63(seed), _u63(salt), slot, index])


# ------------------------------------------------------------------------------------------ evaluation split


def split_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """Contiguous part ``part`` of ``parts`` of ``range(total)``; part sizes differ by at most one."""
    return part * total // parts, (part + 1) * total // parts


def eval_ranges(counts: list[int], rank: int, world_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Global sample positions [start, end) of each loader worker of ``rank``: the ranks split the samples of
    all shards (in shard order) into W contiguous parts within one sample of each other, each rank's workers
    split its part the same way."""
    start, end = split_range(sum(counts), world_size, rank)
    return [tuple(start + bound for bound in split_range(end - start, num_workers, worker))
            for worker in range(num_workers)]
