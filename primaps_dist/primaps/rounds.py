"""The proposal loop: all images of a batch advance one round at a time (package docstring, steps 1-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_dist.primaps.eigen import BLOCK, gram, solver_settings, start_basis, start_sketch, top_direction
from primaps_dist.primaps.native import native_kernel
from primaps_dist.primaps.orientation import reference_orientation
from primaps_dist.primaps.rows import compact_order, rows_dot, take_rows

__all__ = ["WorkingSet", "principal_masks", "proposal_maps"]

# Finished images leave the working batch once the running fraction drops to this.
_COMPACT_FRACTION = 0.9
# Multiply-adds that cost about as much as one more small matrix product call on the CPU (~5 us at
# ~1e11 per second): the down-date stops padding images to the widest count once the padding wastes
# more than this per image (WorkingSet.cover).
_CALL_MACS = 5e5


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


def _first_index_of_max(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 1 (explicit, so ties never depend on the backend)."""
    peak = values.amax(dim=1, keepdim=True)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values == peak, positions, values.shape[1]).amin(dim=1)


class WorkingSet:
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
        "free", "free_count", "basis", "gram_basis", "smallest_ritz", "running", "counts", "mask_id", "mask_value",
    )
    _HOST_STATE = ("free_count_host", "running_host")

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
        self.gram = gram(centred.transpose(1, 2))  # [b, C, C]
        self.free_sum = centred.sum(dim=1)  # [b, C]
        self.total_variance = torch.diagonal(self.gram, dim1=1, dim2=2).sum(dim=1)
        self.basis = start_basis(centred.transpose(1, 2), min(block, channels))
        self.gram_basis: torch.Tensor | None = None  # basis @ gram once known
        self.smallest_ritz: torch.Tensor | None = None  # [b] of the basis, once it is a Ritz basis
        # F.normalize's eps; exactly 0 at zero vectors, whose centred dot products only cancel up to
        # rounding (the residue times 1e12 would make them look like the most similar positions).
        self.inverse_norm = F.pad(torch.where(norm > 0, 1.0 / norm.clamp(min=1e-12), 0.0), (0, 1))  # [b, Q+1]
        # The zero row's position is a sink column P of mask_id / mask_value.
        self.position = F.pad(torch.arange(positions, device=device), (0, 1), value=positions).expand(batch, -1)
        self.free = F.pad(torch.ones(batch, positions, dtype=torch.bool, device=device), (0, 1))
        self.free_count = torch.full((batch,), positions, dtype=torch.int64, device=device)
        self.running = torch.ones(batch, dtype=torch.bool, device=device)
        # CPU copies of free_count and running, refreshed by one transfer per round (bookkeeping
        # decisions read these, so the loop does not wait on the device for each of them).
        self.free_count_host = torch.full((batch,), positions, dtype=torch.int64)
        self.running_host = torch.ones(batch, dtype=torch.bool)
        self.counts = torch.zeros(batch, dtype=torch.int64, device=device)
        self.mask_id = torch.zeros(batch, positions + 1, dtype=torch.int64, device=device)  # [b, P + 1]
        self.mask_value = torch.zeros(batch, positions + 1, dtype=torch.float32, device=device)  # [b, P + 1]

    @property
    def zero_row(self) -> int:
        return self.points.shape[1] - 1

    def keep_only(self, selection: torch.Tensor) -> None:
        """Drop images: keep working rows ``selection`` [b'] int64 (on the CPU)."""
        for name in self._HOST_STATE:
            setattr(self, name, getattr(self, name)[selection])
        selection = selection.to(self.rows.device)
        for name in self._STATE:
            value = getattr(self, name)
            setattr(self, name, None if value is None else value[selection])

    def drop_covered_rows(self) -> None:
        """Shrink the stored rows to the largest free count of the working images."""
        width = int(self.free_count_host.max())
        if width == 0 or width > self.zero_row // 2:
            return
        order, _ = compact_order(self.free, self.free_count, width)
        order = F.pad(order, (0, 1), value=self.zero_row)
        self.points = take_rows(self.points, order)
        self.inverse_norm = self.inverse_norm.gather(1, order)
        self.position = self.position.gather(1, order)
        self.free = self.free.gather(1, order)

    def cosine_to(self, direction: torch.Tensor, centred_dots: torch.Tensor | None = None) -> torch.Tensor:
        """<direction, n> per stored row: direction [b, C] -> [b, Q+1], 0 at covered rows.

        ``centred_dots`` [b, Q+1]: ``points @ direction`` when the caller already has it."""
        offset = (direction * self.mean).sum(dim=1, keepdim=True)
        if centred_dots is None:
            centred_dots = rows_dot(self.points, direction.unsqueeze(1)).squeeze(2)
        dots = (centred_dots + offset) * self.inverse_norm
        return dots.masked_fill(~self.free, 0.0)

    def unit_feature(self, row: torch.Tensor) -> torch.Tensor:
        """n at one stored row per image: row [b] -> [b, C]."""
        picked = take_rows(self.points, row[:, None]).squeeze(1)
        return (picked + self.mean) * self.inverse_norm.gather(1, row[:, None])

    def record(self, keep: torch.Tensor, values: torch.Tensor) -> None:
        """Store proposal ``counts`` with soft ``values`` [b, Q] at the ``keep`` [b, Q] columns."""
        # Stored rows have distinct positions (the zero row writes the sink), so the scatters are
        # deterministic; no data-dependent sizes, so no wait on the device.
        kept_id = torch.where(keep, self.counts[:, None], self.mask_id.gather(1, self.position))
        self.mask_id.scatter_(1, self.position, kept_id)
        kept_value = torch.where(keep, values, self.mask_value.gather(1, self.position))
        self.mask_value.scatter_(1, self.position, kept_value)

    def cover(self, keep: torch.Tensor, newly: torch.Tensor, counts: torch.Tensor) -> None:
        """Mark ``keep`` [b, Q] rows covered; down-date the Gram matrix and the free sum.

        newly [b] = ``keep.sum(1)``, counts: the same on the host.

        The newly covered rows are gathered into zero-padded [b, width, C] blocks, so a down-date is
        a batched rank-``width`` update (padding rows contribute nothing). When the padding would
        cost more on the CPU than one call per image (a few images cover many rows while the rest
        cover few), each image is down-dated with its own count instead: on planted 384 x 40 x 40
        maps that was 2x faster than grouping images by count, whose gather and ``index_add_`` cost
        more than the products. Accelerators always take the one padded call.
        """
        widest = int(counts.max())
        if widest > 0:
            order, valid = compact_order(keep, newly, widest)
            covered = take_rows(self.points, torch.where(valid, order, self.zero_row))  # [b, widest, C]
            self.free_sum = self.free_sum - covered.sum(dim=1)
            carry_basis = 4 * widest <= covered.shape[2]
            sizes = counts.tolist()
            padding = (len(sizes) * widest - sum(sizes)) * covered.shape[2] ** 2  # wasted multiply-adds
            if covered.device.type != "cpu" or padding <= _CALL_MACS * len(sizes):
                self.gram.baddbmm_(covered.transpose(1, 2), covered, alpha=-1.0)
                if carry_basis:
                    self.gram_basis.baddbmm_(self.basis @ covered.transpose(1, 2), covered, alpha=-1.0)
            else:
                for image, size in enumerate(sizes):
                    if size > 0:
                        rows = covered[image, :size]  # [size, C]
                        self.gram[image].addmm_(rows.T, rows, alpha=-1.0)
                        if carry_basis:
                            self.gram_basis[image].addmm_(self.basis[image] @ rows.T, rows, alpha=-1.0)
            if not carry_basis:
                self.gram_basis = None
        self.free = self.free & ~keep

def _proposal_round(state: WorkingSet, threshold: float, coverage: float, max_masks: int) -> None:
    """One PriMaPs round for every running image of the working set (updates ``state`` in place)."""
    direction, state.basis, state.gram_basis, state.smallest_ritz = top_direction(
        state.gram, state.free_sum, state.free_count.to(torch.float32), state.basis, state.gram_basis,
        state.running, state.total_variance, state.smallest_ritz,
    )
    signs, direction_dots = reference_orientation(state, direction, state.basis, state.gram_basis)
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
    newly = keep.sum(dim=1)
    state.free_count = state.free_count - newly
    # Same float32 comparison as the reference's `(covered / numel) < 0.95` loop condition.
    covered_fraction = (state.positions - state.free_count).to(torch.float32) / state.positions
    state.running = productive & (covered_fraction < coverage) & (state.counts < max_masks)
    # The round's one transfer of bookkeeping to the host: the down-date's widths, the next
    # round's tall / wide split and row compaction, the loop's stopping decision.
    host = torch.stack([newly, state.free_count, state.running.to(torch.int64)]).cpu()
    state.free_count_host, state.running_host = host[1], host[2].bool()
    state.cover(keep, newly, host[0])


def proposal_maps(
    features: torch.Tensor, threshold: float, coverage: float, max_masks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the proposal rounds. Returns (mask_id [B, h, w] int64 with 0 = no proposal and k = the
    k-th proposal, mask_value [B, h, w] float32 soft value of that proposal, counts [B] int64)."""
    _validate(features, threshold, coverage, max_masks)
    batch, _, height, width = features.shape
    device = features.device
    kernel = native_kernel(device)
    if kernel is not None:  # the CPU: every image's rounds back to back in C++ (native/__init__.py)
        channels, positions = features.shape[1], height * width
        flat = features.detach().to(torch.float32).reshape(batch, channels, positions).contiguous()
        mask_id, mask_value, counts = kernel.proposal_rounds(
            flat, start_sketch(positions, min(BLOCK, channels)), *solver_settings(), float(threshold),
            float(coverage), int(max_masks),
        )
        return mask_id.reshape(batch, height, width), mask_value.reshape(batch, height, width), counts
    state = WorkingSet(features, BLOCK)
    mask_id = torch.zeros(batch, height * width, dtype=torch.int64, device=device)
    mask_value = torch.zeros(batch, height * width, dtype=torch.float32, device=device)
    counts = torch.zeros(batch, dtype=torch.int64, device=device)

    def store(rows_state: WorkingSet) -> None:
        mask_id[rows_state.rows] = rows_state.mask_id[:, :-1]
        mask_value[rows_state.rows] = rows_state.mask_value[:, :-1]
        counts[rows_state.rows] = rows_state.counts

    for _ in range(int(max_masks)):
        running = int(state.running_host.sum())
        if running == 0:
            break
        if running <= _COMPACT_FRACTION * state.rows.numel():
            store(state)
            state.keep_only(state.running_host.nonzero().squeeze(1))
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
