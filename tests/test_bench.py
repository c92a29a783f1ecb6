"""Smoke tests of the PriMaPs, CRF and pseudo-label benchmarks (tiny sizes): they run as ``make bench`` runs them, as
scripts in their own process, and print their ratios. (Tests never import ``bench/``; what the two share
lives in ``primaps_dist.testing``.)"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from support.env import PYTHON, REPO, child_env
from support.run import run_checked


def _bench(name: str, *args: str, tmp_path) -> str:
    result = run_checked([PYTHON, str(REPO / "bench" / f"{name}.py"), *args],
                         env=child_env(tmp_path), cwd=tmp_path, timeout=300)
    return result.stdout


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf not importable")
def test_bench_crf_prints_agreement_and_throughput_per_factor(tmp_path):
    out = _bench("bench_crf", "--batch", "2", "--size", "48", "--repeats", "1", "--downsample", "1", "4",
                 "--no-memory", tmp_path=tmp_path)
    for factor in (1, 4):
        assert re.search(rf"torch, downsample {factor}: argmax agreement with pydensecrf \d+\.\d\d %", out), out
    assert len(re.findall(r"throughput x\d+\.\d\d of pydensecrf", out)) == 2, out
    assert "pydensecrf with 3 iterations vs 10" in out


def test_bench_pseudo_labels_prints_the_share_of_the_forward(tmp_path):
    out = _bench("bench_pseudo_labels", "--batch", "1", "--size", "64", "--regions", "4", "--crf-downsample", "2",
                 tmp_path=tmp_path)
    assert "downsample 2" in out
    assert re.search(r"pseudo labels / backbone forward \(CPU time\): \d+\.\d % \(target <= 25 %\)", out), out


def test_bench_primaps_prints_ratio_and_agreement_with_the_published_loop(tmp_path):
    out = _bench("bench_primaps", "--batch", "3", "--channels", "24", "--size", "12", "--regions", "4",
                 "--ref-images", "2", "--repeats", "1", "--skip-memory", tmp_path=tmp_path)
    assert re.search(r"throughput ratio \(reference / ours, per image, CPU time\): \d+\.\dx", out), out
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) >= {"ratio_cpu", "ari_mean", "ari_mean_reproducible", "counts_equal"}
    assert summary["ari_mean"] > 0.9 and summary["counts_equal"] == 1.0, summary
