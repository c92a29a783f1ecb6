"""Tensor helpers of the pseudo-label and prediction paths: resizing log-probabilities that contain
``-inf`` and a fast channel argmax. Independent of the PriMaPs method itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["argmax_channels", "upsample_logits"]


def upsample_logits(
    logits: torch.Tensor,
    size: tuple[int, int],
    memory_format: torch.memory_format = torch.contiguous_format,
    *,
    whole_channels: bool = False,
) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of log-probabilities that may contain ``-inf``.

    Plain ``F.interpolate`` turns ``-inf`` into NaN wherever a ``-inf`` neighbour has interpolation
    weight exactly 0 (``0 * -inf``), e.g. at the borders, and ``argmax`` then picks that channel. Here
    an output is ``-inf`` exactly when a neighbour with positive weight is ``-inf``; other values are
    the usual interpolation of the finite values. Channels that are ``-inf`` everywhere (unused
    proposals) take a fast path.

    logits [B, L, h, w] float -> [B, L, H, W] float32 in ``memory_format`` (``torch.channels_last``
    makes the resize and a following ``argmax(1)`` several times faster on CPU).

    ``whole_channels=True`` promises that every channel is ``-inf`` everywhere or nowhere (the proposal
    logits of ``primaps.mask_logits``); the result is the same, and the call never waits for the device
    (otherwise two host reads choose the path).
    """
    logits = logits.to(torch.float32)
    size = (int(size[0]), int(size[1]))
    forbidden = torch.isneginf(logits)
    source = logits.masked_fill(forbidden, 0.0).contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
    dead = forbidden.all(dim=3).all(dim=2)  # [B, L]
    if whole_channels:
        resized.masked_fill_(dead[:, :, None, None], float("-inf"))
    elif bool((forbidden.any(dim=3).any(dim=2) & ~dead).any()):
        reach = F.interpolate(forbidden.to(torch.float32), size=size, mode="bilinear", align_corners=False)
        resized = resized.masked_fill(reach > 0, float("-inf"))
    elif bool(dead.any()):
        resized = resized.masked_fill(dead[:, :, None, None], float("-inf"))
    return resized.contiguous(memory_format=memory_format)


def argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)`` for [B, L, H, W] (first maximum on ties), via a channels-last copy: on
    CPU the reduction over a contiguous channel axis is several times faster. -> [B, H, W] int64."""
    return scores.contiguous(memory_format=torch.channels_last).argmax(dim=1)
