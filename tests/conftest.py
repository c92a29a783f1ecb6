"""Shared fixtures (built lazily, once per session) and the run's summary of what did not run.

Tests never touch the network: hub downloads are disabled here. Helpers live in ``tests/support/``.

Fixtures (the demo ones are built once per run, also under xdist: :func:`support.parallel.built_once`):

- ``demo_data`` -> :class:`support.demo.DemoData`: the demo data set and its shards.
- ``demo_checkpoint`` -> Path: the ``checkpoints`` folder of a 2-step run on ``demo_data`` (PCA + one
  K-means step, EfficientNet-Lite0 layers [2, 3], crop 64, K = 6).
- ``slurm_cluster`` -> :class:`support.slurm.SlurmCluster`: a real single-node SLURM (skips without it,
  fails under ``CI``).

Parallel runs (``make test`` runs ``pytest -n 2 --dist loadgroup``, pytest-xdist): every worker process builds
its own session fixtures. Tests that share something global run on one worker, in the ``xdist_group`` named
by :data:`support.parallel.SHARED_RESOURCE_GROUPS` (added from the fixtures a test uses, so new tests are grouped
too) or by their own ``@pytest.mark.xdist_group(name)``. A test with wall-clock bounds is marked
``@pytest.mark.alone``: no other test runs meanwhile (all ``alone`` tests are one group, so they follow each
other). The hooks live in :mod:`support.parallel`. ``pytest -n 0`` (or no ``-n``) runs serially.
"""

import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_USE_OLD_CACHE", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

pytest.register_assert_rewrite("support")

from support.demo import DemoData, build_demo_data, demo_data_paths, tiny_train_args  # noqa: E402
from support.env import child_env  # noqa: E402
from support.parallel import (  # noqa: E402,F401  (hooks: xdist groups, the run lock for `alone` tests)
    built_once, pytest_collection_modifyitems, pytest_configure, pytest_runtest_protocol, pytest_unconfigure)
from support.run import module_command, run_checked  # noqa: E402
from support.slurm import SlurmCluster, require_slurm  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoData:
    return demo_data_paths(built_once(tmp_path_factory, "demo", build_demo_data))


@pytest.fixture(scope="session")
def demo_checkpoint(demo_data, tmp_path_factory) -> Path:
    """``checkpoints`` folder of a tiny finished run (steps: 1 PCA + 1 K-means)."""

    def train(folder: Path) -> None:
        run_checked(module_command("primaps_dist.train", *tiny_train_args(demo_data.train_shards, folder / "run")),
                    env=child_env(folder), timeout=240)

    return built_once(tmp_path_factory, "demo_run", train) / "run" / "checkpoints"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started :class:`SlurmCluster` for the whole session; all daemons stopped at teardown."""
    require_slurm()
    root = tempfile.mkdtemp(prefix="primaps-slurm-")  # short: munge's socket path must stay below ~108 bytes
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name what did not run on this machine and why, one line per reason, so a skip is never silent."""
    reasons: Counter = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            reason = str(report.longrepr[2])
        else:
            reason = str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section("not run on this machine", sep="=", yellow=True, bold=True)
    for reason, count in reasons.most_common():
        terminalreporter.line(f"{count:3d} skipped: {reason}")


def _with_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def photo_features_stride16() -> torch.Tensor:
    """EfficientNet-Lite0 stride-16 features [12, 112, 20, 20] of the bundled photos (computed once)."""
    from primaps_dist.testing.photo_features import photo_features

    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(2)
            _, features = photo_features(stage=3)
    finally:
        torch.set_num_threads(threads)
    return features


@pytest.fixture
def single_thread():
    """One torch thread for the test (results independent of the thread count), restored after."""
    yield from _with_threads(1)


@pytest.fixture
def two_threads():
    """Two torch threads for the test (this project's CI machine has two cores), restored after."""
    yield from _with_threads(2)


@pytest.fixture
def keep_signal_handlers():
    """The trainer installs SIGTERM/SIGUSR1 handlers (its stop flag); give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
