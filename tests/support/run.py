"""Running commands: argv builders, one runner (subprocess or in-process), a background process, and the
assertion every bad-input test makes (one ``error:`` line, exit status 2)."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest

from support.env import PYTHON, child_env

EXIT_USER_ERROR = 2  # README: every command refuses bad input with exit status 2 and one line


@dataclass
class Result:
    """What a finished command left behind."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        """stdout then stderr (launch scripts and torchrun spread their lines over both)."""
        return f"{self.stdout}\n{self.stderr}"

    def describe(self) -> str:
        return (f"command: {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-6000:]}")


def module_command(module: str, *args: str | os.PathLike) -> list[str]:
    """``python -m <module> args...`` with the test interpreter (the project's virtual environment)."""
    return [PYTHON, "-m", module, *map(str, args)]


def torchrun_command(nproc: int, target: str | os.PathLike, *args: str | os.PathLike,
                     max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N [--max-restarts=R]`` running a module, or a ``.py`` script."""
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
    program = [str(target)] if str(target).endswith(".py") else ["-m", str(target)]
    return command + program + [str(arg) for arg in args]


def _text(stream) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def run_command(args: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None, timeout: float = 120.0,
                cwd: str | os.PathLike | None = None) -> Result:
    """Run ``args`` to completion, whatever its exit status; a run past ``timeout`` s fails the test."""
    argv = [str(arg) for arg in args]
    begin = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else child_env(), cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"command did not finish within {timeout} s: {' '.join(argv)}\n"
                    f"--- stdout ---\n{_text(err.stdout)[-2000:]}\n--- stderr ---\n{_text(err.stderr)[-4000:]}",
                    pytrace=False)
    return Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - begin)


def run_checked(args: Sequence[str | os.PathLike], **options) -> Result:
    """:func:`run_command` that fails the test, with the output's tail, unless the command exits 0."""
    result = run_command(args, **options)
    if result.returncode != 0:
        pytest.fail(result.describe(), pytrace=False)
    return result


@contextlib.contextmanager
def _process_state_restored():
    """In-process runs install signal handlers and reconfigure logging; give the test process its own back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for handler in list(root.handlers):
            if handler not in root_handlers:
                root.removeHandler(handler)
        for handler in root_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(root_level)


def run_main_in_process(module_name: str, argv: Sequence[str]) -> Result:
    """``run_cli(module.main, argv)`` with stdout/stderr captured: the entry point's code path without the
    interpreter start-up. An uncaught exception is printed as the interpreter would, with exit status 1."""
    from primaps_dist.errors import run_cli

    module = importlib.import_module(module_name)
    out, err = io.StringIO(), io.StringIO()
    begin = time.monotonic()
    with _process_state_restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(module.main, list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    return Result([module_name, *argv], code, out.getvalue(), err.getvalue(), time.monotonic() - begin)


class Background:
    """A process with its stderr in a file (no pipe to fill up); killed on exit if still alive."""

    def __init__(self, args: Sequence[str | os.PathLike], env: Mapping[str, str], log: Path,
                 cwd: str | os.PathLike | None = None):
        self.args = [str(a) for a in args]
        self.log = log
        self._handle = open(log, "w")
        self.begin = time.monotonic()
        self.process = subprocess.Popen(self.args, env=dict(env), cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=self._handle, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(self.args)} did not end within {timeout} s\n{self.stderr()[-4000:]}")

    def stderr(self) -> str:
        self._handle.flush()
        return self.log.read_text(errors="replace")

    def result(self) -> Result:
        return Result(self.args, self.process.returncode, "", self.stderr(), time.monotonic() - self.begin)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._handle.close()

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def wait_until(condition: Callable[[], object], timeout: float, what: str, alive: Background | None = None) -> None:
    """Poll ``condition`` every 50 ms; fail the test after ``timeout`` s, or when ``alive`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and alive.process.poll() is not None:
            pytest.fail(f"the process ended (status {alive.process.returncode}) before {what}\n"
                        f"{alive.stderr()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}"
                        + (f"\n{alive.stderr()[-4000:]}" if alive is not None else ""))
        time.sleep(0.05)


def last_line(text: str) -> str:
    """The last non-empty line (tqdm's carriage-return redraws count as line breaks)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit status 2, no traceback, and the last stderr line is ``error: ...`` containing every needle."""
    assert result.returncode == EXIT_USER_ERROR, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    line = last_line(result.stderr)
    assert line.startswith("error: "), result.describe()
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line {line!r}\n{result.describe()}"
    return line
