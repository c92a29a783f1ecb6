"""Checkpoint plumbing of the `gradient` mode: the engine's state to and from ``TrainState.gradient_state``.

The replicated part (head weights, a replicated optimizer, theta_M) is a plain dict that rank 0 writes into
the checkpoint payload. An engine with sharded state (DeepSpeed ZeRO >= 1) also writes a folder,
``<checkpoint>/deepspeed``, on every rank (:class:`ShardedWriter`), and reading the dict back reads that
folder too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from primaps_dist import distributed
from primaps_dist.em.gradient.engines import HeadEngine
from primaps_dist.em.gradient.momentum import MomentumPrototypes
from primaps_dist.errors import UserError

__all__ = ["SHARDED_SUBDIR", "ShardedWriter", "gradient_state", "restore_gradient_state"]

SHARDED_SUBDIR = "deepspeed"


class ShardedWriter:
    """Collective checkpoint writer for engines with sharded state (DeepSpeed ZeRO >= 1).

    Called on EVERY rank; rank 0's directory is shared with all (ranks may pass None), then each rank writes
    its shard into ``<directory>/deepspeed``. Fits ``checkpoint.save_checkpoint(all_ranks_writer=)``
    and the "rank 0 passes the folder, the others None" protocol alike.
    """

    all_ranks = True

    def __init__(self, engine: HeadEngine):
        self.engine = engine

    def __call__(self, directory: str | os.PathLike | None) -> None:
        paths = distributed.all_gather_object(None if directory is None else str(directory))
        if paths[0] is None:
            raise UserError("rank 0 gave no checkpoint directory for the DeepSpeed shards")
        self.engine.save_checkpoint(Path(paths[0]) / SHARDED_SUBDIR)


def gradient_state(engine: HeadEngine, momentum: MomentumPrototypes) -> dict[str, Any]:
    """Replicated state of theta_R's engine and theta_M (rank 0 may write it); names the shard folder when
    the engine keeps sharded state."""
    return {
        "engine": engine.state_dict(),
        "momentum": momentum.state_dict(),
        "sharded_subdir": SHARDED_SUBDIR if engine.sharded else "",
    }


def restore_gradient_state(
    engine: HeadEngine,
    momentum: MomentumPrototypes,
    state: dict[str, Any],
    checkpoint_dir: str | os.PathLike | None = None,
) -> None:
    """Restore :func:`gradient_state`; with a sharded engine also read ``<checkpoint_dir>/deepspeed``
    (collective).

    A checkpoint of the former cosine head (no ``gain``) is refused with a one-line UserError: its Adam
    state and its trajectory belong to another head, so resuming it would silently mix two methods.
    """
    if "gain" not in state["engine"]["head"]:
        raise UserError(
            "checkpoint's gradient-mode head has no 'gain': it was saved by the former cosine head and cannot "
            "resume with the weight-normalised head; start a new train.output_dir or set checkpoint.resume=false"
        )
    engine.load_state_dict(state["engine"])
    momentum.load_state_dict(state["momentum"])
    subdir = state.get("sharded_subdir", "")
    if subdir and engine.sharded:
        if checkpoint_dir is None:
            raise UserError("this checkpoint keeps DeepSpeed shards in a folder; pass its checkpoint directory")
        engine.load_checkpoint(Path(checkpoint_dir) / subdir)
