"""The README's "Use a trained model" blocks (Python and export), run as written from a folder that looks like
``make demo``'s output (demo_out/ holding the tiny demo run, its metrics.json, images and shards). The batch line
(torchrun) runs in tests/test_predict_shards.py, the MLflow block in tests/test_mlflow_model.py."""

import json
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from support.demo import NUM_CLASSES
from support.env import PYTHON, REPO, VENV_BIN, child_env
from support.run import run_checked

SECTION = "## Use a trained model"


def readme_blocks(language: str) -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def demo_out(demo_checkpoint, demo_data, tmp_path_factory):
    """``<tmp>/demo_out`` with run/checkpoints, run/metrics.json (a real evaluate), images/ and shards/."""
    root = tmp_path_factory.mktemp("readme")
    demo = root / "demo_out"
    (demo / "run").mkdir(parents=True)
    (demo / "run" / "checkpoints").symlink_to(demo_checkpoint)
    (demo / "images").symlink_to(demo_data.root / "images")
    (demo / "shards").symlink_to(demo_data.root / "shards")
    run_checked([PYTHON, "-m", "primaps_dist.evaluate", "--checkpoint", str(demo / "run" / "checkpoints" / "latest"),
                 "--out", str(demo / "run" / "metrics.json"), f"data.val_shards={demo_data.val_shards}"],
                env=child_env(root), cwd=root, timeout=300)
    return root


def test_python_block_runs_as_written(demo_out):
    (block,) = readme_blocks("python")
    result = run_checked([PYTHON, "-c", block], env=child_env(demo_out), cwd=demo_out, timeout=300)
    names = json.loads((demo_out / "demo_out" / "run" / "metrics.json").read_text())["class_names"]
    shape, name = result.stdout.strip().split(") ")
    assert shape == "(96, 96" and name in names, result.stdout  # the image's own size (not the 64-pixel crop)


@pytest.mark.slow
def test_export_block_runs_as_written(demo_out):
    (block,) = readme_blocks("bash")[:1]
    lines = commands(block)
    assert [shlex.split(line)[0] for line in lines] == ["primaps-dist", "python", "python", "torchrun"]
    programs = {"primaps-dist": str(VENV_BIN / "primaps-dist"), "python": PYTHON}
    for line in lines[:-1]:  # the torchrun line runs in tests/test_predict_shards.py, with its checks
        words = shlex.split(line)
        run_checked([programs[words[0]], *words[1:]], env=child_env(demo_out), cwd=demo_out, timeout=400)
    demo = demo_out / "demo_out"
    assert {p.name for p in (demo / "model").iterdir()} == {"config.json", "weights.safetensors",
                                                              "window_program.pt2", "segment.py"}
    with Image.open(demo / "labels" / "val_000000.png") as standalone, \
            Image.open(demo / "pred_export" / "val_000000.png") as in_package:
        # no CRF in this run's config, so the standalone runner and predict --export give the same class ids
        assert np.array_equal(np.array(standalone), np.array(in_package))
        assert np.array(standalone).shape == (96, 96) and np.array(standalone).max() < NUM_CLASSES
