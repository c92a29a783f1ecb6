"""Pseudo labels from PriMaPs proposals and class prototypes (docs/method.md, "3. Pseudo labels (the E-step)").

``make_pseudo_labels`` runs the whole chain for a batch: proposals (``primaps.mask_logits``) -> bilinear
upsampling to the label size -> optional dense CRF -> ``argmax`` (mask id per pixel, 0 = background)
-> every proposal takes the most frequent prototype class among its pixels
(:func:`~primaps_dist.prototypes.nearest_prototype_upsampled`). Everything is batched;
the only loops are over memory-bounded chunks of images in the label-resolution stages.

Along the way ``make_pseudo_labels`` records label-free health statistics (:class:`ProposalStats`) from
tensors it has anyway: they stay on the device, and nothing here reads them back to the host. Outside the
proposal loop, a batch costs one host read: the proposal counts that size the label-resolution groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from primaps_dist.labels import IGNORE_INDEX
from primaps_dist.ops import argmax_channels, upsample_logits

# The two halves of ``mask_logits``: the raw proposal maps (before the median filter) are needed for the
# proposal-size statistics, and ``mask_logits`` does not return them.
from primaps_dist.primaps import logits_from_maps, proposal_maps
from primaps_dist.prototypes import nearest_prototype_upsampled

__all__ = ["ProposalStats", "PseudoLabels", "assemble", "make_pseudo_labels", "proposal_stats_on_grid"]

# Upper bound on elements of one label-resolution [chunk, channels, H, W] float tensor (~256 MB).
_CHUNK_ELEMENTS = 64 * 1024 * 1024
# Start a new group of images rather than pad a group by more label maps than this in total.
_PADDING_LABELS = 8

CrfFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ProposalStats:
    """Label-free health statistics of one batch (tensors on the batch's device; no host sync).

    proposals: [B] int64 proposals per image made by the PriMaPs loop.
    proposal_cells: [B] int64 feature cells those proposals cover, before the median filter
        (``proposal_cells / proposals`` is the mean proposal size in cells).
    kept_cells: [B] int64 feature cells that a proposal still labels after post-processing (3x3 median
        filter and the background channel: the pre-CRF argmax on the feature grid is a proposal).
    coverage_pre_crf: [B] float32 fraction of label pixels whose pre-CRF argmax is a proposal.
    coverage_post_crf: [B] float32 fraction of label pixels that get a pseudo label (after the CRF).
    """

    proposals: torch.Tensor
    proposal_cells: torch.Tensor
    kept_cells: torch.Tensor
    coverage_pre_crf: torch.Tensor
    coverage_post_crf: torch.Tensor


@dataclass
class PseudoLabels:
    """Output of :func:`make_pseudo_labels`.

    labels: [B, H', W'] int64 class per pixel, ``ignore_index`` (default ``IGNORE_INDEX``) on background /
        unlabelled.
    mask_ids: [B, H', W'] int64 proposal id per pixel after CRF + argmax (0 = background).
    num_proposals: [B] int64 number of PriMaPs proposals per image (before the CRF; a proposal can
        lose all its pixels in the CRF / argmax).
    stats: label-free health statistics of the batch (:class:`ProposalStats`).
    """

    labels: torch.Tensor
    mask_ids: torch.Tensor
    num_proposals: torch.Tensor
    stats: ProposalStats


def _label_groups(counts: torch.Tensor, pixels: int) -> list[tuple[torch.Tensor, int]]:
    """Split the batch into groups of images for the label-resolution stage: ``(index tensor, channels)``.

    Images are taken in order of proposal count, so each group's channel count (its largest count
    + 1, at least 2) is tight; a group ends when its [n, L, H', W'] tensor would exceed ``_CHUNK_ELEMENTS``
    or when padding the group to the next image's count would cost more than ``_PADDING_LABELS`` label
    maps (the resize, argmax and above all the CRF cost grows with n * L). Planning only: O(B) scalar work
    and the one host read of a pseudo-label step (the sorted counts decide tensor shapes; padding every
    image to the batch's largest count instead would cost CRF work in proportion).
    """
    order = torch.argsort(counts, stable=True)
    labels = (counts[order] + 1).clamp(min=2).tolist()
    groups, start = [], 0
    for index in range(1, len(labels) + 1):
        if index < len(labels):
            members = index - start
            too_big = (members + 1) * labels[index] * pixels > _CHUNK_ELEMENTS
            padding = members * (labels[index] - labels[index - 1]) > _PADDING_LABELS
            if not too_big and not padding:
                continue
        groups.append((order[start:index], labels[index - 1]))  # ascending: the last is the group's largest
        start = index
    return groups


def assemble(
    mask_ids: torch.Tensor,
    class_pred: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    slots: Optional[int] = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Give every proposal the mode of the predicted classes inside it.

    Args:
        mask_ids: [B, H, W] int64, 0 = background (ignored), 1..M = proposal ids.
        class_pred: [B, H, W] int64 class per pixel in [0, num_classes).
        num_classes: K.
        ignore_index: label of background pixels (must not be a class id).
        slots: a bound on the mask ids known on the host (ids lie in [0, slots)); None reads
            ``mask_ids.max()`` back from the device.
        check_values: check that ids and classes lie in range (reads them back from the device); callers
            whose inputs are in range by construction (an argmax) pass False, and with ``slots`` given the
            call then never waits for the device.

    Returns:
        [B, H, W] int64: the mode of ``class_pred`` over each proposal's pixels (ties -> smallest
        class id) on all its pixels, ``ignore_index`` on background.
    """
    if mask_ids.dim() != 3 or class_pred.shape != mask_ids.shape:
        raise ValueError(
            f"mask_ids and class_pred must both have shape [B, H, W], got {tuple(mask_ids.shape)} "
            f"and {tuple(class_pred.shape)}"
        )
    if mask_ids.is_floating_point() or class_pred.is_floating_point():
        raise ValueError("mask_ids and class_pred must be integer tensors")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} collides with a class id (num_classes={num_classes})")
    batch = mask_ids.shape[0]
    mask_ids = mask_ids.to(torch.int64)
    class_pred = class_pred.to(device=mask_ids.device, dtype=torch.int64)
    if mask_ids.numel() == 0:
        return torch.full_like(mask_ids, ignore_index)
    if check_values:
        if int(mask_ids.min()) < 0:
            raise ValueError("mask_ids must be >= 0")
        if int(class_pred.min()) < 0 or int(class_pred.max()) >= num_classes:
            raise ValueError(f"class_pred must lie in [0, {num_classes})")
    if slots is None:
        slots = int(mask_ids.max()) + 1
    image = torch.arange(batch, device=mask_ids.device)[:, None, None]
    key = ((image * slots + mask_ids) * num_classes + class_pred).reshape(-1)
    # A fixed-size histogram: bincount on CUDA reads the key's maximum back to size its output.
    histogram = torch.zeros(batch * slots * num_classes, dtype=torch.int64, device=mask_ids.device)
    histogram.index_add_(0, key, torch.ones_like(key))
    histogram = histogram.reshape(batch, slots, num_classes)
    # First maximum = smallest class id among the tied most frequent ones (explicit, backend-proof).
    peak = histogram.amax(dim=2, keepdim=True)
    classes = torch.arange(num_classes, device=mask_ids.device).expand_as(histogram)
    mode = torch.where(histogram == peak, classes, num_classes).amin(dim=2)  # [B, slots]
    labels = mode.gather(1, mask_ids.reshape(batch, -1)).reshape(mask_ids.shape)
    return labels.masked_fill(mask_ids == 0, ignore_index)


def proposal_stats_on_grid(raw_ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature cells with a proposal before and after post-processing, per image.

    Args:
        raw_ids: [B, h, w] int64 proposal id per feature cell from the PriMaPs loop (0 = none).
        logits: [B, 1 + M, h, w] post-processed log-probabilities (channel 0 = background).

    Returns:
        ([B] int64 cells with a raw proposal, [B] int64 cells whose argmax over ``logits`` is a proposal).
    """
    return (raw_ids > 0).sum(dim=(1, 2)), (argmax_channels(logits) > 0).sum(dim=(1, 2))


def _resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] in 0..1 -> float32 [B, 3, size] in 0..255 (bilinear with antialias if shrinking)."""
    images = images.to(torch.float32)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (images * 255.0).clamp(0.0, 255.0)


@torch.no_grad()
def make_pseudo_labels(
    features: torch.Tensor,
    images: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    threshold: float = 0.4,
    coverage: float = 0.95,
    max_masks: int = 64,
    median_filter: bool = True,
    crf_fn: Optional[CrfFn] = None,
    label_size: Optional[tuple[int, int]] = None,
    ignore_index: int = IGNORE_INDEX,
) -> PseudoLabels:
    """PriMaPs pseudo labels for a batch.

    Args:
        features: [B, C, h, w] float backbone features.
        images: [B, 3, H, W] float RGB in 0..1 (resized to ``label_size`` if it differs).
        prototypes: [K, C] class prototypes (unit vectors).
        threshold, coverage, max_masks, median_filter: PriMaPs parameters (see ``primaps``).
        crf_fn: optional ``crf_fn(logits [b, L, H', W'] float32 with -inf, images [b, 3, H', W']
            float32 0..255) -> [b, L, H', W']`` probabilities or log-probabilities (only the argmax
            is used), e.g. ``functools.partial(primaps_dist.crf.dense_crf, iterations=10)``.
        label_size: (H', W'); default the image size.
        ignore_index: label of unlabelled pixels.

    Returns:
        :class:`PseudoLabels` on the device of ``features``.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != features.shape[0]:
        raise ValueError(
            f"images must have shape [{features.shape[0]}, 3, H, W], got {tuple(images.shape)}"
        )
    size = tuple(images.shape[-2:]) if label_size is None else (int(label_size[0]), int(label_size[1]))
    if min(size) < 1:
        raise ValueError(f"label_size must be positive, got {size}")
    # = mask_logits(...), keeping the raw proposal maps for the statistics.
    raw_ids, raw_values, counts = proposal_maps(features, threshold, coverage, max_masks)
    logits = logits_from_maps(raw_ids, raw_values, counts, median_filter)
    batch = features.shape[0]
    device = features.device
    mask_ids = torch.empty(batch, *size, dtype=torch.int64, device=device)
    coverage_pre_crf = torch.empty(batch, dtype=torch.float32, device=device)
    images = images.to(device)
    groups = _label_groups(counts, size[0] * size[1])
    for part, used in groups:  # used: 1 + the group's largest count; drops channels no image of it uses
        # Channels-last throughout: the CRF works pixel-major and argmax_channels reduces over channels.
        # Proposal logits are -inf on whole channels only (unused proposals), so the resize needs no host check.
        part_logits = upsample_logits(
            logits[part, :used], size, memory_format=torch.channels_last, whole_channels=True
        )
        if crf_fn is not None:
            coverage_pre_crf[part] = _labelled_fraction(argmax_channels(part_logits))
            part_logits = crf_fn(part_logits, _resize_images(images[part], size))
        mask_ids[part] = argmax_channels(part_logits)
    coverage_post_crf = _labelled_fraction(mask_ids)
    if crf_fn is None:
        coverage_pre_crf = coverage_post_crf
    classes = nearest_prototype_upsampled(features, prototypes, size)
    # Ids come from an argmax over at most max(used) channels and classes from an argmax over K prototypes.
    slots = max((used for _, used in groups), default=1)
    labels = assemble(
        mask_ids, classes, prototypes.shape[0], ignore_index=ignore_index, slots=slots, check_values=False
    )
    cells, kept = proposal_stats_on_grid(raw_ids, logits)
    stats = ProposalStats(counts, cells, kept, coverage_pre_crf, coverage_post_crf)
    return PseudoLabels(labels=labels, mask_ids=mask_ids, num_proposals=counts, stats=stats)


def _labelled_fraction(mask_ids: torch.Tensor) -> torch.Tensor:
    """[b, H, W] proposal ids -> [b] float32 fraction of pixels with a proposal (id > 0)."""
    return (mask_ids > 0).flatten(1).to(torch.float32).mean(dim=1)
