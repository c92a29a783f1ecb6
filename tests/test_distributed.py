"""Launcher detection, process-group setup, counted collectives and the collective-timeout error."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from primaps_dist import distributed
from primaps_dist.config import DistConfig
from primaps_dist.distributed import (
    CollectiveError,
    CollectiveTimeout,
    _parse_first_host,
    detect_env,
    first_slurm_host,
    guard_collective,
)
from primaps_dist.errors import UserError
from support import dist_pipelines as utils
from support.env import child_env

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29400",
}

SRUN_STEP = {  # as seen in a task of `srun` inside `sbatch --ntasks=4 --nodes=2`
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "2",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3",
}

SBATCH_SCRIPT = {  # the batch script itself: no step variables (checked on a real slurmd)
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_torchrun_variables():
    env = detect_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 4, "10.0.0.5", 29400)
    assert env.launcher == "torchrun" and env.is_distributed and not env.is_master


def test_torchrun_wins_over_slurm():
    env = detect_env({**SRUN_STEP, **TORCHRUN})
    assert env.launcher == "torchrun" and env.rank == 3


def test_srun_step_variables():
    env = detect_env(SRUN_STEP, use_scontrol=False)
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)
    assert (env.node_rank, env.num_nodes) == (1, 2)
    assert env.master_addr == "gpu007"  # first host of the step, where task 0 runs
    assert env.master_port == 12000 + 123456 % 20000


def test_srun_overrides_and_fallbacks():
    env = detect_env({**SRUN_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "30001"}, use_scontrol=False)
    assert (env.master_addr, env.master_port) == ("head", 30001)
    no_list = {k: v for k, v in SRUN_STEP.items() if "NODELIST" not in k}
    assert detect_env(no_list, use_scontrol=False).master_addr == "10.1.2.3"
    # Older srun without SLURM_STEP_NUM_TASKS: world from SLURM_NTASKS.
    old = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect_env(old, use_scontrol=False).world_size == 4


def test_batch_script_is_single_process():
    env = detect_env(SBATCH_SCRIPT)
    assert env.launcher == "single" and env.world_size == 1 and not env.is_distributed


def test_single_process_default():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher, env.backend) == (0, 1, "single", "none")


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not in [0, world size 2)"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "not a valid TCP port"),
    ],
)
def test_bad_launcher_variables(environ, needle):
    with pytest.raises(UserError) as info:
        detect_env(environ)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("a[09,10],b", "a09"),
        ("r[1-2]-n[07-08]", "r1-n07"),
        ("login,gpu[1-4]", "login"),
    ],
)
def test_first_host_parser(nodelist, first):
    assert _parse_first_host(nodelist) == first


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_first_host_with_scontrol():
    assert first_slurm_host("gpu[003-005],cpu1") == "gpu003"


def test_init_single_process(monkeypatch):
    for name in list(TORCHRUN) + list(SRUN_STEP):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_distributed(DistConfig(timeout_s=5), "cpu")
    assert (env.world_size, env.backend, env.device.type, env.timeout_s) == (1, "none", "cpu", 5.0)
    assert distributed.current_env() is env
    distributed.shutdown()
    with pytest.raises(UserError, match="nccl needs CUDA"):
        distributed.init_distributed(DistConfig(backend="nccl"), "cpu")
    with pytest.raises(UserError, match="must be auto, cpu or cuda"):
        distributed.init_distributed(DistConfig(), "tpu")


def test_wrappers_are_counted_noops_in_one_process():
    distributed.reset_collective_counts()
    tensor = torch.arange(4.0)
    assert distributed.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert distributed.broadcast(tensor, src=0) is tensor
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.all_reduce_sum(tensor)
    expected = {"all_reduce_sum": 2, "broadcast": 1, "all_gather_object": 1, "barrier": 1}
    assert distributed.collective_counts() == expected
    distributed.reset_collective_counts()
    assert distributed.collective_counts() == {}


def test_guard_turns_torch_errors_into_one_line_messages():
    gloo_timeout = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
    with pytest.raises(CollectiveTimeout) as info:
        with guard_collective("all_reduce_sum"):
            raise RuntimeError(gloo_timeout)
    assert str(info.value).startswith("rank 0: collective all_reduce_sum timed out after")
    assert "a peer died or hung; see dist.timeout_s" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CollectiveError, match="a peer closed the connection"):
        with guard_collective("barrier"):
            raise RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4711")
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        with guard_collective("broadcast"):
            raise RuntimeError("shape mismatch")
    assert not isinstance(info.value, CollectiveError)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to count threads")
def test_shutdown_joins_the_process_group_threads():
    """Regression: gloo threads that outlived shutdown aborted ranks at interpreter exit (SIGABRT in CI)."""
    for record in utils.load_ranks("shutdown", "threads"):
        assert any("gloo" in name for name in record["before_shutdown"]), record  # the probe sees gloo threads
        assert not any("gloo" in name for name in record["after_shutdown"]), record


@pytest.mark.alone  # a group timeout measured in wall-clock time
def test_hung_peer_ends_with_clear_error_not_a_hang():
    """Rank 1 sleeps past the group timeout; rank 0's all-reduce must fail after the timeout with one line."""
    timeout_s = utils.HUNG_PEER_TIMEOUT_S  # why this value: support/dist_pipelines.py
    started = time.monotonic()
    proc, outdir = utils.launched("timeout")
    wall = time.monotonic() - started
    assert proc.returncode != 0
    expected = (f"error: rank 0: collective all_reduce_sum timed out after {timeout_s:g} s "
                "(a peer died or hung; see dist.timeout_s)")
    assert expected in proc.stderr + proc.stdout
    elapsed = torch.load(outdir / "timeout_rank0.pt", weights_only=True)["elapsed"]
    assert 0.8 * timeout_s <= elapsed <= min(timeout_s + 4.0, utils.HUNG_PEER_SLEEP_S), elapsed
    assert wall < 90.0


@pytest.mark.slow
def test_srun_without_torchrun_forms_a_process_group(slurm_cluster, tmp_path):
    """``sbatch --ntasks=2`` + ``srun python ...``: ranks, world and master come from the SLURM step."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun --ntasks=2 --cpus-per-task=1 {sys.executable} {utils.WORKERS} srun {tmp_path}\n"
    )
    log_path = tmp_path / "job.out"
    env = {k: v for k, v in child_env().items() if k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    job = slurm_cluster.sbatch(["--ntasks=2", "--cpus-per-task=1", f"--output={log_path}", str(script)],
                               cwd=tmp_path, extra_env=env)
    info = slurm_cluster.wait(job, 180)
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    assert info.get("JobState") == "COMPLETED", f"{info}\n{log[-3000:]}"
    records = [torch.load(tmp_path / f"srun_rank{rank}.pt", weights_only=True) for rank in range(2)]
    for rank, record in enumerate(records):
        assert (record["launcher"], record["rank"], record["world_size"], record["backend"]) == ("slurm", rank, 2, "gloo")
        assert record["sum"] == 3.0
        assert record["master"] == f"localhost:{12000 + job % 20000}"
