"""Shared helpers for end-to-end CLI tests: one tiny demo data set per session, subprocess runners.

Use from a test module with::

    pytest_plugins = ["helpers_demo"]            # registers the session fixtures once for the whole run
    from helpers_demo import run_command, ...      # plain helper functions

Fixtures (session scope, built lazily on first use):

- ``demo_data`` -> :class:`DemoData`: 16 train + 8 val texture mosaics (96 x 96, 6 classes) made by
  ``make-demo-data`` and written as shards of 4 samples by ``make-shards`` (4 train, 2 val shards).
- ``demo_checkpoint`` -> Path: the ``checkpoints`` folder of a 2-step training run on ``demo_data``
  (PCA + one K-means step, EfficientNet-Lite0 layers [2, 3], crop 64, K = 6).

Every subprocess gets :func:`child_env`: hub downloads off, MLflow in a local SQLite file, one thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
PYTHON = sys.executable
NUM_CLASSES = 6
CROP = 64
# The demo preset concatenates EfficientNet-Lite0 stages 2 and 3: stride 8, 40 + 112 channels.
DEMO_STRIDE = 8
DEMO_CHANNELS = 40 + 112


@dataclass(frozen=True)
class DemoData:
    """Paths of the session's demo data set."""

    root: Path
    train_images: Path
    train_labels: Path
    val_images: Path
    val_labels: Path
    classes: Path  # classes.json (make-shards --classes)
    train_shards: Path  # folder of 000000.tar ...
    val_shards: Path


@dataclass
class Result:
    """What a finished command left behind."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (f"command: {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-6000:]}")


def child_env(tmp: str | os.PathLike | None = None, **changes: str | None) -> dict[str, str]:
    """Environment for a CLI subprocess; ``changes`` set (or with None remove) variables."""
    env = dict(os.environ)
    for name in ("PRIMAPS_DEBUG", "PRIMAPS_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    if tmp is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp).resolve() / 'mlflow.db'}"
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_command(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0,
                cwd: str | os.PathLike | None = None) -> Result:
    """Run ``args`` to completion (killed after ``timeout`` s, which fails the calling test)."""
    begin = time.monotonic()
    try:
        done = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else child_env(), cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        text = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        pytest.fail(f"command did not finish within {timeout} s: {' '.join(map(str, args))}\n"
                    f"--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{text[-4000:]}")
    return Result(list(map(str, args)), done.returncode, done.stdout, done.stderr, time.monotonic() - begin)


def module_command(module: str, *args: str | os.PathLike) -> list[str]:
    """``python -m <module> args...`` with the test interpreter (the project's virtual environment)."""
    return [PYTHON, "-m", module, *map(str, args)]


def torchrun_command(nproc: int, module: str, *args: str | os.PathLike, max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N [--max-restarts=R] -m module args...``."""
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
    return command + ["-m", module, *map(str, args)]


def tiny_train_args(train_shards: str | os.PathLike, output_dir: str | os.PathLike, *extra: str,
                    val_shards: str | os.PathLike = "", pca: int = 1, kmeans: int = 1, em: int = 0,
                    tracking: bool = False) -> list[str]:
    """``--config demo.yaml`` plus overrides for a run of a few seconds (no final evaluation by default)."""
    return [
        "--config", str(DEMO_CONFIG),
        f"data.train_shards={train_shards}", f"data.val_shards={val_shards}",
        f"data.crop_size={CROP}", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=0", "data.train_scale=[1.0,1.0]",
        f"train.pca_steps={pca}", f"train.kmeans_steps={kmeans}", f"train.em_steps={em}",
        f"train.output_dir={output_dir}", "train.log_every=1", "checkpoint.every_steps=1",
        "train.device=cpu", "proposals.max_masks=4", "proposals.label_size=0", "crf.iterations=2",
        "tracking.num_overlays=0",
        f"tracking.enabled={'true' if tracking else 'false'}", "tracking.system_metrics=false",
        *extra,
    ]


def last_line(text: str) -> str:
    """The last non-empty line (tqdm's carriage-return redraws count as line breaks)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Non-zero exit, no traceback, and the last stderr line is ``error: ...`` containing every needle."""
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    line = last_line(result.stderr)
    assert line.startswith("error: "), result.describe()
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line {line!r}\n{result.describe()}"
    return line


def write_shard(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar shard with exactly these ``(member name, bytes)`` (names used verbatim, even unsafe ones)."""
    from primaps_dist.data.synthetic import write_tar

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(path, members)
    return path


def load_checkpoint_file(checkpoint_dir: str | os.PathLike) -> dict:
    """The newest complete checkpoint under ``checkpoint_dir``, read as the framework does (weights only)."""
    import torch

    from primaps_dist import checkpoint as ckpt

    latest = ckpt.find_latest(checkpoint_dir)
    assert latest is not None, f"no complete checkpoint in {checkpoint_dir}"
    return torch.load(latest / "checkpoint.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- fixtures


def build_demo_data(root: Path) -> DemoData:
    """Generate the images and shard them (in this process: the CLI mains, no interpreter start-up)."""
    from primaps_dist.data import demo, shards

    images = root / "images"
    assert demo.main(["--out", str(images), "--train", "16", "--val", "8", "--size", "96"]) == 0
    data = DemoData(
        root=root,
        train_images=images / "train" / "images",
        train_labels=images / "train" / "labels",
        val_images=images / "val" / "images",
        val_labels=images / "val" / "labels",
        classes=images / "classes.json",
        train_shards=root / "shards" / "train",
        val_shards=root / "shards" / "val",
    )
    for split_images, split_labels, out in ((data.train_images, data.train_labels, data.train_shards),
                                            (data.val_images, data.val_labels, data.val_shards)):
        assert shards.main(["--images", str(split_images), "--labels", str(split_labels), "--out", str(out),
                            "--shard-size", "4", "--classes", str(data.classes)]) == 0
    return data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoData:
    return build_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_checkpoint(demo_data, tmp_path_factory) -> Path:
    """``checkpoints`` folder of a tiny finished run (steps: 1 PCA + 1 K-means)."""
    out = tmp_path_factory.mktemp("demo_run") / "run"
    result = run_command(module_command("primaps_dist.train", *tiny_train_args(demo_data.train_shards, out)),
                         env=child_env(out.parent), timeout=240)
    assert result.returncode == 0, result.describe()
    return out / "checkpoints"
