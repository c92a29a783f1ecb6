"""Opening shards (:func:`open_shard`, :func:`prefetch_shards`): local files, ``pipe:`` commands, and remote
shards as a :class:`~primaps_dist.data.remote_stream.RemoteStream` or from an optional node-local cache.

:class:`ShardCache` (``data.cache_dir``): whole shards, downloaded to a hidden temporary file and renamed into
place when complete and of the expected size, so no reader ever sees a partial file. A per-shard ``flock``
makes one process of a node download a shard while the others wait for it. Beyond ``data.cache_limit_gb`` the
least recently used shards (file mtime, touched on every use) are deleted; a reader that already opened one
keeps reading it (POSIX unlink semantics).

:func:`prefetch`: a loader worker names the shards it reads next; they download into the cache in the
background, or without a cache their streams open early and fill their read-ahead.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import posixpath
import subprocess
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Sequence

from primaps_dist.data.remote_stream import BLOCK_BYTES, RemoteStream
from primaps_dist.data.sources import ShardRef, as_ref
from primaps_dist.data.transport import describe_error, is_remote, url_scheme

log = logging.getLogger("primaps_dist.data")

EARLY_STREAMS = 4  # streams a worker may open ahead of use when there is no cache
PREFETCH_THREADS = 2


class PipeStream:
    """stdout of ``pipe:COMMAND``; a non-zero exit status is an OSError at the end, never a short shard."""

    def __init__(self, url: str):
        self.url = url
        self._process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)

    def read(self, size: int = -1) -> bytes:
        data = self._process.stdout.read(size)
        if not data or size < 0:
            status = self._process.wait()
            if status != 0:
                raise OSError(f"{self.url}: command exited with status {status}")
        return data

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.stdout.close()
        self._process.wait()

    def __enter__(self) -> "PipeStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ cache


class ShardCache:
    """Complete remote shards in a local folder, shared by the processes of a node, size-limited (LRU)."""

    def __init__(self, directory: str, limit_bytes: int):
        self.directory = directory
        self.limit_bytes = limit_bytes
        os.makedirs(os.path.join(directory, ".locks"), exist_ok=True)

    def path_for(self, url: str) -> str:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{digest}-{posixpath.basename(url)}")

    def _open_cached(self, path: str) -> BinaryIO | None:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass  # evicted meanwhile: the open handle still reads it
        return handle

    def open(self, ref: ShardRef) -> BinaryIO:
        """The cached copy of ``ref``, downloaded first when missing (errors as for :class:`RemoteStream`)."""
        final = self.path_for(ref.url)
        handle = self._open_cached(final)
        if handle is not None:
            return handle
        lock_path = os.path.join(self.directory, ".locks", os.path.basename(final) + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process of the node may be downloading it: wait
            try:
                handle = self._open_cached(final)
                if handle is None:
                    self._download(ref, final)
                    handle = open(final, "rb")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict(keep=final)
        return handle

    def _download(self, ref: ShardRef, final: str) -> None:
        temp = os.path.join(self.directory, f".{os.path.basename(final)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with RemoteStream(ref) as stream, open(temp, "wb") as out:
                while True:
                    block = stream.read(BLOCK_BYTES)
                    if not block:
                        break
                    out.write(block)
            os.replace(temp, final)  # complete (RemoteStream checked the size): now visible under its name
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def evict(self, keep: str = "") -> None:
        """Delete least recently used shards until the folder is within the limit (never ``keep``)."""
        entries = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(".") or path == keep:
                continue
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries) + (os.path.getsize(keep) if keep and os.path.exists(keep) else 0)
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size


# ------------------------------------------------------------------------------------------ per-process state


class _ProcessState:
    """Caches, the prefetch pool and early streams of one process (a forked worker starts its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.caches: dict[tuple[str, int], ShardCache] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[str, Any] = {}
        self.early: OrderedDict[str, RemoteStream] = OrderedDict()
        self.lock = threading.Lock()


_state: _ProcessState | None = None


def _process_state() -> _ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():
        _state = _ProcessState()
    return _state


def _cache_for(ref: ShardRef) -> ShardCache | None:
    transport = ref.transport
    if not transport.cache_dir:
        return None
    state = _process_state()
    key = (transport.cache_dir, transport.cache_limit_bytes)
    with state.lock:
        if key not in state.caches:
            state.caches[key] = ShardCache(transport.cache_dir, transport.cache_limit_bytes)
        return state.caches[key]


def open_remote(ref: ShardRef) -> BinaryIO | RemoteStream:
    """The shard from the cache (``data.cache_dir``), from a prefetched stream, or a new stream."""
    cache = _cache_for(ref)
    if cache is not None:
        state = _process_state()
        with state.lock:
            pending = state.pending.pop(ref.url, None)
        if pending is not None:
            try:
                pending.result()  # the prefetch's own error, if any, is retried by cache.open below
            except Exception:
                pass
        return cache.open(ref)
    state = _process_state()
    with state.lock:
        stream = state.early.pop(ref.url, None)
    return stream if stream is not None else RemoteStream(ref)


def _prefetch_into_cache(cache: ShardCache, ref: ShardRef) -> None:
    try:
        cache.open(ref).close()
    except Exception as err:  # the reader opens it again and reports the problem where it is counted
        log.info("prefetch of %s failed (%s)", ref.url, describe_error(err))


def prefetch(refs: list[ShardRef]) -> None:
    """Start fetching ``refs`` in the background (see the module docstring)."""
    state = _process_state()
    for ref in refs:
        cache = _cache_for(ref)
        with state.lock:
            if cache is not None:
                if ref.url in state.pending or os.path.exists(cache.path_for(ref.url)):
                    continue
                if state.pool is None:
                    state.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="shard-prefetch")
                state.pending[ref.url] = state.pool.submit(_prefetch_into_cache, cache, ref)
            elif ref.url not in state.early:
                state.early[ref.url] = RemoteStream(ref)
                while len(state.early) > EARLY_STREAMS:
                    state.early.popitem(last=False)[1].close()


def open_shard(shard: str) -> BinaryIO:
    """A binary stream of the shard's bytes (``read(size)``; use it as a context manager).

    Local files open directly; ``pipe:`` runs the command; remote shards come from ``data.cache_dir`` when it is
    set (downloaded whole, checked, renamed into place), else stream with retries and a background read-ahead.
    Raises FileNotFoundError / PermissionError (at once) or RemoteUnavailable (after the retries).
    """
    ref = as_ref(shard)
    scheme = url_scheme(ref.url)
    if scheme == "":
        return open(ref.url, "rb")
    if scheme == "file":
        return open(ref.url[len("file://"):], "rb")
    if scheme == "pipe":
        return PipeStream(ref.url)
    return open_remote(ref)


def prefetch_shards(shards: Sequence[str]) -> None:
    """Start fetching the remote shards this worker reads next (no-op for local and pipe: shards)."""
    remote = [as_ref(shard) for shard in shards if is_remote(str(shard))]
    if remote:
        prefetch(remote)


def clear_process_state() -> None:
    """Close early streams and forget caches (tests; a worker's state otherwise ends with the process)."""
    global _state
    if _state is not None and _state.pid == os.getpid():
        for stream in _state.early.values():
            stream.close()
        if _state.pool is not None:
            _state.pool.shutdown(wait=True)
    _state = None

