"""The `gradient` M-step's engine: theta_R (the head behind DDP or DeepSpeed) and theta_M, one step at a time.

:class:`GradientEngine` (:func:`make_engine`) owns a :class:`~primaps_dist.em.gradient.head.PrototypeHead`
behind a :class:`~primaps_dist.em.gradient.engines.HeadEngine` and the
:class:`~primaps_dist.em.gradient.momentum.MomentumPrototypes`; its checkpoint state is assembled in
:mod:`primaps_dist.em.gradient.checkpointing`, and :func:`step_metrics` reports the focal-weight spread and
the head's gains of each step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from primaps_dist import distributed
from primaps_dist.distributed import DistEnv
from primaps_dist.em.gradient.checkpointing import ShardedWriter, gradient_state, restore_gradient_state
from primaps_dist.em.gradient.engines import make_head_engine
from primaps_dist.em.gradient.head import PrototypeHead
from primaps_dist.em.gradient.momentum import MomentumPrototypes

__all__ = ["GradientEngine", "make_engine", "step_metrics"]


class GradientEngine:
    """`gradient` mode: theta_R (head + optimizer behind DDP or DeepSpeed) and theta_M (momentum prototypes).

    Per training step (all ranks)::

        teacher = engine.teacher_prototypes()      # theta_M: pseudo labels on the clean view
        loss, counts = engine.step(student_features, pseudo_labels)
        tracker.log_metrics(engine.last_metrics)   # focal-weight spread and head gains of that step
    """

    def __init__(
        self, prototypes: torch.Tensor, em_cfg: Any, env: DistEnv | None = None, device: torch.device | None = None
    ):
        env = env if env is not None else distributed.current_env()
        if device is not None and torch.device(device) != env.device:
            env = dataclasses.replace(env, device=torch.device(device))
        prototypes = prototypes.detach().to(env.device, torch.float32)
        self.engine = make_head_engine(PrototypeHead(prototypes), em_cfg, env)
        self.momentum = MomentumPrototypes(prototypes, em_cfg.ema_every, em_cfg.ema_max)
        self.gamma = float(em_cfg.focal_gamma)
        self.last_ema_decay: float | None = None
        self._last_weights_and_gains: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def last_metrics(self) -> dict[str, float]:
        """The last step's focal-weight spread and head gains (:func:`step_metrics`); {} before any step.
        Read on demand: on a GPU this reads device values back, so the trainer asks on logging steps only."""
        if self._last_weights_and_gains is None:
            return {}
        return step_metrics(*self._last_weights_and_gains)

    @property
    def head(self) -> PrototypeHead:
        return self.engine.head

    def teacher_prototypes(self) -> torch.Tensor:
        """theta_M unit rows ``[K, C]``: pseudo labels and predictions."""
        return self.momentum.prototypes

    def running_prototypes(self) -> torch.Tensor:
        """theta_R unit rows ``[K, C]``."""
        return self.engine.head.prototypes()

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One optimizer step of theta_R, then the EMA of theta_M (collective).

        Args:
            features: ``[B, C, h, w]`` features of the view the student sees (the photometric view).
            labels: ``[B, H, W]`` pseudo labels (255 = ignore) made with theta_M on the clean view; the
                logits are upsampled bilinearly to ``H x W``.
        Returns:
            (loss as a float, global pseudo-label counts per class ``[K]`` int64). The step's focal
            weights and head gains are left in :attr:`last_metrics` (see :func:`step_metrics`).
        """
        loss, counts = self.step_on_device(features, labels)
        return float(loss), counts

    def step_on_device(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` without reading anything back: (detached 0-dim loss, counts ``[K]``) on the device."""
        loss, counts, weights = self.engine.step(features, labels, self.gamma)
        self.last_ema_decay = self.momentum.step(self.engine.head.weight)
        self._last_weights_and_gains = (weights.detach(), self.engine.head.gain.detach().clone())
        return loss, counts

    def state_dict(self) -> dict[str, Any]:
        """Replicated state (rank 0 may write it); see :meth:`checkpoint_parts` for sharded engines."""
        return gradient_state(self.engine, self.momentum)

    def checkpoint_parts(self) -> tuple[dict[str, Any], ShardedWriter | None]:
        """``(state_dict(), writer)``: ``writer`` is None unless the engine has sharded state; then call
        ``writer(folder)`` on rank 0 and ``writer(folder or None)`` on every other rank (collective)."""
        return self.state_dict(), (ShardedWriter(self.engine) if self.engine.sharded else None)

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Restore; with a sharded engine also read ``<checkpoint_dir>/deepspeed`` (collective).

        A checkpoint of the former cosine head is refused in one line (see
        :func:`~primaps_dist.em.gradient.checkpointing.restore_gradient_state`).
        """
        restore_gradient_state(self.engine, self.momentum, state, checkpoint_dir)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Collective: the engine's own checkpoint (DeepSpeed format) into ``directory``; no-op for DDP."""
        self.engine.save_checkpoint(directory)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        self.engine.load_checkpoint(directory)


def step_metrics(focal_weights: torch.Tensor, gains: torch.Tensor) -> dict[str, float]:
    """Spread of the focal class weights ``[K]`` (min, max, population std) and the range of the head's
    gains ``[K]``, as floats for the tracker. Weights that barely differ mean the focal weighting is idle."""
    weights = focal_weights.detach().double().cpu()
    gains = gains.detach().double().cpu()
    return {
        "em/focal_weight_min": float(weights.min()),
        "em/focal_weight_max": float(weights.max()),
        "em/focal_weight_std": float(weights.std(correction=0)),
        "em/head_gain_min": float(gains.min()),
        "em/head_gain_max": float(gains.max()),
    }


def make_engine(
    prototypes: torch.Tensor, em_cfg: Any, env: DistEnv | None = None, device: torch.device | None = None
) -> GradientEngine:
    """The `gradient` M-step engine, starting from ``prototypes`` ``[K, C]`` (theta_R = theta_M = them)."""
    return GradientEngine(prototypes, em_cfg, env, device)
