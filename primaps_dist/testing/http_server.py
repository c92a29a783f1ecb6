"""A plain static HTTP server on loopback, in its own process, for the remote-shard tests and the streaming benchmark.

:class:`HttpServerProcess` runs ``python -m http.server`` over a folder (no faults: the tests' fault-injecting
server lives in ``tests/support/object_servers.py``); :func:`free_port` and :func:`wait_for_port` are the loopback
port helpers it uses, also for other servers a caller starts (``moto_server`` in ``bench/bench_streaming.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (closed again on return: nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s")


class HttpServerProcess:
    """``python -m http.server`` serving ``root`` on ``http://127.0.0.1:<port>`` in a child process (this
    interpreter's Python, quiet). :meth:`kill` and :meth:`start` again on the same port simulate a server that dies
    mid-transfer and comes back."""

    def __init__(self, root: str | os.PathLike, port: int | None = None):
        self.root = str(root)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://{HOST}:{self.port}"

    def start(self, wait: bool = True) -> "HttpServerProcess":
        """Start the process; with ``wait``, return only once it accepts connections."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", HOST, "--directory", self.root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """Kill the process (if it still runs) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "HttpServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
