"""Reading WebDataset tar shards robustly: shard specs -> file lists, shard -> raw samples.

A raw sample is a dict ``{"__key__": str, "__shard__": str, "<ext>": bytes, ...}`` grouped by
WebDataset's key rule (``webdataset.tariterators.base_plus_ext``: the key is the member name up to
the first dot of its base name). Problems never raise: a shard that cannot be opened, is empty, or
is truncated yields a :class:`ShardProblem` in the stream instead, so a loader can count it and go on.
Truncation is detected even when the file ends on a member boundary (a missing end-of-archive
block), which the streaming ``tarfile`` reader otherwise reports as a clean end.
"""

from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

import braceexpand
from webdataset.tariterators import base_plus_ext

from primaps_dist.errors import ConfigError

_BLOCK = 512


@dataclass(frozen=True)
class ShardProblem:
    """Something in a shard that did not give a usable sample (counted as one skipped item)."""

    shard: str
    key: str | None
    reason: str

    def describe(self) -> str:
        where = f"{self.shard} key {self.key}" if self.key else self.shard
        return f"{where}: {self.reason}"


def _expand_one(item: str) -> list[str]:
    if os.path.isdir(item):
        return sorted(os.path.join(item, name) for name in os.listdir(item) if name.endswith(".tar"))
    if "{" in item and ".." in item:
        return list(braceexpand.braceexpand(item))
    if any(ch in item for ch in "*?["):
        return sorted(path for path in glob.glob(item) if os.path.isfile(path))
    return [item]


def resolve_shards(spec: str | list[str] | tuple[str, ...], key: str) -> list[str]:
    """Expand a shard spec into a list of existing .tar files.

    ``spec``: a directory (all ``*.tar`` in it, sorted), a glob, a brace pattern
    ``dir/{000000..000009}.tar``, a single file, or a comma-separated list of these (or a Python list).
    ``key`` names the config key in errors. Raises ConfigError when nothing matches or a named file
    is missing.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else [part.strip() for part in str(spec).split(",")]
    items = [item for item in items if item]
    if not items:
        raise ConfigError(key, "is empty; give a directory of .tar shards, a glob or a brace pattern")
    shards: list[str] = []
    for item in items:
        expanded = _expand_one(os.path.expanduser(item))
        missing = [path for path in expanded if not os.path.isfile(path)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(key, f"shard file not found: {missing[0]}{more}")
        if not expanded:
            raise ConfigError(key, f"{item!r} matches no .tar shards")
        shards.extend(expanded)
    return shards


def _archive_ends_cleanly(path: str, offset: int) -> bool:
    """True when an end-of-archive marker (a zero block) follows the last member at ``offset``."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            tail = handle.read(2 * _BLOCK)
    except OSError:
        return False
    return len(tail) >= _BLOCK and not any(tail[:_BLOCK])


def read_shard(path: str) -> Iterator[dict | ShardProblem]:
    """Yield the raw samples of one shard in file order, and ShardProblems for what is broken.

    A truncated shard yields its complete samples, then one ShardProblem (the sample being read when
    the data ended is dropped, never handed out half). An empty or unreadable shard yields one problem.
    """
    try:
        handle = open(path, "rb")
    except OSError as err:
        yield ShardProblem(path, None, f"cannot open shard ({err.strerror or err})")
        return
    pending: dict | None = None
    members = 0
    with handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|") as stream:
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
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            if members == 0 and "empty file" in str(err):
                yield ShardProblem(path, None, "empty shard (0 bytes)")
            else:
                key = pending["__key__"] if pending else None
                yield ShardProblem(path, key, f"truncated or corrupt tar ({str(err).split(' @ ')[0]})")
            return
    if not _archive_ends_cleanly(path, end_offset):
        key = pending["__key__"] if pending else None
        yield ShardProblem(path, key, "truncated tar (no end-of-archive marker)")
        return
    if pending is not None:
        yield pending
    elif members == 0:
        yield ShardProblem(path, None, "empty shard (no members)")
