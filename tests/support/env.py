"""The environment of every child process a test starts (CLI runs, torchrun, launch scripts, workers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the project's virtual environment, which runs pytest
VENV_BIN = Path(PYTHON).parent  # torchrun, primaps-dist and deepspeed live here

# Variables of an outer launcher (a torchrun or SLURM job running pytest) that a child would mistake for its
# own; fault injection and tracebacks are opt-in per test.
_DROPPED = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
    "PRIMAPS_DEBUG", "PRIMAPS_FAULT",
}
_DROPPED_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def child_env(tmp: str | os.PathLike | None = None, **changes: str | None) -> dict[str, str]:
    """This process's environment, made safe and quiet for a child.

    The virtual environment's ``bin`` first on PATH (launch scripts find torchrun there), the repository on
    PYTHONPATH (worker scripts import ``primaps_dist`` from any directory), one thread per process, hub
    downloads and MLflow telemetry off. With ``tmp``, MLflow logs to ``tmp/mlflow.db``. ``changes`` set
    variables, or remove them with ``None``.
    """
    env = {name: value for name, value in os.environ.items()
           if name not in _DROPPED and not name.startswith(_DROPPED_PREFIXES)}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]).rstrip(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        PRIMAPS_VENV=str(VENV_BIN.parent),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    if tmp is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp).resolve() / 'mlflow.db'}"
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
