"""Tests of the batched PriMaPs proposals against a per-image reference and on edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from primaps_dist.primaps import (
    mask_logits,
    median_filter_3x3,
    postprocess_masks,
    principal_masks,
)
from primaps_dist.testing.primaps_reference import (
    OracleAgreement,
    oracle_agreement,
    planted_features,
    reference_logits,
    reference_proposals,
)


pytestmark = pytest.mark.usefixtures("single_thread", "proposal_path")


@pytest.fixture(params=["native", "batched"])
def proposal_path(request, monkeypatch):
    """Every test here runs on both CPU paths: the C++ kernel (per image) and the batched torch loop
    (the path accelerators take). ``native`` requires the kernel (a build failure fails the test)."""
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def _agreement(features: torch.Tensor, seeds: tuple[int, ...] = (0, 1, 2), **kwargs) -> OracleAgreement:
    labels = mask_logits(features, **kwargs).argmax(1).numpy()
    _, counts = principal_masks(features, **{k: v for k, v in kwargs.items() if k != "median_filter"})
    return oracle_agreement(features, labels, counts.numpy(), seeds=seeds, **kwargs)


def _assert_faithful(agreement: OracleAgreement, min_stable: int) -> None:
    """The targets against the published loop (``torch.pca_lowrank`` as released, its own sign):
    where the oracle is reproducible, ARI >= 0.97 on average and >= 0.9 on every image; everywhere,
    at least as close to the oracle as its runs are to each other; counts equal on >= 90 %."""
    print(agreement.summary())
    assert agreement.stable.sum() >= min_stable  # the comparison is not vacuous
    assert agreement.ari[agreement.stable].mean() >= 0.97
    assert agreement.ari[agreement.stable].min() >= 0.9
    assert np.all(agreement.ari >= agreement.oracle_self - 0.02), (agreement.ari, agreement.oracle_self)
    assert agreement.counts_equal.mean() >= 0.9


# ------------------------------------------------------------------------------------------------
# Faithfulness
# ------------------------------------------------------------------------------------------------


def test_matches_published_loop_on_real_photo_features(photo_features_stride16):
    """EfficientNet-Lite0 (ImageNet) stride-16 features (112 x 20 x 20) of 12 bundled photos: rounds
    with more free positions than channels and fewer (where pca_lowrank transposes) both occur."""
    _assert_faithful(_agreement(photo_features_stride16), min_stable=6)


@pytest.mark.slow
def test_matches_published_loop_on_planted_dino_sized_features():
    """C=384, 40x40 maps with 24 planted regions plus noise.

    Five oracle seeds: on an image where the oracle is not reproducible, two seeds are one sample of
    its spread. On an Intel Xeon (MKL, AVX-512) image 0's oracle runs with seeds 0 and 1 ended in two
    different maps (ARI 0.94 to each other, counts 59 and 43), while seeds 2-4 all gave ours exactly
    (count 44); with seeds (0, 1) only, the comparison failed although ours is the oracle's most
    frequent outcome."""
    features = planted_features(4, channels=384, size=40, regions=24, noise=1.0, seed=3)
    agreement = _agreement(features, seeds=(0, 1, 2, 3, 4))
    _assert_faithful(agreement, min_stable=2)


def test_matches_published_loop_on_small_planted_maps():
    features = planted_features(6, channels=48, size=16, regions=6, noise=0.6, seed=7)
    _assert_faithful(_agreement(features), min_stable=4)


@pytest.mark.parametrize("proposal_path", ["batched"], indirect=True)  # patches that loop's orientation
def test_published_sign_is_not_a_simple_rule(photo_features_stride16):
    """Guards the oracle itself: flipping every direction to the package's former rule (largest |s|
    positive) must disagree with the published loop on these photos, else the tests above could not
    tell the two apart. (Patches the batched path's orientation, so it runs on that path only.)"""
    import primaps_dist.primaps.rounds as rounds

    features = photo_features_stride16[:6]

    def largest_magnitude_positive(state, direction, top3, top3_gram):
        similarity = state.cosine_to(direction)
        extreme = similarity.abs().argmax(dim=1, keepdim=True)
        signs = torch.where(similarity.gather(1, extreme).squeeze(1) < 0, -1.0, 1.0)
        return signs, (state.points @ direction.unsqueeze(2)).squeeze(2)

    original = rounds.reference_orientation
    rounds.reference_orientation = largest_magnitude_positive
    try:
        agreement = _agreement(features, seeds=(1,))
    finally:
        rounds.reference_orientation = original
    print(agreement.summary())
    assert agreement.ari.mean() < 0.9


def test_soft_masks_match_reference_values():
    features = planted_features(2, channels=64, size=16, regions=5, noise=0.5, seed=5)
    masks, counts = principal_masks(features)
    for index in range(2):
        proposals = reference_proposals(features[index])
        assert int(counts[index]) == len(proposals)
        expected = torch.stack(proposals)
        torch.testing.assert_close(masks[index, : len(proposals)], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            postprocess_masks(masks[index : index + 1], counts[index : index + 1])[0, : len(proposals) + 1],
            reference_logits(proposals),
            atol=1e-4,
            rtol=0,
        )


# ------------------------------------------------------------------------------------------------
# Contract: shapes, dtypes, determinism, -inf channels
# ------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_unused_channels():
    features = torch.cat([planted_features(1, 32, 12, regions=2, noise=0.1, seed=1),
                          planted_features(1, 32, 12, regions=8, noise=0.3, seed=2)])
    masks, counts = principal_masks(features)
    logits = mask_logits(features)
    assert masks.dtype == torch.float32 and counts.dtype == torch.int64
    assert masks.shape == (2, int(counts.max()), 12, 12)
    assert logits.shape == (2, 1 + int(counts.max()), 12, 12) and logits.dtype == torch.float32
    assert counts[0] < counts[1]
    unused = logits[0, 1 + int(counts[0]):]
    assert unused.numel() > 0 and torch.isneginf(unused).all()
    assert torch.isfinite(logits[0, : 1 + int(counts[0])]).all() and torch.isfinite(logits[1]).all()
    probabilities = logits.softmax(dim=1)
    assert (probabilities[0, 1 + int(counts[0]):] == 0).all()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 12, 12))
    assert masks.min() >= 0 and masks.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_computes_in_float32(dtype):
    features = planted_features(2, 48, 10, regions=4, noise=0.2, seed=7)
    logits = mask_logits(features.to(dtype))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, mask_logits(features.to(dtype).float()))


def test_deterministic_and_independent_of_batch_composition():
    features = planted_features(5, 96, 20, regions=10, noise=0.8, seed=11)
    first = mask_logits(features)
    torch.testing.assert_close(first, mask_logits(features), atol=0, rtol=0)
    _, counts = principal_masks(features)
    for index in (0, 3):
        alone = mask_logits(features[index : index + 1])
        used = 1 + int(counts[index])
        assert alone.shape[1] == used
        assert torch.equal(alone[0].argmax(0), first[index, :used].argmax(0))
        # Only BLAS rounding may differ with the batch size.
        torch.testing.assert_close(alone[0], first[index, :used], atol=1e-5, rtol=0)



@pytest.mark.slow
def test_orientation_does_not_follow_rounding_noise_of_the_batch():
    """DINO-sized planted maps: image 0 alone and in a batch of 32 differ only by BLAS rounding. With
    the sign replay's SVD in float32, round 13 of that image (sigma ratios 1.38 / 1.25, nothing near
    a tie) flipped between the two (63 vs 64 proposals, ARI 0.85 against the published loop in the
    batch): the rows of Q^T A are orthogonal to float32 precision there."""
    features = planted_features(32, channels=384, size=40, regions=24, noise=1.0, seed=1)
    masks, counts = principal_masks(features)
    alone, alone_counts = principal_masks(features[:1])
    assert int(alone_counts[0]) == int(counts[0])
    torch.testing.assert_close(alone[0], masks[0, : alone.shape[1]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("proposal_path", ["batched"], indirect=True)  # the path accelerators take
def test_host_syncs_per_round_are_bounded():
    """The loop reads the device three times per round (solver convergence, the orientation's
    inputs, the round's bookkeeping); it was about 15 before. Counted on CPU with SyncCounter, on the
    batched loop (the path accelerators take; the C++ kernel never runs on one)."""
    from support.sync_counter import SyncCounter

    features = planted_features(6, channels=48, size=16, regions=6, noise=0.6, seed=7)
    with SyncCounter() as counter:
        _, counts = principal_masks(features)
    rounds = int(counts.max())
    package = counter.package_total("primaps_dist/primaps/")
    print(f"{package} syncs in primaps_dist/primaps/ over {rounds} rounds: {dict(counter.by_site)}")
    assert rounds >= 5
    assert package <= 3 * rounds + 6

def test_masks_are_disjoint_thresholded_and_cover_enough():
    features = planted_features(3, 64, 24, regions=9, noise=0.6, seed=13)
    masks, counts = principal_masks(features, threshold=0.4, coverage=0.95)
    for index in range(3):
        valid = masks[index, : int(counts[index])]
        assert ((valid > 0).sum(0) <= 1).all()  # disjoint
        nonzero = valid[valid > 0]
        assert nonzero.min() >= 0.4 - 1e-6 and nonzero.max() <= 1.0
        assert torch.allclose(valid.flatten(1).amax(1), torch.ones(len(valid)))  # each peaks at 1
        assert (masks[index, int(counts[index]):] == 0).all()
        covered = (valid > 0).any(0).float().mean()
        assert covered >= 0.95 or counts[index] == 64


def test_median_filter_matches_unfold_median():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(7, 9), (2, 5), (3, 2), (6, 6)]:
        values = torch.randint(0, 4, (3, 2, height, width), generator=generator).float()  # many ties
        padded = F.pad(values, (1, 1, 1, 1), mode="reflect")
        expected = padded.unfold(2, 3, 1).unfold(3, 3, 1).reshape(3, 2, height, width, 9).median(-1).values
        assert torch.equal(median_filter_3x3(values), expected)
    single = torch.rand(1, 1, 1, 1)
    assert torch.equal(median_filter_3x3(single), single)


def test_constant_features_give_one_mask_covering_everything():
    features = torch.ones(2, 16, 8, 8) * torch.linspace(1, 2, 16)[None, :, None, None]
    masks, counts = principal_masks(features)
    assert counts.tolist() == [1, 1]
    assert torch.equal(masks, torch.ones(2, 1, 8, 8))
    assert (mask_logits(features).argmax(1) == 1).all()


def test_pure_noise_is_bounded_by_max_masks():
    noise = torch.randn(2, 384, 40, 40, generator=torch.Generator().manual_seed(0))
    masks, counts = principal_masks(noise, max_masks=12)
    assert counts.tolist() == [12, 12]
    logits = mask_logits(noise, max_masks=12)
    assert logits.shape == (2, 13, 40, 40) and not torch.isnan(logits).any()


@pytest.mark.parametrize(
    "shape", [(1, 8, 1, 1), (1, 1, 6, 6), (3, 1, 5, 7), (1, 384, 1, 9), (2, 5, 2, 2), (1, 700, 3, 3)]
)
def test_tiny_and_thin_inputs(shape):
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    masks, counts = principal_masks(features, max_masks=16)
    logits = mask_logits(features, max_masks=16)
    assert (counts >= 1).all() and (counts <= 16).all()
    assert logits.shape == (shape[0], 1 + int(counts.max()), *shape[2:])
    assert not torch.isnan(logits).any()
    if shape[2] * shape[3] == 1:
        assert counts.tolist() == [1] and masks.item() == 1.0


def test_single_channel_splits_by_sign():
    values = torch.tensor([[1.0, 2.0, -1.0], [3.0, -2.0, -0.5]])
    masks, counts = principal_masks(values[None, None], coverage=1.0)
    assert counts.item() == 2
    positive = (values > 0).float()
    assert {tuple((m > 0).float().flatten().tolist()) for m in masks[0]} == {
        tuple(positive.flatten().tolist()), tuple((1 - positive).flatten().tolist())
    }
    torch.testing.assert_close(masks[0].sum(0), torch.ones(2, 3))  # |n| = 1 everywhere for C = 1


def test_zero_features_stay_background():
    features = torch.zeros(1, 8, 4, 4)
    masks, counts = principal_masks(features)
    assert counts.tolist() == [0] and masks.shape == (1, 1, 4, 4) and (masks == 0).all()
    logits = mask_logits(features)
    assert (logits.argmax(1) == 0).all() and torch.isneginf(logits[:, 1]).all()
    for seed in range(8):
        partly = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(seed))
        partly[..., :2, :] = 0
        masks, counts = principal_masks(partly, coverage=1.0)
        assert (masks[0, :, :2, :] == 0).all()  # zero vectors cannot be covered
        # Like the published loop, which stops when the oriented axis points away from every
        # nonzero feature (its best free position is then a zero vector).
        assert counts.item() == len(reference_proposals(partly[0], coverage=1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_raise(bad):
    features = torch.randn(2, 4, 5, 5)
    features[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        mask_logits(features)


@pytest.mark.parametrize(
    "features, kwargs, message",
    [
        (torch.randn(4, 5, 5), {}, "shape"),
        (torch.ones(1, 4, 5, 5, dtype=torch.int64), {}, "floating"),
        (torch.randn(0, 4, 5, 5), {}, "empty"),
        (torch.randn(1, 4, 5, 5), {"threshold": 1.5}, "threshold"),
        (torch.randn(1, 4, 5, 5), {"coverage": 0.0}, "coverage"),
        (torch.randn(1, 4, 5, 5), {"max_masks": 0}, "max_masks"),
        (torch.randn(1, 4, 5, 5), {"max_masks": 2.5}, "max_masks"),
    ],
)
def test_invalid_arguments_raise(features, kwargs, message):
    with pytest.raises(ValueError, match=message):
        principal_masks(features, **kwargs)


# ------------------------------------------------------------------------------------------------
# Properties on random inputs
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 24),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    threshold=st.floats(0.05, 0.95),
    max_masks=st.integers(1, 10),
    seed=st.integers(0, 10_000),
)
def test_invariants_on_random_maps(batch, channels, height, width, threshold, max_masks, seed):
    features = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    masks, counts = principal_masks(features, threshold=threshold, max_masks=max_masks)
    assert (counts >= 1).all() and (counts <= max_masks).all()
    for index in range(batch):
        valid = masks[index, : int(counts[index])]
        assert ((valid > 0).sum(0) <= 1).all()
        assert torch.allclose(valid.flatten(1).amax(1), torch.ones(len(valid)))
        assert valid[valid > 0].min() >= threshold - 1e-5
        covered = (valid > 0).float().sum() / (height * width)
        assert covered >= 0.95 or counts[index] == max_masks
    for median in (True, False):
        logits = postprocess_masks(masks, counts, median_filter=median)
        assert not torch.isnan(logits).any()
        assert torch.allclose(logits.exp().sum(1), torch.ones(batch, height, width))
        # mask_logits takes a sparse shortcut through the post-processing: same numbers.
        fast = mask_logits(features, threshold=threshold, max_masks=max_masks, median_filter=median)
        torch.testing.assert_close(fast, logits, atol=2e-6, rtol=0)


@pytest.mark.parametrize("vectors", [1, 4])
def test_rows_dot_equals_the_float64_products_and_does_not_depend_on_the_batch(vectors):
    """The CPU's per-image matrix-vector path and the transposed product both give points @ vectors^T."""
    from primaps_dist.primaps.rows import rows_dot

    generator = torch.Generator().manual_seed(5)
    points = torch.randn(3, 37, 24, generator=generator)
    directions = torch.randn(3, vectors, 24, generator=generator)
    result = rows_dot(points, directions)
    assert result.shape == (3, 37, vectors) and result.dtype == torch.float32
    expected = torch.einsum("bqc,bkc->bqk", points.double(), directions.double())
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows_dot(points[1:2], directions[1:2]), result[1:2])
