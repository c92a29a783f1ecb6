"""PriMaPs: batched principal mask proposals (docs/method.md, "Principal mask proposals").

One call processes a whole batch of feature maps; the only Python loops are over proposal rounds
(at most ``max_masks``) and over the iterations of the eigen-solver inside a round.

Per image and round (all images of the batch at once):

1. First principal direction ``v`` of the centred features at the still *free* positions. The
   un-normalised covariance ``A = G_free - S S^T / n_free`` is kept as a running Gram matrix
   ``G_free = sum_free x x^T`` ([B, C, C]) and sum ``S = sum_free x`` ([B, C]); covered positions
   are subtracted (down-dated) once, when they get covered. ``v`` is the top eigenvector of ``A``,
   found by shifted block subspace iteration with Rayleigh-Ritz (``_BLOCK`` vectors, warm-started
   from the previous round's Ritz basis, whose product with ``G`` is carried over through the
   down-date) until the relative residual ``||A v - theta v|| / theta`` drops below
   ``_RESIDUAL_TOL``; it agrees with an exact float64 eigendecomposition and with the reference's
   ``torch.pca_lowrank(q=3, niter=100)`` (see tests). No [B, h*w, h*w] tensor is ever built.
2. **Orientation**: a principal direction has no intrinsic sign, yet the sign decides which end of
   the axis step 3 starts from. ``v`` gets the sign that the published code's
   ``torch.pca_lowrank(q=3, niter=100)`` returns, by replaying that routine's final Rayleigh-Ritz
   step from the top-3 eigenvectors with the same LAPACK calls on the CPU
   (:func:`_reference_orientation`; evidence in docs/method.md). Then ``s = <v, n>`` with
   ``n = f / ||f||``; ``s = 0`` at covered positions.
3. Nearest-neighbour refinement: ``v = n[p]`` at ``p = argmax`` of ``s`` over free positions (first
   one on ties); ``s = <v, n>``, ``s = 0`` at covered positions.
4. ``s[s < threshold * max(s)] = 0``; ``s = s / max(s)`` is the soft proposal.
5. Positions with ``s > 0`` become covered.
6. Stop an image when the covered fraction reaches ``coverage``, when it has ``max_masks``
   proposals, or when a round covers nothing new. The reference keeps the last three coverage
   states and stops when they agree; here every round is a deterministic function of the coverage
   state, so one unchanged round already means that nothing will ever change again. Such an empty
   round adds no proposal (the reference would add an all-zero / NaN mask).

Images that are done keep their state while the others continue; finished images leave the working
batch and covered positions leave the stored features (both geometrically), so they stop costing
compute. Post-processing uses that proposals are disjoint: the median-filtered stack has at most one
nonzero channel per position, so ``mask_logits`` never builds the dense [B, M, h, w] stack
(``postprocess_masks`` is the general dense version; both agree to float rounding).

Degenerate inputs: positions whose feature vector is zero can never be covered (``s = 0`` there)
and end up as background; constant features give one proposal covering everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "logits_from_maps",
    "mask_logits",
    "median_filter_3x3",
    "postprocess_masks",
    "principal_masks",
    "proposal_maps",
]

# Subspace size of the block eigen-solver: a pass [b, k, C] @ [b, C, C] costs little more for k = 16
# than for k = 4 (memory bound on G) while convergence improves as (lambda_{k+1} / lambda_1)^iters;
# 16 was fastest overall (8 and 24 measured slower) for C = 384.
_BLOCK = 16
_RESIDUAL_TOL = 2e-4
_MAX_SOLVER_ITERS = 60
# A covariance whose top eigenvalue is below this fraction of the image's total variance is treated
# as zero (e.g. constant features): its direction is arbitrary and needs no convergence.
_DEGENERATE_EIGENVALUE = 1e-6
_BASIS_SEED = 0x5EED
# Finished images leave the working batch once the running fraction drops to this.
_COMPACT_FRACTION = 0.9


def _validate(features: torch.Tensor, threshold: float, coverage: float, max_masks: int) -> None:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 4:
        raise ValueError(f"features must have shape [B, C, h, w], got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating point tensor, got dtype {features.dtype}")
    if min(features.shape) == 0:
        raise ValueError(f"features must not have an empty dimension, got {tuple(features.shape)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 < float(coverage) <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if isinstance(max_masks, bool) or int(max_masks) != max_masks or max_masks < 1:
        raise ValueError(f"max_masks must be a positive integer, got {max_masks}")


def _gram(columns: torch.Tensor) -> torch.Tensor:
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


def _start_basis(centred: torch.Tensor, block: int) -> torch.Tensor:
    """Deterministic orthonormal start basis [b, k, C] (rows) for the first round.

    A randomised range finder: random combinations of the image's centred features
    (``centred`` [b, C, P]), i.e. one implicit power step, so the first round starts close to the
    dominant subspace. The sketch matrix is drawn on the CPU with a fixed seed (same on every device).
    """
    batch, channels, positions = centred.shape
    generator = torch.Generator().manual_seed(_BASIS_SEED)
    sketch = torch.randn(positions, block, generator=generator, dtype=torch.float32).to(centred.device)
    return torch.linalg.qr(centred @ sketch).Q.transpose(1, 2).contiguous()


def _top_direction(
    gram: torch.Tensor,
    free_sum: torch.Tensor,
    free_count: torch.Tensor,
    basis: torch.Tensor,
    gram_basis: torch.Tensor | None,
    active: torch.Tensor,
    total_variance: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenvector of ``A = gram - free_sum free_sum^T / free_count`` per image.

    Block subspace iteration on ``A - sigma I`` (``sigma`` = half the smallest Ritz value) with
    Rayleigh-Ritz; vectors are stored as rows ([b, k, C] @ [b, C, C] streams the Gram matrix faster
    than [b, C, C] @ [b, C, k]). Images stop iterating once their relative residual
    ``||A v - theta v|| / theta`` is below ``_RESIDUAL_TOL``; they keep their rows (and G products)
    from then on, so their result does not depend on the rest of the batch.

    gram [b, C, C] symmetric, free_sum [b, C], free_count [b] float, basis [b, k, C] orthonormal rows
    (warm start), gram_basis [b, k, C] = basis @ gram if already known (saves one pass over gram),
    active [b] bool (inactive images only pass through), total_variance [b].
    Returns (direction [b, C] unit norm, Ritz basis [b, k, C] by decreasing Ritz value,
    Ritz basis @ gram [b, k, C]).
    """
    inverse_count = (1.0 / free_count.clamp(min=1.0))[:, None, None]
    sums = free_sum.unsqueeze(1)  # [b, 1, C]
    converged = ~active
    rows = basis
    gram_rows = basis @ gram if gram_basis is None else gram_basis
    floor = _DEGENERATE_EIGENVALUE * total_variance
    for iteration in range(_MAX_SOLVER_ITERS):
        if iteration > 0:  # converged images keep even their G products: bitwise frozen
            fresh = rows @ gram
            gram_rows = torch.where(converged[:, None, None], gram_rows, fresh) if any_converged else fresh
        applied = torch.baddbmm(gram_rows, (rows @ sums.transpose(1, 2)) * inverse_count, sums, alpha=-1.0)
        projected = rows @ applied.transpose(1, 2)
        projected = 0.5 * (projected + projected.transpose(1, 2))
        values, rotation = torch.linalg.eigh(projected)
        rotation = rotation.flip(-1).transpose(1, 2)  # rows = Ritz coefficients, largest first
        top = values[:, -1]
        ritz = rotation @ rows
        applied_ritz = rotation @ applied
        residual = torch.linalg.vector_norm(applied_ritz[:, 0] - top[:, None] * ritz[:, 0], dim=1)
        converged = converged | (residual <= _RESIDUAL_TOL * top) | (top <= floor)
        if iteration == _MAX_SOLVER_ITERS - 1 or bool(converged.all()):
            break
        # Converged images keep their rows (and G products), so every later iteration reproduces
        # their Ritz vectors exactly and the final `ritz` is theirs at convergence time.
        shift = 0.5 * values[:, 0]  # half the smallest Ritz value: damps the unwanted spectrum [0, theta_k]
        stepped = torch.linalg.qr((applied_ritz - shift[:, None, None] * ritz).transpose(1, 2)).Q.transpose(1, 2)
        any_converged = bool(converged.any())
        rows = torch.where(converged[:, None, None], rows, stepped) if any_converged else stepped
    return F.normalize(ritz[:, 0], dim=1), ritz, rotation @ gram_rows


def _first_index_of_max(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 1 (explicit, so ties never depend on the backend)."""
    peak = values.amax(dim=1, keepdim=True)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values == peak, positions, values.shape[1]).amin(dim=1)


def _take_rows(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``points[i, index[i]]`` for every image: points [b, Q, C], index [b, w] -> [b, w, C]."""
    batch, stored, channels = points.shape
    flat = index + stored * torch.arange(batch, device=index.device)[:, None]
    return points.reshape(batch * stored, channels).index_select(0, flat.reshape(-1)).reshape(batch, -1, channels)


class _WorkingSet:
    """State of the proposal loop for the images still in the working batch.

    Features are stored centred (``f - mean``, so down-dates need no subtraction) and position-major
    as ``points`` [b, Q + 1, C] (gathering positions copies contiguous rows); the last row is all
    zeros and never free, so padded gathers can point at it. Only rows that may still be free are
    kept: once the largest free count of the working images drops to half the stored width, the free
    rows are gathered to the front (stable, so row-major order and hence first-on-ties decisions are
    kept) and the rest dropped.
    """

    _STATE = (
        "rows", "points", "inverse_norm", "position", "mean", "gram", "free_sum", "total_variance",
        "free", "free_count", "basis", "gram_basis", "running", "counts", "mask_id", "mask_value",
    )

    def __init__(self, features: torch.Tensor, block: int):
        batch, channels, height, width = features.shape
        positions = height * width
        device = features.device
        flat = features.detach().to(torch.float32).reshape(batch, channels, positions)
        norm = torch.linalg.vector_norm(flat, dim=1)  # [b, P]
        if not bool(torch.isfinite(norm).all()) and not bool(torch.isfinite(flat).all()):
            raise ValueError("features contain NaN or Inf values")
        self.positions = positions
        self.rows = torch.arange(batch, device=device)  # full-batch index of each working image
        self.mean = flat.mean(dim=2)  # [b, C]
        # Centring first also keeps the float32 Gram matrix from losing digits to a large mean.
        self.points = torch.empty(batch, positions + 1, channels, dtype=torch.float32, device=device)
        self.points[:, positions].zero_()
        centred = self.points[:, :positions]
        torch.sub(flat.transpose(1, 2), self.mean.unsqueeze(1), out=centred)
        self.gram = _gram(centred.transpose(1, 2))  # [b, C, C]
        self.free_sum = centred.sum(dim=1)  # [b, C]
        self.total_variance = torch.diagonal(self.gram, dim1=1, dim2=2).sum(dim=1)
        self.basis = _start_basis(centred.transpose(1, 2), min(block, channels))
        self.gram_basis: torch.Tensor | None = None  # basis @ gram once known
        # F.normalize's eps; exactly 0 at zero vectors, whose centred dot products only cancel up to
        # rounding (the residue times 1e12 would make them look like the most similar positions).
        self.inverse_norm = F.pad(torch.where(norm > 0, 1.0 / norm.clamp(min=1e-12), 0.0), (0, 1))  # [b, Q+1]
        self.position = F.pad(torch.arange(positions, device=device), (0, 1), value=-1).expand(batch, -1)
        self.free = F.pad(torch.ones(batch, positions, dtype=torch.bool, device=device), (0, 1))
        self.free_count = torch.full((batch,), positions, dtype=torch.int64, device=device)
        self.running = torch.ones(batch, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch, dtype=torch.int64, device=device)
        self.mask_id = torch.zeros(batch, positions, dtype=torch.int64, device=device)  # [b, P]
        self.mask_value = torch.zeros(batch, positions, dtype=torch.float32, device=device)  # [b, P]

    @property
    def zero_row(self) -> int:
        return self.points.shape[1] - 1

    def keep_only(self, selection: torch.Tensor) -> None:
        """Drop images: keep working rows ``selection`` [b'] int64."""
        for name in self._STATE:
            value = getattr(self, name)
            setattr(self, name, None if value is None else value[selection])

    def drop_covered_rows(self) -> None:
        """Shrink the stored rows to the largest free count of the working images."""
        width = int(self.free_count.max())
        if width == 0 or width > self.zero_row // 2:
            return
        order = torch.sort(self.free.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
        order = F.pad(order, (0, 1), value=self.zero_row)
        self.points = _take_rows(self.points, order)
        self.inverse_norm = self.inverse_norm.gather(1, order)
        self.position = self.position.gather(1, order)
        self.free = self.free.gather(1, order)

    def cosine_to(self, direction: torch.Tensor, centred_dots: torch.Tensor | None = None) -> torch.Tensor:
        """<direction, n> per stored row: direction [b, C] -> [b, Q+1], 0 at covered rows.

        ``centred_dots`` [b, Q+1]: ``points @ direction`` when the caller already has it."""
        offset = (direction * self.mean).sum(dim=1, keepdim=True)
        if centred_dots is None:
            # A [b, 1, C] row viewed as [b, C, 1] takes MKL's GEMM path, several times faster on CPU
            # than a contiguous [b, C, 1] column (GEMV).
            centred_dots = (self.points @ direction.unsqueeze(1).transpose(1, 2)).squeeze(2)
        dots = (centred_dots + offset) * self.inverse_norm
        return dots.masked_fill(~self.free, 0.0)

    def unit_feature(self, row: torch.Tensor) -> torch.Tensor:
        """n at one stored row per image: row [b] -> [b, C]."""
        picked = _take_rows(self.points, row[:, None]).squeeze(1)
        return (picked + self.mean) * self.inverse_norm.gather(1, row[:, None])

    def record(self, keep: torch.Tensor, values: torch.Tensor) -> None:
        """Store proposal ``counts`` with soft ``values`` [b, Q] at the ``keep`` [b, Q] columns."""
        image, column = keep.nonzero(as_tuple=True)
        position = self.position[image, column]
        self.mask_id[image, position] = self.counts[image]
        self.mask_value[image, position] = values[image, column]

    def cover(self, keep: torch.Tensor) -> None:
        """Mark ``keep`` [b, Q] rows covered; down-date the Gram matrix and the free sum.

        The newly covered rows are gathered into a zero-padded [b, widest, C] block, so the
        down-date is one batched rank-``widest`` update (padding rows contribute nothing).
        """
        newly = keep.sum(dim=1)
        widest = int(newly.max())
        if widest > 0:
            order = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :widest]
            valid = torch.arange(widest, device=keep.device)[None, :] < newly[:, None]
            covered = _take_rows(self.points, torch.where(valid, order, self.zero_row))  # [b, widest, C]
            self.gram.baddbmm_(covered.transpose(1, 2), covered, alpha=-1.0)
            if 4 * widest <= covered.shape[2]:
                # Cheaper than a pass over G: keep G @ basis current for the next solver start.
                self.gram_basis.baddbmm_(self.basis @ covered.transpose(1, 2), covered, alpha=-1.0)
            else:
                self.gram_basis = None
            self.free_sum = self.free_sum - covered.sum(dim=1)
        self.free = self.free & ~keep
        self.free_count = self.free_count - newly


def _compact_order(free: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored rows of the free positions, in row-major order, moved to the front.

    free [b, Q] bool -> (order [b, width] int64 row indices, valid [b, width] bool); entries past an
    image's free count are padding (``valid`` False).
    """
    order = torch.sort(free.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width, device=free.device)[None, :] < free.sum(dim=1, keepdim=True)
    return order, valid


def _reference_orientation(
    state: "_WorkingSet", direction: torch.Tensor, top3: torch.Tensor, top3_gram: torch.Tensor
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
    ``Q^T A = R^-T E^T (A^T A)``, and ``E^T A^T A`` follows from the running Gram matrix. One pass
    over the stored features (``A M``, three columns, plus ``points @ direction`` for the caller) is
    all this costs.

    direction [b, C] unit top eigenvector, top3 [b, k, C] orthonormal rows by decreasing eigenvalue
    (k >= 1, first row ~ direction), top3_gram [b, k, C] = top3 @ G (G the running Gram matrix)
    -> (signs [b] float32, ``points @ direction`` [b, Q+1]) on ``direction``'s device.
    """
    batch, channels = direction.shape
    device = direction.device
    count = state.free_count.cpu()
    rank = min(3, top3.shape[1], channels)
    width = int(count.max())
    signs = torch.ones(batch, dtype=torch.float32)
    tall = count >= channels  # pca_lowrank keeps A as it is; otherwise it works on A^T
    wide_rows = (~tall).nonzero().squeeze(1)
    # Per image one [C, q] matrix M: E for tall images, Q = qr(E).Q for wide ones; one pass over the
    # stored features then gives A M at every row (covered rows are dropped by the gather below).
    rows = top3[:, :rank].contiguous()  # E^T [b, q, C]
    wide_q = torch.linalg.qr(rows[wide_rows.to(device)].transpose(1, 2).cpu()).Q  # [w, C, q], Householder on the CPU
    if wide_rows.numel():
        rows[wide_rows.to(device)] = wide_q.transpose(1, 2).to(device)
    free_count = state.free_count.clamp(min=1).to(torch.float32)
    free_mean = state.free_sum / free_count[:, None]  # [b, C]
    # [b, Q+1, C] @ (a transposed view of [b, 1+q, C]) takes a GEMM path several times faster on
    # CPU than a contiguous [b, C, 1+q] operand.
    products = state.points @ torch.cat([direction.unsqueeze(1), rows], dim=1).transpose(1, 2)
    direction_dots = products[:, :, 0]
    if width < 1:
        return signs.to(device), direction_dots
    projected = products[:, :, 1:] - (rows @ free_mean.unsqueeze(2)).transpose(1, 2)
    order, valid = _compact_order(state.free, width)
    compact = projected.gather(1, order.unsqueeze(2).expand(-1, -1, rank)) * valid.unsqueeze(2)
    compact = compact.cpu()  # [b, width, q]: A M, free rows in row-major order, zero padding after them
    cpu_direction = direction.cpu()

    tall_rows = tall.nonzero().squeeze(1)
    if tall_rows.numel():
        # Zero rows after the free ones leave Householder QR unchanged: its reflectors are zero there.
        triangle = torch.linalg.qr(compact[tall_rows]).R  # [t, q, q]
        # E^T A^T A = E^T G - (E^T S) S^T / n with S the free sum (A = free rows minus their mean).
        covariance_rows = top3_gram[:, :rank] - (top3[:, :rank] @ state.free_sum.unsqueeze(2)) * (
            free_mean.unsqueeze(1)
        )
        small = torch.linalg.solve_triangular(
            triangle.transpose(1, 2), covariance_rows.cpu()[tall_rows], upper=False
        )  # Q^T A [t, q, C]
        # A rank-deficient A E (e.g. constant features) has no defined orientation: any finite input.
        small = torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)
        right = torch.linalg.svd(small, full_matrices=False).Vh[:, 0]  # [t, C]
        signs[tall_rows] = torch.where((right * cpu_direction[tall_rows]).sum(dim=1) < 0, -1.0, 1.0)
    if wide_rows.numel():
        # LAPACK orients U differently once zero columns pad B, so every image gets its exact
        # [q', n_free] matrix; images with equal free counts share one batched call.
        wide_count = count[wide_rows]
        for free_positions in torch.unique(wide_count).tolist():
            if free_positions < 1:
                continue
            same = (wide_count == free_positions).nonzero().squeeze(1)
            used = min(rank, free_positions)  # pca_lowrank's q = min(3, n_free, C)
            exact = compact[wide_rows[same], :free_positions, :used].transpose(1, 2)  # B = (A Q)^T [w', q', n]
            left = torch.linalg.svd(exact, full_matrices=False).U[:, :, 0]  # [w', q']
            oriented = (wide_q[same, :, :used] @ left.unsqueeze(2)).squeeze(2)  # Q U[:, 0] [w', C]
            signs[wide_rows[same]] = torch.where((oriented * cpu_direction[wide_rows[same]]).sum(dim=1) < 0, -1.0, 1.0)
    return signs.to(device), direction_dots

def _proposal_round(state: _WorkingSet, threshold: float, coverage: float, max_masks: int) -> None:
    """One PriMaPs round for every running image of the working set (updates ``state`` in place)."""
    direction, state.basis, state.gram_basis = _top_direction(
        state.gram, state.free_sum, state.free_count.to(torch.float32), state.basis, state.gram_basis,
        state.running, state.total_variance,
    )
    signs, direction_dots = _reference_orientation(state, direction, state.basis, state.gram_basis)
    direction = direction * signs[:, None]
    similarity = state.cosine_to(direction, direction_dots * signs[:, None])
    # Nearest-neighbour refinement from the best free position.
    seed = _first_index_of_max(similarity.masked_fill(~state.free, float("-inf")))
    similarity = state.cosine_to(state.unit_feature(seed))
    peak = similarity.amax(dim=1)
    productive = state.running & (peak > 0)
    keep = state.free & productive[:, None] & (similarity > 0) & (similarity >= threshold * peak[:, None])

    state.counts = state.counts + productive.to(torch.int64)
    state.record(keep, similarity / torch.where(productive, peak, 1.0)[:, None])
    state.cover(keep)
    # Same float32 comparison as the reference's `(covered / numel) < 0.95` loop condition.
    covered_fraction = (state.positions - state.free_count).to(torch.float32) / state.positions
    state.running = productive & (covered_fraction < coverage) & (state.counts < max_masks)


def proposal_maps(
    features: torch.Tensor, threshold: float, coverage: float, max_masks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the proposal rounds. Returns (mask_id [B, h, w] int64 with 0 = no proposal and k = the
    k-th proposal, mask_value [B, h, w] float32 soft value of that proposal, counts [B] int64)."""
    _validate(features, threshold, coverage, max_masks)
    batch, _, height, width = features.shape
    device = features.device
    state = _WorkingSet(features, _BLOCK)
    mask_id = torch.zeros(batch, height * width, dtype=torch.int64, device=device)
    mask_value = torch.zeros(batch, height * width, dtype=torch.float32, device=device)
    counts = torch.zeros(batch, dtype=torch.int64, device=device)

    def store(rows_state: _WorkingSet) -> None:
        mask_id[rows_state.rows] = rows_state.mask_id
        mask_value[rows_state.rows] = rows_state.mask_value
        counts[rows_state.rows] = rows_state.counts

    for _ in range(int(max_masks)):
        running = int(state.running.sum())
        if running == 0:
            break
        if running <= _COMPACT_FRACTION * state.rows.numel():
            store(state)
            state.keep_only(state.running.nonzero().squeeze(1))
        state.drop_covered_rows()
        _proposal_round(state, float(threshold), float(coverage), int(max_masks))
    store(state)
    return mask_id.reshape(batch, height, width), mask_value.reshape(batch, height, width), counts


@torch.no_grad()
def principal_masks(
    features: torch.Tensor,
    threshold: float = 0.4,
    coverage: float = 0.95,
    max_masks: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft principal mask proposals of a batch of feature maps (before post-processing).

    Args:
        features: [B, C, h, w] floating point feature maps (any float dtype; computed in float32).
        threshold: relative threshold of step 4 (0.4 in the paper).
        coverage: stop an image once this fraction of its positions is covered.
        max_masks: upper bound on the number of proposals (and rounds) per image.

    Returns:
        masks: [B, M, h, w] float32 in [0, 1], M = max(1, largest proposal count in the batch);
            proposal ``k`` of image ``b`` is ``masks[b, k]``; masks of one image are disjoint;
            channels ``k >= counts[b]`` are all zero.
        counts: [B] int64 number of proposals per image.

    Raises:
        ValueError: wrong shape or dtype, NaN/Inf values, or an invalid parameter.
    """
    mask_id, mask_value, counts = proposal_maps(features, threshold, coverage, max_masks)
    batch, height, width = mask_id.shape
    channels = max(1, int(counts.max()))
    masks = torch.zeros(batch, channels, height, width, dtype=torch.float32, device=mask_id.device)
    masks.scatter_(1, (mask_id - 1).clamp(min=0).unsqueeze(1), mask_value.unsqueeze(1))
    return masks, counts


def _reflect_index(size: int, device: torch.device) -> torch.Tensor:
    """Indices of a 1-pixel reflect padding (replicate when size == 1, where reflect is undefined)."""
    index = torch.arange(-1, size + 1, device=device)
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= size, 2 * (size - 1) - index, index)
    return index.clamp(0, size - 1)


def median_filter_3x3(images: torch.Tensor) -> torch.Tensor:
    """3x3 median filter with reflect padding over the last two dims of ``images`` [..., H, W].

    Exact median of 9 as ``med3(max of column minima, med3 of column medians, min of column
    maxima)`` after sorting every vertical triple; elementwise ops on shifted views only.
    """
    height, width = images.shape[-2:]
    padded = images.index_select(-2, _reflect_index(height, images.device))
    padded = padded.index_select(-1, _reflect_index(width, images.device))
    up, centre, down = padded[..., :-2, :], padded[..., 1:-1, :], padded[..., 2:, :]
    low, high = torch.minimum(up, centre), torch.maximum(up, centre)
    middle = torch.maximum(low, torch.minimum(high, down))
    high, low = torch.maximum(high, down), torch.minimum(low, down)

    def columns(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return t[..., :-2], t[..., 1:-1], t[..., 2:]

    low_l, low_c, low_r = columns(low)
    mid_l, mid_c, mid_r = columns(middle)
    high_l, high_c, high_r = columns(high)
    max_low = torch.maximum(torch.maximum(low_l, low_c), low_r)
    min_high = torch.minimum(torch.minimum(high_l, high_c), high_r)
    med_mid = _median3(mid_l, mid_c, mid_r)
    return _median3(max_low, med_mid, min_high)


def _median3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


@torch.no_grad()
def postprocess_masks(masks: torch.Tensor, counts: torch.Tensor, median_filter: bool = True) -> torch.Tensor:
    """Turn soft proposals into pre-CRF log-probabilities (ALGORITHM.md section 2, post-processing).

    Args:
        masks: [B, M, h, w] float soft proposals in [0, 1] (channels ``>= counts[b]`` are ignored).
        counts: [B] int64 number of valid proposals per image.
        median_filter: apply the 3x3 median filter (reflect padding) to every mask first.

    Returns:
        [B, 1 + M, h, w] float32 log-probabilities; channel 0 is the background
        ``clip(mean(nonzero mask values) - sum(masks), 0, 1)`` (mean taken as 1 when an image has no
        nonzero value, i.e. all background); channels of unused proposals hold ``-inf``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape [B, M, h, w], got {tuple(masks.shape)}")
    if counts.shape != masks.shape[:1]:
        raise ValueError(f"counts must have shape [{masks.shape[0]}], got {tuple(counts.shape)}")
    masks = masks.to(torch.float32)
    valid = torch.arange(masks.shape[1], device=masks.device)[None, :] < counts.to(masks.device)[:, None]
    valid = valid[:, :, None, None]
    if median_filter:
        masks = median_filter_3x3(masks)
    masks = torch.where(valid, (masks * 10.0).clamp(0.0, 1.0), 0.0)
    nonzero = (masks != 0).sum(dim=(1, 2, 3))
    mean_nonzero = torch.where(nonzero > 0, masks.sum(dim=(1, 2, 3)) / nonzero.clamp(min=1), 1.0)
    background = (mean_nonzero[:, None, None, None] - masks.sum(dim=1, keepdim=True)).clamp(0.0, 1.0)
    logits = torch.cat([background, masks.masked_fill(~valid, float("-inf"))], dim=1)
    return torch.log_softmax(logits, dim=1)


def _neighbourhoods(maps: torch.Tensor) -> torch.Tensor:
    """The 9 values of every 3x3 window (reflect padding): maps [B, h, w] -> [B, 9, h, w]."""
    height, width = maps.shape[-2:]
    padded = maps.index_select(-2, _reflect_index(height, maps.device))
    padded = padded.index_select(-1, _reflect_index(width, maps.device))
    return torch.stack(
        [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], dim=1
    )


def logits_from_maps(
    mask_id: torch.Tensor, mask_value: torch.Tensor, counts: torch.Tensor, median_filter: bool
) -> torch.Tensor:
    """:func:`postprocess_masks` for disjoint proposals given as (id, value) maps, without the dense stack.

    Disjointness makes the filtered stack sparse too: channel k is nonzero after a 3x3 median only
    where at least 5 of the 9 window entries belong to proposal k, which holds for at most one k per
    position, and that k is then the median of the window's ids. Its filtered value is the median of
    the window's values with other proposals' entries set to 0. With at most one nonzero channel per
    position, ``log_softmax`` has a closed form.

    mask_id [B, h, w] int64, mask_value [B, h, w] float32, counts [B] -> [B, 1 + M, h, w] float32.
    """
    batch, height, width = mask_id.shape
    if median_filter:
        ids = _neighbourhoods(mask_id)
        winner = ids.median(dim=1).values  # the majority id whenever one has >= 5 of 9 entries
        mine = ids == winner.unsqueeze(1)
        value = torch.where(mine, _neighbourhoods(mask_value), 0.0).median(dim=1).values
        present = (mine.sum(dim=1) >= 5) & (winner > 0) & (value > 0)
        mask_id = torch.where(present, winner, 0)
        mask_value = torch.where(present, value, 0.0)
    value = torch.where(mask_id > 0, (mask_value * 10.0).clamp(0.0, 1.0), 0.0)
    nonzero = (value != 0).sum(dim=(1, 2))
    mean_nonzero = torch.where(nonzero > 0, value.sum(dim=(1, 2)) / nonzero.clamp(min=1), 1.0)
    background = (mean_nonzero[:, None, None] - value).clamp(0.0, 1.0)
    has_mask = (value != 0) | (mask_id > 0)
    others = counts.to(torch.float32)[:, None, None] - has_mask.to(torch.float32)  # channels at 0
    log_total = torch.log(background.exp() + torch.where(has_mask, value.exp(), 0.0) + others)
    channels = max(1, int(counts.max()))
    valid = torch.arange(channels, device=mask_id.device)[None, :] < counts[:, None]  # [B, M]
    logits = torch.where(valid[:, :, None, None], -log_total.unsqueeze(1), float("-inf"))
    logits = logits.expand(batch, channels, height, width).contiguous()
    own = (mask_id - 1).clamp(min=0).unsqueeze(1)
    own_logit = torch.where(has_mask, value - log_total, logits.gather(1, own).squeeze(1))
    logits.scatter_(1, own, own_logit.unsqueeze(1))
    return torch.cat([(background - log_total).unsqueeze(1), logits], dim=1)


@torch.no_grad()
def mask_logits(
    features: torch.Tensor,
    threshold: float = 0.4,
    coverage: float = 0.95,
    max_masks: int = 64,
    median_filter: bool = True,
) -> torch.Tensor:
    """PriMaPs pre-CRF log-probabilities of a batch of feature maps.

    Args:
        features: [B, C, h, w] floating point feature maps (computed in float32).
        threshold, coverage, max_masks: see :func:`principal_masks`.
        median_filter: 3x3 median filter on the proposals (paper: on).

    Returns:
        [B, 1 + M, h, w] float32 log-probabilities, channel 0 = background, M = max(1, largest
        proposal count in the batch); unused channels are ``-inf`` (softmax gives exactly 0).
        ``argmax`` over dim 1 gives the (pre-CRF) mask id per position. Equal (up to float
        rounding) to ``postprocess_masks(*principal_masks(features, ...), median_filter)``.
    """
    mask_id, mask_value, counts = proposal_maps(features, threshold, coverage, max_masks)
    return logits_from_maps(mask_id, mask_value, counts, median_filter)
