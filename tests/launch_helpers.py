"""Helpers for the launcher / SLURM / multi-node integration tests: demo shards, tiny-run overrides,
subprocess runs with readable failures, and reading the final checkpoint.

The demo shards are generated once per pytest session (cached in this module) with the package's own
``primaps-dist make-demo-data`` and ``make-shards`` commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest: torchrun, primaps-dist, deepspeed live here
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
STEP_DIR = re.compile(r"^step_(\d+)$")

_demo_cache: dict[str, Path] = {}


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for child runs: the test venv first on PATH, one thread per process, no network."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
            "PYTHONUNBUFFERED": "1",
            "PRIMAPS_VENV": str(BIN.parent),
        }
    )
    for key in list(env):  # an outer torchrun/SLURM job must not leak into the runs under test
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            del env[key]
    env.update(extra or {})
    return env


def run_checked(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: str | os.PathLike = REPO, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a command; on a non-zero exit or a timeout fail the test with the tail of its output."""
    try:
        out = subprocess.run(
            list(argv), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        text = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"{' '.join(map(str, argv))} timed out after {timeout} s:\n{tail(text)}", pytrace=False)
    if out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {out.returncode}:\n{tail(out.stdout)}", pytrace=False)
    return out


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def demo_shards(base: Path) -> Path:
    """``base/demo`` with ``shards/{train,val}``: 16 train and 8 val 128x128 demo images (made once)."""
    key = str(base)
    if key in _demo_cache:
        return _demo_cache[key]
    root = base / "demo"
    env = subprocess_env()
    cli = str(BIN / "primaps-dist")
    run_checked([cli, "make-demo-data", "--out", str(root / "images"), "--train", "16", "--val", "8", "--size", "128"], env=env)
    for split in ("train", "val"):
        run_checked(
            [
                cli, "make-shards",
                "--images", str(root / "images" / split / "images"),
                "--labels", str(root / "images" / split / "labels"),
                "--out", str(root / "shards" / split),
                "--shard-size", "4",
            ],
            env=env,
        )
    _demo_cache[key] = root
    return root


def tiny_overrides(demo: Path, output_dir: Path, **extra: object) -> list[str]:
    """``key=value`` overrides that turn configs/demo.yaml into a run of a few seconds per step on CPU.

    ``extra`` uses ``section__key`` names, e.g. ``train__em_steps=8``.
    """
    values: dict[str, object] = {
        "data.train_shards": demo / "shards" / "train",
        "data.val_shards": demo / "shards" / "val",
        "data.crop_size": 128,
        "data.train_scale": "[1.0,1.0]",
        "data.batch_size": 2,
        "data.eval_batch_size": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 8,
        "train.pca_steps": 2,
        "train.kmeans_steps": 3,
        "train.em_steps": 4,
        "train.log_every": 1,
        "train.device": "cpu",
        "train.output_dir": output_dir,
        "checkpoint.every_steps": 3,
        "tracking.system_metrics": "false",
        "tracking.num_overlays": 0,
    }
    for name, value in extra.items():
        values[name.replace("__", ".")] = value
    return [f"{key}={value}" for key, value in values.items()]


def total_steps(overrides: Sequence[str]) -> int:
    values = dict(item.split("=", 1) for item in overrides)
    return sum(int(values[f"train.{k}"]) for k in ("pca_steps", "kmeans_steps", "em_steps"))


def complete_checkpoints(output_dir: Path) -> dict[int, Path]:
    """``{step: folder}`` of every checkpoint folder with a ``COMPLETE`` marker."""
    found = {}
    folder = Path(output_dir) / "checkpoints"
    if folder.is_dir():
        for entry in folder.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / "COMPLETE").exists():
                found[int(match.group(1))] = entry
    return found


def load_checkpoint(folder: Path) -> dict:
    """The checkpoint payload, loaded the safe way (``weights_only=True``)."""
    import torch

    files = sorted(folder.glob("*.pt"))
    assert files, f"no .pt file in {folder}: {sorted(p.name for p in folder.iterdir())}"
    path = folder / "checkpoint.pt" if (folder / "checkpoint.pt").exists() else files[0]
    return torch.load(path, map_location="cpu", weights_only=True)


def final_checkpoint(output_dir: Path, expected_step: int) -> dict:
    """Payload of the newest complete checkpoint, which must be at ``expected_step``."""
    found = complete_checkpoints(output_dir)
    assert found, f"no complete checkpoint under {output_dir}/checkpoints"
    step = max(found)
    assert step == expected_step, f"newest complete checkpoint is step {step}, expected {expected_step}"
    pointer = Path(output_dir) / "checkpoints"
    assert (pointer / "latest").exists() or (pointer / "latest.txt").exists(), "checkpoints/latest pointer missing"
    payload = load_checkpoint(found[step])
    assert int(payload["step"]) == expected_step
    return payload
