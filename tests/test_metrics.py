"""Confusion matrix, Hungarian matching, accuracy and mIoU on hand-made cases."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from primaps_dist import distributed
from primaps_dist.metrics import confusion_matrix, hungarian_scores, reduce_confusion


def test_confusion_by_hand_with_ignore():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[1, 1, 0], [2, 0, 1]])
    confusion = confusion_matrix(pred, target, num_classes=3)
    assert confusion.dtype == torch.int64
    assert confusion.tolist() == [[0, 2, 0], [1, 1, 0], [0, 0, 1]]  # rows: class, columns: cluster


def test_confusion_rejects_bad_values():
    with pytest.raises(ValueError, match="predictions must be in \\[0, 3\\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="targets must be in \\[0, 3\\) or 255"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
    # An ignored pixel may carry any prediction id that is in range.
    assert confusion_matrix(torch.tensor([2]), torch.tensor([255]), 3).sum() == 0


def test_permuted_perfect_prediction_scores_100():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (1000,), generator=generator)
    permutation = torch.tensor([3, 0, 4, 1, 2])  # cluster id of each class
    scores = hungarian_scores(confusion_matrix(permutation[target], target, 5))
    assert scores["accuracy"] == 100.0 and scores["miou"] == 100.0
    assert scores["per_class_iou"] == [1.0] * 5
    assert [scores["assignment"][int(permutation[c])] for c in range(5)] == list(range(5))
    assert np.array_equal(np.array(scores["matched_confusion"]), np.diag(np.bincount(target.numpy(), minlength=5)))
    assert np.array_equal(np.array(scores["confusion"]), confusion_matrix(permutation[target], target, 5).numpy())


def test_scores_by_hand():
    # classes x clusters; best matching: cluster 0 -> class 1, cluster 1 -> class 0.
    confusion = torch.tensor([[2, 8], [6, 4]])
    scores = hungarian_scores(confusion)
    assert scores["assignment"] == [1, 0]
    assert scores["accuracy"] == pytest.approx(70.0)
    # class 0: TP 8, GT 10, predicted 12 -> 8/14; class 1: TP 6, GT 10, predicted 8 -> 6/12
    assert scores["per_class_iou"] == pytest.approx([8 / 14, 6 / 12])
    assert scores["miou"] == pytest.approx((8 / 14 + 6 / 12) / 2 * 100)
    assert scores["num_pixels"] == 20
    assert scores["confusion"] == [[2, 8], [6, 4]] and scores["matched_confusion"] == [[8, 2], [4, 6]]


def test_undefined_classes_are_excluded_from_miou():
    # Class 2 has no pixel and its matched cluster predicts nothing -> IoU undefined (NaN), not 0.
    confusion = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    scores = hungarian_scores(confusion)
    assert math.isnan(scores["per_class_iou"][2])
    assert scores["miou"] == 100.0 and scores["accuracy"] == 100.0
    # Absent class that IS predicted (false positives) has IoU 0 and counts.
    confusion = np.array([[5, 0, 1], [0, 5, 0], [0, 0, 0]])
    scores = hungarian_scores(confusion)
    assert scores["per_class_iou"][2] == 0.0
    assert scores["miou"] == pytest.approx((5 / 6 + 1.0 + 0.0) / 3 * 100)


def test_more_or_fewer_clusters_than_classes():
    over = np.array([[4, 1, 0], [0, 0, 5]])  # 2 classes, 3 clusters: cluster 1 stays unmatched
    scores = hungarian_scores(over)
    assert scores["assignment"] == [0, -1, 1]
    assert scores["accuracy"] == pytest.approx(90.0)  # the unmatched cluster's pixel is an error
    assert scores["per_class_iou"] == pytest.approx([4 / 5, 1.0])
    assert scores["matched_confusion"] == [[4, 0], [0, 5]]  # the unmatched cluster's pixels are dropped
    under = np.array([[4, 0], [0, 5], [1, 0]])  # 3 classes, 2 clusters: class 2 unmatched -> IoU 0
    scores = hungarian_scores(under)
    assert scores["assignment"] == [0, 1]
    assert scores["per_class_iou"] == pytest.approx([4 / 5, 1.0, 0.0])


def test_empty_confusion_is_an_error():
    with pytest.raises(ValueError, match="no labelled pixels"):
        hungarian_scores(torch.zeros(3, 3, dtype=torch.int64))


@settings(max_examples=50, deadline=None)
@given(num_classes=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_accuracy_is_the_best_permutation(num_classes, seed):
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, 20, size=(num_classes, num_classes))
    confusion[0, 0] += 1  # never empty
    best = max(
        sum(confusion[c, perm[c]] for c in range(num_classes)) for perm in itertools.permutations(range(num_classes))
    )
    scores = hungarian_scores(confusion)
    assert scores["accuracy"] == pytest.approx(best / confusion.sum() * 100)
    assert sorted(scores["assignment"]) == list(range(num_classes))


def test_reduce_confusion_single_process():
    distributed.reset_collective_counts()
    confusion = torch.ones(3, 3, dtype=torch.int64)
    assert reduce_confusion(confusion) is confusion and confusion.sum() == 9
    assert distributed.collective_counts() == {"all_reduce_sum": 1}
    with pytest.raises(ValueError, match="int64"):
        reduce_confusion(torch.ones(2, 2))


def test_class_usage_entropy():
    from primaps_dist.metrics import class_usage_entropy

    assert class_usage_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert class_usage_entropy(torch.tensor([0, 9, 0])) == 0.0
    assert class_usage_entropy(torch.tensor([0, 0])) == 0.0 and class_usage_entropy(torch.tensor([4])) == 0.0
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 2 = 0.8112781...
    assert class_usage_entropy(torch.tensor([3, 1])) == pytest.approx(0.8112781244591328, abs=1e-12)
