"""Label-free diagnostics: the per-batch statistics of ``make_pseudo_labels``, their window, the health warnings, and
the metric keys of a tiny training run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from primaps_dist.diagnostics import METRIC_KEYS, DiagnosticsWindow, HealthMonitor
from primaps_dist.primaps import principal_masks
from primaps_dist.pseudo_labels import ProposalStats, make_pseudo_labels
from primaps_dist.testing.primaps_reference import planted_features
from support.demo import tiny_train_args
from support.env import child_env
from support.run import module_command, run_command


pytestmark = pytest.mark.usefixtures("single_thread")


def reference_grid_cells(features: torch.Tensor, threshold: float, max_masks: int) -> tuple[list[int], list[int]]:
    """Per image: cells covered by the raw proposals, and cells a proposal wins after the paper's post-processing,
    computed densely with scipy's median filter (mode 'mirror' = reflect padding without edge repeat)."""
    masks, counts = principal_masks(features, threshold=threshold, max_masks=max_masks)
    raw_cells, kept_cells = [], []
    for b in range(features.shape[0]):
        stack = masks[b, : int(counts[b])].numpy().astype(np.float64)
        raw_cells.append(int((stack > 0).any(axis=0).sum()) if len(stack) else 0)
        if not len(stack):
            kept_cells.append(0)
            continue
        filtered = np.stack([ndimage.median_filter(mask, size=3, mode="mirror") for mask in stack])
        values = np.clip(filtered * 10.0, 0.0, 1.0)
        nonzero = values[values != 0]
        mean_nonzero = nonzero.mean() if nonzero.size else 1.0
        background = np.clip(mean_nonzero - values.sum(axis=0), 0.0, 1.0)
        winner = np.concatenate([background[None], values]).argmax(axis=0)  # log_softmax keeps the order
        kept_cells.append(int((winner > 0).sum()))
    return raw_cells, kept_cells


def distinct_images(batch: int, size: int) -> torch.Tensor:
    """Image b is constant b / 10 (the CRF can tell which image it got)."""
    return (torch.arange(batch, dtype=torch.float32) / 10.0).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()


def test_make_pseudo_labels_statistics_match_independent_computation():
    features = torch.cat([
        planted_features(2, channels=32, size=12, regions=3, noise=0.2, seed=1),
        torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(2)),  # noise: tiny proposals
    ])
    images = distinct_images(4, 48)
    prototypes = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    seen_pre = {}

    def background_loving_crf(logits, crf_images):
        """Records the pre-CRF coverage of each image it gets, then gives the top half of every image to the
        background (so the CRF changes coverage)."""
        for index, image in zip((crf_images[:, 0, 0, 0] / 25.5).round().long().tolist(), logits.argmax(dim=1)):
            seen_pre[index] = float((image > 0).float().mean())
        shifted = logits.clone()
        shifted[:, 0, : logits.shape[2] // 2] = 1e9
        return shifted

    result = make_pseudo_labels(features, images, prototypes, threshold=0.4, max_masks=10, crf_fn=background_loving_crf,
                      label_size=(24, 24))
    stats = result.stats
    assert isinstance(stats, ProposalStats)
    raw_cells, kept_cells = reference_grid_cells(features, 0.4, 10)
    assert stats.proposals.tolist() == result.num_proposals.tolist()
    assert stats.proposal_cells.tolist() == raw_cells
    assert stats.kept_cells.tolist() == kept_cells
    assert sorted(seen_pre) == [0, 1, 2, 3]
    assert stats.coverage_pre_crf.tolist() == pytest.approx([seen_pre[b] for b in range(4)], abs=1e-6)
    post = [float((result.labels[b] != 255).float().mean()) for b in range(4)]
    assert stats.coverage_post_crf.tolist() == pytest.approx(post, abs=1e-6)
    assert stats.coverage_post_crf.sum() < stats.coverage_pre_crf.sum()  # the fake CRF did change coverage
    # The planted maps have large proposals that mostly survive the filter; the noise maps do not.
    assert kept_cells[0] > 0.5 * raw_cells[0] and kept_cells[2] < 0.5 * raw_cells[2]

    plain = make_pseudo_labels(features, images, prototypes, threshold=0.4, max_masks=10, label_size=(24, 24)).stats
    assert torch.equal(plain.coverage_pre_crf, plain.coverage_post_crf)


def test_window_sums_batches_and_resets():
    first = ProposalStats(torch.tensor([3, 5]), torch.tensor([30, 40]), torch.tensor([20, 10]),
                          torch.tensor([0.5, 0.25]), torch.tensor([0.75, 0.5]))
    second = ProposalStats(torch.tensor([1]), torch.tensor([2]), torch.tensor([0]),
                           torch.tensor([0.0]), torch.tensor([0.25]))
    window = DiagnosticsWindow()
    assert window.pop() == {}
    window.add(first)
    window.add(second)
    metrics = window.pop()
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics == pytest.approx({
        "proposals_per_image": 9 / 3,
        "proposals_per_image_min": 1.0,
        "proposals_per_image_max": 5.0,
        "proposal_size_cells": 72 / 9,
        "proposal_cells_kept": 30 / 72,
        "coverage_pre_crf": 0.75 / 3,
        "coverage_post_crf": 1.5 / 3,
    })
    assert window.pop() == {}
    window.add(ProposalStats(*(torch.zeros(2, dtype=torch.int64),) * 3, torch.zeros(2), torch.zeros(2)))
    empty = window.pop()
    assert empty["proposal_size_cells"] == 0.0 and empty["proposal_cells_kept"] == 0.0


def _window_of(features: torch.Tensor, crf_fn=None, median_filter: bool = True) -> dict[str, float]:
    images = torch.rand(features.shape[0], 3, 8 * features.shape[-2], 8 * features.shape[-1],
                        generator=torch.Generator().manual_seed(0))
    prototypes = F.normalize(torch.randn(4, features.shape[1], generator=torch.Generator().manual_seed(1)), dim=1)
    window = DiagnosticsWindow()
    window.add(make_pseudo_labels(features, images, prototypes, max_masks=32, median_filter=median_filter,
                        crf_fn=crf_fn).stats)
    return window.pop()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "primaps_dist.diagnostics" and r.levelno == logging.WARNING]


def test_warning_fires_once_on_tiny_proposals(caplog):
    noise = torch.randn(2, 32, 12, 12, generator=torch.Generator().manual_seed(5))
    metrics = _window_of(noise)
    assert metrics["proposal_cells_kept"] < HealthMonitor.MIN_CELLS_KEPT
    monitor = HealthMonitor(median_filter=True)
    with caplog.at_level(logging.WARNING, logger="primaps_dist.diagnostics"):
        for step in (10, 20, 30):
            monitor.check(metrics, step)
    lines = _warnings(caplog)
    small = [line for line in lines if "too small for the 3x3 median filter" in line]
    assert len(small) == 1 and small[0].startswith("step 10:") and "\n" not in small[0]
    # Without the median filter nothing is erased, so the same maps are no problem for it.
    assert "small_proposals" not in HealthMonitor(median_filter=False).problems(_window_of(noise, median_filter=False))


def test_no_warning_on_healthy_proposals(caplog):
    healthy = planted_features(2, channels=32, size=24, regions=4, noise=0.2, seed=7)
    metrics = _window_of(healthy)
    assert metrics["proposal_cells_kept"] > 0.8 and metrics["coverage_post_crf"] > 0.8
    with caplog.at_level(logging.WARNING, logger="primaps_dist.diagnostics"):
        assert HealthMonitor().check(metrics, 5) == []
    assert _warnings(caplog) == []


def test_warning_fires_once_on_coverage_collapse(caplog):
    healthy = planted_features(2, channels=32, size=24, regions=4, noise=0.2, seed=7)

    def background_crf(logits, images):
        out = torch.full_like(logits, float("-inf"))
        out[:, 0] = 0.0
        return out

    metrics = _window_of(healthy, crf_fn=background_crf)
    assert metrics["coverage_post_crf"] == 0.0 and metrics["coverage_pre_crf"] > 0.8
    monitor = HealthMonitor()
    with caplog.at_level(logging.WARNING, logger="primaps_dist.diagnostics"):
        monitor.check(metrics, 1)
        monitor.check(metrics, 2)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "coverage collapsed" in lines[0] and "0 % of the pixels" in lines[0]


@pytest.mark.slow
def test_tiny_training_run_logs_diagnostics(tmp_path: Path, demo_data) -> None:
    """Stride-16 features (layer 3) of 64-pixel crops are a 4x4 grid: the run must log every diagnostic key at
    every logging step of the EM stage, and warn once about proposals too small for the median filter."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    args = tiny_train_args(demo_data.train_shards, out, "backbone.layers=[3]", pca=1, kmeans=1, em=3, tracking=True)
    result = run_command(module_command("primaps_dist.train", *args), env=child_env(tmp_path), timeout=400,
                         cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stderr.count("too small for the 3x3 median filter") == 1, result.describe()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for key in (*METRIC_KEYS, "class_usage_entropy"):
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        assert set(range(3, 6)) <= set(steps), (key, steps)  # every EM step logs (train.log_every=1)
    metrics = run.data.metrics
    assert 0.0 <= metrics["coverage_post_crf"] <= 1.0 and 0.0 <= metrics["coverage_pre_crf"] <= 1.0
    assert 1.0 <= metrics["proposals_per_image_min"] <= metrics["proposals_per_image"] <= \
        metrics["proposals_per_image_max"] <= 4.0  # proposals.max_masks=4 in tiny runs
    assert metrics["proposal_cells_kept"] < HealthMonitor.MIN_CELLS_KEPT
