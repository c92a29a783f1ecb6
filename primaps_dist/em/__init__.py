"""Prototype math: PCA initialisation, spherical K-means and the PriMaPs-EM M-steps.

* :mod:`.pca`: streamed, all-reduced covariance -> principal directions (initial prototypes).
* :mod:`.stats`: packed sufficient statistics, one all-reduce per step, :class:`PrototypeState`.
* :mod:`.kmeans`: nearest-prototype assignment + the statistics step (the "Baseline").
* :mod:`.gradient`: the paper's Adam-trained head with momentum prototypes (imported lazily; it pulls in
  the engines).
"""

from primaps_dist.em.kmeans import kmeans_step
from primaps_dist.em.pca import CovarianceAccumulator
from primaps_dist.em.stats import PrototypeState, StepResult, batch_stats, stats_step

__all__ = [
    "CovarianceAccumulator",
    "PrototypeState",
    "StepResult",
    "batch_stats",
    "kmeans_step",
    "stats_step",
]
