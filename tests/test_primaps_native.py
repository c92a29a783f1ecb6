"""The C++ proposal kernel (primaps_dist/primaps/native) against the batched torch loop, and its build switch.

Both paths implement the same rounds; on the CPU they must give the same proposals. The independent
check of either against the published loop is tests/test_primaps.py, which runs on both paths.
"""

from __future__ import annotations

import logging

import pytest
import torch

import primaps_dist.primaps.native as native
from primaps_dist.primaps import proposal_maps
from primaps_dist.testing.primaps_reference import planted_features

pytestmark = pytest.mark.usefixtures("single_thread")


def _both_paths(monkeypatch, features, **kwargs):
    settings = {"threshold": 0.4, "coverage": 0.95, "max_masks": 64, **kwargs}
    results = {}
    for name, value in (("native", "1"), ("batched", "0")):
        monkeypatch.setenv("PRIMAPS_DIST_NATIVE", value)
        results[name] = proposal_maps(features, settings["threshold"], settings["coverage"], settings["max_masks"])
    return results["native"], results["batched"]


def _assert_same(native_result, batched_result):
    native_ids, native_values, native_counts = native_result
    batched_ids, batched_values, batched_counts = batched_result
    assert native_ids.dtype == torch.int64 and native_values.dtype == torch.float32
    assert native_counts.dtype == torch.int64 and native_ids.shape == batched_ids.shape
    assert torch.equal(native_counts, batched_counts), (native_counts, batched_counts)
    assert torch.equal(native_ids, batched_ids)
    torch.testing.assert_close(native_values, batched_values, atol=1e-6, rtol=0)


def test_kernel_builds():
    kernel = native.build()
    assert callable(kernel.proposal_rounds)


def test_same_proposals_as_the_batched_loop_on_photo_features(monkeypatch, photo_features_stride16):
    """12 photos at stride 16 (112 x 20 x 20): tall and wide rounds of the sign replay both occur."""
    _assert_same(*_both_paths(monkeypatch, photo_features_stride16))


def test_same_proposals_as_the_batched_loop_on_dino_sized_planted_maps(monkeypatch):
    features = planted_features(3, channels=384, size=40, regions=24, noise=1.0, seed=3)
    _assert_same(*_both_paths(monkeypatch, features))


@pytest.mark.parametrize(
    "kwargs", [{}, {"threshold": 0.0}, {"threshold": 1.0}, {"coverage": 1.0}, {"coverage": 0.3}, {"max_masks": 1},
               {"max_masks": 5}],
)
def test_same_proposals_for_every_setting(monkeypatch, kwargs):
    features = planted_features(4, channels=48, size=16, regions=6, noise=0.6, seed=7)
    _assert_same(*_both_paths(monkeypatch, features, **kwargs))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(2, 8, 4, 4),
        lambda: torch.ones(2, 16, 8, 8) * torch.linspace(1, 2, 16)[None, :, None, None],
        lambda: torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1)),
        lambda: torch.randn(3, 5, 1, 1, generator=torch.Generator().manual_seed(2)),
        lambda: torch.randn(1, 700, 3, 3, generator=torch.Generator().manual_seed(3)),
        lambda: torch.randn(2, 24, 9, 7, generator=torch.Generator().manual_seed(4)).double(),
    ],
    ids=["zeros", "constant", "one-channel", "one-position", "wide", "float64"],
)
def test_same_proposals_on_degenerate_inputs(monkeypatch, make):
    _assert_same(*_both_paths(monkeypatch, make(), max_masks=16))


def test_images_do_not_depend_on_threads_or_batch(monkeypatch):
    """Images run in parallel over torch's threads; each image's result is its own (up to the rounding
    of the batched set-up: Gram matrices and start bases are products whose BLAS blocking may change
    with the thread count and the batch size)."""
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "1")
    features = planted_features(5, channels=96, size=20, regions=10, noise=0.8, seed=11)
    one_thread = proposal_maps(features, 0.4, 0.95, 64)
    torch.set_num_threads(2)  # the single_thread fixture restores the setting
    two_threads = proposal_maps(features, 0.4, 0.95, 64)
    alone = proposal_maps(features[3:4], 0.4, 0.95, 64)
    _assert_same(one_thread, two_threads)
    _assert_same([whole[3:4] for whole in one_thread], alone)


def test_setting_is_validated(monkeypatch):
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "yes")
    with pytest.raises(ValueError, match="PRIMAPS_DIST_NATIVE must be one of auto, 0, 1, got 'yes'"):
        proposal_maps(torch.randn(1, 4, 3, 3), 0.4, 0.95, 4)


def test_forced_mode_sets_and_restores_the_setting(monkeypatch):
    monkeypatch.delenv("PRIMAPS_DIST_NATIVE", raising=False)
    with native.forced_mode("0"):
        assert native.mode() == "0" and native.native_kernel(torch.device("cpu")) is None
    assert native.mode() == "auto"
    with pytest.raises(ValueError, match="PRIMAPS_DIST_NATIVE must be one of auto, 0, 1, got 'on'"):
        native.forced_mode("on")


def test_accelerators_take_the_batched_path():
    assert native.native_kernel(torch.device("meta")) is None


@pytest.fixture
def broken_kernel_source(monkeypatch, tmp_path):
    """The kernel's source replaced by one that does not compile; the real build is restored after."""
    source = tmp_path / "rounds.cpp"
    source.write_text("this is not C++\n")
    native._reset_for_tests()
    monkeypatch.setattr(native, "_SOURCE", source)
    yield
    monkeypatch.undo()
    native._reset_for_tests()


def test_failed_build_falls_back_with_one_warning_under_auto(monkeypatch, broken_kernel_source, caplog):
    features = planted_features(2, channels=32, size=10, regions=3, noise=0.3, seed=2)
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "auto")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        first = proposal_maps(features, 0.4, 0.95, 16)
        proposal_maps(features, 0.4, 0.95, 16)
    warnings = [record.getMessage() for record in caplog.records if record.name == native.__name__]
    assert len(warnings) == 1 and "building the PriMaPs C++ kernel (rounds.cpp) failed" in warnings[0]
    assert "batched torch path" in warnings[0]
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "0")
    for fallback, batched in zip(first, proposal_maps(features, 0.4, 0.95, 16)):
        assert torch.equal(fallback, batched)


def test_failed_build_is_an_error_when_required(monkeypatch, broken_kernel_source):
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "1")
    with pytest.raises(native.NativeUnavailable, match="building the PriMaPs C\\+\\+ kernel"):
        proposal_maps(torch.randn(1, 4, 3, 3), 0.4, 0.95, 4)


def test_an_error_in_one_worker_stops_the_batch_cleanly(monkeypatch):
    """Workers run images in parallel; a bad image raises one ValueError in the caller, no hang."""
    monkeypatch.setenv("PRIMAPS_DIST_NATIVE", "1")
    torch.set_num_threads(2)  # the single_thread fixture restores the setting
    features = planted_features(6, channels=24, size=10, regions=3, noise=0.3, seed=4)
    features[4, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="features contain NaN or Inf values"):
        proposal_maps(features, 0.4, 0.95, 16)
    features[4, 3, 2, 2] = 0.0
    assert proposal_maps(features, 0.4, 0.95, 16)[2].min() >= 1  # the kernel still works afterwards


@pytest.mark.slow
def test_processes_with_different_ninjas_on_path_share_one_build(tmp_path):
    """CI's test processes found a system ninja 1.11 or the ``ninja`` package's 1.13 first on PATH; ninja
    1.12 changed the command hash in its build log, so each took the other's build for stale and rebuilt
    (26 s each time). The build pins the package's ninja: the second process only loads."""
    import subprocess
    import sys

    from support.env import VENV_BIN, child_env

    cache = tmp_path / "extensions"
    build = [sys.executable, "-m", "primaps_dist.primaps.native"]
    # Unpinned, this order rebuilt three times here (1.13 reads 1.11's log as stale and the other way round).
    for path in (f"{VENV_BIN}:/usr/bin:/bin", "/usr/bin:/bin", f"{VENV_BIN}:/usr/bin:/bin"):
        env = child_env(TORCH_EXTENSIONS_DIR=str(cache), PATH=path, PRIMAPS_DIST_NATIVE="1")
        done = subprocess.run(build, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "PriMaPs C++ kernel ready" in done.stdout
    logs = list(cache.rglob(".ninja_log"))
    assert len(logs) == 1
    compiles = [line for line in logs[0].read_text().splitlines() if line.endswith(tuple("0123456789abcdef"))
                and "rounds.o" in line]
    assert len(compiles) == 1, logs[0].read_text()
