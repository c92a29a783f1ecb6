"""How remote shards are reached: transport settings, fsspec file systems, retries with backoff, error wording.

The transport is fsspec (HTTP through aiohttp, S3 through s3fs, GCS through gcsfs when installed). S3 takes its
endpoint from ``data.s3_endpoint_url`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, its credentials from
the ``AWS_*`` variables or ``data.s3_profile``. Listing shards is :mod:`.sources`' job, reading them
:mod:`.remote_stream`'s.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from primaps_dist.errors import UserError

log = logging.getLogger("primaps_dist.data")

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
MAX_BACKOFF_S = 30.0
URL_PATTERN = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class MissingTransport(UserError):
    """The URL's scheme needs a package that is not installed (gcsfs for gs://)."""


class RemoteUnavailable(OSError):
    """A remote read failed on every attempt; the message is one line naming the URL."""


@dataclass(frozen=True)
class Transport:
    """How remote shards are reached (plain data: it travels to loader workers with every ShardRef)."""

    s3_endpoint_url: str = ""
    s3_profile: str = ""
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    cache_dir: str = ""
    cache_limit_bytes: int = 0

    @classmethod
    def from_config(cls, data_cfg: Any) -> "Transport":
        if data_cfg is None:
            return cls()
        return cls(
            s3_endpoint_url=getattr(data_cfg, "s3_endpoint_url", ""),
            s3_profile=getattr(data_cfg, "s3_profile", ""),
            retries=int(getattr(data_cfg, "remote_retries", 5)),
            backoff_s=float(getattr(data_cfg, "remote_backoff_s", 1.0)),
            timeout_s=float(getattr(data_cfg, "remote_timeout_s", 60.0)),
            cache_dir=os.path.expanduser(getattr(data_cfg, "cache_dir", "") or ""),
            cache_limit_bytes=int(float(getattr(data_cfg, "cache_limit_gb", 50.0)) * 2**30),
        )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)


def url_scheme(url: str) -> str:
    """``'s3'``, ``'https'``, ``'pipe'``, ``'file'``, or ``''`` for a plain local path."""
    if url.startswith("pipe:"):
        return "pipe"
    match = URL_PATTERN.match(url)
    return match.group(1).lower() if match else ""


def is_remote(url: str) -> bool:
    return url_scheme(url) in REMOTE_SCHEMES


def filesystem(url: str, transport: Transport):
    """(fsspec filesystem, path inside it) for a remote URL; fsspec caches the instances per process."""
    import fsspec

    scheme = url_scheme(url)
    options: dict[str, Any] = {}
    if scheme in ("http", "https"):
        import aiohttp

        # No total limit (a large shard may take long); a silent server fails the attempt.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=transport.timeout_s, sock_read=transport.timeout_s)
        options["client_kwargs"] = {"timeout": timeout}
    elif scheme == "s3":
        endpoint = (transport.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            options["endpoint_url"] = endpoint
        if transport.s3_profile:
            options["profile"] = transport.s3_profile
        # Retries are ours (with the URL in the message); botocore's own would multiply them.
        options["config_kwargs"] = {"connect_timeout": transport.timeout_s, "read_timeout": transport.timeout_s,
                                    "retries": {"max_attempts": 1}}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        extra = " (pip install 'primaps-dist[gcs]')" if scheme in ("gs", "gcs") else ""
        raise MissingTransport(f"{url}: {scheme}:// needs a package that is not installed: {err}{extra}") from None


def _root_cause(err: BaseException) -> BaseException:
    """fsspec's HTTP layer reports an unreachable server as FileNotFoundError(url) *from* the connection
    error: the cause is what happened."""
    if isinstance(err, FileNotFoundError) and err.__cause__ is not None:
        return err.__cause__
    return err


def is_permanent(err: BaseException) -> bool:
    """Errors that another attempt cannot fix: not found, access denied, a bad request."""
    err = _root_cause(err)
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)):
        return True
    status = getattr(err, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def describe_error(err: BaseException) -> str:
    err = _root_cause(err)
    status = getattr(err, "status", None)
    if isinstance(err, FileNotFoundError) or status == 404:
        return "not found (404)"
    if isinstance(err, PermissionError) or status in (401, 403):
        return f"access denied ({str(err).splitlines()[0] if str(err) else status}); check the credentials"
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def with_retries(url: str, transport: Transport, action: Callable[[], Any], what: str = "read") -> Any:
    """``action()`` with exponential backoff on transient errors; RemoteUnavailable naming ``url`` at the end.
    Permanent errors (404, access denied) are raised at once, unchanged."""
    for attempt in range(transport.retries):
        try:
            return action()
        except Exception as err:
            if is_permanent(err):
                raise
            if attempt + 1 >= transport.retries:
                # The caller reports it (one line, exit 2 at start): no second line here.
                raise RemoteUnavailable(
                    f"{url}: gave up after {transport.retries} attempts to {what} ({describe_error(err)})"
                ) from None
            wait = transport.backoff(attempt)
            log.info("%s: %s failed (%s); attempt %d in %.1f s", url, what, describe_error(err), attempt + 2, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
