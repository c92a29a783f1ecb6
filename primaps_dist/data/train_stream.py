"""The worker side of the elastic training stream: logical streams -> decoded samples -> per-step pieces.

The order itself (slots, visits, shuffle-buffer emission order, crop seeds) is :mod:`.order`. Here a loader
worker runs the streams it owns: each stream reads its current shard sequentially, decodes and crops an item
when it is read (unless it was handed out before a resume), holds at most ``capacity`` decoded crops, and hands
them out in the visit's emission order. For every step the worker yields one *piece*: the next ``q`` usable
samples of each of its streams, uint8, plus the streams' new positions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from primaps_dist.errors import UserError
from primaps_dist.labels import IGNORE_INDEX

from .order import Layout, crop_rng, make_units, shard_of_slot, visit_order
from .remote_cache import prefetch_shards
from .shardio import ShardProblem, read_shard
from .transforms import SampleError, decode_sample, train_crop_box

log = logging.getLogger("primaps_dist.data")

MIN_ITEMS_FOR_CORRUPT_CHECK = 50
MAX_UNUSABLE_IN_A_ROW = 1000
_WARN_FIRST = 5
_WARN_EVERY = 100


@dataclass
class Tally:
    """Per-worker count of unusable items; raises when they exceed the configured fraction."""

    max_fraction: float
    where: str
    max_in_a_row: int = MAX_UNUSABLE_IN_A_ROW
    seen: int = 0
    skipped: int = 0
    in_a_row: int = 0
    bad_shards: dict[str, int] = field(default_factory=dict)

    def add_ok(self) -> None:
        self.seen += 1
        self.in_a_row = 0

    def add_problem(self, problem: ShardProblem) -> None:
        self.seen += 1
        self.skipped += 1
        self.in_a_row += 1
        self.bad_shards[problem.shard] = self.bad_shards.get(problem.shard, 0) + 1
        if self.skipped <= _WARN_FIRST or self.skipped % _WARN_EVERY == 0:
            log.warning("skipped unusable sample (%d so far, %s): %s", self.skipped, self.where, problem.describe())
        too_many = self.seen >= MIN_ITEMS_FOR_CORRUPT_CHECK and self.skipped > self.max_fraction * self.seen
        # Even with max_corrupt_fraction = 1 an endless stream of unusable items must end, not spin.
        if too_many or self.in_a_row >= self.max_in_a_row:
            worst = sorted(self.bad_shards.items(), key=lambda kv: -kv[1])[:5]
            names = ", ".join(f"{path} ({n})" for path, n in worst)
            limit = (
                f"more than data.max_corrupt_fraction={self.max_fraction}"
                if too_many
                else f"the last {self.in_a_row} in a row"
            )
            raise UserError(
                f"{self.skipped} of {self.seen} samples read by {self.where} are unusable, {limit}; "
                f"shards with problems: {names}"
            )


def check_label_ids(label: np.ndarray, num_classes: int, shard: str, key: str, config_key: str) -> None:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        found = sorted(set(np.unique(label[bad]).tolist()))[:8]
        raise UserError(
            f"{shard} key {key}: label ids {found} are >= data.num_classes={num_classes} "
            f"(and not the ignore id {IGNORE_INDEX}); fix {config_key} or data.num_classes"
        )


@dataclass(frozen=True)
class StreamSpec:
    """Everything a training worker needs; plain data so it pickles under any start method."""

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    shards_key: str
    layout: Layout
    crop: int
    num_classes: int
    max_corrupt_fraction: float
    rank: int
    num_workers: int  # logical workers (>= 1)
    with_labels: bool
    seed: int
    salt: int
    scale_range: tuple[float, float]
    hflip: bool
    start_step: int = 0
    positions: tuple[tuple[int, int, int], ...] = ()  # (stream, visit, emitted) to resume from


@dataclass
class Decoded:
    image: np.ndarray  # uint8 [S, S, 3]
    label: np.ndarray | None  # uint8 [S, S]
    key: str
    shard: str


def _decode(spec: StreamSpec, item: dict, slot: int, index: int) -> Decoded | ShardProblem:
    rng = crop_rng(spec.seed, spec.salt, slot, index)
    try:
        image, label = decode_sample(
            item,
            with_labels=spec.with_labels,
            make_box=lambda size: train_crop_box(size, spec.crop, spec.scale_range, spec.hflip, rng),
        )
    except SampleError as err:
        return ShardProblem(item["__shard__"], item["__key__"], str(err))
    if label is not None:
        check_label_ids(label, spec.num_classes, item["__shard__"], item["__key__"], spec.shards_key)
    return Decoded(image, label, item["__key__"], item["__shard__"])


def stream_events(
    spec: StreamSpec, stream: int, visit: int, emitted: int, opened: Callable[[str], None]
) -> Iterator[tuple[int, int, Decoded | ShardProblem]]:
    """Stream ``stream``'s infinite sequence from position (``visit``, ``emitted``): ``(visit, emitted after,
    sample or problem)``. A problem met while reading (not a sample slot) keeps ``emitted`` unchanged."""
    layout = spec.layout
    units = make_units(spec.counts, layout.streams)
    while True:
        slot = stream + visit * layout.streams
        shard, start, end = units[shard_of_slot(spec.seed, spec.salt, slot, len(units))]
        path = spec.shards[shard]
        following = units[shard_of_slot(spec.seed, spec.salt, slot + layout.streams, len(units))][0]
        prefetch_shards([spec.shards[following]])  # remote shards: the next visit downloads while this one is read
        first_epoch = slot < len(units)
        if end == start:
            # An empty or unreadable shard is read and its problems counted at its first-epoch visit only; later
            # epochs pass over it (counting it again every epoch would inflate the skipped total without end).
            if emitted == 0 and first_epoch:
                opened(path)
                for item in read_shard(path):
                    if isinstance(item, ShardProblem):
                        yield visit, 0, item
        elif emitted < end - start:
            yield from _visit(spec, visit, slot, path, (start, end, spec.counts[shard]), emitted, first_epoch, opened)
        visit, emitted = visit + 1, 0


def _local_samples_from(path: str, first: int) -> Iterator[tuple[int, dict | ShardProblem]]:
    """(index, raw sample) of a local tar shard from sample ``first`` on, found through the tar headers: the
    members of earlier samples are skipped by seeking, not read (what makes a resume late in a shard cheap)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    index, previous, pending = -1, None, None
    try:
        with tarfile.open(path, mode="r:") as archive:
            for info in archive:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != previous:
                    if pending is not None:
                        yield index, pending
                    index, previous, pending = index + 1, prefix, None
                    if index >= first:
                        pending = {"__key__": prefix, "__shard__": path}
                if pending is not None:
                    pending[suffix.lower()] = archive.extractfile(info).read()
                archive.members = []  # keep no headers
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        yield -1, ShardProblem(path, previous, f"truncated or corrupt tar ({err})")
        return
    if pending is not None:
        yield index, pending


def _numbered_samples(path: str, first: int) -> Iterator[tuple[int, dict | ShardProblem]]:
    """(index, raw sample) from sample ``first`` on, and (-1, problem); local shards skip to ``first`` by their
    headers, other sources read the samples before it (tar bytes only, not decoded)."""
    if first > 0 and os.path.isfile(str(path)):
        yield from _local_samples_from(str(path), first)
        return
    index = 0
    for item in read_shard(path):
        if isinstance(item, ShardProblem):
            yield -1, item
        else:
            yield index, item
            index += 1


def _visit(spec: StreamSpec, visit: int, slot: int, path: str, unit: tuple[int, int, int], emitted: int,
           first_epoch: bool, opened: Callable[[str], None]) -> Iterator[tuple[int, int, Decoded | ShardProblem]]:
    """One visit of samples ``[start, end)`` of the shard (``total`` samples) from its ``emitted``-th on."""
    start, end, total = unit
    count = end - start
    order = visit_order(spec.seed, spec.salt, slot, count, spec.layout.capacity) + start  # sample indices
    when = np.empty(count, dtype=np.int64)
    when[order - start] = np.arange(count)
    first_needed = int(order[emitted:].min())  # a resume, or a later range, skips the samples before it
    # Problems of the shard itself (truncation, stray members) are counted by the range they follow, at
    # first-epoch visits only, like an empty shard's; unusable samples are counted whenever they are skipped.
    counted_after = start - 1 if emitted == 0 else first_needed
    opened(path)
    reader = _numbered_samples(path, first_needed)
    held: dict[int, Decoded | ShardProblem] = {}
    last = -1
    exhausted = False
    try:
        for position in range(emitted, count):
            wanted = int(order[position])
            while wanted not in held and not exhausted:
                index, item = next(reader, (None, None))
                if item is None:
                    exhausted = True
                elif isinstance(item, ShardProblem):
                    if first_epoch and last >= counted_after:
                        yield visit, position, item
                else:
                    last = index
                    if start <= index < end and when[index - start] >= emitted:
                        held[index] = _decode(spec, item, slot, index)
                    if index == total - 1:  # the shard's last sample: read on to its end for trailing problems
                        for _, rest in reader:
                            if isinstance(rest, ShardProblem) and first_epoch:
                                yield visit, position, rest
                        exhausted = True
                    elif index >= end - 1 and wanted not in held:
                        exhausted = True  # past this range: the wanted sample is missing
            result = held.pop(wanted, None)
            if result is None:
                result = ShardProblem(path, None, f"sample {wanted} is missing (the shard has fewer than {total})")
            yield visit, position + 1, result
    finally:
        reader.close()


def _stack(samples: list[Decoded], crop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not samples:
        return torch.zeros(0, 3, crop, crop, dtype=torch.uint8), None
    image = torch.from_numpy(np.ascontiguousarray(np.stack([s.image for s in samples]).transpose(0, 3, 1, 2)))
    if all(s.label is None for s in samples):
        return image, None
    labels = [s.label if s.label is not None else np.full((crop, crop), IGNORE_INDEX, np.uint8) for s in samples]
    return image, torch.from_numpy(np.stack(labels))


def train_pieces(spec: StreamSpec, worker: int) -> Iterator[dict]:
    """One piece per step from ``spec.start_step`` on: this worker's streams' next ``q`` usable samples each.

    Piece: ``image`` uint8 ``[b, 3, S, S]``, ``label`` uint8 ``[b, S, S]`` or None, ``key``, ``shard`` and
    ``stream`` lists of length b (stream order), ``sample_index`` int64 ``[b]``, ``skipped`` (unusable items
    met), ``step``, ``positions`` ``{stream: [visit, emitted]}`` after the step, ``opened`` (shard visits
    started, for egress accounting).

    ``sample_index``: the sample's place in the global training sequence, ``t * G + s * q + j`` for the ``j``-th
    usable sample stream ``s`` gives to step ``t`` (0-based) -- a function of the step and the stream only, so
    the same on any number of ranks and workers, and new at every step (a sample read again at a later visit
    gets another index). The trainer seeds the sample's photometric view with it.
    """
    layout = spec.layout
    mine = layout.worker_streams(spec.rank, worker, spec.num_workers)
    start = {stream: (visit, emitted) for stream, visit, emitted in spec.positions}
    positions = {stream: list(start.get(stream, (0, 0))) for stream in mine}
    opened: list[str] = []
    streams = {stream: stream_events(spec, stream, *positions[stream], opened.append) for stream in mine}
    tally = Tally(spec.max_corrupt_fraction, f"rank {spec.rank} loader worker {worker}", MAX_UNUSABLE_IN_A_ROW)
    step = spec.start_step
    while True:
        samples: list[Decoded] = []
        owners: list[int] = []
        places: list[int] = []
        skipped = 0
        for stream in mine:
            got = 0
            while got < layout.per_stream:
                visit, emitted, event = next(streams[stream])
                positions[stream] = [visit, emitted]
                if isinstance(event, ShardProblem):
                    skipped += 1
                    tally.add_problem(event)
                    continue
                tally.add_ok()
                samples.append(event)
                owners.append(stream)
                places.append(step * layout.global_batch + stream * layout.per_stream + got)
                got += 1
        image, label = _stack(samples, spec.crop)
        step += 1
        yield {
            "image": image, "label": label, "key": [s.key for s in samples], "shard": [s.shard for s in samples],
            "stream": owners, "sample_index": torch.tensor(places, dtype=torch.int64), "skipped": skipped, "step": step,
            "positions": {str(stream): list(position) for stream, position in positions.items()},
            "opened": list(opened),
        }
        opened.clear()
