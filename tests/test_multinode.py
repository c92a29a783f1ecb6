"""Multi-node torchrun on one machine: two agents (``--nnodes=2 --nproc_per_node=1``, c10d rendezvous on
127.0.0.1, started through launch/train_multi_node.sh with NODE_RANK 0 and 1) must train the same
prototypes as one agent with two processes (``torchrun --nproc_per_node=2``): the world, the data
sharding and the all-reduced statistics are the same, only the process placement differs."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from support.checkpoints import final_payload
from support.demo import DEMO_CONFIG, tiny_overrides, total_steps
from support.env import REPO, child_env
from support.net import free_port
from support.run import run_checked, torchrun_command

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
                f"--- agent{rank}.log\n{_tail(log_dir / f'agent{rank}.log')}" for rank, _, _ in agents
            )
            pytest.fail("; ".join(failures) + "\n" + logs, pytrace=False)


def _tail(path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _overrides(demo_data, output_dir) -> list[str]:
    return tiny_overrides(demo_data.train_shards, output_dir, "data.shuffle_buffer=8", "checkpoint.every_steps=3",
                          val_shards=demo_data.val_shards, pca=2, kmeans=3, em=4, tracking=True)


def test_two_nodes_match_one_node_with_two_processes(demo_data, tmp_path):
    env = child_env(tmp_path)

    single = _overrides(demo_data, tmp_path / "single")
    run_checked(torchrun_command(2, "primaps_dist.train", "--config", DEMO_CONFIG, *single), env=env, timeout=400)

    multi = _overrides(demo_data, tmp_path / "multi")
    _two_agents(multi, env, tmp_path)

    steps = total_steps(single)
    one_node = final_payload(tmp_path / "single", steps)
    two_nodes = final_payload(tmp_path / "multi", steps)
    assert one_node["world_size"] == 2 and two_nodes["world_size"] == 2
    a, b = one_node["prototypes"].double(), two_nodes["prototypes"].double()
    assert a.shape == b.shape and a.shape[0] == 6  # configs/demo.yaml: 6 classes
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # Not a vacuous comparison: the prototypes moved away from each other (K distinct unit vectors).
    assert torch.allclose(a.norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-4)
    assert (a @ a.T - torch.eye(6, dtype=torch.float64)).abs().max() < 0.999
