"""Engines that train theta_R's head across ranks: DDP or DeepSpeed behind one small interface.

:class:`HeadEngine` is what :class:`~primaps_dist.em.gradient.engine.GradientEngine` needs: a collective
``step`` and replicated / sharded state. :func:`make_head_engine` picks :class:`DDPEngine` (Adam, DDP over
the head when world > 1) or :class:`DeepSpeedEngine` by ``em.engine``. Logits are computed at feature
resolution and upsampled bilinearly to the label size (cheaper than upsampling C-channel features as the
reference does; K << C).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from primaps_dist import distributed
from primaps_dist.distributed import DistEnv
from primaps_dist.em.gradient.head import PrototypeHead, global_focal_loss
from primaps_dist.errors import UserError

__all__ = [
    "HeadEngine",
    "DDPEngine",
    "DeepSpeedEngine",
    "fused_adam_prebuilt",
    "load_deepspeed_config",
    "make_head_engine",
]


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _loss(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal loss of the upsampled logits with global class weights; also the global label counts ``[K]``
    int64 and the focal class weights ``[K]`` float32 (identical on every rank)."""
    logits = _upsample(model(features), tuple(labels.shape[-2:]))
    return global_focal_loss(logits, labels, gamma)

class HeadEngine(Protocol):
    """What the trainer needs from an engine that trains a :class:`PrototypeHead`.

    ``step`` is collective (every rank calls it with a batch of the same shape); it returns the detached
    loss, the global pseudo-label counts per class ``[K]`` int64 and the focal class weights ``[K]``.
    ``state_dict``/``load_state_dict`` hold what is replicated on every rank (rank 0 may write it);
    ``save_checkpoint``/``load_checkpoint`` are collective and write/read the engine's sharded state in a
    directory (DeepSpeed; no-ops for DDP).
    """

    head: PrototypeHead
    name: str
    sharded: bool  # True when save_checkpoint holds state that state_dict lacks

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_checkpoint(self, directory: str | os.PathLike) -> None: ...

    def load_checkpoint(self, directory: str | os.PathLike) -> None: ...


class DDPEngine:
    """Adam on the head; DistributedDataParallel over the head only when more than one rank."""

    name = "ddp"
    sharded = False

    def __init__(self, head: PrototypeHead, lr: float, env: DistEnv):
        self.head = head
        if distributed.is_distributed():
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            with distributed.guard_collective("ddp init"):
                self.model: nn.Module = nn.parallel.DistributedDataParallel(head, device_ids=device_ids)
        else:
            self.model = head
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr)

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with distributed.guard_collective("ddp step"):
            loss, counts, weights = _loss(self.model, features, labels, gamma)
            loss.backward()
        self.optimizer.step()
        return loss.detach(), counts, weights

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.name, "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Nothing beyond :meth:`state_dict` (replicated)."""

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Nothing beyond :meth:`load_state_dict`."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fused_adam_prebuilt() -> bool:
    """Whether this DeepSpeed install ships a compiled FusedAdam (``DS_BUILD_FUSED_ADAM=1`` at install time).

    Without it DeepSpeed JIT-compiles the op with nvcc at start-up, on every node, into a cache that
    concurrent jobs fight over: minutes per launch, and a failure on nodes without a CUDA toolkit.
    """
    try:
        from deepspeed.git_version_info import installed_ops
    except Exception:  # noqa: BLE001 - no DeepSpeed or an unknown layout: treat as not prebuilt
        return False
    return bool(installed_ops.get("fused_adam", False))


def load_deepspeed_config(path: str | os.PathLike, lr: float, device: torch.device) -> dict[str, Any]:
    """Read the JSON config; ``em.lr`` overrides the optimizer's lr; torch Adam on CPU (FusedAdam needs
    CUDA) and on CUDA unless FusedAdam is prebuilt (:func:`fused_adam_prebuilt`) or the config sets
    ``torch_adam`` itself. For a [K, C] head torch's Adam is as fast; the fused kernel buys nothing.

    ``train_batch_size`` is dropped (DeepSpeed derives it from micro batch x accumulation x world size).
    """
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"em.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"em.deepspeed_config: {path} is not valid JSON (line {err.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"em.deepspeed_config: {path} must hold a JSON object")
    config.pop("train_batch_size", None)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        params["lr"] = lr
        if device.type != "cuda":
            params["torch_adam"] = True
        elif not fused_adam_prebuilt():
            params.setdefault("torch_adam", True)
    return config


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op only speeds up CPU (inference) all-reduces; gloo is plenty for a [K, C] head. Compiling it
    needs a C++ toolchain, takes minutes on a fresh machine, and concurrent jobs sharing
    ~/.cache/torch_extensions were seen rebuilding it for every launch. DeepSpeed looks the op up in its
    cached ``deepspeed.ops.__compatible_ops__`` table before building; marking it incompatible there
    makes DeepSpeed fall back to torch.distributed. A no-op if the table's layout changes.
    """
    try:
        import deepspeed.ops as ds_ops

        table = ds_ops.__compatible_ops__
    except Exception:  # noqa: BLE001 - any failure just leaves DeepSpeed's default behaviour
        return
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """``deepspeed.initialize(model=head, config=...)``; DeepSpeed all-reduces the head's gradients.

    Checkpoints: :meth:`state_dict` holds the head weights, plus the optimizer state when it is a plain
    replicated torch optimizer (ZeRO stage 0). For ZeRO >= 1 the optimizer state is partitioned across
    ranks: call :meth:`save_checkpoint`/:meth:`load_checkpoint` (DeepSpeed's own format, tag ``head``) on
    every rank; :meth:`load_state_dict` alone then restores only the weights.
    """

    name = "deepspeed"

    def __init__(self, head: PrototypeHead, em_cfg: Any, env: DistEnv):
        try:
            import deepspeed
        except ImportError:
            raise UserError("em.engine=deepspeed but DeepSpeed is not installed (pip install deepspeed)") from None
        if env.device.type != "cuda":
            _skip_deepspeed_shm_op()
        if not torch.distributed.is_initialized():
            # Single process: DeepSpeed wants a process group; give it a private one-rank group.
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            backend = "nccl" if env.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend)
        config = load_deepspeed_config(em_cfg.deepspeed_config, em_cfg.lr, env.device)
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.Adam(head.parameters(), lr=em_cfg.lr)
        with distributed.guard_collective("deepspeed init"):
            engine, engine_optimizer, _, _ = deepspeed.initialize(
                model=head, model_parameters=list(head.parameters()), optimizer=optimizer, config=config
            )
        self.head = head
        self.engine = engine
        self.optimizer = engine_optimizer
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with distributed.guard_collective("deepspeed step"):
            loss, counts, weights = _loss(self.engine, features, labels, gamma)
            self.engine.backward(loss)
            self.engine.step()
        return loss.detach(), counts, weights

    @property
    def sharded(self) -> bool:
        """Whether :meth:`save_checkpoint` holds state that :meth:`state_dict` lacks (ZeRO >= 1)."""
        return self._replicated_optimizer() is None

    def _replicated_optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer if self.zero_stage == 0 and isinstance(self.optimizer, torch.optim.Optimizer) else None

    def state_dict(self) -> dict[str, Any]:
        optimizer = self._replicated_optimizer()
        return {
            "engine": self.name,
            "head": self.head.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        optimizer = self._replicated_optimizer()
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if self.zero_stage > 0 and callable(refresh):
            refresh()  # ZeRO keeps its own fp32 master copy of the weights

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        with distributed.guard_collective("deepspeed save_checkpoint"):
            self.engine.save_checkpoint(str(directory), tag="head")

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        if not (Path(directory) / "head").is_dir():
            raise UserError(f"DeepSpeed checkpoint not found: {Path(directory) / 'head'}")
        with distributed.guard_collective("deepspeed load_checkpoint"):
            path, _ = self.engine.load_checkpoint(str(directory), tag="head")
        if path is None:
            raise UserError(f"DeepSpeed could not load its checkpoint from {directory}")


def make_head_engine(head: PrototypeHead, em_cfg: Any, env: DistEnv) -> HeadEngine:
    """``em.engine``: ``ddp`` (Adam, DDP over the head when world > 1) or ``deepspeed``."""
    head.to(env.device)
    if em_cfg.engine == "deepspeed":
        return DeepSpeedEngine(head, em_cfg, env)
    if em_cfg.engine == "ddp":
        return DDPEngine(head, em_cfg.lr, env)
    raise UserError(f"config key 'em.engine': must be 'ddp' or 'deepspeed', got {em_cfg.engine!r}")

