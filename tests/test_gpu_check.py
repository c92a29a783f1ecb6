"""bench/gpu_check.py cannot rot: its CPU dry run executes every stage (agreement, throughput, sync count,
training runs with checkpoint and resume, DDP and DeepSpeed); a failed check exits 1 with one clear line, and
no CUDA without --dry exits 2. Also the CUDA-only DeepSpeed optimizer choice, which is plain configuration."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from primaps_dist.em.gradient import engines
from support.env import child_env
from support.run import run_command

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_executes_every_stage_and_prints_one_json_line(tmp_path):
    result = run_command([sys.executable, str(SCRIPT), "--dry"], env=child_env(tmp_path), timeout=420)
    assert result.returncode == 0, result.describe()
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["mode"] == "dry" and report["failures"] == []
    agreement = report["agreement"]
    assert agreement["mask_logits_min_ari"] == 1.0 and agreement["stats_max_difference"] == 0.0
    assert set(agreement["crf_argmax_agreement"]) == {"downsample_1", "downsample_4"}
    stages = report["throughput"]["stage_ms"]
    assert set(stages) == {"backbone", "proposals", "crf", "assembly", "m_step"} and min(stages.values()) > 0
    assert sum(report["throughput"]["stage_share"].values()) == pytest.approx(1.0)
    assert report["throughput"]["features"] == [384, 8, 8]  # ViT-S/8 at the dry crop 64
    assert set(report["syncs"]) == {"stats", "gradient"}
    for engine in ("train_ddp", "train_deepspeed"):
        first, resumed = report[engine]["runs"]
        assert (first["exit"], first["final_step"], first["resumed"]) == (0, 4, False), report[engine]
        assert (resumed["exit"], resumed["final_step"], resumed["resumed"]) == (0, 6, True), report[engine]
    assert report["collective"]["all_reduce_ok"]


def test_a_failed_check_exits_1_with_one_clear_line(tmp_path):
    result = run_command([sys.executable, str(SCRIPT), "--dry", "--stages", "agreement", "--ari-min", "1.01"],
                         env=child_env(tmp_path), timeout=300)
    assert result.returncode == 1, result.describe()
    assert "gpu-check FAILED: mask_logits ARI 1.0000 < 1.01" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == ["mask_logits ARI 1.0000 < 1.01"]


def test_without_cuda_the_full_check_refuses_in_one_line(tmp_path):
    result = run_command([sys.executable, str(SCRIPT)], env=child_env(tmp_path, CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert result.returncode == 2, result.describe()
    assert result.stderr.count("\n") == 1 and "no CUDA device" in result.stderr and "--dry" in result.stderr


def test_deepspeed_on_cuda_uses_torch_adam_unless_fused_adam_is_prebuilt(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1.0}}}))
    cuda = torch.device("cuda", 0)  # configuration only: nothing runs on the device
    monkeypatch.setattr(engines, "fused_adam_prebuilt", lambda: False)
    assert engines.load_deepspeed_config(path, 5e-3, cuda)["optimizer"]["params"] == {"lr": 5e-3, "torch_adam": True}
    monkeypatch.setattr(engines, "fused_adam_prebuilt", lambda: True)
    assert engines.load_deepspeed_config(path, 5e-3, cuda)["optimizer"]["params"] == {"lr": 5e-3}
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1.0, "torch_adam": False}}}))
    monkeypatch.setattr(engines, "fused_adam_prebuilt", lambda: False)
    explicit = engines.load_deepspeed_config(path, 5e-3, cuda)["optimizer"]["params"]
    assert explicit == {"lr": 5e-3, "torch_adam": False}  # the user's explicit choice stands
    assert engines.fused_adam_prebuilt() in (True, False)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_runs_the_script_with_its_arguments():
    done = run_command(["make", "-n", "-C", str(SCRIPT.parents[1]), "gpu-check", "GPU_CHECK_ARGS=--dry"], timeout=60)
    assert done.returncode == 0, done.describe()
    assert ".venv/bin/python bench/gpu_check.py --dry" in done.stdout
