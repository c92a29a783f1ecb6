"""Reading WebDataset tar shards robustly: shard specs -> shard lists, shard -> raw samples.

Where the bytes come from (local files, HTTP, S3, ``pipe:``) is :mod:`primaps_dist.data.sources`' job.

A raw sample is a dict ``{"__key__": str, "__shard__": str, "<ext>": bytes, ...}`` grouped by
WebDataset's key rule (``webdataset.tariterators.base_plus_ext``: the key is the member name up to
the first dot of its base name). Problems never raise: a shard that cannot be opened, is empty, or
is truncated yields a :class:`ShardProblem` in the stream instead, so a loader can count it and go on.
Truncation is detected even when the file ends on a member boundary (a missing end-of-archive
block), which the streaming ``tarfile`` reader otherwise reports as a clean end.
"""

from __future__ import annotations

import tarfile
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from primaps_dist.data import remote_cache, sources, transport
from primaps_dist.data.sources import ShardRef

_BLOCK = 512
_TAIL_BYTES = 64 * 1024  # more than tarfile reads ahead of the member it parses (its 10 KiB record)


@dataclass(frozen=True)
class ShardProblem:
    """Something in a shard that did not give a usable sample (counted as one skipped item)."""

    shard: str
    key: str | None
    reason: str

    def describe(self) -> str:
        where = f"{self.shard} key {self.key}" if self.key else self.shard
        return f"{where}: {self.reason}"


def resolve_shards(spec: str | list[str] | tuple[str, ...], key: str, data_cfg=None) -> list[ShardRef]:
    """Expand a shard spec into the shards it names, checked to exist (see :mod:`.sources`).

    ``spec``: a directory (all ``*.tar`` in it, sorted), a glob, a brace pattern
    ``dir/{000000..000009}.tar``, a single file, a remote folder with an ``index.json``, remote URLs,
    ``pipe:COMMAND``, or a comma-separated list of these (or a Python list). ``key`` names the config key in
    errors; ``data_cfg`` (the ``data`` section) gives the remote transport settings. The result is a list of
    :class:`ShardRef` (strings: the paths or URLs). Raises ConfigError when nothing matches or a named file
    is missing.
    """
    return sources.resolve_shards(spec, data_cfg, key)


class _TailKeepingReader:
    """Passes ``read`` through, counting bytes and keeping the last ``_TAIL_BYTES`` of them, so that the
    end-of-archive block after the last member can be checked on any stream (not only a seekable file)."""

    def __init__(self, handle):
        self._handle = handle
        self.position = 0
        self._recent: deque[bytes] = deque()  # the last reads, at least _TAIL_BYTES together (no copying)
        self._recent_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.position += len(data)
        if data:
            self._recent.append(data)
            self._recent_bytes += len(data)
            while self._recent_bytes - len(self._recent[0]) >= _TAIL_BYTES:
                self._recent_bytes -= len(self._recent.popleft())
        return data

    def zero_block_at(self, offset: int) -> bool:
        """True when a zero block (end-of-archive marker) starts at byte ``offset``."""
        while self.position < offset + _BLOCK:
            if not self.read(offset + _BLOCK - self.position):
                return False
        tail = b"".join(self._recent)
        start = offset - (self.position - len(tail))
        return start >= 0 and not any(tail[start : start + _BLOCK])

    def drain(self) -> None:
        """Read to the end: a stream's own checks (a remote shard's size, a ``pipe:`` command's exit status)
        run there, after the last member."""
        while self._handle.read(1 << 16):
            pass


def read_shard(path: str) -> Iterator[dict | ShardProblem]:
    """Yield the raw samples of one shard (a local path, URL or ShardRef) in file order, and ShardProblems for
    what is broken.

    A truncated shard yields its complete samples, then one ShardProblem (the sample being read when
    the data ended is dropped, never handed out half). An empty or unreadable shard, a missing remote one
    (404) or one whose server failed on every retry yields one problem.
    """
    try:
        handle = remote_cache.open_shard(path)
    except OSError as err:
        yield ShardProblem(path, None, f"cannot open shard ({err.strerror or transport.describe_error(err)})")
        return
    pending: dict | None = None
    members = 0
    with handle:
        reader = _TailKeepingReader(handle)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as stream:
                for info in stream:
                    if not info.isreg():
                        continue
                    prefix, suffix = base_plus_ext(info.name)
                    data = stream.extractfile(info).read()
                    stream.members = []  # a streaming TarFile would otherwise keep every header
                    members += 1
                    if prefix is None:
                        yield ShardProblem(path, info.name, "member name has no extension; ignored")
                        continue
                    suffix = suffix.lower()
                    if pending is not None and prefix != pending["__key__"]:
                        yield pending
                        pending = None
                    if pending is None:
                        pending = {"__key__": prefix, "__shard__": path}
                    if suffix in pending:
                        yield ShardProblem(path, prefix, f"duplicate member {info.name}; sample dropped")
                        pending = None
                        continue
                    pending[suffix] = data
                end_offset = stream.offset
            ends_cleanly = reader.zero_block_at(end_offset)
            reader.drain()
        except (FileNotFoundError, PermissionError) as err:
            reason = err.strerror or transport.describe_error(err)
            if members == 0:
                yield ShardProblem(path, None, f"cannot open shard ({reason})")
            else:
                yield ShardProblem(path, pending["__key__"] if pending else None, f"read failed ({reason})")
            return
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            if members == 0 and "empty file" in str(err):
                yield ShardProblem(path, None, "empty shard (0 bytes)")
            else:
                key = pending["__key__"] if pending else None
                yield ShardProblem(path, key, f"truncated or corrupt tar ({str(err).split(' @ ')[0]})")
            return
    if not ends_cleanly:
        key = pending["__key__"] if pending else None
        yield ShardProblem(path, key, "truncated tar (no end-of-archive marker)")
        return
    if pending is not None:
        yield pending
    elif members == 0:
        yield ShardProblem(path, None, "empty shard (no members)")
