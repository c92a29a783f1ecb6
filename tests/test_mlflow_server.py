"""Against a real ``mlflow server`` on a free loopback port: late start, kill mid-run, restart, CLI.

Slow (each server start takes 10-40 s on a small machine). Measured numbers are printed (run with -s).
"""

import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from primaps_dist.config import Config, TrackingConfig, flatten  # noqa: E402
from primaps_dist.tracking import SPOOL_NAME, Tracker  # noqa: E402
from primaps_dist.tracking.server import check_health, find_free_port, start_server  # noqa: E402

pytestmark = pytest.mark.slow


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "primaps_dist.tracking" and r.levelno >= logging.WARNING]


def log_until_online(tracker: Tracker, first_step: int, timeout_s: float = 60.0) -> int:
    """Keep 'training' (one log call per step) until the tracker has delivered its spool; returns the next step."""
    step = first_step
    deadline = time.monotonic() + timeout_s
    while tracker.offline:
        assert time.monotonic() < deadline, "the spool was not delivered after the server came back"
        tracker.log_metrics({"loss": float(step), "acc": 1.0}, step)
        step += 1
        time.sleep(0.05)
    tracker.wait_until_idle()  # the delivery thread has also sent what was logged after the flag was read
    return step


def test_server_late_then_killed_then_restarted(tmp_path, caplog):
    port = find_free_port()
    uri = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    artifacts = tmp_path / "artifacts"
    experiment = f"server-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    cfg = Config()
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=experiment, system_metrics=False),
                      is_master=True, output_dir=out, retry_initial_s=0.5, retry_max_s=2.0, finish_timeout_s=60,
                      flush_interval_s=0)

    # 1. server down at start: training goes on, one warning, everything spooled
    begin = time.perf_counter()
    local_key = tracker.start(flatten(cfg.to_dict()), run_name="late-server")
    offline_start_s = time.perf_counter() - begin
    assert local_key.startswith("local-") and tracker.offline
    offline_calls = []
    for step in range(20):
        begin = time.perf_counter()
        tracker.log_metrics({"loss": float(step), "acc": step / 20}, step)
        offline_calls.append(time.perf_counter() - begin)
    (out / "early.txt").write_text("logged while the server was down")
    tracker.log_artifact(out / "early.txt", "notes")
    assert len(tracker_warnings(caplog)) == 1 and (out / SPOOL_NAME).is_file()

    # 2. the server appears: the next log calls deliver the spool
    server = start_server(port=port, backend_store_uri=backend, artifacts_destination=artifacts,
                          log_path=tmp_path / "server1.log")
    first_start_s = server.start_seconds
    try:
        step = log_until_online(tracker, 20)
        assert not (out / SPOOL_NAME).exists()
        run_id = tracker.run_id
        assert not run_id.startswith("local-")
        online_calls = []
        for _ in range(20):
            begin = time.perf_counter()
            tracker.log_metrics({"loss": float(step), "acc": 1.0}, step)
            online_calls.append(time.perf_counter() - begin)
            step += 1
        tracker._sender.flush_interval_s = 1.0  # measurement only: the default batching (one log_batch per interval)
        begin = time.perf_counter()
        batched_calls = 0
        while time.perf_counter() - begin < 3.0:
            tracker.log_metrics({"loss": float(step), "acc": 1.0}, step)
            step += 1
            batched_calls += 1
            time.sleep(0.01)
        batched_overhead_s = time.perf_counter() - begin - 0.01 * batched_calls
        tracker._sender.flush_interval_s = 0.0
        tracker.wait_until_idle()  # what was logged so far reaches the server before it goes away

        # 3. the server goes away mid-run (killed by pid): one new warning, no stop
        server.stop()
        assert not check_health(uri)
        warnings_before = len(tracker_warnings(caplog))
        for _ in range(20):
            tracker.log_metrics({"loss": float(step), "acc": 1.0}, step)
            step += 1
        (out / "mid.txt").write_text("logged while the server was killed")
        tracker.log_artifact(out / "mid.txt", "notes")
        tracker.wait_until_idle()  # the delivery thread has tried to send them
        assert tracker.offline and len(tracker_warnings(caplog)) == warnings_before + 1

        # 4. restarted on the same port with the same backend; finish() delivers the rest
        server = start_server(port=port, backend_store_uri=backend, artifacts_destination=artifacts,
                              log_path=tmp_path / "server2.log")
        assert tracker.finish("FINISHED") is True
        last_step = step

        client = MlflowClient(uri)
        (experiment_entity,) = [e for e in client.search_experiments() if e.name == experiment]
        runs = client.search_runs([experiment_entity.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "late-server"
        assert run.data.params == {k: str(v) for k, v in flatten(cfg.to_dict()).items()}
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert loss == [(s, float(s)) for s in range(last_step)]
        assert len(client.get_metric_history(run_id, "acc")) == last_step
        assert sorted(f.path for f in client.list_artifacts(run_id, "notes")) == ["notes/early.txt", "notes/mid.txt"]
        assert not (out / SPOOL_NAME).exists()
    finally:
        server.stop()
    print(
        f"\nmlflow server start: {first_start_s:.1f} s (fresh sqlite), restart {server.start_seconds:.1f} s; "
        f"tracker.start while down {offline_start_s * 1e3:.1f} ms; log_metrics median while down "
        f"{statistics.median(offline_calls) * 1e3:.3f} ms (max {max(offline_calls) * 1e3:.1f} ms), "
        f"online over HTTP {statistics.median(online_calls) * 1e3:.1f} ms per call unbatched, "
        f"{batched_overhead_s / batched_calls * 1e3:.2f} ms per call batched (1 s interval, {batched_calls} calls)"
    )


def test_cli_serves_on_loopback_until_sigterm(tmp_path):
    port = find_free_port()
    command = [sys.executable, "-m", "primaps_dist.tracking.server", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path / 'cli.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts"), "--log-file", str(tmp_path / "server.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server_pid = None
    try:
        ready = process.stdout.readline()
        assert ready.startswith(f"MLflow server ready at http://127.0.0.1:{port} (pid "), ready + process.stderr.read()
        server_pid = int(ready.split("(pid ")[1].split(",")[0])
        assert check_health(f"http://127.0.0.1:{port}")
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines() if line.strip()]
        if local_addresses:  # bound to loopback only (ss may be missing: then only /health is checked)
            assert local_addresses == [f"127.0.0.1:{port}"], listening
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            if server_pid is not None:  # the test failed half-way: do not leave the server behind
                try:
                    os.killpg(server_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert not check_health(f"http://127.0.0.1:{port}")
    with pytest.raises(ProcessLookupError):  # the server's whole process group is gone
        os.killpg(server_pid, 0)


def test_killed_cli_does_not_orphan_the_server(tmp_path):
    port = find_free_port()
    command = [sys.executable, "-m", "primaps_dist.tracking.server", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path / 'cli.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts"), "--log-file", str(tmp_path / "server.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server_pid = None
    try:
        ready = process.stdout.readline()
        assert "ready at" in ready, ready + process.stderr.read()
        server_pid = int(ready.split("(pid ")[1].split(",")[0])
        process.kill()  # no chance to clean up
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                os.killpg(server_pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the server outlived its killed parent"
            time.sleep(0.25)
    finally:
        if process.poll() is None:
            process.kill()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
