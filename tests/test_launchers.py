"""The launch/*.sh scripts, run for real: the MLflow server helper with a single-node training run logging
to it over HTTP, and the DeepSpeed path (2 CPU processes, em.mode=gradient em.engine=deepspeed; torchrun,
then a resume from its checkpoint with more steps through the `deepspeed` launcher). The multi-node
script is exercised by test_multinode.py.

The first DeepSpeed run on a machine JIT-compiles DeepSpeed's CPU shared-memory comm op (about a minute
on 2 cores; cached in ~/.cache/torch_extensions afterwards)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from launch_helpers import (
    DEMO_CONFIG,
    REPO,
    complete_checkpoints,
    demo_shards,
    final_checkpoint,
    run_checked,
    subprocess_env,
    tail,
    tiny_overrides,
    total_steps,
)
from slurm_cluster import free_port

pytestmark = pytest.mark.slow


def _health(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class _Server:
    """launch/mlflow_server.sh in its own session; stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "server.out"
        self.artifacts = tmp_path / "mlartifacts"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "mlflow_server.sh"),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(self.artifacts),
             "--log-file", str(tmp_path / "mlflow-server.log")],
            cwd=tmp_path, env=subprocess_env({"MLFLOW_PORT": str(self.port)}),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow_server.sh exited {self.proc.returncode}:\n{self.output()}", pytrace=False)
            if "MLflow server ready" in self.output() and _health(self.uri):
                return
            time.sleep(0.5)
        pytest.fail(f"MLflow server not ready after {timeout_s} s:\n{self.output()}", pytrace=False)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started, by its id
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def test_mlflow_server_script_and_single_node_run(tmp_path_factory, tmp_path):
    demo = demo_shards(tmp_path_factory.getbasetemp())
    server = _Server(tmp_path)
    try:
        server.wait_ready()
        assert f"MLFLOW_TRACKING_URI={server.uri}" in server.output()

        overrides = tiny_overrides(demo, tmp_path / "run", tracking__experiment="launcher-test",
                                   tracking__run_name="single-node")
        env = subprocess_env({"MLFLOW_TRACKING_URI": server.uri, "NPROC_PER_NODE": "1"})
        run_checked(["bash", str(REPO / "launch" / "train_single_node.sh"), "--config", str(DEMO_CONFIG), *overrides],
                    env=env, timeout=400)
        steps = total_steps(overrides)
        payload = final_checkpoint(tmp_path / "run", steps)
        assert (tmp_path / "run" / "config.yaml").is_file()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("launcher-test")
        assert experiment is not None, "the run did not reach the server"
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == payload.get("mlflow_run_id", run.info.run_id)
        history = client.get_metric_history(run.info.run_id, "stage")
        assert history and max(m.step for m in history) == steps
        # Artifacts go through the server into its artifact store.
        assert any(p.is_file() for p in server.artifacts.rglob("*")), "no artifact reached the server's store"
    finally:
        status = server.stop()
    assert status == 0, f"server did not stop cleanly ({status}):\n{server.output()}"
    assert not _health(server.uri)


def test_deepspeed_two_processes_and_resume(tmp_path_factory, tmp_path):
    pytest.importorskip("deepspeed")
    demo = demo_shards(tmp_path_factory.getbasetemp())
    env = subprocess_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "NPROC_PER_NODE": "2"})
    out = tmp_path / "ds"
    script = ["bash", str(REPO / "launch" / "train_deepspeed.sh"), "--config", str(DEMO_CONFIG)]
    deepspeed_config = f"em.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}"

    first = tiny_overrides(demo, out, train__em_steps=3, checkpoint__every_steps=100)
    run_checked([*script, *first, deepspeed_config], env=env, timeout=400)
    first_steps = total_steps(first)
    payload = final_checkpoint(out, first_steps)
    assert payload["config"]["em"]["mode"] == "gradient" and payload["config"]["em"]["engine"] == "deepspeed"
    assert "gradient_state" in payload
    state_before = payload["gradient_state"]
    assert int(state_before["momentum"]["steps"]) == 3  # one optimiser step per EM step

    # The resume goes through the `deepspeed` launcher instead of torchrun: same checkpoint, other launcher.
    second = tiny_overrides(demo, out, train__em_steps=6, checkpoint__every_steps=100)
    launcher_env = {**env, "LAUNCHER": "deepspeed", "MASTER_PORT": str(free_port())}
    result = run_checked([*script, *second, deepspeed_config], env=launcher_env, timeout=400)
    second_steps = total_steps(second)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", result.stdout)
    assert resumed and int(resumed[0]) == first_steps, f"no resume at step {first_steps}:\n{tail(result.stdout)}"
    after = final_checkpoint(out, second_steps)
    assert set(complete_checkpoints(out)) >= {first_steps, second_steps}
    state_after = after["gradient_state"]
    # The resumed run continued the saved optimiser and EMA state: 3 + 3 steps, not 6 fresh ones.
    assert int(state_after["momentum"]["steps"]) == 6
    optimizer_steps = [float(s["step"]) for s in state_after["engine"]["optimizer"]["state"].values()]
    assert optimizer_steps and all(step == 6 for step in optimizer_steps), optimizer_steps
    head_before = state_before["engine"]["head"]["weight"]
    head_after = state_after["engine"]["head"]["weight"]
    assert float((head_after - head_before).abs().max()) > 1e-6, "three more Adam steps left the head unchanged"
    norms = after["prototypes"].double().norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-4).all()), norms
