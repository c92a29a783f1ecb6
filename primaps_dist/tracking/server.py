"""``primaps-dist mlflow-server``: a local MLflow tracking server, bound to loopback unless told otherwise.

The server has no authentication, so it listens on 127.0.0.1 by default; any other ``--host`` is
allowed but prints a warning. The command starts ``mlflow server`` in its own process group, waits until
``/health`` answers, prints the tracking URI and serves until interrupted. Tests use
:func:`start_server`, whose handle knows the server's pid and URI and stops the whole process group.

MLflow's job runner (GenAI scorers, one helper process per queue) is switched off unless
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set: training runs do not use it and it more than doubles the
start time on a small machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from primaps_dist.errors import UserError, run_cli

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    bind_host = "" if host in ("0.0.0.0", "::") else host
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            sock.bind((bind_host, port))
        return True
    except OSError:
        return False


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _die_with_parent() -> None:
    """In the server process (Linux): get SIGTERM when the starting process dies, even by SIGKILL.

    The server runs in its own session (so stop() can signal its whole group); without this an
    interrupted test or a killed CLI would leave an orphaned server holding the port.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; not available outside Linux
        pass


def check_health(uri: str, timeout_s: float = 1.0) -> bool:
    """True when ``<uri>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ServerHandle:
    """A running ``mlflow server``: ``pid`` (also its process group id), ``uri``, :meth:`stop`."""

    process: subprocess.Popen
    uri: str
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    log_path: Path | None = None
    start_seconds: float = 0.0
    _log_handle: IO | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the server's process group (server, uvicorn workers), SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        # Workers may outlive the parent for a moment; the group id is the server's pid.
        self._signal_group(signal.SIGKILL)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    backend_store_uri: str | None = None,
    artifacts_destination: str | os.PathLike | None = None,
    *,
    workers: int = 1,
    timeout_s: float = 180.0,
    log_path: str | os.PathLike | None = None,
    extra_env: dict[str, str] | None = None,
) -> ServerHandle:
    """Start ``mlflow server`` and wait until ``/health`` answers.

    Defaults: backend ``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlartifacts`` (proxied through
    the server, so clients upload over HTTP). ``log_path`` receives the server's output (None: inherit).
    Raises UserError when the port is taken or the server exits or stays silent for ``timeout_s``.
    On Linux the server gets SIGTERM when the calling thread ends (so nothing is orphaned if the caller is
    killed): call it from a thread that lives as long as the server should.
    """
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if not _port_is_free(host, port):
        raise UserError(f"--port: {host}:{port} is already in use (pick another port)")
    backend_store_uri = backend_store_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if artifacts_destination is None:
        artifacts = str(Path.cwd() / "mlartifacts")
    elif "://" in str(artifacts_destination):
        artifacts = str(artifacts_destination)
    else:
        artifacts = str(Path(artifacts_destination).resolve())
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts,
    ]
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.update(extra_env or {})
    log_handle = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(log_path, "ab")
    begin = time.monotonic()
    process = subprocess.Popen(
        command, stdout=log_handle, stderr=subprocess.STDOUT if log_handle else None,
        stdin=subprocess.DEVNULL, env=env, start_new_session=True,  # own process group: stop() reaches workers
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    uri = f"http://{_client_host(host)}:{port}"
    handle = ServerHandle(process, uri, host, port, backend_store_uri, artifacts, log_path, 0.0, log_handle)
    deadline = begin + timeout_s
    while True:
        if check_health(uri):
            handle.start_seconds = time.monotonic() - begin
            return handle
        if process.poll() is not None:
            handle.stop()
            tail = ""
            if log_path is not None and Path(log_path).is_file():
                lines = Path(log_path).read_text(errors="replace").strip().splitlines()
                tail = f": {lines[-1]}" if lines else ""
            raise UserError(f"mlflow server exited with status {process.returncode} during start-up{tail}")
        if time.monotonic() > deadline:
            handle.stop()
            raise UserError(f"mlflow server on {host}:{port} did not answer /health within {timeout_s:.0f} s")
        time.sleep(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="primaps-dist mlflow-server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to bind (default 127.0.0.1; anything else exposes an unauthenticated server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--backend-store-uri", default=None, help="default: sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--artifacts-destination", default=None, help="default: <cwd>/mlartifacts")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /health")
    parser.add_argument("--log-file", default=None, help="server output goes here (default: this terminal)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} makes the MLflow server (no authentication) reachable from the "
              "network; use 127.0.0.1 unless that is intended", file=sys.stderr)
    server = start_server(args.host, args.port, args.backend_store_uri, args.artifacts_destination,
                          workers=args.workers, timeout_s=args.timeout, log_path=args.log_file)
    print(f"MLflow server ready at {server.uri} (pid {server.pid}, started in {server.start_seconds:.1f} s)")
    print(f"  backend {server.backend_store_uri}, artifacts {server.artifacts_destination}")
    print(f"  export MLFLOW_TRACKING_URI={server.uri}", flush=True)

    def _terminate(signum, frame):  # SIGTERM (e.g. from a job scheduler) -> same clean stop as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(server.process.wait() or 0)
    except KeyboardInterrupt:
        print("stopping MLflow server", file=sys.stderr)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(run_cli(main))
