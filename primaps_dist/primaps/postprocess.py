"""Post-processing of proposals into pre-CRF log-probabilities: 3x3 median filter, x10 and clip, a
background channel, ``log_softmax`` (package docstring, "Post-processing")."""

from __future__ import annotations

import torch

from primaps_dist.primaps.rounds import proposal_maps

__all__ = ["logits_from_maps", "mask_logits", "median_filter_3x3", "postprocess_masks"]


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
    """Turn soft proposals into pre-CRF log-probabilities (docs/method.md, "2. Principal mask proposals").

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
