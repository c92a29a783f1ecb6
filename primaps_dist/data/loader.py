"""Training and evaluation loaders over WebDataset shards, with deterministic resume.

Batches are dicts:

- ``image``: float32 ``[B, 3, S, S]``, RGB in 0..1 (S = ``data.crop_size``)
- ``label``: int64 ``[B, S, S]``, class ids, 255 = ignore (all 255 for samples without a label, and
  for training batches unless ``with_labels=True``)
- ``key``: list[str] sample keys; ``shard``: list[str] the shard each sample came from
- ``skipped``: int, unusable items the producing worker skipped since its previous batch (add them up
  for a running total); ``worker``: the producing (logical) worker id
- training only: ``state``, the producing worker's stream position; fold it into a checkpointable
  dict with :func:`collect_state` and pass that dict back as ``resume_state``.

Training stream (per rank, per loader worker): an infinite sequence of *chunks*. Chunk ``c`` draws
``shards_per_chunk`` distinct shards with an RNG seeded from ``(seed, rank, worker, salt, c)`` and
reads them interleaved in an RNG-chosen order through a shuffle buffer that is emptied at the chunk's
end. Sample ``i`` of chunk ``c`` is cropped with an RNG seeded from ``(seed, rank, worker, salt, c, i)``.
A position is therefore just ``(chunk, index)``; resuming re-reads at most one chunk (without decoding)
and reproduces the remaining stream bit for bit. ``salt`` is ``start_step`` of the run that started the
stream, so a job restarted *without* a usable resume state does not replay the same samples.
The DataLoader hands batches out round-robin over workers; a resumed loader rotates its workers'
roles so that its first batch comes from the worker that was next in line.

The module stays whole for now (~590 lines): the worker-side stream (chunks, crops, tallies, batch assembly)
and the DataLoader pipeline with its resume state share the private stream spec and position format, and the
module is about to be rewritten for remote streaming; that rewrite is where the split between them belongs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from primaps_dist.errors import ConfigError, UserError

from .shardio import ShardProblem, read_shard, resolve_shards
from primaps_dist.labels import IGNORE_INDEX

from .transforms import SampleError, decode_sample, eval_crop_box, train_crop_box

log = logging.getLogger("primaps_dist.data")

STATE_VERSION = 1
MIN_ITEMS_FOR_CORRUPT_CHECK = 50
MAX_UNUSABLE_IN_A_ROW = 1000
DEFAULT_SHARDS_PER_CHUNK = 4
_TAG_CHUNK = 0x5348_4152  # domain separation of the two RNG families
_TAG_SAMPLE = 0x5341_4D50
_WARN_FIRST = 5
_WARN_EVERY = 100


def _u63(value: int) -> int:
    return int(value) % (1 << 63)


def chunk_rng(seed: int, rank: int, worker: int, salt: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng([_TAG_CHUNK, _u63(seed), rank, worker, _u63(salt), chunk])


def sample_rng(seed: int, rank: int, worker: int, salt: int, chunk: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_TAG_SAMPLE, _u63(seed), rank, worker, _u63(salt), chunk, index])


def shards_fingerprint(shards: Sequence[str]) -> str:
    """Identifies a shard list by file names (not directories), so a moved dataset still resumes."""
    names = "\n".join(os.path.basename(path) for path in shards)
    return hashlib.sha1(names.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ stream pieces


def interleave_chunk(
    shards: Sequence[str], rng: np.random.Generator, shards_per_chunk: int, shuffle_buffer: int
) -> Iterator[dict | ShardProblem]:
    """One chunk: distinct shards drawn by ``rng``, read interleaved, through a shuffle buffer.

    Every draw comes from ``rng`` in an order fixed by the data, so the chunk's item sequence is a
    function of (shard contents, rng seed) only.
    """
    count = min(shards_per_chunk, len(shards))
    chosen = rng.choice(len(shards), size=count, replace=False)
    readers = [read_shard(shards[int(i)]) for i in chosen]
    buffer: list[dict | ShardProblem] = []
    while readers:
        pick = int(rng.integers(len(readers)))
        try:
            item = next(readers[pick])
        except StopIteration:
            readers.pop(pick)
            continue
        if shuffle_buffer <= 1:
            yield item
        elif len(buffer) < shuffle_buffer:
            buffer.append(item)
        else:
            slot = int(rng.integers(shuffle_buffer))
            buffer[slot], item = item, buffer[slot]
            yield item
    while buffer:
        slot = int(rng.integers(len(buffer)))
        buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
        yield buffer.pop()


def split_for_eval(shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Shards read by (rank, worker) in evaluation: round-robin over ranks, then over that rank's workers.

    Disjoint and complete over all (rank, worker) pairs; ranks differ by at most one shard.
    """
    return list(shards[rank::world_size][worker::num_workers])


@dataclass
class _Tally:
    """Per-worker count of unusable items; raises when they exceed the configured fraction."""

    max_fraction: float
    where: str
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
        if too_many or self.in_a_row >= MAX_UNUSABLE_IN_A_ROW:
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


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs; plain data so it pickles under any start method."""

    shards: tuple[str, ...]
    shards_key: str
    crop: int
    batch_size: int
    num_classes: int
    max_corrupt_fraction: float
    rank: int
    world_size: int
    num_workers: int  # logical workers (>= 1)
    with_labels: bool
    # training
    seed: int = 0
    salt: int = 0
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    shards_per_chunk: int = DEFAULT_SHARDS_PER_CHUNK
    shuffle_buffer: int = 0
    # evaluation
    resize_short: int = 0


def _check_label_ids(label: np.ndarray, num_classes: int, shard: str, key: str, config_key: str) -> None:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        found = sorted(set(np.unique(label[bad]).tolist()))[:8]
        raise UserError(
            f"{shard} key {key}: label ids {found} are >= data.num_classes={num_classes} "
            f"(and not the ignore id {IGNORE_INDEX}); fix {config_key} or data.num_classes"
        )


class _BatchBuilder:
    """Accumulates decoded samples of one worker into batch dicts (uint8 tensors; converted in the main process)."""

    def __init__(self, worker: int):
        self.worker = worker
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray | None] = []
        self.keys: list[str] = []
        self.shards: list[str] = []
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def add(self, image: np.ndarray, label: np.ndarray | None, key: str, shard: str) -> None:
        self.images.append(image)
        self.labels.append(label)
        self.keys.append(key)
        self.shards.append(shard)

    def take(self, state: dict | None = None) -> dict:
        if self.images:
            image = torch.from_numpy(np.ascontiguousarray(np.stack(self.images).transpose(0, 3, 1, 2)))
            size = self.images[0].shape[:2]
            labels = [lab if lab is not None else np.full(size, IGNORE_INDEX, np.uint8) for lab in self.labels]
            label = torch.from_numpy(np.stack(labels)) if any(lab is not None for lab in self.labels) else None
        else:
            image = label = None
        batch = {
            "image": image,
            "label": label,
            "key": self.keys,
            "shard": self.shards,
            "skipped": self.skipped,
            "worker": self.worker,
        }
        if state is not None:
            batch["state"] = state
        self.images, self.labels, self.keys, self.shards, self.skipped = [], [], [], [], 0
        return batch


def _train_items(spec: _Spec, worker: int, chunk: int, skip: int) -> Iterator[tuple[int, int, dict | ShardProblem]]:
    """(chunk, index, item) of a logical worker's infinite stream, starting at item ``skip`` of ``chunk``.

    Items before ``skip`` are re-read (tar bytes only) but not handed out: that is what resume costs.
    """
    empty_chunks = 0
    while True:
        rng = chunk_rng(spec.seed, spec.rank, worker, spec.salt, chunk)
        produced = False
        for index, item in enumerate(interleave_chunk(spec.shards, rng, spec.shards_per_chunk, spec.shuffle_buffer)):
            produced = produced or isinstance(item, dict)
            if index >= skip:
                yield chunk, index, item
        empty_chunks = 0 if produced else empty_chunks + 1
        # Every shard drawn many times without one sample: the data set is unusable, not unlucky.
        if empty_chunks * min(spec.shards_per_chunk, len(spec.shards)) >= 4 * len(spec.shards) + 16:
            raise UserError(
                f"{spec.shards_key}: no shard yields any sample ({len(spec.shards)} shards, all empty or broken)"
            )
        chunk, skip = chunk + 1, 0


def _train_batches(spec: _Spec, worker: int, chunk: int, skip: int) -> Iterator[dict]:
    where = f"rank {spec.rank} loader worker {worker}"
    tally = _Tally(spec.max_corrupt_fraction, where)
    builder = _BatchBuilder(worker)
    stream_info = _stream_info(spec)
    for chunk_index, index, item in _train_items(spec, worker, chunk, skip):
        if isinstance(item, ShardProblem):
            builder.skipped += 1
            tally.add_problem(item)
            continue
        rng = sample_rng(spec.seed, spec.rank, worker, spec.salt, chunk_index, index)
        try:
            image, label = decode_sample(
                item,
                with_labels=spec.with_labels,
                make_box=lambda size: train_crop_box(size, spec.crop, spec.scale_range, spec.hflip, rng),
            )
        except SampleError as err:
            builder.skipped += 1
            tally.add_problem(ShardProblem(item["__shard__"], item["__key__"], str(err)))
            continue
        tally.add_ok()
        if label is not None:
            _check_label_ids(label, spec.num_classes, item["__shard__"], item["__key__"], spec.shards_key)
        builder.add(image, label, item["__key__"], item["__shard__"])
        if len(builder) == spec.batch_size:
            yield builder.take({"worker": worker, "chunk": chunk_index, "index": index + 1, **stream_info})


def _eval_batches(spec: _Spec, worker: int) -> Iterator[dict]:
    shards = split_for_eval(spec.shards, spec.rank, spec.world_size, worker, spec.num_workers)
    tally = _Tally(spec.max_corrupt_fraction, f"rank {spec.rank} eval worker {worker}")
    builder = _BatchBuilder(worker)
    for shard in shards:
        for item in read_shard(shard):
            if isinstance(item, ShardProblem):
                builder.skipped += 1
                tally.add_problem(item)
                continue
            try:
                image, label = decode_sample(
                    item,
                    with_labels=True,
                    make_box=lambda size: eval_crop_box(size, spec.crop, spec.resize_short),
                )
            except SampleError as err:
                builder.skipped += 1
                tally.add_problem(ShardProblem(shard, item["__key__"], str(err)))
                continue
            tally.add_ok()
            if label is not None:
                _check_label_ids(label, spec.num_classes, shard, item["__key__"], spec.shards_key)
            builder.add(image, label, item["__key__"], shard)
            if len(builder) == spec.batch_size:
                yield builder.take()
    if len(builder) or builder.skipped:
        yield builder.take()  # a last partial batch, or an empty one carrying the final skipped count


def _stream_info(spec: _Spec) -> dict:
    """The stream's identity, stored with every position: a resume state only applies to the same stream."""
    return {
        "seed": spec.seed,
        "rank": spec.rank,
        "world_size": spec.world_size,
        "num_workers": spec.num_workers,
        "salt": spec.salt,
        "shards_per_chunk": spec.shards_per_chunk,
        "shuffle_buffer": spec.shuffle_buffer,
        "shards": shards_fingerprint(spec.shards),
    }


def _guard(batches: Iterator[dict]) -> Iterator[dict]:
    """Turn a worker's UserError into an error record (a DataLoader would wrap it in a traceback)."""
    try:
        yield from batches
    except UserError as err:
        yield {"__error__": str(err)}


class _TrainDataset(IterableDataset):
    def __init__(self, spec: _Spec, positions: dict[int, tuple[int, int]], rotation: int):
        super().__init__()
        self.spec = spec
        self.positions = positions
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.spec.num_workers
        chunk, index = self.positions.get(worker, (0, 0))
        return _guard(_train_batches(self.spec, worker, chunk, index))


class _EvalDataset(IterableDataset):
    def __init__(self, spec: _Spec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return _guard(_eval_batches(self.spec, info.id if info is not None else 0))


def _no_collate(batch: Any) -> Any:
    return batch


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def _data_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_no_collate,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def _finish(raw: dict, crop: int) -> dict:
    """Worker batch (uint8) -> public batch (float32 image in 0..1, int64 label)."""
    if "__error__" in raw:
        raise UserError(raw["__error__"])
    image = raw.pop("image")
    label = raw.pop("label")
    count = len(raw["key"])
    raw["image"] = image.float().div_(255.0) if image is not None else torch.zeros(0, 3, crop, crop)
    if label is None:
        raw["label"] = torch.full((count, crop, crop), IGNORE_INDEX, dtype=torch.int64)
    else:
        raw["label"] = label.long()
    return raw


# ------------------------------------------------------------------------------------------ public API


def collect_state(batch: dict, previous_state: dict | None = None) -> dict:
    """Fold one consumed training batch into the loader state (a small JSON-able dict).

    Call it for every batch the training loop uses, in order; checkpoint the result and give it back
    to :func:`make_train_loader` as ``resume_state``. ``previous_state`` is not modified.
    """
    position = batch["state"]
    info = {key: value for key, value in position.items() if key not in ("worker", "chunk", "index")}
    if previous_state is None or previous_state.get("stream") != info:
        state = {"version": STATE_VERSION, "stream": info, "batches": 0, "workers": {}}
    else:
        state = {
            "version": previous_state["version"],
            "stream": dict(previous_state["stream"]),
            "batches": previous_state["batches"],
            "workers": dict(previous_state["workers"]),
        }
    state["workers"][str(position["worker"])] = [int(position["chunk"]), int(position["index"])]
    state["batches"] += 1
    return state


class TrainLoader:
    """Infinite iterator of training batches; ``close()`` (or ``with``) stops the worker processes."""

    def __init__(self, loader: DataLoader, crop: int, resumed: bool, salt: int):
        self._loader = loader
        self._iterator: Iterator[dict] | None = None
        self._crop = crop
        self.resumed = resumed  # True when resume_state was applied
        self.salt = salt

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        return _finish(next(self._iterator), self._crop)

    def close(self) -> None:
        self._iterator = None  # the DataLoader iterator shuts its workers down when released

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _resume_positions(resume_state: dict | None, expected: dict) -> tuple[dict[int, tuple[int, int]], int] | None:
    if not resume_state:
        return None
    stream = dict(resume_state.get("stream", {}))
    salt = stream.pop("salt", None)
    wanted = {key: value for key, value in expected.items() if key != "salt"}
    if resume_state.get("version") != STATE_VERSION or stream != wanted or salt is None:
        changed = sorted(key for key in wanted if stream.get(key) != wanted[key])
        log.warning(
            "loader resume state does not match this run (%s differ); starting fresh streams",
            ", ".join(changed) or "version",
        )
        return None
    positions = {int(worker): (int(pos[0]), int(pos[1])) for worker, pos in resume_state["workers"].items()}
    return positions, int(salt)


def make_train_loader(
    data_cfg,
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    resume_state: dict | None = None,
    with_labels: bool = False,
    shards_per_chunk: int = DEFAULT_SHARDS_PER_CHUNK,
    pin_memory: bool = False,
) -> TrainLoader:
    """Infinite, resampled, deterministic training batches for one rank (see the module docstring).

    ``resume_state``: a dict from :func:`collect_state`; used when it belongs to the same stream (seed,
    rank, world size, workers, shards), else ignored with a warning and new streams are seeded from
    ``start_step``. ``with_labels``: decode ``label.png`` members (skipped by default: training needs none).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    shards = resolve_shards(data_cfg.train_shards, "data.train_shards")
    num_workers = max(1, data_cfg.num_workers)
    spec = _Spec(
        shards=tuple(shards),
        shards_key="data.train_shards",
        crop=data_cfg.crop_size,
        batch_size=data_cfg.batch_size,
        num_classes=data_cfg.num_classes,
        max_corrupt_fraction=data_cfg.max_corrupt_fraction,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        with_labels=with_labels,
        seed=seed,
        salt=start_step,
        scale_range=(float(data_cfg.train_scale[0]), float(data_cfg.train_scale[1])),
        hflip=data_cfg.hflip,
        shards_per_chunk=shards_per_chunk,
        shuffle_buffer=data_cfg.shuffle_buffer,
    )
    resumed = _resume_positions(resume_state, _stream_info(spec))
    positions: dict[int, tuple[int, int]] = {}
    rotation = 0
    if resumed is not None:
        positions, salt = resumed
        spec = replace(spec, salt=salt)
        rotation = int(resume_state["batches"]) % num_workers
    loader = _data_loader(_TrainDataset(spec, positions, rotation), data_cfg.num_workers, pin_memory)
    return TrainLoader(loader, data_cfg.crop_size, resumed is not None, spec.salt)


class EvalLoader:
    """Finite, ordered evaluation batches of one rank; iterate it once per evaluation pass.

    After (or during) a pass, ``skipped`` is the number of unusable items this rank met, including
    those after its last batch, and ``num_samples`` the number of samples handed out.
    """

    def __init__(self, spec: _Spec, num_workers: int, pin_memory: bool):
        self._spec = spec
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self.skipped = 0
        self.num_samples = 0

    @property
    def shards(self) -> list[str]:
        """The shards this rank reads."""
        return list(self._spec.shards[self._spec.rank :: self._spec.world_size])

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        self.num_samples = 0
        if not self.shards:
            return
        dataset = _EvalDataset(self._spec)
        for raw in _data_loader(dataset, self._num_workers, self._pin_memory):
            batch = _finish(raw, self._spec.crop)
            self.skipped += batch["skipped"]
            if not batch["key"]:
                continue
            self.num_samples += len(batch["key"])
            yield batch


def make_eval_loader(
    data_cfg,
    *,
    rank: int,
    world_size: int,
    shards: str | Sequence[str] | None = None,
    resize_short: int = 0,
    shards_key: str | None = None,
    pin_memory: bool = False,
) -> EvalLoader:
    """Every sample of the split exactly once across all ranks, in a fixed order; labels decoded.

    ``shards``: a shard spec (default ``data_cfg.val_shards``); ``shards_key`` names it in errors
    (default ``data.val_shards``). Short side -> ``resize_short`` (0 = crop size), centre crop.
    A rank with no shards yields no batches. Label ids >= ``data_cfg.num_classes`` (other than 255)
    raise UserError naming the shard and key.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    key = shards_key or ("data.val_shards" if shards is None else "shards")
    resolved = resolve_shards(data_cfg.val_shards if shards is None else shards, key)
    if resize_short and resize_short < data_cfg.crop_size:
        raise ConfigError(
            "eval.resize_short", f"must be 0 or >= data.crop_size ({data_cfg.crop_size}), got {resize_short}"
        )
    rank_shards = len(resolved[rank::world_size])
    num_workers = min(data_cfg.num_workers, rank_shards)
    spec = _Spec(
        shards=tuple(resolved),
        shards_key=key,
        crop=data_cfg.crop_size,
        batch_size=data_cfg.eval_batch_size,
        num_classes=data_cfg.num_classes,
        max_corrupt_fraction=data_cfg.max_corrupt_fraction,
        rank=rank,
        world_size=world_size,
        num_workers=max(1, num_workers),
        with_labels=True,
        resize_short=resize_short,
    )
    return EvalLoader(spec, num_workers, pin_memory)
