"""The Trainer in this process, with an injected backbone, loader and tracker: three steps (PCA, K-means, EM),
compared bit for bit with the same three steps written out by hand from the public functions the multi-rank
tests check (CovarianceAccumulator, kmeans_step, make_pseudo_labels, stats_step / the gradient engine).

This is the fast companion of the subprocess runs in test_train.py: it needs no shards, no torchrun and no
MLflow, so a change to the trainer's wiring fails here in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from primaps_dist.config import Config
from primaps_dist.distributed import DistEnv
from primaps_dist.em import CovarianceAccumulator, PrototypeState, kmeans_step, stats_step
from primaps_dist.em.gradient import make_engine, photometric_draws, photometric_view
from primaps_dist.labels import IGNORE_INDEX
from primaps_dist.pseudo_labels import make_pseudo_labels
from primaps_dist.train import Trainer
from primaps_dist.train_state import load_train_state

K, CHANNELS, STRIDE, CROP, BATCH = 4, 8, 4, 32, 2


class TinyBackbone(torch.nn.Module):
    """A frozen random strided convolution: ``[B, 3, S, S]`` -> ``[B, 8, S/4, S/4]`` float32."""

    stride = STRIDE
    out_channels = CHANNELS

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, CHANNELS, STRIDE, stride=STRIDE)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() - 0.5)


def quadrant_images(seed: int) -> torch.Tensor:
    """``[B, 3, S, S]`` in 0..1: four flat colours (one per quadrant, random per image) plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(BATCH, 4, 3, generator=generator)
    images = torch.empty(BATCH, 3, CROP, CROP)
    half = CROP // 2
    for index, (rows, cols) in enumerate([(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None)),
                                          (slice(half, None), slice(0, half)), (slice(half, None), slice(half, None))]):
        images[:, :, rows, cols] = colours[:, index, :, None, None]
    return (images + 0.02 * torch.randn(images.shape, generator=generator)).clamp(0, 1)


class RecordingTracker:
    """Stands in for the MLflow Tracker: records what the trainer reports."""

    def __init__(self) -> None:
        self.started: list[dict] = []
        self.metrics: dict[int, dict[str, float]] = {}
        self.artifacts: list[str] = []
        self.finished: list[str] = []

    def start(self, params=None, run_name=None) -> str:
        self.started.append(dict(params or {}))
        return "recorded-run"

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics[step] = dict(metrics)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path).name)

    def finish(self, status: str = "FINISHED") -> bool:
        self.finished.append(status)
        return True


def tiny_config(out: Path, mode: str) -> Config:
    cfg = Config()
    cfg.data.num_classes, cfg.data.crop_size = K, CROP
    cfg.train.output_dir, cfg.train.device, cfg.train.seed, cfg.train.log_every = str(out), "cpu", 3, 1
    cfg.train.pca_steps = cfg.train.kmeans_steps = cfg.train.em_steps = 1
    cfg.crf.backend = "none"
    cfg.em.mode = mode
    cfg.em.ema_every = 1  # the first EMA update copies the trained head, so one step moves the teacher
    cfg.tracking.enabled = False
    return cfg.validate()


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


def by_hand(cfg: Config, backbone: TinyBackbone, batches: list[dict]) -> tuple[PrototypeState, torch.Tensor]:
    """PCA on batch 0, one K-means step on batch 1, one EM step on batch 2: (final state, K-means result)."""
    features = [backbone(batch["image"]) for batch in batches]
    covariance = CovarianceAccumulator(CHANNELS)
    covariance.update(features[0])
    covariance.reduce()
    state = PrototypeState.from_prototypes(covariance.principal_directions(K, seed=cfg.train.seed))
    kmeans_step(state, features[1], cfg.em.momentum)
    baseline = state.prototypes.clone()

    images, grid = batches[2]["image"], features[2]
    engine = make_engine(state.prototypes, cfg.em, DistEnv()) if cfg.em.mode == "gradient" else None
    teacher = state.prototypes if engine is None else engine.teacher_prototypes()
    pseudo = make_pseudo_labels(grid, images, teacher, threshold=cfg.proposals.threshold,
                                coverage=cfg.proposals.coverage, max_masks=cfg.proposals.max_masks,
                                median_filter=cfg.proposals.median_filter, label_size=(CROP, CROP))
    assert int((pseudo.labels != IGNORE_INDEX).sum()) > 0, "the scene gives no pseudo label: the test would be void"
    if engine is None:
        # Statistics at the feature grid: the label at each patch centre.
        labels = F.interpolate(pseudo.labels[:, None].float(), size=grid.shape[-2:], mode="nearest-exact")
        stats_step(state, grid, labels[:, 0].long(), cfg.em.momentum)
    else:
        # The injected loader has no sample_index: the trainer numbers step 2's samples 2 B + [0, B) (W = 1).
        size = images.shape[0]
        draws = photometric_draws(torch.arange(2 * size, 3 * size), cfg.train.seed)
        engine.step(backbone(photometric_view(images, draws)), pseudo.labels)
        state.set_prototypes(engine.teacher_prototypes())
    return state, baseline


@pytest.mark.parametrize("mode", ["stats", "gradient"])
def test_three_steps_in_process_equal_the_hand_computation(tmp_path, mode):
    cfg = tiny_config(tmp_path / "run", mode)
    backbone = TinyBackbone()
    batches = [{"image": quadrant_images(seed)} for seed in range(3)]
    tracker = RecordingTracker()
    trainer = Trainer(cfg, DistEnv(), backbone=backbone, loader=iter(batches), tracker=tracker)
    assert trainer.run() == 0

    expected, baseline = by_hand(cfg, backbone, batches)
    prototypes = trainer.state.prototypes
    assert torch.equal(trainer.baseline_prototypes, baseline)
    assert torch.equal(prototypes, expected.prototypes)
    if mode == "stats":
        assert torch.equal(trainer.state.M, expected.M) and torch.equal(trainer.state.W, expected.W)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(K))
    assert (prototypes - baseline).abs().max() > 1e-4  # the EM step moved the prototypes

    saved = load_train_state(tmp_path / "run")  # the final step is always checkpointed
    assert saved.step == 3 and saved.stage == "em" and saved.world_size == 1
    assert torch.equal(saved.prototypes, prototypes) and torch.equal(saved.kmeans_prototypes, baseline)
    assert saved.data_position is None  # the injected loader has no stream position
    assert saved.mlflow_run_id == "recorded-run" and (saved.gradient_state is not None) == (mode == "gradient")

    assert len(tracker.started) == 1 and tracker.started[0]["em.mode"] == mode
    assert sorted(tracker.metrics) == [1, 2, 3] and tracker.finished == ["FINISHED"]
    assert [tracker.metrics[step]["stage"] for step in (1, 2, 3)] == [0.0, 1.0, 2.0]
    assert "kmeans/objective" in tracker.metrics[2]
    assert ("em/objective" if mode == "stats" else "em/loss") in tracker.metrics[3]
    assert tracker.artifacts == ["config.yaml"]
