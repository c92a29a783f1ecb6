"""A remote shard as a stream: retries, resume at the byte reached, a bounded background read-ahead.

:class:`RemoteStream` reads a shard in blocks on a background thread (at most ``READ_AHEAD_BLOCKS`` blocks ahead,
so memory stays bounded). When the connection fails or the body ends before the shard's size, it waits
(exponential backoff) and reopens at the byte it reached (an HTTP ``Range`` request; from a server that ignores
it, the bytes already handed out are read again and dropped; S3/GCS seek). After the last attempt the reader
gets a :class:`~primaps_dist.data.transport.RemoteUnavailable`, so a partly read sample is never used.
"""

from __future__ import annotations

import logging
import posixpath
import queue
import threading
from typing import Any

from primaps_dist.data.sources import ShardRef
from primaps_dist.data.transport import RemoteUnavailable, describe_error, filesystem, is_permanent, url_scheme

log = logging.getLogger("primaps_dist.data")

BLOCK_BYTES = 1 << 20
READ_AHEAD_BLOCKS = 8
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
        self._size: int | None = ref.n_bytes
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
        # The size seen on a first, whole response still holds for a resumed one (a 206 tells only the rest).
        self._size = total = total if total is not None else self._size
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
