"""theta_M: the momentum (EMA) copy of the head's directions that makes the pseudo labels.

:class:`MomentumPrototypes` is an EMA of theta_R's direction ``weight`` (weight norm's ``v``), updated after
every ``every``-th optimizer step; the k-th update uses decay ``min(1 - 1/k, max_decay)``: 0 (a copy of
theta_R), 0.5, 0.667, 0.75, ... up to 0.98, like the reference's EMA (whose first update copies the weights).
Pseudo labels come from :attr:`MomentumPrototypes.prototypes`, the unit rows.

theta_M's gain: the reference's theta_M is an EMA of the whole student head, ``g`` included, applied to
un-normalised features, so it predicts ``argmax_k g_k * cos_k`` (its ``ConvClusterProbe`` that resets ``g``
to 1 and normalises the features is only the K-means-stage probe; it is replaced by the EMA model when EM
training starts). Here theta_M has no gain and predicts ``argmax_k cos_k``, the rule shared with K-means, the
``stats`` mode and evaluation. Both agree while the gains stay equal (they start at 1);
``em/head_gain_min``/``max`` in the step metrics show how far they drift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MomentumPrototypes"]


class MomentumPrototypes:
    """theta_M: EMA of the running head's raw weight ``[K, C]``, updated every ``every`` optimizer steps."""

    def __init__(self, prototypes: torch.Tensor, every: int = 10, max_decay: float = 0.98):
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        if not 0.0 < max_decay < 1.0:
            raise ValueError(f"EMA maximum decay must be in (0, 1), got {max_decay}")
        self.weight = F.normalize(prototypes.detach().to(torch.float32), dim=1).clone()
        self.every = every
        self.max_decay = max_decay
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # EMA updates done

    @staticmethod
    def decay_for_update(k: int, max_decay: float) -> float:
        """Decay of the k-th update (k >= 1): ``min(1 - 1/k, max_decay)``."""
        if k < 1:
            raise ValueError(f"update index must be >= 1, got {k}")
        return min(1.0 - 1.0 / k, max_decay)

    @property
    def prototypes(self) -> torch.Tensor:
        """Unit rows ``[K, C]`` float32: the prototypes that make pseudo labels."""
        return F.normalize(self.weight, dim=1)

    @torch.no_grad()
    def step(self, running_weight: torch.Tensor) -> float | None:
        """Count one optimizer step; on every ``every``-th, blend in ``running_weight``. Returns the decay used."""
        self.steps += 1
        if self.steps % self.every:
            return None
        self.updates += 1
        decay = self.decay_for_update(self.updates, self.max_decay)
        source = running_weight.detach().to(device=self.weight.device, dtype=torch.float32)
        self.weight = decay * self.weight + (1.0 - decay) * source
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight.clone(),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "updates": torch.tensor(self.updates, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["weight"].shape) != tuple(self.weight.shape):
            shape, expected = tuple(state["weight"].shape), tuple(self.weight.shape)
            raise ValueError(f"momentum prototypes 'weight' has shape {shape}, expected {expected}")
        self.weight = state["weight"].to(device=self.weight.device, dtype=torch.float32).clone()
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])

