"""slurm/train.sbatch and slurm/evaluate.sbatch on a real single-node SLURM cluster started by the test
(tests/support/slurm.py, fixture ``slurm_cluster`` in tests/conftest.py): a short 2-process CPU training job
to completion (checkpoint, MLflow run), evaluation of its checkpoint, and a job that is preempted with USR1
mid-training, requeues itself, resumes from its checkpoint and finishes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from support.checkpoints import complete_steps, final_payload
from support.demo import tiny_overrides, total_steps
from support.env import REPO, VENV_BIN

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 420
SBATCH_COMMON = ["--cpus-per-task=2", "--time=30"]


def _job_env(tmp_path: Path) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "NPROC_PER_NODE": "2",  # one torchrun agent with 2 CPU processes on the single node
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "PRIMAPS_VENV": str(VENV_BIN.parent),
    }


def _overrides(demo_data, output_dir: Path, *extra: str, em: int = 4) -> list[str]:
    """A tiny run with tracking and a final evaluation: PCA 2 + K-means 3 + EM steps, a checkpoint every 3."""
    return tiny_overrides(demo_data.train_shards, output_dir, "data.shuffle_buffer=8", "checkpoint.every_steps=3",
                          *extra, val_shards=demo_data.val_shards, pca=2, kmeans=3, em=em, tracking=True)


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def _wait_done(cluster, job_id: int, log_path: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    try:
        info = cluster.wait(job_id, timeout_s)
    except TimeoutError as err:
        pytest.fail(f"{err}\n--- job log\n{tail(_log(log_path))}\n{cluster.logs(15)}", pytrace=False)
    if info.get("JobState") != "COMPLETED" or info.get("ExitCode") != "0:0":
        pytest.fail(
            f"job {job_id} ended {info.get('JobState')} exit {info.get('ExitCode')} ({info.get('Reason')})\n"
            f"--- job log\n{tail(_log(log_path))}\n{cluster.logs(25)}",
            pytrace=False,
        )
    return info


def _mlflow_runs(tmp_path: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {tmp_path}/mlflow.db"
    return client, client.search_runs([found.experiment_id])


def test_cluster_runs_a_batch_job_with_a_step(slurm_cluster, tmp_path):
    """The harness itself: a batch script whose srun step runs on the node."""
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks=1 hostname\necho \"job $SLURM_JOB_ID on $SLURM_JOB_NODELIST\"\n")
    log_path = tmp_path / "hello.out"
    job = slurm_cluster.sbatch([f"--output={log_path}", str(script)], cwd=tmp_path)
    info = _wait_done(slurm_cluster, job, log_path, timeout_s=60)
    assert info["NodeList"] == "localhost"
    assert f"job {job} on localhost" in _log(log_path)


@pytest.fixture(scope="module")
def trained(slurm_cluster, demo_data, tmp_path_factory):
    """A completed train.sbatch job: (job fields, output dir, overrides, tmp dir, log path)."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    overrides = _overrides(demo_data, tmp / "run", "tracking.experiment=slurm-test")
    log_path = tmp / "train.out"
    job = slurm_cluster.sbatch(
        [f"--output={log_path}", *SBATCH_COMMON, str(REPO / "slurm" / "train.sbatch"),
         "--config", "configs/demo.yaml", *overrides],
        cwd=REPO, extra_env=_job_env(tmp),
    )
    info = _wait_done(slurm_cluster, job, log_path)
    return info, tmp / "run", overrides, tmp, log_path


def test_train_sbatch_completes_with_checkpoint_and_mlflow_run(trained):
    info, out, overrides, tmp, log_path = trained
    log = _log(log_path)
    assert "1 node(s) x 2 process(es)" in log, tail(log)
    assert "training finished" in log
    assert info["Restarts"] == "0"
    steps = total_steps(overrides)
    payload = final_payload(out, steps)
    assert payload["world_size"] == 2
    assert payload["prototypes"].shape[0] == 6
    assert (out / "config.yaml").is_file()

    client, runs = _mlflow_runs(tmp, "slurm-test")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "stage")
    assert max(m.step for m in history) == steps


def test_evaluate_sbatch_writes_metrics(slurm_cluster, trained):
    _, out, overrides, tmp, _ = trained
    metrics_path = tmp / "metrics.json"
    log_path = tmp / "eval.out"
    config_overrides = [o for o in overrides if o.startswith("data.")]
    job = slurm_cluster.sbatch(
        [f"--output={log_path}", *SBATCH_COMMON, str(REPO / "slurm" / "evaluate.sbatch"),
         "--config", "configs/demo.yaml", "--checkpoint", str(out / "checkpoints" / "latest"),
         "--out", str(metrics_path), *config_overrides],
        cwd=REPO, extra_env=_job_env(tmp),
    )
    _wait_done(slurm_cluster, job, log_path)
    assert metrics_path.is_file(), tail(_log(log_path))
    metrics = json.loads(metrics_path.read_text())
    text = json.dumps(metrics)
    assert "miou" in text.lower() and "accuracy" in text.lower(), text[:500]


def test_preempted_job_requeues_and_resumes(slurm_cluster, demo_data, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(demo_data, out, "checkpoint.every_steps=2", "tracking.experiment=slurm-preempt", em=40)
    steps = total_steps(overrides)
    log_path = tmp_path / "train.out"
    job = slurm_cluster.sbatch(
        [f"--output={log_path}", *SBATCH_COMMON, str(REPO / "slurm" / "train.sbatch"),
         "--config", "configs/demo.yaml", *overrides],
        cwd=REPO, extra_env=_job_env(tmp_path),
    )

    # Preempt once training is past its first checkpoint (inside the K-means/EM stages).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not complete_steps(out):
        info = slurm_cluster.job(job)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > deadline:
            pytest.fail(f"job {job} {info.get('JobState')} before its first checkpoint\n{tail(_log(log_path))}",
                        pytrace=False)
        time.sleep(0.5)
    signalled_at = max(complete_steps(out))
    assert signalled_at < steps, "the run finished before it could be preempted; make it longer"
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])

    # The job checkpoints, exits and requeues itself (Restarts=1, pending again).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        info = slurm_cluster.job(job)
        if int(info.get("Restarts", "0")) >= 1:
            break
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or time.monotonic() > deadline:
            pytest.fail(f"job {job} did not requeue: {info.get('JobState')}\n{tail(_log(log_path))}", pytrace=False)
        time.sleep(0.5)
    # SLURM holds a requeued job ~2 minutes (BeginTime); release it so the test does not sit that out.
    try:
        slurm_cluster.release_requeued(job)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{tail(_log(log_path))}\n{slurm_cluster.logs(20)}", pytrace=False)

    final = _wait_done(slurm_cluster, job, log_path)
    assert final["Restarts"] == "1", final
    log = _log(log_path)
    assert "received SIGUSR1" in log and f"requeueing job {job}" in log, tail(log)
    assert "restart 1:" in log, tail(log)
    assert "training finished" in log, tail(log)
    resumed = {int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)}  # one line per rank
    assert len(resumed) == 1, tail(log)
    resumed_at = resumed.pop()
    # It resumed from the checkpoint written on the stop request (at or after the one seen before the signal).
    assert signalled_at < resumed_at < steps, (signalled_at, resumed_at)
    assert f"stopped at step {resumed_at} on request" in log, tail(log)
    payload = final_payload(out, steps)
    assert payload["prototypes"].shape[0] == 6

    # One MLflow run across both attempts, finished.
    _, runs = _mlflow_runs(tmp_path, "slurm-preempt")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert payload["mlflow_run_id"] == runs[0].info.run_id
