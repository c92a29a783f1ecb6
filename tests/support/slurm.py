"""A throw-away single-node SLURM cluster for integration tests (Debian ``slurm-wlm`` + ``munge``).

:class:`SlurmCluster` writes a munge key, ``slurm.conf`` and ``cgroup.conf`` into a temporary directory,
starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground (as the current user, normally root) with
free TCP ports and all state, spool, log and pid files under that directory, and waits until ``sinfo``
reports the node ``localhost`` idle. :meth:`SlurmCluster.stop` cancels every job, kills what is left of the
jobs' processes (found by a marker variable in their environment) and stops each daemon it started, by pid.

The session fixture ``slurm_cluster`` (tests/conftest.py) calls :func:`require_slurm`, which skips when SLURM
or munge is not installed or the tests do not run as root, except when the environment variable ``CI`` is
set: CI installs them (``make system-deps``, called by ``.ci/run``), so there it fails instead.

Clients (``sbatch``, ``squeue``, ``scontrol``, ``srun``) find the cluster through ``SLURM_CONF``: use
:attr:`SlurmCluster.env` as the environment of every client command and of submitted jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

import pytest

from support.net import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
MARKER = "PRIMAPS_TEST_SLURM_ROOT"  # set in every daemon's and job's environment; finds leftovers at teardown

# Finished jobs stay visible to `scontrol show job` this long (there is no accounting database).
MIN_JOB_AGE_S = 3600
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def missing_programs() -> list[str]:
    """Names of the SLURM/munge programs that are not on PATH (or in /usr/sbin)."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _program(name: str) -> str:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    path = shutil.which(name, path=search)
    if path is None:
        raise FileNotFoundError(name)
    return path


def _node_hardware() -> str:
    """``CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=..`` as ``slurmd -C`` sees it.

    The node line must not claim more than the machine has, or slurmd registers it as drained.
    """
    try:
        text = subprocess.run([_program("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(re.findall(r"(\w+)=(\S+)", text.splitlines()[0] if text else ""))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    if all(key in fields for key in keys):
        return " ".join(f"{key}={fields[key]}" for key in keys)
    return f"CPUs={os.cpu_count() or 1}"


class SlurmCluster:
    """One node (``localhost``), one partition (``debug``), daemons owned by this object.

    Args:
        root: an empty directory for keys, configs, state, logs.
        start_timeout_s: how long to wait for the node to become idle.
    """

    def __init__(self, root: str | os.PathLike, start_timeout_s: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.start_timeout_s = start_timeout_s
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._daemon_logs: list = []
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ setup

    def _write_files(self) -> None:
        for sub in ("etc", "log", "munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged insists on private key and socket directories.
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        r = self.root
        user = _current_user()
        conf = f"""\
ClusterName=primapstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
MinJobAge={MIN_JOB_AGE_S}
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf_path.write_text(conf)
        # No cgroups at all (containers rarely allow them); linuxproc tracks processes instead.
        (self.root / "etc" / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        (self.root / "etc" / "plugstack.conf").write_text("")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")
        self._daemon_logs.append(log)
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # keep the daemons out of pytest's terminal signals
        )
        self._daemons.append((name, proc))

    def _wait_for(self, what: str, predicate, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def start(self) -> "SlurmCluster":
        self._write_files()
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf_path),
            MARKER: str(self.root),
        }
        # Keep outer SLURM job variables (a CI runner inside SLURM) away from the test cluster.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]
        try:
            m = self.root / "munge"
            self._spawn(
                "munged",
                [
                    _program("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={m / 'munge.key'}",
                    f"--pid-file={m / 'munged.pid'}",
                    f"--log-file={self.log_dir / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}",
                ],
            )
            self._wait_for("the munge socket", self.munge_socket.exists, 20)
            self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
            self._wait_for("slurmctld", lambda: self._client_ok(["scontrol", "ping"], "UP"), 30)
            self._spawn("slurmd", [_program("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf_path)])
            self._wait_for("the node to become idle", self._node_idle, self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _client_ok(self, argv: Sequence[str], needle: str) -> bool:
        try:
            out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and needle in out.stdout

    def _node_idle(self) -> bool:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return False
        return any(line.split() == ["localhost", "idle"] for line in out.stdout.splitlines())

    # ------------------------------------------------------------------------------------------ clients

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a client command against this cluster; ``check`` raises with its output on failure."""
        env = {**self.env, **kw.pop("extra_env", {})}
        out = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(
        self, args: Sequence[str], *, cwd: str | os.PathLike, extra_env: Mapping[str, str] | None = None
    ) -> int:
        """Submit (``sbatch --parsable ARGS``) from ``cwd``; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, extra_env=dict(extra_env or {}))
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` fields of one job (e.g. ``JobState``, ``Restarts``, ``ExitCode``)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: int, timeout_s: float, states: set[str] = TERMINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; returns its fields. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f} s: {info}")

    def release_requeued(self, job_id: int, timeout_s: float = 180.0) -> dict[str, str]:
        """Start a requeued job now instead of after SLURM's ~2 minute hold (``Reason=BeginTime``).

        The hold exists for a reason: slurmd refuses ("Job N already killed, do not launch batch job") a
        relaunch that comes within about a second of the old instance's end, and the job then FAILS. So
        release only once the node is idle again, plus a few seconds. Returns the job's fields once it
        runs again (or has ended). Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout_s
        released = False
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state, reason = info.get("JobState"), info.get("Reason")
            if state == "RUNNING" or (state in TERMINAL_STATES and state != "PENDING" and released):
                return info
            if state == "PENDING" and reason == "BeginTime" and not released and self._node_idle():
                time.sleep(3.0)
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                released = True
            time.sleep(0.25)
        raise TimeoutError(f"requeued job {job_id} did not start again within {timeout_s:.0f} s: {info}")

    def cancel_all(self, wait_s: float = 40.0) -> None:
        """Cancel every job and wait (bounded) until none is left running."""
        try:
            out = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15)
            ids = out.stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False, timeout=15)
            deadline = time.monotonic() + wait_s
            while ids and time.monotonic() < deadline:
                out = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15)
                if out.returncode == 0 and not out.stdout.split():
                    break
                time.sleep(0.5)
        except (subprocess.SubprocessError, OSError):
            pass

    # ------------------------------------------------------------------------------------------ teardown

    def _leftover_pids(self) -> list[int]:
        """Processes (slurmstepd, job steps) whose environment carries this cluster's marker."""
        needle = f"{MARKER}={self.root}".encode()
        own = {os.getpid()} | {proc.pid for _, proc in self._daemons}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in own:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Cancel jobs, stop each daemon this object started (by pid), then kill leftover job processes."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._daemons):
            self.cancel_all()
        for name, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._daemons.clear()
        # Whatever a cancel did not reach (a step of a job that ignored the signal) goes now, by pid.
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self._daemon_logs:
            log.close()
        self._daemon_logs.clear()

    def logs(self, tail_lines: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def require_slurm() -> None:
    """Skip the calling test when SLURM/munge are missing; under CI (env ``CI`` set) fail instead."""
    missing = missing_programs()
    if missing:
        reason = (f"SLURM integration test needs {', '.join(missing)}: install slurm-wlm and munge as root "
                  f"(sudo make system-deps)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run it", pytrace=False)
        pytest.skip(reason)
    if os.getuid() != 0:
        reason = "SLURM integration test starts slurmd, which needs root"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run it", pytrace=False)
        pytest.skip(reason)
