"""Training and evaluation loaders over WebDataset shards: elastic deterministic training, balanced evaluation.

Batches are dicts:

- ``image``: float32 ``[B, 3, S, S]``, RGB in 0..1 (S = ``data.crop_size``); uint8 0..255 from a training
  loader made with ``as_uint8=True`` (the trainer converts on the device)
- ``label``: int64 ``[B, S, S]``, class ids, 255 = ignore (all 255 for samples without a label, and
  for training batches unless ``with_labels=True``)
- ``key``: list[str] sample keys; ``shard``: list[str] the shard each sample came from
- ``skipped``: int, unusable items met for this batch (add them up for a running total)
- training only: ``stream`` (the logical stream of each sample), ``sample_index`` (int64 ``[B]``, each sample's
  place in the global training sequence, ``step * global_batch_size + place in the step's global batch``: the
  same on any number of ranks and workers; seeds the photometric view) and ``state``, the position after this batch;
  fold it into a checkpointable dict with :func:`collect_state`, merge the ranks' dicts with
  :func:`merge_states` and pass the result back as ``resume_state`` (on any number of ranks).

Training (:mod:`.order`, :mod:`.train_stream`): the global batch of step t is a function of (seed, data set,
global batch size, t) only. Rank r's batch is its contiguous block of the global batch, the same samples
whatever ``data.num_workers``; each loader worker yields one piece per step and the pieces are put back in
stream order here. Evaluation (:mod:`.eval_loader`, re-exported here) splits the samples (not the shards) into
contiguous parts: every rank's count is within one of every other's, and every sample is read exactly once
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from primaps_dist.errors import UserError
from primaps_dist.labels import IGNORE_INDEX

from .dataloading import data_loader, guard, public_batch, raise_error
from .eval_loader import EvalLoader, make_eval_loader  # noqa: F401  (re-exported: the public loader API)
from .order import Layout, make_layout, shard_sample_counts
from .shardio import resolve_shards
from .train_stream import StreamSpec, train_pieces

log = logging.getLogger("primaps_dist.data")

STATE_VERSION = 2


def shards_fingerprint(shards: Sequence[str]) -> str:
    """Identifies a shard list by file names (not directories), so a moved dataset still resumes."""
    names = "\n".join(os.path.basename(path) for path in shards)
    return hashlib.sha1(names.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ training


class _TrainDataset(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        return guard(train_pieces(self.spec, info.id if info is not None else 0))


def _stream_info(spec: StreamSpec) -> dict:
    """The stream's identity, stored with every position: a resume state only applies to the same stream."""
    return {
        "seed": spec.seed,
        "salt": spec.salt,
        "global_batch_size": spec.layout.global_batch,
        "streams": spec.layout.streams,
        "capacity": spec.layout.capacity,
        "shards": shards_fingerprint(spec.shards),
    }


class TrainLoader:
    """Infinite iterator of this rank's training batches; ``close()`` (or ``with``) stops the worker processes.

    ``layout``: the run's :class:`~primaps_dist.data.order.Layout`; ``opened``: shard visits started so far by
    this rank's workers (list of paths, for egress accounting).
    """

    def __init__(self, loader: DataLoader, spec: StreamSpec, resumed: bool, as_uint8: bool, pin_memory: bool):
        self._loader = loader
        self._iterator: Iterator[dict] | None = None
        self._spec = spec
        self._as_uint8 = as_uint8
        self._pin = pin_memory and torch.cuda.is_available()
        self.layout = spec.layout
        self.resumed = resumed  # True when resume_state was applied
        self.salt = spec.salt
        self.opened: list[str] = []

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        pieces = [raise_error(next(self._iterator)) for _ in range(self._spec.num_workers)]
        batch = self._merge(pieces)
        return public_batch(batch, self._spec.crop, self._as_uint8)

    def _merge(self, pieces: list[dict]) -> dict:
        """Pieces of one step (one per worker) -> the rank's batch, samples in stream order."""
        steps = {piece["step"] for piece in pieces}
        assert len(steps) == 1, f"loader workers out of step: {sorted(steps)}"
        owners = [stream for piece in pieces for stream in piece["stream"]]
        order = sorted(range(len(owners)), key=lambda i: owners[i])  # stable: keeps each stream's order
        image = torch.cat([piece["image"] for piece in pieces])[order]
        labels = [piece["label"] for piece in pieces]
        label = None
        if any(lab is not None for lab in labels):
            crop = self._spec.crop
            filled = [lab if lab is not None else torch.full((len(p["key"]), crop, crop), IGNORE_INDEX, dtype=torch.uint8)
                      for lab, p in zip(labels, pieces)]
            label = torch.cat(filled)[order]
        if self._pin:
            image = image.pin_memory()
        positions: dict[str, list[int]] = {}
        for piece in pieces:
            positions.update(piece["positions"])
            self.opened.extend(piece["opened"])
        pick = lambda name: [value for piece in pieces for value in piece[name]]  # noqa: E731
        keys, shards = pick("key"), pick("shard")
        return {
            "image": image,
            "label": label,
            "key": [keys[i] for i in order],
            "shard": [shards[i] for i in order],
            "stream": [owners[i] for i in order],
            "sample_index": torch.cat([piece["sample_index"] for piece in pieces])[order],
            "skipped": sum(piece["skipped"] for piece in pieces),
            "state": {"step": steps.pop(), "positions": positions, **_stream_info(self._spec)},
        }

    def close(self) -> None:
        self._iterator = None  # the DataLoader iterator shuts its workers down when released

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def collect_state(batch: dict, previous_state: dict | None = None) -> dict:
    """Fold one consumed training batch into the loader state (a small JSON-able dict).

    Call it for every batch the training loop uses, in order. Every batch carries the positions of all of this
    rank's streams, so ``previous_state`` (kept for the interface) adds nothing, and a state never holds stale
    positions of other ranks' streams (e.g. from the global state it resumed from). :func:`merge_states` joins
    the ranks' states into the global position that resumes on any number of ranks.
    """
    position = batch["state"]
    info = {key: value for key, value in position.items() if key not in ("step", "positions")}
    return {"version": STATE_VERSION, "stream": info, "step": int(position["step"]),
            "positions": dict(position["positions"])}


def merge_states(states: Sequence[dict | None]) -> dict | None:
    """The global position from every rank's :func:`collect_state` dict (None when a rank has none)."""
    if not states or any(state is None for state in states):
        return None
    first = states[0]
    if any(state["stream"] != first["stream"] or state["step"] != first["step"] for state in states):
        raise RuntimeError("ranks disagree on the training stream position; cannot checkpoint it")
    positions: dict[str, list[int]] = {}
    for state in states:
        if set(positions) & set(state["positions"]):
            raise RuntimeError("two ranks report the same training stream; cannot checkpoint the position")
        positions.update(state["positions"])
    return {**first, "positions": positions}


def _resume_positions(resume_state: dict | None, expected: dict, layout: Layout) -> tuple[dict, int, int] | None:
    """(positions, salt, step) from a resume state of this stream, else None (with a warning)."""
    if not resume_state:
        return None
    stream = dict(resume_state.get("stream", {}))
    salt = stream.pop("salt", None)
    wanted = {key: value for key, value in expected.items() if key != "salt"}
    positions = resume_state.get("positions", {})
    if resume_state.get("version") != STATE_VERSION or stream != wanted or salt is None:
        changed = sorted(key for key in wanted if stream.get(key) != wanted[key])
        log.warning(
            "loader resume state does not match this run (%s differ); starting fresh streams",
            ", ".join(changed) or "version",
        )
        return None
    return {int(key): (int(v[0]), int(v[1])) for key, v in positions.items()}, int(salt), int(resume_state["step"])


def make_train_loader(
    data_cfg,
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    resume_state: dict | None = None,
    with_labels: bool = False,
    pin_memory: bool = False,
    as_uint8: bool = False,
) -> TrainLoader:
    """Infinite, deterministic training batches for one rank (see the module docstring and :mod:`.order`).

    ``resume_state``: a dict from :func:`collect_state` / :func:`merge_states`; used when it belongs to the
    same stream (seed, global batch size, streams, buffer size, shards), else ignored with a warning and new
    streams are seeded from ``start_step``. ``with_labels``: decode ``label.png`` members (skipped by default).
    ``pin_memory``: batches in pinned memory (with CUDA), for non-blocking copies.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    shards = resolve_shards(data_cfg.train_shards, "data.train_shards", data_cfg)
    sample_bytes = data_cfg.crop_size**2 * (4 if with_labels else 3) + 256
    layout = make_layout(data_cfg, world_size, sample_bytes)
    counts = shard_sample_counts(shards)
    if sum(counts) == 0:
        raise UserError(f"data.train_shards: no shard yields any sample ({len(shards)} shards, all empty or broken)")
    spec = StreamSpec(
        shards=tuple(shards),
        counts=tuple(counts),
        shards_key="data.train_shards",
        layout=layout,
        crop=data_cfg.crop_size,
        num_classes=data_cfg.num_classes,
        max_corrupt_fraction=data_cfg.max_corrupt_fraction,
        rank=rank,
        num_workers=max(1, data_cfg.num_workers),
        with_labels=with_labels,
        seed=seed,
        salt=start_step,
        scale_range=(float(data_cfg.train_scale[0]), float(data_cfg.train_scale[1])),
        hflip=data_cfg.hflip,
    )
    resumed = _resume_positions(resume_state, _stream_info(spec), layout)
    if resumed is not None:
        positions, salt, step = resumed
        mine = [(stream, *positions.get(stream, (0, 0))) for stream in layout.rank_streams(rank)]
        spec = replace(spec, salt=salt, start_step=step, positions=tuple(mine))
    loader = data_loader(_TrainDataset(spec), data_cfg.num_workers)
    return TrainLoader(loader, spec, resumed is not None, as_uint8, pin_memory)
