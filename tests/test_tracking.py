"""MLflow tracking on a local sqlite store: params, metric history, artifacts, resume, outages and the spool.

The real-server scenarios (server appears late, server killed and restarted) are in test_mlflow_server.py.
"""

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from primaps_dist.config import Config, TrackingConfig, flatten  # noqa: E402
from primaps_dist.errors import ConfigError, UserError  # noqa: E402
from primaps_dist.tracking import server as tracking_server  # noqa: E402
from primaps_dist.tracking import (  # noqa: E402
    MAX_PARAM_VALUE_LENGTH,
    RUN_MAP_NAME,
    SPOOL_NAME,
    Tracker,
    config_params,
    main as tracking_main,
    replay_spool,
    resolve_tracking_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking store for the module (creating its tables takes seconds); cwd holds its artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.getcwd()
    os.chdir(root)
    try:
        yield f"sqlite:///{root / 'mlflow.db'}"
    finally:
        os.chdir(previous)


@pytest.fixture
def experiment():
    return f"test-{uuid.uuid4().hex[:8]}"


def dead_uri() -> str:
    """An http URI where nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{tracking_server.find_free_port()}"


def tracking_cfg(uri: str, experiment: str, **changes) -> TrackingConfig:
    return TrackingConfig(**{"tracking_uri": uri, "experiment": experiment, "system_metrics": False, **changes})


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "primaps_dist.tracking" and r.levelno >= logging.WARNING]


class FlakyClient:
    """Wraps an MlflowClient; while ``down`` every call fails the way an unreachable server does."""

    def __init__(self, real):
        self.real = real
        self.down = False
        self.failed_calls = 0

    def __getattr__(self, name):
        attribute = getattr(self.real, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.down:
                self.failed_calls += 1
                raise MlflowException("API request to http://mlflow/api failed with exception ConnectionError")
            return attribute(*args, **kwargs)

        return call


# ----------------------------------------------------------------------------------------------- online


def test_params_metrics_artifacts_on_sqlite(store, experiment, tmp_path):
    cfg = Config()
    cfg.train.output_dir = "x" * (MAX_PARAM_VALUE_LENGTH + 50)  # longer than MLflow's param limit
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path)
    run_id = tracker.start(flatten(cfg.to_dict()), run_name="unit")
    assert run_id and not run_id.startswith("local-")
    for step in range(25):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "em/objective": float(step)}, step=step)
    tracker.set_tags({"stage": "em"})
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{}")
    tracker.log_artifact(tmp_path / "eval", "eval")
    assert tracker.finish() is True

    (run,) = runs_of(store, experiment)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "unit"
    params = run.data.params
    expected = {k: str(v) for k, v in flatten(cfg.to_dict()).items()}
    assert params.keys() == expected.keys()
    assert params["data.num_classes"] == "27" and params["backbone.layers"] == "[]"
    assert len(params["train.output_dir"]) == MAX_PARAM_VALUE_LENGTH and params["train.output_dir"].endswith("...")
    assert history(store, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(25)]
    assert [s for s, _ in history(store, run_id, "em/objective")] == list(range(25))
    assert run.data.tags["stage"] == "em" and run.data.tags["primaps.output_dir"] == str(tmp_path.resolve())
    client = MlflowClient(store)
    assert {f.path for f in client.list_artifacts(run_id)} == {"config.yaml", "eval"}
    assert [f.path for f in client.list_artifacts(run_id, "eval")] == ["eval/report.json"]
    assert not (tmp_path / SPOOL_NAME).exists()


def test_resume_continues_the_same_run(store, experiment, tmp_path):
    cfg = Config()
    first = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path)
    run_id = first.start(flatten(cfg.to_dict()))
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step)
    # the process dies without finish(); torchrun restarts it with the id from the checkpoint
    cfg.train.em_steps = 2000  # a changed setting cannot overwrite an MLflow param
    second = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id=run_id)
    assert second.start(flatten(cfg.to_dict())) == run_id
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step)
    assert second.finish("FINISHED")
    (run,) = runs_of(store, experiment)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert history(store, run_id, "loss") == [(s, float(s)) for s in range(10)]
    assert run.data.params["train.em_steps"] == "1000"
    assert run.data.tags["resume_changed_params"] == "train.em_steps=2000"

    # a finished run can be resumed too (status back to RUNNING, then the new final status)
    third = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id=run_id)
    third.start(flatten(cfg.to_dict()))
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"
    third.finish("KILLED")
    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"


def test_resume_of_unknown_run_starts_a_new_one(store, experiment, tmp_path, caplog):
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id="0" * 32)
    run_id = tracker.start({"a": 1})
    tracker.finish()
    (run,) = runs_of(store, experiment)
    assert run.info.run_id == run_id != "0" * 32 and run.data.tags["resumed_from"] == "0" * 32
    assert any("does not exist" in message for message in tracker_warnings(caplog))


def test_non_main_ranks_and_disabled_tracking_do_nothing(store, experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nonsense://x")  # would be an error if anything looked at it
    for tracker in (Tracker(tracking_cfg(store, experiment), is_master=False, output_dir=tmp_path, run_id="abc"),
                    Tracker(TrackingConfig(enabled=False), is_master=True, output_dir=tmp_path)):
        run_id = tracker.start({"a": 1})
        tracker.log_metrics({"loss": 1.0}, 0)
        tracker.log_artifact(tmp_path)
        tracker.set_tags({"x": 1})
        assert tracker.finish() is True and run_id == tracker.run_id
    assert list(tmp_path.iterdir()) == []
    assert runs_of(store, experiment) == []


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert resolve_tracking_uri("postgresql+psycopg2://u@h/db").startswith("postgresql")
    with pytest.raises(ConfigError, match=r"^config key 'tracking.tracking_uri': unsupported URI scheme 'htp'"):
        Tracker(TrackingConfig(tracking_uri="htp://127.0.0.1:5000"), is_master=True, output_dir=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "s3://bucket")
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri \(from \$MLFLOW_TRACKING_URI\)"):
        Tracker(TrackingConfig(), is_master=True, output_dir=tmp_path)


def test_http_timeouts_are_made_short_but_user_values_win(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    Tracker(tracking_cfg(dead_uri(), "x"), is_master=True, output_dir=tmp_path)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "3"


def test_config_params_and_name_checks(tmp_path, store, experiment):
    params = config_params({"a": {"b": [1, 2], "c": "x" * 7000}, "d": None})
    assert params == {"a.b": "[1, 2]", "a.c": "x" * (MAX_PARAM_VALUE_LENGTH - 3) + "...", "d": "None"}
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path)
    tracker.start({})
    with pytest.raises(ValueError, match="invalid MLflow metric name 'bad|name'"):
        tracker.log_metrics({"bad|name": 1.0}, 0)
    with pytest.raises(ValueError, match="metric name '../up'"):
        tracker.log_metrics({"../up": 1.0}, 0)
    tracker.finish()


def test_refused_record_does_not_block_the_rest(store, experiment, tmp_path, caplog):
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path)
    run_id = tracker.start({"lr": 0.1})
    tracker.log_params({"lr": 0.2})  # MLflow refuses changing a param
    tracker.log_params({"lr": 0.3})
    tracker.log_metrics({"loss": 1.0}, 0)
    assert tracker.finish() and not tracker.offline
    assert history(store, run_id, "loss") == [(0, 1.0)]
    refused = [json.loads(line) for line in (tmp_path / "mlflow_rejected.jsonl").read_text().splitlines()]
    assert [r["record"]["values"] for r in refused] == [{"lr": "0.2"}, {"lr": "0.3"}]
    assert sum("refused" in m for m in tracker_warnings(caplog)) == 1


def test_system_metrics_are_logged_when_enabled(store, experiment, tmp_path):
    tracker = Tracker(tracking_cfg(store, experiment, system_metrics=True), is_master=True, output_dir=tmp_path,
                      system_metrics_interval_s=0.05)
    run_id = tracker.start({})
    time.sleep(0.5)
    tracker.log_metrics({"loss": 1.0}, step=7)
    tracker.finish()
    metrics = MlflowClient(store).get_run(run_id).data.metrics
    system = [k for k in metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    steps = {m.step for m in MlflowClient(store).get_metric_history(run_id, "system/cpu_utilization_percentage")}
    assert steps <= {0, 7} and 7 in steps


# ----------------------------------------------------------------------------------------------- outages


def test_server_down_at_start_one_warning_then_replay(store, experiment, tmp_path, caplog, capfd):
    uri = dead_uri()
    tracker = Tracker(tracking_cfg(uri, experiment), is_master=True, output_dir=tmp_path,
                      retry_initial_s=3600, finish_timeout_s=0)
    attempts = []
    deliver = tracker._delivery.deliver
    tracker._delivery.deliver = lambda records: attempts.append(len(records)) or deliver(records)
    run_id = tracker.start(flatten(Config().to_dict()), run_name="offline")
    assert run_id.startswith("local-") and tracker.offline
    for step in range(100):  # the "training loop" carries on
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    artifact = tmp_path / "picture.txt"
    artifact.write_text("version 1")
    tracker.log_artifact(artifact, "pictures")
    artifact.write_text("version 2 (written after logging)")
    assert tracker.finish("FINISHED") is False
    assert len(attempts) == 2  # one at start, one at finish: a dead server is not hammered every step
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 2 and "unreachable" in warnings[0] and "replay" in warnings[1]
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # per-retry noise is filtered

    spool = tmp_path / SPOOL_NAME
    kinds = [json.loads(line)["kind"] for line in spool.read_text().splitlines()]
    assert kinds == ["run"] + ["metrics"] * 100 + ["artifact", "end"]

    # the server never came back: send the spool to another store later
    with pytest.raises(UserError, match="unreachable"):
        replay_spool(tmp_path)  # the recorded (dead) URI
    assert spool.is_file()
    assert tracking_main(["replay", str(tmp_path), "--uri", store]) == 0
    assert not spool.exists() and not (tmp_path / "mlflow_spool_artifacts").exists()
    (run,) = runs_of(store, experiment)
    assert run.info.status == "FINISHED" and run.info.run_name == "offline"
    assert json.loads((tmp_path / RUN_MAP_NAME).read_text()) == {run_id: run.info.run_id}
    assert len(run.data.params) == len(flatten(Config().to_dict()))
    assert history(store, run.info.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(100)]
    client = MlflowClient(store)
    downloaded = client.download_artifacts(run.info.run_id, "pictures/picture.txt", str(tmp_path / "dl"))
    assert Path(downloaded).read_text() == "version 1"
    with pytest.raises(UserError, match="no MLflow spool"):
        replay_spool(tmp_path, store)

    # a checkpoint that stored the local key resumes the real run
    resumed = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id=run_id)
    assert resumed.start({}) == run.info.run_id
    resumed.finish()
    assert len(runs_of(store, experiment)) == 1


def test_outage_mid_run_recovers_with_everything_in_order(store, experiment, tmp_path, caplog):
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path,
                      retry_initial_s=0.0, finish_timeout_s=0, flush_interval_s=0)
    run_id = tracker.start({"a": 1})
    flaky = FlakyClient(tracker._delivery.client)
    tracker._delivery._client = flaky
    for step in range(40):
        if step == 10:
            flaky.down = True
        if step == 30:
            flaky.down = False
        tracker.log_metrics({"loss": float(step)}, step)
        if step == 15:
            picture = tmp_path / "p.txt"
            picture.write_text("during the outage")
            tracker.log_artifact(picture)
        tracker.wait_until_idle()  # the delivery thread has tried to send what was just logged
        assert tracker.offline == (10 <= step < 30)
    assert flaky.failed_calls >= 20
    assert tracker.finish()
    messages = tracker_warnings(caplog)
    assert len(messages) == 2 and "unreachable" in messages[0] and "reachable again" in messages[1]
    assert history(store, run_id, "loss") == [(s, float(s)) for s in range(40)]
    assert [f.path for f in MlflowClient(store).list_artifacts(run_id)] == ["p.txt"]
    assert not (tmp_path / SPOOL_NAME).exists()


def test_backoff_limits_attempts_while_down(store, experiment, tmp_path):
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path,
                      retry_initial_s=0.02, retry_max_s=0.08, finish_timeout_s=0, flush_interval_s=0)
    tracker.start({})
    flaky = FlakyClient(tracker._delivery.client)
    tracker._delivery._client = flaky
    flaky.down = True
    begin = time.monotonic()
    step = 0
    while time.monotonic() - begin < 0.6:
        tracker.log_metrics({"loss": 1.0}, step)
        step += 1
        time.sleep(0.002)
    # delays 0.02, 0.04, 0.08, 0.08, ... -> at most about 0.6 / 0.08 + 3 attempts, not one per step
    assert step > 50 and 3 <= flaky.failed_calls <= 12, (step, flaky.failed_calls)
    flaky.down = False
    assert tracker.finish()


def test_restart_while_offline_keeps_one_run(store, experiment, tmp_path):
    """Process A starts while MLflow is down and dies; B resumes from A's checkpoint key once it is up."""
    a = Tracker(tracking_cfg(dead_uri(), experiment), is_master=True, output_dir=tmp_path, retry_initial_s=3600)
    key = a.start({"a": 1})
    for step in range(3):
        a.log_metrics({"loss": float(step)}, step)
    # A is killed: no finish(). Its spool is on disk.
    b = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id=key)
    real_id = b.start({"a": 1})
    for step in range(3, 6):
        b.log_metrics({"loss": float(step)}, step)
    assert b.finish()
    (run,) = runs_of(store, experiment)
    assert run.info.run_id == real_id and history(store, real_id, "loss") == [(s, float(s)) for s in range(6)]


def test_metrics_are_batched_and_a_crash_loses_none(store, experiment, tmp_path):
    """Metrics wait in the journal for the next flush; a process killed before it leaves them for the next start."""
    a = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, flush_interval_s=3600)
    run_id = a.start({})
    for step in range(5):
        a.log_metrics({"loss": float(step)}, step)
    assert history(store, run_id, "loss") == []  # not sent yet: one batch per flush interval
    assert len((tmp_path / SPOOL_NAME).read_text().splitlines()) == 5
    # killed here; the restarted process resumes the run and sends the journal first
    b = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, run_id=run_id)
    b.start({})
    assert history(store, run_id, "loss") == [(s, float(s)) for s in range(5)]
    assert not (tmp_path / SPOOL_NAME).exists()
    b.finish()


def test_unwritable_spool_does_not_block_delivery(store, experiment, tmp_path, caplog, monkeypatch):
    tracker = Tracker(tracking_cfg(store, experiment), is_master=True, output_dir=tmp_path, flush_interval_s=0)
    run_id = tracker.start({})

    def disk_full(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker.spool, "append", disk_full)
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.finish()
    assert history(store, run_id, "loss") == [(s, float(s)) for s in range(10)]
    assert sum("No space left" in m for m in tracker_warnings(caplog)) == 1


def test_torn_spool_line_is_skipped(store, experiment, tmp_path, caplog):
    a = Tracker(tracking_cfg(dead_uri(), experiment), is_master=True, output_dir=tmp_path, retry_initial_s=3600)
    a.start({})
    a.log_metrics({"loss": 1.0}, 0)
    with open(tmp_path / SPOOL_NAME, "a") as handle:
        handle.write('{"kind": "metrics", "run": "loc')  # crash mid-append
    replay_spool(tmp_path, store)
    (run,) = runs_of(store, experiment)
    assert history(store, run.info.run_id, "loss") == [(0, 1.0)]
    assert any("damaged" in m for m in tracker_warnings(caplog))


def test_server_cli_warns_for_non_loopback_host(monkeypatch, capsys):
    assert tracking_server.is_loopback("127.0.0.1") and tracking_server.is_loopback("localhost")
    assert tracking_server.is_loopback("::1") and not tracking_server.is_loopback("0.0.0.0")

    def refuse(*args, **kwargs):
        raise UserError("--port: in use")

    monkeypatch.setattr(tracking_server, "start_server", refuse)
    with pytest.raises(UserError):
        tracking_server.main(["--host", "0.0.0.0", "--port", "5999"])
    assert "warning: --host 0.0.0.0" in capsys.readouterr().err
    with pytest.raises(UserError):
        tracking_server.main(["--port", "5999"])
    assert "warning" not in capsys.readouterr().err


def test_server_refuses_a_busy_port():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--port: 127.0.0.1:{port} is already in use"):
            tracking_server.start_server(port=port)
