"""Real servers for remote-shard tests, on loopback, started and stopped by the tests.

- :class:`HttpShardServer`: Python's ``http.server`` serving a folder, in a thread of the test process, with
  switchable faults (cut the connection at a byte of a file; answer ``Range`` requests or ignore them as
  ``SimpleHTTPRequestHandler`` does).
- :class:`HttpServerProcess`: ``python -m http.server`` in its own process, to be killed mid-transfer (defined in
  :mod:`primaps_dist.testing.http_server`, which the streaming benchmark uses too; re-exported here).
- :class:`S3Server`: moto in server mode (the S3 server s3fs's own tests use), with IAM authentication on,
  one bucket and one user whose access key the tests use (any other key is refused).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from primaps_dist.testing.http_server import HttpServerProcess
from support.net import free_port

__all__ = ["HttpServerProcess", "HttpShardServer", "S3Server"]


class _FaultyHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus optional ``Range`` answers and connection cuts (``server.faults``)."""

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: HttpShardServer = self.server.owner  # type: ignore[attr-defined]
        name = self.path.lstrip("/").split("?")[0]
        path = Path(self.directory) / name
        cut_at = server.cuts.get(name)
        ranged = server.answer_ranges and self.headers.get("Range", "").startswith("bytes=")
        if cut_at is None and not ranged:
            server.requests.append(name)
            return super().do_GET()
        server.requests.append(name)
        if ranged:
            server.ranges.append((name, self.headers["Range"]))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"][len("bytes="):].split("-")[0]) if ranged else 0
        self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
        self.send_header("Content-Length", str(len(data) - start))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        stop = len(data) if cut_at is None else max(start, cut_at)
        self.wfile.write(data[start:stop])
        if stop < len(data):  # the connection breaks before the promised length
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            server.cuts_done += 1
            if server.cut_once:
                server.cuts.pop(name, None)


class HttpShardServer:
    """``http://127.0.0.1:<port>/`` serving ``root``. Faults: ``cuts[name] = byte`` ends the body of ``name``
    at that byte (once when ``cut_once``); ``answer_ranges`` serves ``Range`` requests with 206."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.cuts: dict[str, int] = {}
        self.cut_once = True
        self.cuts_done = 0
        self.answer_ranges = False
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str]] = []  # (file, Range header) of the requests answered with 206
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FaultyHandler, directory=self.root))
        self._server.owner = self
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HttpShardServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "HttpShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server:
    """moto's S3 on ``http://127.0.0.1:<port>`` with authentication: only ``access_key`` / ``secret_key`` (an IAM
    user allowed ``s3:*``) are accepted once :meth:`start` returns."""

    region = "us-east-1"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.access_key = self.secret_key = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _client(self, service: str, **keys: str):
        import boto3

        keys = keys or {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region, **keys)

    def start(self) -> "S3Server":
        import urllib.request

        self._server.start()
        iam = self._client("iam")  # moto accepts any key until authentication is switched on below
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        # From now on every request needs the user's key (a text body: a form body would be parsed away).
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()
        return self

    def client(self):
        """boto3 S3 client with the accepted key (to create buckets and upload)."""
        return self._client("s3", aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def upload_folder(self, folder: str | os.PathLike, bucket: str, prefix: str) -> str:
        """Every file of ``folder`` to ``s3://bucket/prefix/``; returns that URL."""
        client = self.client()
        existing = {entry["Name"] for entry in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        for name in sorted(os.listdir(folder)):
            client.upload_file(os.path.join(folder, name), bucket, f"{prefix}/{name}")
        return f"s3://{bucket}/{prefix}/"

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        """The standard AWS variables that point a client at this server (with the accepted key by default)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key or self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def stop(self) -> None:
        self._server.stop()
