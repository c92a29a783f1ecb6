"""Where this process sits in the job: the launcher's environment variables -> :class:`DistEnv`.

Launchers, detected in this order by :func:`detect_env`:

1. ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``).
2. ``srun`` with one task per GPU and no torchrun. Only inside a job *step* (``SLURM_STEP_ID`` or
   ``SLURM_STEP_NUM_TASKS`` set): the batch script itself also carries ``SLURM_PROCID=0`` and
   ``SLURM_NTASKS=N`` but is a single process, and treating it as rank 0 of N would wait for peers that
   never come. Rank ``SLURM_PROCID``, world ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), local rank
   ``SLURM_LOCALID``. Master address: ``MASTER_ADDR`` when set, else the first host of
   ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` (``scontrol show hostnames`` when available, else a
   built-in parser; task 0 runs on that node), else ``SLURM_LAUNCH_NODE_IPADDR``. The launch node is only a
   fallback because ``srun`` started from a login node would name a host outside the job. Port:
   ``MASTER_PORT`` when set, else ``12000 + SLURM_JOB_ID % 20000`` (below the Linux ephemeral range).
3. A single process.

Reading the environment needs no process group; :mod:`primaps_dist.distributed` creates one from the result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Mapping

import torch

from primaps_dist.errors import UserError

__all__ = ["DistEnv", "detect_env", "first_slurm_host"]


@dataclass
class DistEnv:
    """Where this process sits in the job. ``backend``/``device`` are filled in by
    :func:`~primaps_dist.distributed.init_distributed`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | slurm | single
    backend: str = "none"  # none (single process) | gloo | nccl
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        """Global rank 0: the one process that writes checkpoints and reports, logs metrics and draws pictures."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"environment variable {name} is required by the launcher but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def _first_tasks_per_node(value: str) -> int | None:
    """``SLURM_STEP_TASKS_PER_NODE`` like ``"4(x2),3"`` -> 4 (tasks on the first node)."""
    match = re.match(r"\s*(\d+)", value or "")
    return int(match.group(1)) if match else None


def _parse_first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist without scontrol: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Handles several bracket groups (``"r[1-2]-n[07-08]"`` -> ``"r1-n07"``); zero padding is kept.
    """
    depth = 0
    first = nodelist.strip()
    for i, char in enumerate(first):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            first = first[:i]
            break

    def first_of_group(match: re.Match) -> str:
        item = match.group(1).split(",")[0]
        return item.split("-")[0]

    return re.sub(r"\[([^\]]*)\]", first_of_group, first)


def first_slurm_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host name of a SLURM node list (``scontrol show hostnames`` when available)."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20
            )
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return _parse_first_host(nodelist)


def detect_env(environ: Mapping[str, str] | None = None, use_scontrol: bool = True) -> DistEnv:
    """Rank/world/local rank/master from torchrun, else an srun step, else single process.

    ``environ`` defaults to ``os.environ``; ``use_scontrol=False`` keeps the node-list parsing in Python
    (tests). Raises :class:`UserError` on malformed variables (e.g. ``RANK >= WORLD_SIZE``).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        result = DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", 0),
            num_nodes=max(1, world // max(1, local_world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", 29500),
            launcher="torchrun",
        )
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env or "SLURM_STEP_NUM_TASKS" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        if env.get("MASTER_ADDR"):
            master = env["MASTER_ADDR"]
        elif nodelist:
            master = first_slurm_host(nodelist, use_scontrol=use_scontrol)
        else:
            master = env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        else:
            port = 12000 + _int(env, "SLURM_JOB_ID", 0) % 20000
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = _first_tasks_per_node(tasks_per_node) or world
        result = DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=local_world,
            node_rank=_int(env, "SLURM_NODEID", 0),
            num_nodes=_int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1)),
            master_addr=master,
            master_port=port,
            launcher="slurm",
        )
    else:
        return DistEnv()
    if result.world_size < 1 or not 0 <= result.rank < result.world_size:
        raise UserError(
            f"{result.launcher}: rank {result.rank} is not in [0, world size {result.world_size}) "
            "(check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)"
        )
    if not 0 < result.master_port < 65536:
        raise UserError(f"{result.launcher}: master port {result.master_port} is not a valid TCP port")
    return result

