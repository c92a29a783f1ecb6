"""Batched dense CRF (Krähenbühl & Koltun 2011) for refining PriMaPs proposals.

Two backends compute the model the PriMaPs reference runs through pydensecrf:

* ``"torch"`` (default): vectorised mean-field in torch on CPU or CUDA, one call for the whole batch,
  no process pool. The bilateral (appearance) kernel is a permutohedral lattice that reproduces
  pydensecrf's lattice arithmetic step for step, with the symmetric normalisation ``D^-1/2 K D^-1/2``
  (``D = K 1``): with the Gaussian weight set to 0 its probabilities match pydensecrf to ~1e-5. The
  small spatial kernel (sxy = 1) is an exact truncated Gaussian, the only approximation here.
  ``downsample=f`` trades boundary detail for speed: all updates but the last run on a grid f times
  coarser per side, the last one at full resolution. Measured agreement and throughput per factor:
  README, "Results" (``bench/bench_crf.py``).
* ``"pydensecrf"``: the reference itself, one image at a time on the CPU (needs the ``crf`` extra).

Model (per image; ``Q`` is over labels at every pixel; Potts compatibility as in pydensecrf)::

    U      = -log(clip(softmax(logits), 1e-5))          # pydensecrf.utils.unary_from_softmax
    Q_0    = softmax(-U)
    Q_t+1  = softmax(-U + w_g * Kg(Q_t) + w_b * Kb(Q_t))

``Kg`` is the normalised Gaussian kernel on ``(x, y) / gaussian_sxy`` and ``Kb`` the normalised
bilateral kernel on ``(x / bilateral_sxy, y / bilateral_sxy, r / srgb, g / srgb, b / srgb)``; both
include the pixel itself, as in pydensecrf.

Labels whose logit is ``-inf`` at a pixel are forbidden there: their probability is exactly 0 at every
step and they never take mass. The pydensecrf backend drops channels that are ``-inf`` over a whole image
and re-inserts them as zeros; it cannot forbid a label at single pixels (there its 1e-5 clip applies).
No gradients flow through either backend.

Modules, one job each:

* :mod:`~primaps_dist.crf.defaults`: the default parameters (reference values), shared with ``config.CRFConfig``.
* :mod:`~primaps_dist.crf.lattice`: the permutohedral lattice (build, reference filter).
* :mod:`~primaps_dist.crf.operators`: the pairwise message operators (sparse lattice blur, Gaussian
  convolution) and :func:`pairwise_operators`, everything built before the iterations.
* :mod:`~primaps_dist.crf.mean_field`: the torch backend's inference loop and coarse-grid logic.
* :mod:`~primaps_dist.crf.pydensecrf_backend`: the reference backend.
* :mod:`~primaps_dist.crf.api`: :func:`dense_crf`, :func:`make_crf` and :func:`crf_from_config`, the one
  factory the pipeline uses (``backend: none`` -> None, no CRF step).
"""

from primaps_dist.crf.api import BACKENDS, CrfFn, crf_from_config, dense_crf, make_crf
from primaps_dist.crf.lattice import PermutohedralLattice
from primaps_dist.crf.mean_field import UNARY_CLIP
from primaps_dist.crf.operators import GaussianOperator, LatticeOperator, grid_size, pairwise_operators, pixel_grid

__all__ = [
    "BACKENDS",
    "UNARY_CLIP",
    "CrfFn",
    "GaussianOperator",
    "LatticeOperator",
    "PermutohedralLattice",
    "crf_from_config",
    "dense_crf",
    "grid_size",
    "make_crf",
    "pairwise_operators",
    "pixel_grid",
]
