"""Process-level helpers of the command-line jobs (train, evaluate): log set-up, the stop flag that SLURM
preemption sets, the fault injection that the resilience tests use, and the per-phase step timer."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
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


class StepTimer:
    """Seconds per phase of the current logging window, without making the host wait for the device.

    ``lap(name, device)`` closes the phase ``name`` (the time since the previous lap). On the CPU that is
    wall-clock time. On a CUDA device a lap only records an event on the current stream; :meth:`pop` (once
    per logging window) waits for the last event and reads the intervals between consecutive events, i.e.
    the device time of each phase including the gaps where the device waited for the host. The step itself
    never synchronises (the former per-lap ``torch.cuda.synchronize`` cost five host waits a step).
    ``synchronize=True`` brings those back for wall-clock profiling of the host side.
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()
        self._last_event: Any = None
        self._intervals: list[tuple[str, Any, Any]] = []  # (phase, start event, end event), read in pop()

    def lap(self, name: str, device: torch.device) -> None:
        if device.type == "cuda" and not self.synchronize:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            if self._last_event is not None:
                self._intervals.append((name, self._last_event, event))
            self._last_event = event
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now

    def pop(self) -> dict[str, float]:
        """The window's seconds per phase (one wait for the device on CUDA); starts a new window."""
        if self._intervals:
            self._intervals[-1][2].synchronize()
            for name, start, end in self._intervals:
                self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._intervals = []
        totals, self.totals = self.totals, {}
        return totals
