"""Tests of the tensor helpers in ``primaps_dist.ops`` (resizing -inf log-probabilities, channel argmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_dist.ops import argmax_channels, upsample_logits


def test_upsample_logits_keeps_minus_inf_without_nan():
    logits = torch.log_softmax(torch.randn(2, 4, 5, 5), dim=1)
    logits[0, 3] = float("-inf")
    resized = upsample_logits(logits, (40, 40))
    assert not torch.isnan(resized).any()
    assert torch.isneginf(resized[0, 3]).all() and torch.isfinite(resized[0, :3]).all()
    torch.testing.assert_close(resized[1], F.interpolate(logits[1:], (40, 40), mode="bilinear")[0])
    assert (resized[0].argmax(0) != 3).all()
    # Partly forbidden channel: -inf exactly where a neighbour with positive weight is -inf.
    partial = torch.zeros(1, 2, 4, 4)
    partial[0, 1, :2] = float("-inf")
    resized = upsample_logits(partial, (8, 8))
    reach = F.interpolate(torch.isneginf(partial).float(), (8, 8), mode="bilinear") > 0
    assert torch.equal(torch.isneginf(resized), reach) and not torch.isnan(resized).any()
    assert upsample_logits(partial, (8, 8), memory_format=torch.channels_last).is_contiguous(
        memory_format=torch.channels_last)


def test_argmax_channels_matches_argmax_with_ties():
    scores = torch.randint(0, 3, (2, 5, 7, 9)).float()
    assert torch.equal(argmax_channels(scores), scores.argmax(1))


# ------------------------------------------------------------------------------------------------
# Degenerate inputs and errors
# ------------------------------------------------------------------------------------------------
