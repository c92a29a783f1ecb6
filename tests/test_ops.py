"""Tests of the tensor helpers in ``primaps_dist.ops`` (resizing -inf log-probabilities, channel argmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_dist.ops import argmax_channels, upsample_logits
from support.sync_counter import SyncCounter


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


def test_upsample_logits_of_whole_channels_is_the_same_without_a_host_read():
    """``whole_channels=True`` (every channel -inf everywhere or nowhere, as proposal logits are) gives the
    general path's result bit for bit, with no host read; with and without dead channels."""
    logits = torch.log_softmax(torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    logits[0, 3:] = float("-inf")
    logits[2, 1] = float("-inf")
    for case in (logits, logits[1:2]):  # dead channels; none at all
        general = upsample_logits(case, (23, 31))
        with SyncCounter() as counter:
            fixed = upsample_logits(case, (23, 31), memory_format=torch.channels_last, whole_channels=True)
        assert counter.total() == 0, counter.report()
        assert torch.equal(fixed, general)
        assert fixed.is_contiguous(memory_format=torch.channels_last)
    assert torch.isneginf(fixed).sum() == 0 and torch.isneginf(upsample_logits(logits, (23, 31))[0, 3:]).all()


def test_argmax_channels_matches_argmax_with_ties():
    scores = torch.randint(0, 3, (2, 5, 7, 9)).float()
    assert torch.equal(argmax_channels(scores), scores.argmax(1))


# ------------------------------------------------------------------------------------------------
# Degenerate inputs and errors
# ------------------------------------------------------------------------------------------------
