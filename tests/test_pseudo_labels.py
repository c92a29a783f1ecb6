"""Tests of pseudo-label assembly and the make_pseudo_labels() pipeline (class prediction: test_prototypes.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from primaps_dist.ops import upsample_logits
from primaps_dist.primaps import mask_logits
from primaps_dist.prototypes import nearest_prototype_upsampled
from primaps_dist.pseudo_labels import PseudoLabels, assemble, make_pseudo_labels
from primaps_dist.testing.primaps_reference import planted_features
from support.sync_counter import SyncCounter


pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_assemble(mask_ids, class_pred, num_classes, ignore_index=255):
    """Per image, per proposal in id order, only unlabelled pixels (docs/method.md, "3. Pseudo labels")."""
    out = torch.full_like(mask_ids, ignore_index)
    for b in range(mask_ids.shape[0]):
        for proposal in sorted(set(mask_ids[b].unique().tolist()) - {0}):
            region = (mask_ids[b] == proposal) & (out[b] == ignore_index)
            votes = torch.bincount(class_pred[b][region], minlength=num_classes)
            out[b][region] = int(torch.nonzero(votes == votes.max())[0])  # smallest class among ties
    return out


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    proposals=st.integers(0, 6),
    num_classes=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_assemble_matches_brute_force(batch, height, width, proposals, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    mask_ids = torch.randint(0, proposals + 1, (batch, height, width), generator=generator)
    class_pred = torch.randint(0, num_classes, (batch, height, width), generator=generator)
    expected = brute_force_assemble(mask_ids, class_pred, num_classes)
    result = assemble(mask_ids, class_pred, num_classes)
    assert result.dtype == torch.int64
    assert torch.equal(result, expected)


@pytest.mark.parametrize("seed", range(4))
def test_assemble_with_a_host_bound_on_the_ids_matches_brute_force_without_a_host_read(seed):
    """``slots`` (a bound larger than the ids need) and ``check_values=False``: the same labels, no host read."""
    generator = torch.Generator().manual_seed(seed)
    mask_ids = torch.randint(0, 5, (3, 9, 11), generator=generator)
    class_pred = torch.randint(0, 4, (3, 9, 11), generator=generator)
    expected = brute_force_assemble(mask_ids, class_pred, 4)
    with SyncCounter() as counter:
        result = assemble(mask_ids, class_pred, 4, slots=5 + seed, check_values=False)
    assert counter.total() == 0, counter.report()
    assert torch.equal(result, expected)


def test_assemble_ties_background_and_ignore_index():
    mask_ids = torch.tensor([[[1, 1, 1, 1, 0, 2, 2, 3]]])
    class_pred = torch.tensor([[[4, 2, 2, 4, 1, 3, 0, 1]]])
    labels = assemble(mask_ids, class_pred, num_classes=5)
    assert labels.tolist() == [[[2, 2, 2, 2, 255, 0, 0, 1]]]
    assert assemble(mask_ids, class_pred, 5, ignore_index=-1)[0, 0, 4] == -1


@pytest.mark.parametrize(
    "mask_ids, class_pred, num_classes, ignore_index, message",
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 3, 255, "shape"),
        (torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long), 3, 255, "shape"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3, 255, "integer"),
        (torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3), 3, 255, r"\[0, 3\)"),
        (torch.full((1, 2, 2), -1), torch.zeros(1, 2, 2, dtype=torch.long), 3, 255, ">= 0"),
        (torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), 3, 1, "collides"),
    ],
)
def test_assemble_rejects_bad_input(mask_ids, class_pred, num_classes, ignore_index, message):
    with pytest.raises(ValueError, match=message):
        assemble(mask_ids, class_pred, num_classes, ignore_index)


def _scene(batch=2, size=64, channels=48, seed=0):
    features = planted_features(batch, channels=channels, size=size // 8, regions=5, noise=0.3, seed=seed)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    prototypes = F.normalize(torch.randn(4, channels, generator=torch.Generator().manual_seed(seed + 1)), dim=1)
    return features, images, prototypes


def test_make_pseudo_labels_without_crf_is_argmax_of_upsampled_logits():
    features, images, prototypes = _scene()
    result = make_pseudo_labels(features, images, prototypes, threshold=0.4, coverage=0.95, max_masks=64)
    assert isinstance(result, PseudoLabels)
    assert result.labels.shape == result.mask_ids.shape == (2, 64, 64)
    assert result.labels.dtype == result.mask_ids.dtype == result.num_proposals.dtype == torch.int64
    expected_ids = upsample_logits(mask_logits(features), (64, 64)).argmax(1)
    assert torch.equal(result.mask_ids, expected_ids)
    classes = nearest_prototype_upsampled(features, prototypes, (64, 64))
    assert torch.equal(result.labels, brute_force_assemble(result.mask_ids, classes, 4))
    assert int(result.mask_ids.max()) <= int(result.num_proposals.max())
    assert ((result.labels == 255) == (result.mask_ids == 0)).all()
    assert (result.labels[result.labels != 255] < 4).all()


def test_make_pseudo_labels_calls_crf_with_label_sized_0_255_images():
    features, images, prototypes = _scene()
    seen = {}

    def fake_crf(logits, crf_images):
        seen["logits"], seen["images"] = logits, crf_images
        flipped = logits.clone()
        flipped[:, 0] = float("-inf")  # forbid background: every pixel goes to a proposal
        return flipped.softmax(dim=1)

    result = make_pseudo_labels(features, images, prototypes, crf_fn=fake_crf, label_size=(32, 48))
    logits, crf_images = seen["logits"], seen["images"]
    assert logits.shape[0] == 2 and logits.shape[-2:] == (32, 48) and logits.dtype == torch.float32
    assert crf_images.shape == (2, 3, 32, 48) and crf_images.dtype == torch.float32
    assert crf_images.max() > 1.5 and crf_images.min() >= 0 and crf_images.max() <= 255
    assert not torch.isnan(logits).any()
    assert result.labels.shape == (2, 32, 48)
    assert (result.mask_ids > 0).all() and (result.labels != 255).all()


def test_make_pseudo_labels_groups_images_by_proposal_count_without_changing_results():
    features = torch.cat([
        planted_features(2, 32, 8, regions=2, noise=0.1, seed=1),
        planted_features(2, 32, 8, regions=9, noise=0.8, seed=2),
        planted_features(1, 32, 8, regions=4, noise=0.3, seed=3),
    ])
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prototypes = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    calls = []

    def softmax_crf(logits, crf_images):
        calls.append(logits.shape[:2])
        return logits.softmax(dim=1)

    plain = make_pseudo_labels(features, images, prototypes)
    grouped = make_pseudo_labels(features, images, prototypes, crf_fn=softmax_crf)
    assert len(set(plain.num_proposals.tolist())) > 2 and len(calls) >= 2  # several groups
    assert sum(n for n, _ in calls) == 5
    assert torch.equal(plain.mask_ids, grouped.mask_ids) and torch.equal(plain.labels, grouped.labels)
    for count, (_, channels) in zip(sorted(plain.num_proposals.tolist()), calls):
        assert channels >= count + 1


def test_make_pseudo_labels_reads_the_device_once_outside_the_proposal_loop():
    """Outside primaps/ (the proposal loop, bounded on its own), a batch costs one host read: the proposal
    counts that size the label groups; the resize, the CRF input, the assembly and the statistics cost none."""
    features = torch.cat([planted_features(2, 32, 8, regions=2, noise=0.1, seed=1),
                          planted_features(2, 32, 8, regions=9, noise=0.8, seed=2)])
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prototypes = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    with SyncCounter() as counter:
        make_pseudo_labels(features, images, prototypes, crf_fn=lambda logits, _: logits.softmax(dim=1))
    outside = {site: n for site, n in counter.by_site.items() if not site.startswith("primaps_dist/primaps/")}
    assert outside == {"primaps_dist/pseudo_labels.py": 1}, counter.report()


def test_make_pseudo_labels_with_dense_crf():
    crf = pytest.importorskip("primaps_dist.crf")
    features, images, prototypes = _scene(batch=2, size=48)
    result = make_pseudo_labels(features, images, prototypes, crf_fn=crf.dense_crf)
    assert result.labels.shape == (2, 48, 48)
    plain = make_pseudo_labels(features, images, prototypes)
    # The CRF refines boundaries; most pixels keep their proposal.
    assert (result.mask_ids == plain.mask_ids).float().mean() > 0.6


def test_make_pseudo_labels_rejects_mismatched_images():
    features, images, prototypes = _scene()
    with pytest.raises(ValueError, match="images"):
        make_pseudo_labels(features, images[:1], prototypes)
