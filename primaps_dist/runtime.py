"""Process-level helpers of the command-line jobs (train, evaluate): log set-up, the stop flag that SLURM
preemption sets, and the fault injection that the resilience tests use."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

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
