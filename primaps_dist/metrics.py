"""Evaluation metrics: confusion matrix over a split, Hungarian matching, accuracy and mIoU.

Convention: ``confusion[c, k]`` = number of labelled pixels of ground-truth class ``c`` predicted as
cluster ``k`` (rows: classes, columns: clusters). Accumulate it per batch with :func:`confusion_matrix`,
sum over the split, :func:`reduce_confusion` across ranks once, then :func:`hungarian_scores`.
Label-free: :func:`class_usage_entropy` of the per-class pixel counts of a training step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from primaps_dist import distributed
from primaps_dist.labels import IGNORE_INDEX

__all__ = ["confusion_matrix", "reduce_confusion", "hungarian_scores"]


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    num_clusters: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``[num_classes, num_clusters]`` int64 counts of (class, cluster) pairs over labelled pixels.

    ``pred`` and ``target`` are integer tensors of the same shape (any), on the same device; pixels whose
    target is ``ignore_index`` are skipped. ``num_clusters`` defaults to ``num_classes``. Raises ValueError
    for a prediction outside ``[0, num_clusters)`` or a target outside ``[0, num_classes)`` (not ignored).
    """
    num_clusters = num_classes if num_clusters is None else num_clusters
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise ValueError(f"pred ({pred.dtype}) and target ({target.dtype}) must be integer tensors")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel():
        if int(pred.min()) < 0 or int(pred.max()) >= num_clusters:
            raise ValueError(f"predictions must be in [0, {num_clusters}), got {int(pred.min())}..{int(pred.max())}")
        if int(target.min()) < 0 or int(target.max()) >= num_classes:
            raise ValueError(
                f"targets must be in [0, {num_classes}) or {ignore_index}, got {int(target.min())}..{int(target.max())}"
            )
    flat = torch.bincount(target * num_clusters + pred, minlength=num_classes * num_clusters)
    return flat.reshape(num_classes, num_clusters).to(torch.int64)


def reduce_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over all ranks, in place (one all-reduce; every rank must call it)."""
    if confusion.dtype != torch.int64:
        raise ValueError(f"confusion matrix must be int64, got {confusion.dtype}")
    return distributed.all_reduce_sum(confusion)


def hungarian_scores(confusion: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Match clusters to classes one-to-one (maximal matched pixels) and score.

    Args:
        confusion: ``[num_classes, num_clusters]`` counts (rows: ground truth, columns: clusters).
    Returns a JSON-friendly dict:
        ``accuracy`` (percent of labelled pixels whose cluster is matched to their class),
        ``miou`` (percent, mean over classes with a defined IoU), ``per_class_iou`` (fractions, NaN where
        a class is neither present nor predicted), ``assignment`` (per cluster: its class, or -1 when
        unmatched because there are more clusters than classes; such pixels count as errors),
        ``confusion`` (the input ``[num_classes, num_clusters]`` as nested lists), ``matched_confusion``
        (``[num_classes, num_classes]`` after matching: rows ground truth, columns the class each cluster
        was matched to; unmatched clusters dropped), ``num_pixels``.
    With fewer clusters than classes the unmatched classes get IoU 0 (if present).
    Raises ValueError for an empty matrix (no labelled pixel).
    """
    counts = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    if counts.ndim != 2:
        raise ValueError(f"confusion matrix must be 2-D, got shape {counts.shape}")
    counts = counts.astype(np.int64)
    num_classes, num_clusters = counts.shape
    total = int(counts.sum())
    if total == 0:
        raise ValueError("confusion matrix is empty: no labelled pixels were evaluated")
    class_index, cluster_index = linear_sum_assignment(counts, maximize=True)
    assignment = np.full(num_clusters, -1, dtype=np.int64)
    assignment[cluster_index] = class_index
    matched = np.zeros((num_classes, num_classes), dtype=np.int64)
    matched[:, class_index] = counts[:, cluster_index]  # one-to-one: each class gets at most one cluster
    true_positive = np.diag(matched).astype(np.float64)
    ground_truth = counts.sum(axis=1).astype(np.float64)
    predicted = matched.sum(axis=0).astype(np.float64)
    union = ground_truth + predicted - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / np.where(union > 0, union, 1.0), np.nan)
    defined = ~np.isnan(iou)
    miou = float(iou[defined].mean() * 100.0) if defined.any() else math.nan
    return {
        "accuracy": float(true_positive.sum() / total * 100.0),
        "miou": miou,
        "per_class_iou": [float(value) for value in iou],
        "assignment": [int(value) for value in assignment],
        "confusion": counts.tolist(),
        "matched_confusion": matched.tolist(),
        "num_pixels": total,
    }


def class_usage_entropy(counts: torch.Tensor) -> float:
    """Normalised entropy (0..1) of the class-usage histogram: 1 = all K classes used equally."""
    p = counts.double().clamp_min(0)
    total = p.sum()
    if total <= 0 or counts.numel() < 2:
        return 0.0
    p = p / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy / math.log(counts.numel()))
