"""The README's two commands: `make demo` runs end to end (tiny settings); `make test` is what CI runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.env import REPO, child_env
from support.run import run_command

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_end_to_end(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    overrides = ("data.crop_size=96 data.batch_size=2 data.num_workers=0 train.pca_steps=2 train.kmeans_steps=2 "
                 "train.em_steps=2 crf.iterations=2 tracking.system_metrics=false tracking.log_model=false")
    done = run_command(["make", "-C", str(REPO), "demo", f"DEMO_DIR={demo}",
                        "DEMO_DATA_ARGS=--train 8 --val 4 --size 96", f"DEMO_OVERRIDES={overrides}"],
                       env=child_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.describe()
    metrics = json.loads((demo / "run" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and 0 <= metrics["miou"] <= 100
    assert "mIoU" in done.stdout  # the metrics table is printed
    for picture in ("confusion.png", "per_class_iou.png", "overlays.png"):
        assert (demo / "run" / picture).is_file(), picture
    assert len(list((demo / "predictions").glob("*_overlay.jpg"))) == 4


def test_ci_script_runs_make_test_and_fails_on_no_tests() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "make test" in script and '"$status" -eq 5' in script
    assert "make system-deps" in script and "\nsystem-deps:" in (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
