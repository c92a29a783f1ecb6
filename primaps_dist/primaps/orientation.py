"""Orientation of a principal direction as ``torch.pca_lowrank`` gives it (docs/method.md,
"Sign of the principal direction")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from primaps_dist.primaps.rounds import WorkingSet

from primaps_dist.primaps.rows import compact_order, rows_dot

__all__ = ["reference_orientation"]


def reference_orientation(
    state: "WorkingSet", direction: torch.Tensor, top3: torch.Tensor, top3_gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """+1 / -1 per image: the sign that ``torch.pca_lowrank(q=3)`` gives the principal direction.

    A principal direction has no intrinsic sign, but the published method takes the one that
    ``pca_lowrank`` returns on the CPU, and that sign decides which end of the axis the nearest-
    neighbour step starts from. ``pca_lowrank`` ends with one Rayleigh-Ritz step (Halko et al.,
    Algorithm 5.1) on its converged basis; that step is replayed here from our top-3 eigenvectors
    ``E`` of the free covariance, with the same LAPACK calls on the CPU (docs/method.md, "Sign of the
    principal direction"):

    * free positions >= channels: ``Q = qr(A E).Q``, ``svd(Q^T A)``, direction ``Vh[0]``;
    * free positions < channels (the library transposes ``A``): ``Q = qr(E).Q``,
      ``U = svd(Q^T A^T).U``, direction ``Q U[:, 0]``;

    with ``A`` [n_free, C] the free features centred on their mean, rows in row-major order (the
    order matters to Householder QR). Householder QR's Q does not depend on the signs of E's
    columns, so neither does the result. The small QR and SVD always run on the CPU, so every device
    reproduces the CPU's orientation.

    For tall ``A``, ``Q^T A`` is not formed from the features: with ``A E = Q R``,
    ``Q^T A = R^-T E^T (A^T A)``, and ``E^T A^T A`` follows from the running Gram matrix. For wide
    ``A``, ``A Q = (A E) R_E^-1`` with ``E = Q R_E``. One pass over the stored features (``A E``,
    three columns, plus ``points @ direction`` for the caller) and one transfer to the host are all
    this costs on the device.

    direction [b, C] unit top eigenvector, top3 [b, k, C] orthonormal rows by decreasing eigenvalue
    (k >= 1, first row ~ direction), top3_gram [b, k, C] = top3 @ G (G the running Gram matrix)
    -> (signs [b] float32, ``points @ direction`` [b, Q+1]) on ``direction``'s device.
    """
    batch, channels = direction.shape
    device = direction.device
    count = state.free_count_host
    rank = min(3, top3.shape[1], channels)
    width = int(count.max())
    signs = torch.ones(batch, dtype=torch.float32)
    rows = top3[:, :rank]  # E^T [b, q, C]
    products = rows_dot(state.points, torch.cat([direction.unsqueeze(1), rows], dim=1))  # [b, Q+1, 1+q]
    direction_dots = products[:, :, 0]
    if width < 1:
        return signs.to(device), direction_dots
    free_mean = state.free_sum / state.free_count.clamp(min=1).to(torch.float32)[:, None]  # [b, C]
    projected = products[:, :, 1:] - (rows @ free_mean.unsqueeze(2)).transpose(1, 2)
    order, valid = compact_order(state.free, state.free_count, width)
    compact = projected.gather(1, order.unsqueeze(2).expand(-1, -1, rank)) * valid.unsqueeze(2)
    # E^T A^T A = E^T G - (E^T S) S^T / n with S the free sum (A = free rows minus their mean).
    covariance_rows = top3_gram[:, :rank] - (rows @ state.free_sum.unsqueeze(2)) * free_mean.unsqueeze(1)
    pieces = (compact, covariance_rows, rows, direction)
    # The one transfer. The small QR and SVD then run in float64: E's rows are eigenvectors, so the
    # rows of Q^T A (tall) or of B (wide) are orthogonal to about float32 precision, and there the
    # float32 SVD's orientation follows rounding noise (measured: a batch of 32 and a batch of one
    # flipped the sign of a well-separated round, sigma ratios 1.38 / 1.25). In float64 that noise
    # is far above rounding and the orientation is the one that generic small perturbations give
    # (0 flips in 200 perturbations of 1e-12 to 1e-5 there; the published loop is reproducible).
    host = torch.cat([piece.reshape(batch, -1) for piece in pieces], dim=1).cpu().to(torch.float64)
    compact, covariance_rows, rows, cpu_direction = (
        chunk.reshape(piece.shape)
        for chunk, piece in zip(host.split([piece[0].numel() for piece in pieces], dim=1), pieces)
    )  # compact: [b, width, q] A E, free rows in row-major order, zero padding after them

    # Host lists: the batch is small, and Python bookkeeping is cheaper than tensor indexing here.
    sizes = count.tolist()
    tall = [image for image, size in enumerate(sizes) if size >= channels]  # pca_lowrank keeps A as it is
    wide: dict[int, list[int]] = {}  # n_free -> images; pca_lowrank works on A^T
    for image, size in enumerate(sizes):
        if 0 < size < channels:
            wide.setdefault(size, []).append(image)
    if tall:
        index = torch.tensor(tall)
        # Zero rows after the free ones leave Householder QR unchanged: its reflectors are zero there.
        triangle = torch.linalg.qr(compact[index]).R  # [t, q, q]
        small = torch.linalg.solve_triangular(
            triangle.transpose(1, 2), covariance_rows[index], upper=False
        )  # Q^T A [t, q, C]
        # A rank-deficient A E (e.g. constant features) has no defined orientation: any finite input.
        small = torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)
        right = torch.linalg.svd(small, full_matrices=False).Vh[:, 0]  # [t, C]
        signs[index] = torch.where((right * cpu_direction[index]).sum(dim=1) < 0, -1.0, 1.0)
    if wide:
        index = torch.tensor([image for members in wide.values() for image in members])
        wide_q, wide_r = torch.linalg.qr(rows[index].transpose(1, 2))  # Householder on the CPU
        wide_compact = torch.linalg.solve_triangular(wide_r, compact[index], upper=True, left=False)  # A Q
        wide_direction = cpu_direction[index]
        wide_signs = torch.ones(index.numel())
        # LAPACK orients U differently once zero columns pad B, so every image gets its exact
        # [q', n_free] matrix; images with equal free counts share one batched call.
        start = 0
        for free_positions, members in wide.items():
            group = slice(start, start + len(members))
            start += len(members)
            used = min(rank, free_positions)  # pca_lowrank's q = min(3, n_free, C)
            exact = wide_compact[group, :free_positions, :used].transpose(1, 2)  # B = (A Q)^T [w', q', n]
            left = torch.linalg.svd(exact, full_matrices=False).U[:, :, 0]  # [w', q']
            oriented = (wide_q[group, :, :used] @ left.unsqueeze(2)).squeeze(2)  # Q U[:, 0] [w', C]
            wide_signs[group] = torch.where((oriented * wide_direction[group]).sum(dim=1) < 0, -1.0, 1.0)
        signs[index] = wide_signs
    return signs.to(device), direction_dots
