"""Mini-batch spherical K-means: the paper's "Baseline" and the start point of PriMaPs-EM.

A K-means step is the `stats` M-step with one "proposal" per pixel: assign every pixel feature to its
most similar prototype (:func:`~primaps_dist.prototypes.nearest_prototype`), then
:func:`~primaps_dist.em.stats.stats_step` (per-rank sums and counts, one all-reduce, moving averages).
``momentum = 0`` is a plain Lloyd step on the (global) batch; the reported objective is the mean cosine
similarity of the pixels to their nearest prototype.
"""

from __future__ import annotations

import torch

from primaps_dist.em.stats import PrototypeState, StepResult, stats_step
from primaps_dist.prototypes import nearest_prototype

__all__ = ["kmeans_step"]


def kmeans_step(state: PrototypeState, features: torch.Tensor, momentum: float) -> StepResult:
    """One mini-batch spherical K-means step on this rank's ``features`` ``[N, C]`` / ``[B, C, H, W]``.

    Collective: exactly one all-reduce; every rank must call it. No host sync: the labels are nearest
    prototypes, in range by construction, so their range check is skipped.
    """
    labels = nearest_prototype(features, state.prototypes)
    return stats_step(state, features, labels, momentum, check_labels=False)
