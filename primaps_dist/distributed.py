"""Process-group setup and the counted collective wrappers every module uses.

Which launcher started this process (torchrun, an ``srun`` step or none) and where the process sits in the
job is read from the environment by :func:`~primaps_dist.launch_env.detect_env` (re-exported here with
:class:`~primaps_dist.launch_env.DistEnv`).

:func:`init_distributed` creates the process group (nccl with CUDA when ``dist.backend=auto``, else gloo)
with ``timeout=dist.timeout_s`` and, for SLURM, exports the torchrun variables so that libraries reading
them (DeepSpeed) agree. With one process no group is created and every wrapper below is a no-op.

The wrappers count their calls per process (also when they are no-ops) so tests can check how many
collectives a step issues: :func:`collective_counts`, :func:`reset_collective_counts`. A collective that
times out (gloo honours the group timeout) or finds its peer gone raises :class:`CollectiveTimeout` /
:class:`CollectiveError`, one-line :class:`~primaps_dist.errors.UserError` s naming rank and collective.
With NCCL a timed-out collective is detected by PyTorch's watchdog thread, which aborts the process with
its own message after ``timeout_s``; it cannot be caught here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections import Counter
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from primaps_dist.errors import UserError
from primaps_dist.launch_env import DistEnv, _parse_first_host, detect_env, first_slurm_host  # noqa: F401

__all__ = [
    "DistEnv",
    "CollectiveError",
    "CollectiveTimeout",
    "detect_env",
    "init_distributed",
    "shutdown",
    "current_env",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_sum",
    "ride_along",
    "take_rider",
    "broadcast",
    "all_gather_object",
    "barrier",
    "guard_collective",
    "collective_counts",
    "reset_collective_counts",
    "first_slurm_host",
]


class CollectiveError(UserError):
    """A collective failed because a peer went away; one line naming this rank and the collective."""


class CollectiveTimeout(CollectiveError):
    """A collective did not complete within ``dist.timeout_s``."""


# ------------------------------------------------------------------------------------------ setup

_ENV: DistEnv = DistEnv()
_COUNTS: Counter = Counter()


def _pick_device(env: DistEnv, device_pref: str) -> torch.device:
    if device_pref not in ("auto", "cpu", "cuda"):
        raise UserError(f"device {device_pref!r} must be auto, cpu or cuda (train.device)")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible to this process")
    count = torch.cuda.device_count()
    if env.is_distributed and env.local_rank >= count:
        # One visible device per task (e.g. SLURM binding GPUs per task): use it; otherwise a misconfiguration.
        if count != 1:
            raise UserError(f"local rank {env.local_rank} needs a CUDA device but only {count} are visible")
        return torch.device("cuda", 0)
    return torch.device("cuda", env.local_rank % count)


def init_distributed(dist_cfg: Any, device_pref: str = "auto") -> DistEnv:
    """Detect the launcher, pick the device and backend, create the process group (if world > 1).

    Args:
        dist_cfg: a :class:`~primaps_dist.config.DistConfig` (``backend``, ``timeout_s``).
        device_pref: ``train.device``: auto | cpu | cuda.
    Returns the :class:`DistEnv` (also kept for :func:`current_env`). Raises :class:`UserError` for
    impossible combinations (nccl without CUDA, cuda requested but absent).
    """
    global _ENV
    env = detect_env()
    env.timeout_s = float(dist_cfg.timeout_s)
    env.device = _pick_device(env, device_pref)
    backend = dist_cfg.backend
    if backend == "auto":
        backend = "nccl" if env.device.type == "cuda" else "gloo"
    if backend == "nccl" and env.device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not env.is_distributed:
        env.backend = "none"
        _ENV = env
        return env
    if env.launcher == "slurm":
        os.environ.update(
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size),
            MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port),
        )
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = env.device
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(seconds=env.timeout_s),
                **kwargs,
            )
        except (RuntimeError, ValueError) as err:
            reason = " ".join(str(err).split())[:300]
            raise UserError(
                f"rank {env.rank}: could not join the process group at {env.master_addr}:{env.master_port} "
                f"within dist.timeout_s={env.timeout_s:g} s ({reason})"
            ) from err
    env.backend = backend
    _ENV = env
    return env


def shutdown() -> None:
    """Destroy the process group (if any) and forget the environment."""
    global _ENV
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # When the process group sits in a reference cycle (it did after an evaluation), its gloo worker
        # threads outlive destroy_process_group until the next GC. If that is interpreter shutdown, a worker
        # releasing its last tensor needs the GIL, gets pthread_exit'ed by Python and the process aborts
        # ("terminate called without an active exception"). Collect now so the threads are joined while the
        # interpreter is still alive.
        gc.collect()
    _ENV = DistEnv()


def current_env() -> DistEnv:
    """The environment set by :func:`init_distributed` (a single-process one before that)."""
    return _ENV


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------ collectives

_TIMEOUT_PATTERN = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE_PATTERN = re.compile(
    r"connection closed by peer|connection reset|broken pipe|econnreset|communicator was aborted"
    r"|connection refused|peer.*(closed|died)",
    re.IGNORECASE,
)


def _timeout_s() -> float:
    return _ENV.timeout_s


@contextlib.contextmanager
def guard_collective(name: str) -> Iterator[None]:
    """Turn a torch timeout / lost-peer error raised inside the block into a one-line CollectiveError.

    Used by the wrappers below and around code that communicates internally (a DDP backward, a DeepSpeed
    step). Other errors pass through unchanged.
    """
    try:
        yield
    except RuntimeError as err:  # DistBackendError and gloo errors are RuntimeErrors
        text = str(err)
        rank = get_rank()
        if _TIMEOUT_PATTERN.search(text):
            raise CollectiveTimeout(
                f"rank {rank}: collective {name} timed out after {_timeout_s():g} s "
                "(a peer died or hung; see dist.timeout_s)"
            ) from err
        if _PEER_GONE_PATTERN.search(text):
            raise CollectiveError(
                f"rank {rank}: collective {name} failed: a peer closed the connection "
                "(it probably crashed; see its log)"
            ) from err
        raise


def collective_counts() -> dict[str, int]:
    """Calls of each wrapper in this process since the last reset (no-op calls included)."""
    return dict(_COUNTS)


def reset_collective_counts() -> None:
    _COUNTS.clear()


def _backend_device_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor the backend can move (NCCL: CUDA only); ``tensor`` itself when it already is."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device())).contiguous()
    return tensor.contiguous()


_RIDER: dict[str, torch.Tensor | None] = {"pending": None, "reduced": None}


def ride_along(values: torch.Tensor) -> None:
    """Sum ``values`` (float64 ``[n]``) over the ranks inside the next float64 :func:`all_reduce_sum`, as n more
    elements of that one collective (no collective of its own); :func:`take_rider` gives the sums. Every rank
    must call it at the same point of the same code path (the trainer: once per step, for the stop flag)."""
    _RIDER["pending"] = values.detach().to(torch.float64).reshape(-1)
    _RIDER["reduced"] = None


def take_rider() -> torch.Tensor | None:
    """The summed values of the last :func:`ride_along`, or None when no collective carried them yet (the
    pending values are then dropped: call :func:`all_reduce_sum` on them yourself)."""
    reduced = _RIDER["reduced"]
    _RIDER["pending"] = _RIDER["reduced"] = None
    return reduced


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. No-op with one process."""
    _COUNTS["all_reduce_sum"] += 1
    rider = _RIDER["pending"]
    if rider is not None and tensor.dtype == torch.float64:
        _RIDER["pending"] = None
        packed = torch.cat([tensor.reshape(-1), rider.to(tensor.device, non_blocking=True)])
        if is_distributed():
            with guard_collective("all_reduce_sum"):
                work = _backend_device_copy(packed)
                dist.all_reduce(work, op=dist.ReduceOp.SUM)
                packed = work
        tensor.copy_(packed[: tensor.numel()].reshape(tensor.shape))
        _RIDER["reduced"] = packed[tensor.numel():]
        return tensor
    if not is_distributed():
        return tensor
    with guard_collective("all_reduce_sum"):
        work = _backend_device_copy(tensor)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values, in place; returns it."""
    _COUNTS["broadcast"] += 1
    if not is_distributed():
        return tensor
    with guard_collective("broadcast"):
        work = _backend_device_copy(tensor)
        dist.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order (``[obj]`` with one process)."""
    _COUNTS["all_gather_object"] += 1
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    with guard_collective("all_gather_object"):
        dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (bounded by the group timeout)."""
    _COUNTS["barrier"] += 1
    if not is_distributed():
        return
    with guard_collective("barrier"):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
