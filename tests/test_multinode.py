"""Multi-node torchrun on one machine: two agents (``--nnodes=2 --nproc_per_node=1``, c10d rendezvous on
127.0.0.1, started through launch/train_multi_node.sh with NODE_RANK 0 and 1) must train the same
prototypes as one agent with two processes (``torchrun --nproc_per_node=2``): the world, the data
sharding and the all-reduced statistics are the same, only the process placement differs."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from launch_helpers import (
    BIN,
    DEMO_CONFIG,
    REPO,
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


def _two_agents(overrides: list[str], env: dict[str, str], log_dir, timeout: float = 400) -> None:
    """Start NODE_RANK 1 first (it must wait for the head's store), then NODE_RANK 0; both must exit 0."""
    port = free_port()
    agents = []
    for node_rank in (1, 0):
        log = open(log_dir / f"agent{node_rank}.log", "w")
        agent_env = {**env, "HEAD_ADDR": "127.0.0.1", "HEAD_PORT": str(port), "NNODES": "2",
                     "NODE_RANK": str(node_rank), "NPROC_PER_NODE": "1", "RUN_ID": f"multinode-{port}"}
        proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "train_multi_node.sh"), "--config", str(DEMO_CONFIG), *overrides],
            cwd=REPO, env=agent_env, stdout=log, stderr=subprocess.STDOUT,
        )
        agents.append((node_rank, proc, log))
        time.sleep(1.0)
    deadline = time.monotonic() + timeout
    try:
        for node_rank, proc, log in agents:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        failures = []
        for node_rank, proc, log in agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                failures.append(f"agent NODE_RANK={node_rank} timed out")
            elif proc.returncode != 0:
                failures.append(f"agent NODE_RANK={node_rank} exited {proc.returncode}")
            log.close()
        if failures:
            logs = "\n".join(
                f"--- agent{rank}.log\n{tail((log_dir / f'agent{rank}.log').read_text(), 40)}" for rank, _, _ in agents
            )
            pytest.fail("; ".join(failures) + "\n" + logs, pytrace=False)


def test_two_nodes_match_one_node_with_two_processes(tmp_path_factory, tmp_path):
    demo = demo_shards(tmp_path_factory.getbasetemp())
    env = subprocess_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})

    single = tiny_overrides(demo, tmp_path / "single")
    run_checked(
        [str(BIN / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "primaps_dist.train", "--config", str(DEMO_CONFIG), *single],
        env=env, timeout=400,
    )

    multi = tiny_overrides(demo, tmp_path / "multi")
    _two_agents(multi, env, tmp_path)

    steps = total_steps(single)
    one_node = final_checkpoint(tmp_path / "single", steps)
    two_nodes = final_checkpoint(tmp_path / "multi", steps)
    assert int(one_node.get("world_size", 2)) == 2 and int(two_nodes.get("world_size", 2)) == 2
    a, b = one_node["prototypes"].double(), two_nodes["prototypes"].double()
    assert a.shape == b.shape and a.shape[0] == 6  # configs/demo.yaml: 6 classes
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # Not a vacuous comparison: the prototypes moved away from each other (K distinct unit vectors).
    assert torch.allclose(a.norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-4)
    assert (a @ a.T - torch.eye(6, dtype=torch.float64)).abs().max() < 0.999
