"""The launch/*.sh scripts, run for real: the MLflow server helper with a single-node training run logging
to it over HTTP, and the DeepSpeed path (2 CPU processes, em.mode=gradient em.engine=deepspeed; torchrun,
then a resume from its checkpoint with more steps through the `deepspeed` launcher). The multi-node
script is exercised by test_multinode.py. Every launcher (launch/*.sh, slurm/train.sbatch) is also run
with stand-in torchrun / deepspeed / srun programs that record the environment they are started with.

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

from support.checkpoints import complete_steps, final_payload
from support.demo import DEMO_CONFIG, tiny_overrides, total_steps
from support.env import PYTHON, REPO, child_env
from support.net import free_port
from support.run import run_checked


def launcher_overrides(demo_data, output_dir: Path, *extra: str, em: int = 4) -> list[str]:
    """A tiny run with tracking and a final evaluation: PCA 2 + K-means 3 + EM steps, a checkpoint every 3."""
    return tiny_overrides(demo_data.train_shards, output_dir, "data.shuffle_buffer=8", "checkpoint.every_steps=3",
                          *extra, val_shards=demo_data.val_shards, pca=2, kmeans=3, em=em, tracking=True)


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
            cwd=tmp_path, env=child_env(MLFLOW_PORT=str(self.port)),
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


@pytest.mark.slow
def test_mlflow_server_script_and_single_node_run(demo_data, tmp_path):
    server = _Server(tmp_path)
    try:
        server.wait_ready()
        assert f"MLFLOW_TRACKING_URI={server.uri}" in server.output()

        overrides = launcher_overrides(demo_data, tmp_path / "run", "tracking.experiment=launcher-test",
                                       "tracking.run_name=single-node")
        env = child_env(MLFLOW_TRACKING_URI=server.uri, NPROC_PER_NODE="1")
        run_checked(["bash", str(REPO / "launch" / "train_single_node.sh"), "--config", str(DEMO_CONFIG), *overrides],
                    env=env, timeout=400)
        steps = total_steps(overrides)
        payload = final_payload(tmp_path / "run", steps)
        assert (tmp_path / "run" / "config.yaml").is_file()

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("launcher-test")
        assert experiment is not None, "the run did not reach the server"
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert payload["mlflow_run_id"] == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "stage")
        assert history and max(m.step for m in history) == steps
        # Artifacts go through the server into its artifact store.
        assert any(p.is_file() for p in server.artifacts.rglob("*")), "no artifact reached the server's store"
    finally:
        status = server.stop()
    assert status == 0, f"server did not stop cleanly ({status}):\n{server.output()}"
    assert not _health(server.uri)


@pytest.mark.slow
def test_deepspeed_two_processes_and_resume(demo_data, tmp_path):
    pytest.importorskip("deepspeed")
    env = child_env(tmp_path, NPROC_PER_NODE="2")
    out = tmp_path / "ds"
    script = ["bash", str(REPO / "launch" / "train_deepspeed.sh"), "--config", str(DEMO_CONFIG)]
    deepspeed_config = f"em.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}"

    first = launcher_overrides(demo_data, out, "checkpoint.every_steps=100", em=3)
    run_checked([*script, *first, deepspeed_config], env=env, timeout=400)
    first_steps = total_steps(first)
    payload = final_payload(out, first_steps)
    assert payload["config"]["em"]["mode"] == "gradient" and payload["config"]["em"]["engine"] == "deepspeed"
    assert "gradient_state" in payload
    state_before = payload["gradient_state"]
    assert int(state_before["momentum"]["steps"]) == 3  # one optimiser step per EM step

    # The resume goes through the `deepspeed` launcher instead of torchrun: same checkpoint, other launcher.
    second = launcher_overrides(demo_data, out, "checkpoint.every_steps=100", em=6)
    launcher_env = {**env, "LAUNCHER": "deepspeed", "MASTER_PORT": str(free_port())}
    result = run_checked([*script, *second, deepspeed_config], env=launcher_env, timeout=400)
    second_steps = total_steps(second)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", result.output)
    assert resumed and int(resumed[0]) == first_steps, f"no resume at step {first_steps}:\n{result.describe()}"
    after = final_payload(out, second_steps)
    assert set(complete_steps(out)) >= {first_steps, second_steps}
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


# ----------------------------------------------------------------------------------------------- environment

_RECORDER = """#!/usr/bin/env bash
# Stand-in for {name}: records its arguments and environment, then exits 0.
printf '%s\\n' "$@" > "$PROBE_DIR/{name}.args"
env > "$PROBE_DIR/{name}.env"
"""
_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: drops its own options and runs the step command here.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""
_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && echo localhost
exit 0
"""

LAUNCHERS = [  # (script, its variables, the program it starts, the argument that names the trainer module)
    ("launch/train_single_node.sh", {}, "torchrun", "primaps_dist.train"),
    ("launch/train_multi_node.sh", {"HEAD_ADDR": "127.0.0.1", "NNODES": "1", "NODE_RANK": "0"}, "torchrun",
     "primaps_dist.train"),
    ("launch/train_deepspeed.sh", {}, "torchrun", "primaps_dist.train"),
    ("launch/train_deepspeed.sh", {"LAUNCHER": "deepspeed"}, "deepspeed", "primaps_dist.train"),
    ("slurm/train.sbatch", {"PRIMAPS_ROOT": str(REPO), "SLURM_JOB_ID": "4242"}, "torchrun", "primaps_dist.train"),
]


def _fake_venv(root: Path) -> Path:
    """A virtual environment whose torchrun, deepspeed, srun and scontrol are the stand-ins above."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(PYTHON)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    programs = {"torchrun": _RECORDER.format(name="torchrun"), "deepspeed": _RECORDER.format(name="deepspeed"),
                "srun": _SRUN, "scontrol": _SCONTROL}
    for name, text in programs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root


@pytest.mark.parametrize("script, variables, program, module", LAUNCHERS,
                         ids=["single_node", "multi_node", "deepspeed_torchrun", "deepspeed_launcher", "sbatch"])
def test_launchers_make_elastic_restarts_safe(script, variables, program, module, tmp_path):
    """torchrun shares its rendezvous store with the workers' process group unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; after an elastic restart gloo then reads the dead attempt's peer
    addresses and fails or hangs (pytorch/pytorch#135712). Every launcher must set it for its launcher."""
    venv = _fake_venv(tmp_path / "venv")
    probe = tmp_path / "probe"
    probe.mkdir()
    env = child_env(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=None, PRIMAPS_VENV=str(venv), PROBE_DIR=str(probe),
                    NPROC_PER_NODE="1", **variables)
    run_checked(["bash", str(REPO / script), "--config", str(DEMO_CONFIG), "train.em_steps=1"], env=env, cwd=tmp_path,
                timeout=60)
    assert (probe / f"{program}.env").is_file(), f"{script} did not start {program}"
    seen = dict(line.split("=", 1) for line in (probe / f"{program}.env").read_text().splitlines() if "=" in line)
    assert seen.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1", f"{script} does not export it"
    args = (probe / f"{program}.args").read_text().splitlines()
    assert module in args and str(DEMO_CONFIG) in args and args[-1] == "train.em_steps=1", args
