"""Smoke tests of the CRF and pseudo-label benchmarks (tiny sizes): they run and print their ratios."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf not importable")
def test_bench_crf_prints_agreement_and_throughput_per_factor(capsys):
    bench = _load("bench_crf")
    args = ["--batch", "2", "--size", "48", "--repeats", "1", "--downsample", "1", "4", "--no-memory"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for factor in (1, 4):
        assert re.search(rf"torch, downsample {factor}: argmax agreement with pydensecrf \d+\.\d\d %", out), out
    assert len(re.findall(r"throughput x\d+\.\d\d of pydensecrf", out)) == 2, out
    assert "pydensecrf with 3 iterations vs 10" in out


def test_bench_pseudo_labels_prints_the_share_of_the_forward(capsys):
    bench = _load("bench_pseudo_labels")
    assert bench.main(["--batch", "1", "--size", "64", "--regions", "4", "--crf-downsample", "2"]) == 0
    out = capsys.readouterr().out
    assert "downsample 2" in out
    assert re.search(r"pseudo labels / backbone forward \(CPU time\): \d+\.\d % \(target <= 25 %\)", out), out
