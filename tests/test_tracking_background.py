"""MLflow never stalls a step: records are journaled on the caller's thread and delivered by another.

Against a small MLflow-compatible REST stub on 127.0.0.1 (experiments, runs, log-batch, update) that sleeps
before every answer and records what it received, so the tests can check that nothing was lost: a server
answering after 5 s, and one that never answers (bounded shutdown, replay afterwards). Then the delivery
thread on its own, with a delivery the test holds. Measured step times are printed (run with -s).
"""

import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402

from primaps_dist.config import TrackingConfig  # noqa: E402
from primaps_dist.tracking import SPOOL_NAME, Spool, Tracker, replay_spool  # noqa: E402
from primaps_dist.tracking.common import ErrorReporter  # noqa: E402
from primaps_dist.tracking.sender import CLOSE_MIN_WAIT_S, BackgroundSender  # noqa: E402

SERVER_DELAY_S = 5.0
STEPS = 30
STEP_WORK_S = 0.02


class SlowMlflowStub:
    """An MLflow tracking REST API on a free loopback port; every answer waits ``delay_s`` (forever, until
    the stub closes, when ``delay_s`` is None). ``runs`` holds what arrived: ``{run_id: {...}}``.
    ``experiments`` names experiments that exist from the start."""

    def __init__(self, delay_s: float | None, experiments: tuple[str, ...] = ()):
        self.delay_s = delay_s
        self.released = threading.Event()
        self.experiments: dict[str, str] = {name: str(number) for number, name in enumerate(experiments, 1)}
        self.runs: dict[str, dict] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                url = urlparse(self.path)
                self._answer(url.path, {k: v[0] for k, v in parse_qs(url.query).items()})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(urlparse(self.path).path, json.loads(body or b"{}"))

            def _answer(self, path, request):
                stub.requests.append(path.rsplit("/mlflow/", 1)[-1])
                if stub.delay_s is None:
                    stub.released.wait(600)
                else:
                    time.sleep(stub.delay_s)
                with stub._lock:
                    status, reply = stub.handle(stub.requests[-1], request)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with suppress(ConnectionError):  # the client gave up (a test's child process has exited)
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, endpoint: str, request: dict) -> tuple[int, dict]:
        if endpoint == "experiments/get-by-name":
            name = request["experiment_name"]
            if name not in self.experiments:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"no experiment {name}"}
            return 200, {"experiment": {"experiment_id": self.experiments[name], "name": name,
                                        "lifecycle_stage": "active"}}
        if endpoint == "experiments/create":
            self.experiments[request["name"]] = str(len(self.experiments) + 1)
            return 200, {"experiment_id": self.experiments[request["name"]]}
        if endpoint == "runs/create":
            run_id = uuid.uuid4().hex
            info = {"run_id": run_id, "run_uuid": run_id, "experiment_id": request["experiment_id"],
                    "run_name": request.get("run_name", ""), "status": "RUNNING",
                    "start_time": request.get("start_time", 0), "lifecycle_stage": "active",
                    "artifact_uri": "file:///nonexistent"}
            self.runs[run_id] = {"info": info, "metrics": [], "params": {}, "tags": {}}
            return 200, {"run": {"info": info, "data": {}}}
        if endpoint == "runs/log-batch":
            run = self.runs[request["run_id"]]
            run["metrics"] += [(m["key"], int(m.get("step", 0)), float(m["value"])) for m in request.get("metrics", [])]
            run["params"].update({p["key"]: p["value"] for p in request.get("params", [])})
            run["tags"].update({t["key"]: t["value"] for t in request.get("tags", [])})
            return 200, {}
        if endpoint == "runs/get":
            run = self.runs[request["run_id"]]
            return 200, {"run": {"info": run["info"], "data": {}}}
        if endpoint == "runs/update":
            info = self.runs[request["run_id"]]["info"]
            info["status"] = request.get("status", info["status"])
            return 200, {"run_info": info}
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": endpoint}

    def __enter__(self) -> "SlowMlflowStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def training_steps(tracker: Tracker) -> list[float]:
    """STEPS steps of STEP_WORK_S 'work' each, every one logging its metrics; returns each step's seconds."""
    durations = []
    for step in range(STEPS):
        begin = time.perf_counter()
        time.sleep(STEP_WORK_S)
        tracker.log_metrics({"loss": 1.0 / (step + 1), "images_per_s": 100.0 + step}, step)
        durations.append(time.perf_counter() - begin)
    return durations


@pytest.mark.slow  # about 30 s: six requests of 5 s each must arrive before the end
def test_a_server_answering_after_5_s_does_not_change_step_times(tmp_path):
    baseline = training_steps(Tracker(TrackingConfig(enabled=False), is_master=True, output_dir=tmp_path / "off"))
    with SlowMlflowStub(delay_s=SERVER_DELAY_S, experiments=("slow",)) as stub:
        cfg = TrackingConfig(tracking_uri=stub.uri, experiment="slow", system_metrics=False)
        tracker = Tracker(cfg, is_master=True, output_dir=tmp_path / "run", start_timeout_s=0.5,
                          flush_interval_s=0, finish_timeout_s=60)
        begin = time.perf_counter()
        local_key = tracker.start({"lr": 0.1, "batch": 8}, run_name="slow-server")
        start_s = time.perf_counter() - begin
        tracked = training_steps(tracker)
        tracker.set_tags({"stage": "done"})
        begin = time.perf_counter()
        assert tracker.finish("FINISHED") is True
        finish_s = time.perf_counter() - begin

    # every request took 5 s; none of them was waited for inside a step
    assert stub.requests == ["experiments/get-by-name", "runs/create", "runs/log-batch", "runs/log-batch",
                             "runs/get", "runs/update"]
    assert local_key.startswith("local-") and start_s < 2.0
    assert max(tracked) < 1.0, tracked
    assert statistics.mean(tracked) < statistics.mean(baseline) + 0.05, (tracked, baseline)
    # nothing lost: one run with its params, tags, every metric of every step, and the final status
    (run,) = stub.runs.values()
    assert tracker.run_id == run["info"]["run_id"] and run["info"]["run_name"] == "slow-server"
    assert run["params"] == {"lr": "0.1", "batch": "8"} and run["tags"]["stage"] == "done"
    assert sorted(run["metrics"]) == sorted(
        [("loss", s, 1.0 / (s + 1)) for s in range(STEPS)] + [("images_per_s", s, 100.0 + s) for s in range(STEPS)])
    assert run["info"]["status"] == "FINISHED"
    assert not (tmp_path / "run" / SPOOL_NAME).exists()
    print(f"\nserver answers after {SERVER_DELAY_S:.0f} s ({len(stub.requests)} requests): "
          f"step time median {statistics.median(tracked) * 1e3:.1f} ms, max {max(tracked) * 1e3:.1f} ms "
          f"(tracking off: median {statistics.median(baseline) * 1e3:.1f} ms, max {max(baseline) * 1e3:.1f} ms); "
          f"start {start_s:.2f} s, finish {finish_s:.1f} s")


CHILD = textwrap.dedent("""
    import json, sys, time
    from primaps_dist.config import TrackingConfig
    from primaps_dist.tracking import Tracker

    uri, out = sys.argv[1], sys.argv[2]
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="silent", system_metrics=False), is_master=True,
                      output_dir=out, start_timeout_s=0.5, finish_timeout_s=1.0, flush_interval_s=0)
    tracker.start({"lr": 0.1}, run_name="silent-server")
    steps = []
    for step in range(20):
        begin = time.perf_counter()
        tracker.log_metrics({"loss": float(step)}, step)
        steps.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    delivered = tracker.finish("FINISHED")
    print(json.dumps({"delivered": delivered, "finish_s": time.perf_counter() - begin, "max_log_s": max(steps)}))
""")


def test_shutdown_is_bounded_and_undelivered_records_stay_for_replay(tmp_path):
    """A server that never answers: finish() returns in bounded time, the process exits, the journal replays."""
    out = tmp_path / "run"
    with SlowMlflowStub(delay_s=None) as stub:
        begin = time.monotonic()
        child = subprocess.run([sys.executable, "-c", CHILD, stub.uri, str(out)], capture_output=True, text=True,
                               timeout=60)
        process_s = time.monotonic() - begin
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["delivered"] is False and report["max_log_s"] < 0.5
    assert report["finish_s"] < 5.0 + 1.0  # finish_timeout_s=1, at most 5 s for the attempt in flight
    assert "python -m primaps_dist.tracking replay" in child.stderr
    kinds = [json.loads(line)["kind"] for line in (out / SPOOL_NAME).read_text().splitlines()]
    assert kinds == ["run"] + ["metrics"] * 20 + ["end"]

    with SlowMlflowStub(delay_s=0.0) as later:  # the server that is there for the replay
        (run_id,) = replay_spool(out, later.uri).values()
    (run,) = later.runs.values()
    assert run["info"]["run_id"] == run_id and run["info"]["run_name"] == "silent-server"
    assert run["params"] == {"lr": "0.1"} and run["info"]["status"] == "FINISHED"
    assert sorted(run["metrics"]) == [("loss", s, float(s)) for s in range(20)]
    assert not (out / SPOOL_NAME).exists()
    print(f"\nserver never answers: finish {report['finish_s']:.2f} s, whole process {process_s:.1f} s, "
          f"slowest log call {report['max_log_s'] * 1e3:.2f} ms")


# ----------------------------------------------------------------------------------------------- the thread itself


class GatedDelivery:
    """Stands in for Delivery: each call blocks until the test opens the gate, then succeeds or fails."""

    tracking_uri = "gated://test"

    def __init__(self):
        self.gate = threading.Semaphore(0)
        self.calls: list[list[str]] = []
        self.failure: Exception | None = None
        self.rejected: list = []

    def deliver(self, records):
        self.calls.append([r["name"] for r in records])
        self.gate.acquire()
        if self.failure is not None:
            raise self.failure
        return len(records)


def journal_names(spool: Spool) -> list[str]:
    return [record["name"] for record in spool.load()]


def test_records_logged_during_a_slow_delivery_stay_in_the_journal(tmp_path):
    delivery, spool = GatedDelivery(), Spool(tmp_path)
    sender = BackgroundSender(delivery, spool, ErrorReporter(), flush_interval_s=3600, retry_initial_s=3600,
                              retry_max_s=3600)
    sender.start([])
    sender.submit({"kind": "run", "name": "a"})  # due at once: the thread takes it and blocks in deliver
    deadline = time.monotonic() + 10
    while not delivery.calls:
        assert time.monotonic() < deadline, "the delivery thread did not pick up the run record"
        time.sleep(0.01)
    begin = time.perf_counter()
    for name in ("b", "c"):
        sender.submit({"kind": "metrics", "name": name})
    assert time.perf_counter() - begin < 0.5  # the blocked delivery does not hold the log call
    assert journal_names(spool) == ["a", "b", "c"]
    delivery.gate.release()
    assert sender.wait_until_idle(10)
    assert delivery.calls == [["a"]] and journal_names(spool) == ["b", "c"]  # metrics wait for the interval

    delivery.failure = RuntimeError("a bug, not an outage")  # must neither kill the thread nor lose records
    delivery.gate.release()
    sender.submit({"kind": "tags", "name": "d"})
    assert sender.wait_until_idle(10) and sender.offline and journal_names(spool) == ["b", "c", "d"]
    delivery.failure = None
    delivery.gate.release()
    assert sender.close(timeout_s=10) == 0
    assert delivery.calls == [["a"], ["b", "c", "d"], ["b", "c", "d"]] and not spool.path.exists()


def test_close_gives_up_on_a_hanging_delivery_within_its_bound(tmp_path):
    delivery, spool = GatedDelivery(), Spool(tmp_path)
    sender = BackgroundSender(delivery, spool, ErrorReporter(), flush_interval_s=0, retry_initial_s=1,
                              retry_max_s=1)
    sender.start([])
    sender.submit({"kind": "run", "name": "a"})
    sender.submit({"kind": "end", "name": "b"})
    begin = time.monotonic()
    assert sender.close(timeout_s=0.2) == 2  # the first attempt never ends
    waited = time.monotonic() - begin
    assert CLOSE_MIN_WAIT_S - 0.1 <= waited < CLOSE_MIN_WAIT_S + 1.0, waited
    assert journal_names(spool) == ["a", "b"]
    delivery.gate.release()  # let the daemon thread finish; a late success empties the journal
    deadline = time.monotonic() + 10
    while spool.path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
