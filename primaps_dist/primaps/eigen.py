"""Top principal direction of the free covariance: block subspace iteration on a running Gram matrix.

Used by :mod:`primaps_dist.primaps.rounds`; see the package docstring for how it fits in a round.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "gram", "solver_settings", "start_basis", "start_sketch", "top_direction"]


# Subspace size of the block eigen-solver and degree of its filter. With the CPU kernel (native/),
# where a round costs its arithmetic and small LAPACK calls rather than per-operation overhead, 8
# vectors with a degree-4 filter were fastest of k in {8, 12, 16, 24} x degree in {2, 3, 4} on the three
# bench sets (planted 384 x 40 x 40: -11 % against 16 / 3, stride 16: -27 %, stride 8: -30 %), with
# the same maps on all three (8 / 3 was faster still on the planted maps but changed 2 of 32 stride-16
# maps). The batched loop uses the same settings, so both paths run one method.
BLOCK = 8
_RESIDUAL_TOL = 2e-4
_MAX_SOLVER_ITERS = 60
# A covariance whose top eigenvalue is below this fraction of the image's total variance is treated
# as zero (e.g. constant features): its direction is arbitrary and needs no convergence.
_DEGENERATE_EIGENVALUE = 1e-6
_BASIS_SEED = 0x5EED
# Filter polynomial between Rayleigh-Ritz steps: prod_j (A - s_j theta_k) with s_j the Chebyshev nodes
# of degree _FILTER_DEGREE on [0, 1] (theta_k = smallest Ritz value, the top of the unwanted part).
_FILTER_DEGREE = 4
_NODES = tuple(0.5 + 0.5 * math.cos((2 * j - 1) * math.pi / (2 * _FILTER_DEGREE)) for j in range(1, _FILTER_DEGREE + 1))


def solver_settings() -> tuple[int, float, float, list[float]]:
    """(max iterations, residual tolerance, degenerate fraction, filter nodes): the solver's constants
    for the C++ kernel (native/rounds.cpp), which runs the same solver one image at a time."""
    return _MAX_SOLVER_ITERS, _RESIDUAL_TOL, _DEGENERATE_EIGENVALUE, list(_NODES)


def gram(columns: torch.Tensor) -> torch.Tensor:
    """``columns @ columns^T`` ([b, C, n] -> [b, C, C]) computing only 3/4 of the blocks (symmetry)."""
    half = columns.shape[1] // 2
    if half < 32:
        return columns @ columns.transpose(1, 2)
    batch, channels, _ = columns.shape
    gram = torch.empty(batch, channels, channels, dtype=columns.dtype, device=columns.device)
    gram[:, :half] = columns[:, :half] @ columns.transpose(1, 2)
    gram[:, half:, half:] = columns[:, half:] @ columns[:, half:].transpose(1, 2)
    gram[:, half:, :half] = gram[:, :half, half:].transpose(1, 2)
    return gram


def start_basis(centred: torch.Tensor, block: int) -> torch.Tensor:
    """Deterministic orthonormal start basis [b, k, C] (rows) for the first round.

    A randomised range finder: random combinations of the image's centred features
    (``centred`` [b, C, P]), i.e. one implicit power step, so the first round starts close to the
    dominant subspace. The sketch matrix is drawn on the CPU with a fixed seed (same on every device).
    """
    batch, channels, positions = centred.shape
    sketch = start_sketch(positions, block).to(centred.device)
    return torch.linalg.qr(centred @ sketch).Q.transpose(1, 2).contiguous()


def start_sketch(positions: int, block: int) -> torch.Tensor:
    """The fixed random [positions, block] float32 CPU matrix of :func:`start_basis` (the C++ kernel
    builds its start basis from the same one)."""
    generator = torch.Generator().manual_seed(_BASIS_SEED)
    return torch.randn(positions, block, generator=generator, dtype=torch.float32)


def top_direction(
    gram: torch.Tensor,
    free_sum: torch.Tensor,
    free_count: torch.Tensor,
    basis: torch.Tensor,
    gram_basis: torch.Tensor | None,
    active: torch.Tensor,
    total_variance: torch.Tensor,
    smallest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenvector of ``A = gram - free_sum free_sum^T / free_count`` per image.

    Block subspace iteration with a Chebyshev filter: ``basis <- orth(p(A) basis)`` with
    ``p(x) = prod_j (x - s_j theta_k)`` (``_NODES``; theta_k the smallest Ritz value, so ``p`` is
    small on the unwanted part of the spectrum), then Rayleigh-Ritz. Vectors are stored as rows
    ([b, k, C] @ [b, C, C] streams the Gram matrix faster than [b, C, C] @ [b, C, k]). Images stop
    iterating once their relative residual ``||A v - theta v|| / theta`` is below
    ``_RESIDUAL_TOL``; they keep their rows (and G products) from then on, so their result does not
    depend on the rest of the batch.

    gram [b, C, C] symmetric, free_sum [b, C], free_count [b] float, basis [b, k, C] orthonormal rows
    (warm start), gram_basis [b, k, C] = basis @ gram if already known (saves one pass over gram),
    active [b] bool (inactive images only pass through), total_variance [b], smallest [b]: the
    smallest Ritz value of the warm start's last Rayleigh-Ritz step, if any (then the warm start is
    filtered right away; without it, a Rayleigh-Ritz step on the warm start comes first).
    Returns (direction [b, C] unit norm, Ritz basis [b, k, C] by decreasing Ritz value,
    Ritz basis @ gram [b, k, C], smallest Ritz value [b]).
    """
    inverse_count = (1.0 / free_count.clamp(min=1.0))[:, None, None]
    sums = free_sum.unsqueeze(1)  # [b, 1, C]
    floor = _DEGENERATE_EIGENVALUE * total_variance

    def apply_covariance(vectors: torch.Tensor, vectors_gram: torch.Tensor) -> torch.Tensor:
        """A v for rows v [b, k, C], given v G."""
        return torch.baddbmm(vectors_gram, (vectors @ sums.transpose(1, 2)) * inverse_count, sums, alpha=-1.0)

    converged = ~active
    frozen = converged[:, None, None]
    identity = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device)
    rows = basis
    gram_rows = basis @ gram if gram_basis is None else gram_basis
    applied = apply_covariance(rows, gram_rows)
    filter_first = smallest is not None
    for iteration in range(_MAX_SOLVER_ITERS):
        if filter_first or iteration > 0:
            filtered = applied - (_NODES[0] * smallest)[:, None, None] * rows  # (A - s_1) V
            for node in _NODES[1:]:
                filtered = apply_covariance(filtered, filtered @ gram) - (node * smallest)[:, None, None] * filtered
            stepped = torch.linalg.qr(filtered.transpose(1, 2)).Q.transpose(1, 2)
            # Converged images keep their rows and even their G products: bitwise frozen, so every
            # later iteration reproduces their Ritz vectors exactly.
            rows = torch.where(frozen, rows, stepped)
            gram_rows = torch.where(frozen, gram_rows, rows @ gram)
            applied = apply_covariance(rows, gram_rows)
        projected = rows @ applied.transpose(1, 2)
        projected = 0.5 * (projected + projected.transpose(1, 2))
        values, rotation = torch.linalg.eigh(projected)
        rotation = rotation.flip(-1).transpose(1, 2)  # rows = Ritz coefficients, largest first
        # Images converged earlier keep their Ritz vectors (a second Rayleigh-Ritz step would rotate
        # them by rounding noise): the identity rotation reproduces them bitwise (x * 1 + 0 * y = x).
        rotation = torch.where(frozen, identity, rotation)
        rows, gram_rows, applied = rotation @ rows, rotation @ gram_rows, rotation @ applied
        smallest = values[:, 0] if smallest is None else torch.where(converged, smallest, values[:, 0])
        top = values[:, -1]
        residual = torch.linalg.vector_norm(applied[:, 0] - top[:, None] * rows[:, 0], dim=1)
        converged = converged | (residual <= _RESIDUAL_TOL * top) | (top <= floor)
        frozen = converged[:, None, None]
        if iteration == _MAX_SOLVER_ITERS - 1 or bool(converged.all()):
            break
    return F.normalize(rows[:, 0], dim=1), rows, gram_rows, smallest
