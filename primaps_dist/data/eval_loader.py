"""The evaluation loader: every sample of a split exactly once over all ranks, split by samples (not shards) so
that every rank's count is within one of every other's, whatever the number of loader workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from primaps_dist.errors import ConfigError
from primaps_dist.labels import IGNORE_INDEX

from .dataloading import data_loader, guard, public_batch, raise_error
from .order import eval_ranges, shard_sample_counts
from .shardio import ShardProblem, read_shard, resolve_shards
from .train_stream import Tally, check_label_ids
from .transforms import SampleError, decode_sample, eval_crop_box


@dataclass(frozen=True)
class _EvalSpec:
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    shards_key: str
    crop: int
    batch_size: int
    num_classes: int
    max_corrupt_fraction: float
    rank: int
    world_size: int
    num_workers: int  # logical workers (>= 1)
    resize_short: int = 0


def _eval_items(spec: _EvalSpec, worker: int) -> Iterator[dict | ShardProblem]:
    """The raw samples (and problems) this worker owns: global positions in its range of :func:`eval_ranges`.

    A problem is owned by the position of the sample it precedes (the shard's last sample at its end); an
    empty shard by its start position, which for a trailing one is the last worker's.
    """
    total = sum(spec.counts)
    begin, end = eval_ranges(list(spec.counts), spec.rank, spec.world_size, spec.num_workers)[worker]
    last = spec.rank == spec.world_size - 1 and worker == spec.num_workers - 1
    owns = lambda position: begin <= position < end or (last and position >= total)  # noqa: E731
    start = 0
    for path, count in zip(spec.shards, spec.counts):
        first = start
        start += count
        if count == 0 and not owns(first):
            continue
        if count > 0 and (first + count <= begin or first >= end):
            continue
        read = 0
        for item in read_shard(path):
            position = first + (min(read, count - 1) if count else 0)
            if isinstance(item, dict):
                read += 1
            if owns(position):
                yield item


def _eval_batches(spec: _EvalSpec, worker: int) -> Iterator[dict]:
    tally = Tally(spec.max_corrupt_fraction, f"rank {spec.rank} eval worker {worker}")
    images: list[np.ndarray] = []
    labels: list[np.ndarray | None] = []
    keys: list[str] = []
    shards: list[str] = []
    skipped = 0

    def take() -> dict:
        nonlocal images, labels, keys, shards, skipped
        crop = spec.crop
        image = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))) if images else None
        label = None
        if any(lab is not None for lab in labels):
            label = torch.from_numpy(np.stack([lab if lab is not None else np.full((crop, crop), IGNORE_INDEX, np.uint8)
                                               for lab in labels]))
        batch = {"image": image, "label": label, "key": keys, "shard": shards, "skipped": skipped}
        images, labels, keys, shards, skipped = [], [], [], [], 0
        return batch

    for item in _eval_items(spec, worker):
        if isinstance(item, ShardProblem):
            skipped += 1
            tally.add_problem(item)
            continue
        try:
            image, label = decode_sample(
                item, with_labels=True, make_box=lambda size: eval_crop_box(size, spec.crop, spec.resize_short)
            )
        except SampleError as err:
            skipped += 1
            tally.add_problem(ShardProblem(item["__shard__"], item["__key__"], str(err)))
            continue
        tally.add_ok()
        if label is not None:
            check_label_ids(label, spec.num_classes, item["__shard__"], item["__key__"], spec.shards_key)
        images.append(image)
        labels.append(label)
        keys.append(item["__key__"])
        shards.append(item["__shard__"])
        if len(images) == spec.batch_size:
            yield take()
    if images or skipped:
        yield take()  # a last partial batch, or an empty one carrying the final skipped count


class _EvalDataset(IterableDataset):
    def __init__(self, spec: _EvalSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return guard(_eval_batches(self.spec, info.id if info is not None else 0))


class EvalLoader:
    """Finite, ordered evaluation batches of one rank; iterate it once per evaluation pass.

    After (or during) a pass, ``skipped`` is the number of unusable items this rank met, including
    those after its last batch, and ``num_samples`` the number of samples handed out.
    """

    def __init__(self, spec: _EvalSpec, num_workers: int, pin_memory: bool):
        self._spec = spec
        self._num_workers = num_workers
        self._pin_memory = pin_memory
        self.skipped = 0
        self.num_samples = 0

    @property
    def sample_range(self) -> tuple[int, int]:
        """Global sample positions [start, end) this rank evaluates."""
        ranges = eval_ranges(list(self._spec.counts), self._spec.rank, self._spec.world_size, 1)
        return ranges[0]

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        self.num_samples = 0
        dataset = _EvalDataset(self._spec)
        for raw in data_loader(dataset, self._num_workers, self._pin_memory):
            batch = public_batch(raise_error(raw), self._spec.crop)
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
    Label ids >= ``data_cfg.num_classes`` (other than 255) raise UserError naming the shard and key.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    key = shards_key or ("data.val_shards" if shards is None else "shards")
    resolved = resolve_shards(data_cfg.val_shards if shards is None else shards, key, data_cfg)
    if resize_short and resize_short < data_cfg.crop_size:
        raise ConfigError(
            "eval.resize_short", f"must be 0 or >= data.crop_size ({data_cfg.crop_size}), got {resize_short}"
        )
    spec = _EvalSpec(
        shards=tuple(resolved),
        counts=tuple(shard_sample_counts(resolved)),
        shards_key=key,
        crop=data_cfg.crop_size,
        batch_size=data_cfg.eval_batch_size,
        num_classes=data_cfg.num_classes,
        max_corrupt_fraction=data_cfg.max_corrupt_fraction,
        rank=rank,
        world_size=world_size,
        num_workers=max(1, data_cfg.num_workers),
        resize_short=resize_short,
    )
    return EvalLoader(spec, data_cfg.num_workers, pin_memory)
