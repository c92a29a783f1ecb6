"""End-to-end training, evaluation and prediction on the tiny demo set (real torchrun, gloo, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from support.checkpoints import newest_payload
from support.demo import DEMO_CHANNELS, DEMO_CONFIG, NUM_CLASSES, tiny_train_args
from support.env import child_env
from support.run import module_command, run_command, torchrun_command
pytestmark = pytest.mark.slow


def _train(tmp_path: Path, demo_data, name: str, *extra: str, nproc: int = 1, em: int = 2, kmeans: int = 2,
           tracking: bool = False, val: bool = False, timeout: float = 400):
    out = tmp_path / name
    args = tiny_train_args(demo_data.train_shards, out, "train.verify_every=1" if nproc > 1 else "train.seed=0",
                           *extra, val_shards=demo_data.val_shards if val else "", pca=2, kmeans=kmeans, em=em,
                           tracking=tracking)
    command = torchrun_command(nproc, "primaps_dist.train", *args) if nproc > 1 else \
        module_command("primaps_dist.train", *args)
    env = child_env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_command(command, env=env, timeout=timeout, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    return out, result


def test_two_rank_stats_training_end_to_end(tmp_path: Path, demo_data) -> None:
    """torchrun x2: prototypes verified bitwise identical across ranks after every step (train.verify_every=1),
    a complete checkpoint, the final evaluation, pictures, and one MLflow run with params and histories."""
    out, result = _train(tmp_path, demo_data, "run", "tracking.num_overlays=2", nproc=2, tracking=True, val=True)
    payload = newest_payload(out)
    assert payload["prototypes"].shape == (NUM_CLASSES, DEMO_CHANNELS)
    assert payload["prototypes"].dtype == torch.float32
    assert torch.allclose(payload["prototypes"].norm(dim=1), torch.ones(NUM_CLASSES), atol=1e-5)
    assert payload["step"] == 6 and payload["world_size"] == 2
    assert payload["config"]["em"]["mode"] == "stats" and payload["mlflow_run_id"]
    assert (out / "config.yaml").is_file()

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["accuracy"] <= 100
    assert metrics["num_images"] == 8  # every validation image exactly once across the two ranks
    assert sorted(metrics["assignment"]) == list(range(NUM_CLASSES))
    for picture in ("confusion.png", "per_class_iou.png", "overlays.png"):
        assert (out / "eval" / picture).stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == payload["mlflow_run_id"]
    run = runs[0]
    assert run.data.params["em.mode"] == "stats" and run.data.params["data.num_classes"] == str(NUM_CLASSES)
    history = client.get_metric_history(run.info.run_id, "images_per_s")
    assert [m.step for m in history] == list(range(1, 7))
    for key in ("time/backbone", "time/proposals", "time/update", "time/data", "proposals_per_image",
                "class_usage_entropy", "em/objective", "skipped_samples", "eval/miou"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/miou"] == pytest.approx(metrics["miou"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "config.yaml" in artifacts and "eval/metrics.json" in artifacts and "eval/confusion.png" in artifacts


def test_gradient_mode_ddp_two_ranks(tmp_path: Path, demo_data) -> None:
    out, _ = _train(tmp_path, demo_data, "grad", "em.mode=gradient", "em.engine=ddp", nproc=2, em=3)
    payload = newest_payload(out)
    state = payload["gradient_state"]
    assert payload["step"] == 7 and "momentum" in state and "engine" in state
    assert torch.allclose(payload["prototypes"].norm(dim=1), torch.ones(NUM_CLASSES), atol=1e-5)


def test_seeded_runs_reproduce_and_resume_continues_exactly(tmp_path: Path, demo_data) -> None:
    """Same seed -> same prototypes; a run stopped after its checkpoint and resumed with more steps equals
    an uninterrupted run (deterministic data stream and EM state)."""
    straight, _ = _train(tmp_path, demo_data, "straight", em=3)
    again, _ = _train(tmp_path, demo_data, "again", em=3)
    first = newest_payload(straight)["prototypes"]
    assert torch.equal(first, newest_payload(again)["prototypes"])

    staged, _ = _train(tmp_path, demo_data, "staged", em=1)
    assert newest_payload(staged)["step"] == 5
    staged, result = _train(tmp_path, demo_data, "staged", em=3)
    assert "resumed from" in result.stderr
    resumed = newest_payload(staged)
    assert resumed["step"] == 7
    assert torch.allclose(resumed["prototypes"], first, atol=1e-5)

    other_seed, _ = _train(tmp_path, demo_data, "other", "train.seed=1", em=3)
    assert not torch.equal(first, newest_payload(other_seed)["prototypes"])


def test_evaluate_two_ranks_equals_one_rank_and_predict(tmp_path: Path, demo_data, demo_checkpoint) -> None:
    env = child_env(tmp_path)
    common = ["--checkpoint", str(demo_checkpoint), f"data.val_shards={demo_data.val_shards}", "train.device=cpu",
              "data.num_workers=0", "tracking.num_overlays=1"]
    single = run_command(module_command("primaps_dist.evaluate", *common, "--out", tmp_path / "one.json"),
                         env=env, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.describe()
    assert "mIoU" in single.stdout
    double = run_command(torchrun_command(2, "primaps_dist.evaluate", *common, "--out", tmp_path / "two.json"),
                         env=env, timeout=300, cwd=tmp_path)
    assert double.returncode == 0, double.describe()
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["confusion"] == two["confusion"] and one["num_images"] == two["num_images"] == 8
    assert one["miou"] == pytest.approx(two["miou"])

    predicted = run_command(module_command("primaps_dist.predict", "--checkpoint", demo_checkpoint, "--images",
                                           demo_data.val_images, "--out", tmp_path / "pred", "--limit", "3",
                                           "--assignment", tmp_path / "one.json"),
                            env=env, timeout=300, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.describe()
    labels = sorted((tmp_path / "pred").glob("*.png"))
    overlays = sorted((tmp_path / "pred").glob("*_overlay.jpg"))
    assert len(labels) == 3 and len(overlays) == 3
    from PIL import Image

    image = Image.open(sorted(demo_data.val_images.glob("*.png"))[0])
    label = Image.open(labels[0])
    assert label.size == image.size and int(np.asarray(label).max()) < NUM_CLASSES


def test_show_proposals_draws_pictures(tmp_path: Path, demo_data) -> None:
    images = sorted(demo_data.val_images.glob("*.png"))[:2]
    result = run_command([*module_command("primaps_dist.cli"), "show-proposals", *images, "--out", tmp_path / "p",
                          "--config", str(DEMO_CONFIG),
                          "--set", "data.crop_size=64", "--set", "crf.iterations=2"],
                         env=child_env(tmp_path), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    pictures = sorted((tmp_path / "p").glob("*_proposals.png"))
    assert len(pictures) == 2 and all(p.stat().st_size > 500 for p in pictures)
    assert "proposals ->" in result.stdout
