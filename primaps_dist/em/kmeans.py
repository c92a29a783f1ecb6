"""Mini-batch spherical K-means: the paper's "Baseline" and the start point of PriMaPs-EM.

A K-means step is the `stats` M-step with one "proposal" per pixel: assign every pixel feature to its
most similar prototype (cosine), then :func:`~primaps_dist.em.stats.stats_step` (per-rank sums and counts,
one all-reduce, moving averages). ``momentum = 0`` is a plain Lloyd step on the (global) batch; the
reported objective is the mean cosine similarity of the pixels to their nearest prototype.
"""

from __future__ import annotations

import torch

from primaps_dist.em.stats import PrototypeState, StepResult, as_pixel_rows, stats_step

__all__ = ["assign", "kmeans_step"]


def assign(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar prototype per pixel; exact ties go to the lowest k.

    Args:
        features: ``[N, C]`` or ``[B, C, H, W]`` (need not be normalised; argmax is scale invariant).
        prototypes: ``[K, C]`` unit rows.
    Returns:
        int64 labels ``[N]`` or ``[B, H, W]`` on the features' device.
    """
    rows, _ = as_pixel_rows(features)
    if prototypes.dim() != 2 or prototypes.shape[1] != rows.shape[1]:
        raise ValueError(f"prototypes have shape {tuple(prototypes.shape)}, expected [K, {rows.shape[1]}]")
    scores = rows.to(torch.float32) @ prototypes.to(device=rows.device, dtype=torch.float32).T
    labels = scores.argmax(dim=1)  # torch.argmax returns the first maximal index
    if features.dim() == 4:
        batch, _, height, width = features.shape
        labels = labels.reshape(batch, height, width)
    return labels


def kmeans_step(state: PrototypeState, features: torch.Tensor, momentum: float) -> StepResult:
    """One mini-batch spherical K-means step on this rank's ``features`` ``[N, C]`` / ``[B, C, H, W]``.

    Collective: exactly one all-reduce; every rank must call it.
    """
    labels = assign(features, state.prototypes)
    return stats_step(state, features, labels, momentum)
