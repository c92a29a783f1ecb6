"""Smoke test of bench/bench_predict.py at a tiny size: it runs as a script and prints both rates and their ratio."""

import re

from support.env import PYTHON, REPO, child_env
from support.run import run_checked


def test_bench_predict_prints_batched_and_per_image_rates(tmp_path):
    result = run_checked([PYTHON, str(REPO / "bench" / "bench_predict.py"), "--crop", "32", "--size", "48",
                          "--count", "4", "--batch-size", "4", "--threads", "1", "--repeats", "1"],
                         env=child_env(tmp_path), cwd=tmp_path, timeout=300)
    out = result.stdout
    assert "(4 windows per image)" in out, out
    rates = [float(x) for x in re.findall(r"(?:per-image|batched)\s+([0-9.]+) images/s", out)]
    assert len(rates) == 2 and all(rate > 0 for rate in rates), out
    agreement = re.search(r"ratio batched / per-image: [0-9.]+x; maps identical: (?:True|False) \(pixel agreement ([0-9.]+)\)", out)
    assert agreement and float(agreement.group(1)) > 0.999, out  # batching may move float bits, not the maps
