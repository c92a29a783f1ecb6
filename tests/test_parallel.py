"""The two-process test run (tests/support/parallel.py): the run lock, and xdist groups under a real
``pytest -n 2 --dist loadgroup`` of a small generated suite (no torch: a few seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from support.env import REPO, child_env
from support.parallel import RunLock

pytest.importorskip("xdist")


def _in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_exclusive_waits_for_shared_and_new_shared_holders_wait_behind_it(tmp_path):
    a, b, c = (RunLock(tmp_path) for _ in range(3))  # one open file each, as in three worker processes
    with a.shared(), c.shared():  # shared holders do not wait for each other
        pass
    order = []

    def exclusive_b():
        with b.exclusive():
            order.append("b in")
            time.sleep(0.2)
            order.append("b out")

    def shared_c():
        with c.shared():
            order.append("c")

    with a.shared():
        threads = [_in_thread(exclusive_b)]
        time.sleep(0.3)
        assert order == []  # B waits for A's test to end
        threads.append(_in_thread(shared_c))
        time.sleep(0.3)
        assert order == []  # C waits behind B (else a busy worker could keep B waiting for ever)
    for thread in threads:
        thread.join(10)
    assert order == ["b in", "b out", "c"]
    for lock in (a, b, c):
        lock.close()


SUITE = '''
import json, os, time
from pathlib import Path
import pytest

LOG = Path(os.environ["PARALLEL_LOG"])

@pytest.fixture(scope="session")
def slurm_cluster():
    return "stand-in"

def record(name, seconds):
    begin = time.time()
    time.sleep(seconds)
    with open(LOG, "a") as log:
        log.write(json.dumps({"name": name, "worker": os.environ["PYTEST_XDIST_WORKER"], "begin": begin,
                              "end": time.time()}) + "\\n")

@pytest.mark.parametrize("index", range(4))
def test_plain(index):
    record(f"plain{index}", 0.4)

@pytest.mark.parametrize("index", range(3))
def test_uses_the_cluster(index, slurm_cluster):
    record(f"cluster{index}", 0.2)

@pytest.mark.xdist_group("own")
@pytest.mark.parametrize("index", range(3))
def test_own_group(index):
    record(f"own{index}", 0.2)

@pytest.mark.alone
@pytest.mark.parametrize("index", range(2))
def test_alone(index):
    record(f"alone{index}", 0.5)
'''


@pytest.mark.slow  # three pytest processes
def test_groups_and_alone_tests_under_two_workers(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    alone: runs alone\n")
    log = tmp_path / "log.jsonl"
    env = child_env(PARALLEL_LOG=str(log), PYTHONPATH=f"{REPO / 'tests'}")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "support.parallel", "-p", "no:cacheprovider",
                           "-n", "2", "--dist", "loadgroup", "test_suite.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 12
    workers = {}
    for record in records:
        workers.setdefault(record["name"].rstrip("0123456789"), set()).add(record["worker"])
    assert len(workers["cluster"]) == len(workers["own"]) == len(workers["alone"]) == 1, workers
    assert workers["plain"] | workers["cluster"] | workers["own"] == {"gw0", "gw1"}  # both workers ran tests
    for alone in (r for r in records if r["name"].startswith("alone")):
        for other in records:
            if other is not alone:
                assert other["end"] <= alone["begin"] or other["begin"] >= alone["end"], (alone, other)
