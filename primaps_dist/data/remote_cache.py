"""Opening shards (:func:`open_shard`, :func:`prefetch_shards`); for remote ones a retrying stream with a background read-ahead, an optional node-local cache, prefetch.

:class:`RemoteStream` reads a shard in blocks on a background thread (at most ``READ_AHEAD_BLOCKS`` blocks ahead,
so memory stays bounded). When the connection fails or the body ends before the shard's size, it waits
(exponential backoff) and reopens at the byte it reached (an HTTP ``Range`` request; from a server that ignores
it, the bytes already handed out are read again and dropped; S3/GCS seek). After the last attempt the reader
gets a :class:`~primaps_dist.data.sources.RemoteUnavailable`, so a partly read sample is never used.

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
import queue
import subprocess
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Sequence

from primaps_dist.data.sources import (
    RemoteUnavailable,
    ShardRef,
    as_ref,
    describe_error,
    filesystem,
    is_permanent,
    is_remote,
    url_scheme,
)

log = logging.getLogger("primaps_dist.data")

BLOCK_BYTES = 1 << 20
READ_AHEAD_BLOCKS = 8
EARLY_STREAMS = 4  # streams a worker may open ahead of use when there is no cache
PREFETCH_THREADS = 2
_END = object()


class _Cancelled(Exception):
    pass


class _BadContent(Exception):
    """The server sent more bytes than the index lists: the shard changed, retrying cannot help."""


class RemoteStream:
    """The bytes of one remote shard, in order and complete (``read(size)``; a context manager)."""

    def __init__(self, ref: ShardRef):
        self.ref = ref
        self.url = ref.url
        self._blocks: queue.Queue = queue.Queue(maxsize=READ_AHEAD_BLOCKS)
        self._stop = threading.Event()
        self._handed_out = 0  # bytes queued for the reader: where a reopened read continues
        self._pending = b""
        self._failure: BaseException | None = None
        self._finished = False
        name = f"shard-read {posixpath.basename(self.url)}"
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    # -- background side -----------------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Cancelled()

    def _open_at(self, offset: int) -> tuple[Any, int, int | None]:
        """(file object, bytes to drop before ``offset`` is reached, the shard's size if known)."""
        fs, path = filesystem(self.url, self.ref.transport)
        if url_scheme(self.url) in ("http", "https"):
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            # Any non-zero size makes fsspec skip a HEAD request; block_size=0: one streaming GET.
            handle = fs.open(path, "rb", block_size=0, size=self.ref.n_bytes or 1, headers=headers)
            resumed = bool(offset) and handle.r.status == 206
            total = self.ref.n_bytes
            if total is None and not resumed:
                total = handle.r.content_length
            return handle, (0 if resumed or not offset else offset), total
        handle = fs.open(path, "rb", block_size=8 * BLOCK_BYTES)
        total = self.ref.n_bytes if self.ref.n_bytes is not None else getattr(handle, "size", None)
        if offset:
            handle.seek(offset)
        return handle, 0, total

    def _read_once(self) -> int | None:
        """Queue the bytes from ``_handed_out`` until this connection's body ends; returns the shard's size."""
        handle, drop, total = self._open_at(self._handed_out)
        try:
            while drop:
                dropped = handle.read(min(drop, BLOCK_BYTES))
                if not dropped:
                    raise ConnectionError("the body ended before the resume point")
                drop -= len(dropped)
            while True:
                data = handle.read(BLOCK_BYTES)
                if not data:
                    return total
                if total is not None and self._handed_out + len(data) > total:
                    raise _BadContent(f"the shard is larger than the {total} bytes listed for it")
                self._put(data)
                self._handed_out += len(data)
        finally:
            handle.close()

    def _pump(self) -> None:
        transport = self.ref.transport
        failures = 0
        try:
            while True:
                start = self._handed_out
                try:
                    total = self._read_once()
                    if total is None or self._handed_out == total:
                        self._put(_END)
                        return
                    raise ConnectionError(f"the body ended at byte {self._handed_out} of {total}")
                except _Cancelled:
                    raise
                except Exception as err:
                    if isinstance(err, _BadContent) or is_permanent(err):
                        self._put(err if isinstance(err, OSError) else OSError(f"{self.url}: {describe_error(err)}"))
                        return
                    failures = 0 if self._handed_out > start else failures + 1
                    if failures >= transport.retries:
                        message = (f"{self.url}: gave up after {transport.retries} attempts at byte "
                                   f"{self._handed_out} ({describe_error(err)})")
                        log.warning("%s", message)
                        self._put(RemoteUnavailable(message))
                        return
                    wait = transport.backoff(failures - 1)
                    log.info("%s: read failed at byte %d (%s); retrying in %.1f s", self.url, self._handed_out,
                             describe_error(err), wait)
                    if self._stop.wait(wait):
                        return
        except _Cancelled:
            return

    # -- reader side ---------------------------------------------------------------------------------------

    def _next_block(self) -> bool:
        """Move the next queued block into ``_pending``; False at the end or on failure."""
        item = self._blocks.get()
        if item is _END:
            self._finished = True
            return False
        if isinstance(item, BaseException):
            self._finished = True
            self._failure = item
            return False
        self._pending = item
        return True

    def read(self, size: int = -1) -> bytes:
        chunks: list[bytes] = []
        have = 0
        while (size < 0 or have < size) and (self._pending or (not self._finished and self._next_block())):
            take = self._pending if size < 0 else self._pending[: size - have]
            self._pending = self._pending[len(take):]
            chunks.append(take)
            have += len(take)
        if not have and self._failure is not None:
            raise self._failure
        return b"".join(chunks)

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._blocks.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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

