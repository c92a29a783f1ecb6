"""Process-level helpers of the command-line jobs (train, evaluate): log set-up, the stop flag that SLURM
preemption sets, the fault injection that the resilience tests use, and the per-phase step timer."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("primaps_dist.runtime")

FAULT_VARIABLE = "PRIMAPS_FAULT"


def setup_logging(rank: int) -> None:
    """INFO records to stderr, each line prefixed with ``[rank N]`` (replaces earlier handlers)."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM preemption, scancel); checked at step boundaries on every rank."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.requested:
            log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.requested = True


def inject_fault(step: int, rank: int) -> None:
    """Fault injection for resilience tests: ``PRIMAPS_FAULT=kill@STEP[:RANK]`` SIGKILLs that rank when it
    reaches STEP, on the first attempt only (torchrun's restart count 0), so an elastic restart can recover."""
    spec = os.environ.get(FAULT_VARIABLE, "")
    if not spec.startswith("kill@") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    at, _, who = spec[len("kill@"):].partition(":")
    if not at.isdigit() or not (who or "0").isdigit():
        log.warning("ignoring malformed %s=%r (expected kill@STEP[:RANK])", FAULT_VARIABLE, spec)
        return
    if step == int(at) and rank == int(who or 0):
        log.warning("fault injection: SIGKILL at step %d", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StepTimer:
    """Wall-clock seconds per phase of the current logging window."""

    totals: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals
