"""Where shards come from: shard specs -> :class:`ShardRef` lists, checked at start.

A spec item (``data.train_shards`` / ``data.val_shards``; items separated by commas outside braces) is

- a local directory (its ``*.tar``), a glob, a file, or ``file://`` of any of these;
- a remote dataset folder ``https://host/data/``, ``s3://bucket/prefix/`` or ``gs://bucket/prefix/``, listed by
  its ``index.json`` (written by ``make-shards``: shard names, sample counts, byte sizes), since an HTTP server
  cannot be listed; or that ``.../index.json`` itself;
- remote ``.tar`` URLs, globs on S3/GCS (``s3://bucket/train-*.tar``);
- ``pipe:COMMAND`` (the command writes one shard to stdout, e.g. ``pipe:curl -s https://host/000000.tar``);
- brace patterns in any of these: ``s3://bucket/{000000..000099}.tar``.

Opening a ShardRef (with retries, read-ahead, cache, prefetch) is :mod:`primaps_dist.data.remote_cache`'s job,
the transport settings and file systems :mod:`primaps_dist.data.transport`'s. Remote reads retry with exponential backoff
(``data.remote_retries`` attempts, first wait ``data.remote_backoff_s``); a stream cut mid-shard resumes at the
byte it reached, and a stream that ends before the shard's size is an error, never a short shard. After the
last attempt one line names the URL; the reader sees an ``OSError`` and counts the shard like a corrupt local one.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from primaps_dist.data.transport import (
    REMOTE_SCHEMES,
    URL_PATTERN,
    MissingTransport,
    RemoteUnavailable,
    Transport,
    describe_error,
    filesystem,
    url_scheme,
    with_retries,
)
from primaps_dist.errors import ConfigError, UserError

log = logging.getLogger("primaps_dist.data")

INDEX_NAME = "index.json"
_GLOB_CHARS = "*?["


class ShardRef(str):
    """One shard: its URL or local path (a ``str``, so shard lists stay lists of strings) and what the dataset
    index says about it: ``n_samples`` and ``n_bytes`` (None when unknown), plus the :class:`Transport`."""

    n_samples: int | None
    n_bytes: int | None
    transport: Transport

    def __new__(cls, url: str, n_samples: int | None = None, n_bytes: int | None = None,
                transport: Transport | None = None) -> "ShardRef":
        ref = super().__new__(cls, url)
        ref.n_samples = n_samples
        ref.n_bytes = n_bytes
        ref.transport = transport or Transport()
        return ref

    @property
    def url(self) -> str:
        return str.__str__(self)

    def __reduce__(self):
        return (ShardRef, (self.url, self.n_samples, self.n_bytes, self.transport))


def as_ref(shard: str) -> ShardRef:
    return shard if isinstance(shard, ShardRef) else ShardRef(shard)


# ------------------------------------------------------------------------------------------ listing


def split_spec(spec: str | Sequence[str]) -> list[str]:
    """Items of a spec: a list as given, or a string split at commas outside braces (``{a,b}`` stays whole)."""
    if isinstance(spec, (list, tuple)):
        return [str(item).strip() for item in spec if str(item).strip()]
    items, depth, current = [], 0, []
    for char in str(spec):
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def expand_braces(item: str) -> list[str]:
    if "{" not in item:
        return [item]
    import braceexpand

    return list(braceexpand.braceexpand(item))


def _index_entries(index: Any, where: str, key: str) -> list[tuple[str, int | None, int | None]]:
    """(shard name, samples, bytes) from a make-shards index.json."""
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not shards:
        raise ConfigError(key, f"{where} is not a make-shards index (no 'shards' list)")
    entries = []
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(key, f"{where}: every entry of 'shards' needs a 'name'")
        samples, size = entry.get("num_samples"), entry.get("num_bytes")
        if not all(value is None or (isinstance(value, int) and value >= 0) for value in (samples, size)):
            raise ConfigError(key, f"{where}: shard {entry['name']!r} has a num_samples or num_bytes that is not "
                                   f"a count")
        entries.append((entry["name"], samples, size))
    return entries


def _read_local_index(directory: str) -> dict[str, tuple[int | None, int | None]]:
    """name -> (samples, bytes) from ``directory/index.json`` when there is a readable one, else {}."""
    try:
        with open(os.path.join(directory, INDEX_NAME)) as handle:
            entries = _index_entries(json.load(handle), directory, "")
    except (OSError, ValueError, ConfigError):
        return {}
    return {name: (samples, size) for name, samples, size in entries}


def _local_refs(item: str, key: str, transport: Transport) -> list[ShardRef]:
    import glob

    if os.path.isdir(item):
        paths = sorted(os.path.join(item, name) for name in os.listdir(item) if name.endswith(".tar"))
    elif any(ch in item for ch in _GLOB_CHARS):
        paths = sorted(path for path in glob.glob(item) if os.path.isfile(path))
    else:
        paths = [item]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(key, f"shard file not found: {missing[0]}{more}")
    indexes: dict[str, dict] = {}
    refs = []
    for path in paths:
        folder = os.path.dirname(path) or "."
        if folder not in indexes:
            indexes[folder] = _read_local_index(folder)
        samples, _ = indexes[folder].get(os.path.basename(path), (None, None))
        refs.append(ShardRef(path, samples, os.path.getsize(path), transport))
    return refs


def _remote_access_error(key: str, url: str, err: BaseException) -> ConfigError:
    return ConfigError(key, f"{url}: {describe_error(err)}")


def _remote_index_refs(index_url: str, key: str, transport: Transport) -> list[ShardRef]:
    fs, path = filesystem(index_url, transport)

    def read_index() -> bytes:
        return fs.cat_file(path)

    try:
        raw = with_retries(index_url, transport, read_index, "read the dataset index")
    except RemoteUnavailable as err:
        raise UserError(f"{key}: {err}") from None
    except Exception as err:
        if describe_error(err).startswith("not found"):
            raise ConfigError(key, f"{index_url}: not found (404); a remote folder needs the {INDEX_NAME} "
                                   f"written by make-shards, or name the .tar URLs") from None
        raise _remote_access_error(key, index_url, err) from None
    try:
        index = json.loads(raw)
    except ValueError as err:
        raise ConfigError(key, f"{index_url} is not JSON ({err})") from None
    base = index_url.rsplit("/", 1)[0]
    return [ShardRef(f"{base}/{name}", samples, size, transport)
            for name, samples, size in _index_entries(index, index_url, key)]


def _neighbour_index_counts(urls: Sequence[str], transport: Transport) -> dict[str, int]:
    """url -> sample count from an ``index.json`` in the shards' folder, where there is one (else nothing: the
    loader then counts a shard's samples by reading it once)."""
    counts: dict[str, int] = {}
    for folder in sorted({url.rsplit("/", 1)[0] for url in urls}):
        fs, path = filesystem(f"{folder}/{INDEX_NAME}", transport)
        try:
            index = json.loads(fs.cat_file(path))
            entries = _index_entries(index, folder, "")
        except Exception:  # no index, or not one of ours: the shards themselves were checked
            continue
        counts.update({f"{folder}/{name}": samples for name, samples, _ in entries if samples is not None})
    return counts


def _remote_file_refs(urls: Sequence[str], key: str, transport: Transport) -> list[ShardRef]:
    """Explicit remote .tar URLs or globs: listed (globs) and checked (size) at once, in parallel."""
    fs, _ = filesystem(urls[0], transport)
    protocol = url_scheme(urls[0])

    def full_url(path: str) -> str:
        return path if URL_PATTERN.match(path) else f"{protocol}://{path}"

    expanded: list[str] = []
    for url in urls:
        if any(ch in url.split("://", 1)[1] for ch in _GLOB_CHARS) and protocol not in ("http", "https"):
            try:
                found = sorted(with_retries(url, transport, lambda: fs.glob(filesystem(url, transport)[1]), "list"))
            except RemoteUnavailable as err:
                raise UserError(f"{key}: {err}") from None
            except Exception as err:
                raise _remote_access_error(key, url, err) from None
            if not found:
                raise ConfigError(key, f"{url!r} matches no .tar shards")
            expanded.extend(full_url(path) for path in found)
        else:
            expanded.append(url)

    def size_of(url: str) -> int | None:
        info = with_retries(url, transport, lambda: fs.info(filesystem(url, transport)[1]), "check the shard")
        return info.get("size")

    counts = _neighbour_index_counts(expanded, transport)

    with ThreadPoolExecutor(max_workers=min(16, len(expanded))) as pool:
        futures = [pool.submit(size_of, url) for url in expanded]
        refs, failures = [], []
        for url, future in zip(expanded, futures):
            try:
                refs.append(ShardRef(url, counts.get(url), future.result(), transport))
            except Exception as err:
                failures.append((url, err))
    if failures:
        url, err = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        if isinstance(err, RemoteUnavailable):
            raise UserError(f"{key}: {err}{more}")
        raise ConfigError(key, f"{url}: {describe_error(err)}{more}")
    return refs


def _pipe_refs(item: str, key: str, transport: Transport) -> list[ShardRef]:
    refs = []
    for url in expand_braces(item):
        command = url[len("pipe:"):].strip()
        try:
            program = shlex.split(command)[0] if command else ""
        except ValueError as err:
            raise ConfigError(key, f"{url!r}: cannot parse the command ({err})") from None
        if not program or shutil.which(program) is None:
            raise ConfigError(key, f"{url!r}: command {program!r} not found")
        refs.append(ShardRef(url, None, None, transport))
    return refs


def _is_remote_folder(url: str) -> bool:
    """``https://host/data/`` or ``s3://bucket/prefix`` (no file extension, no glob): listed by its index."""
    if url.endswith("/"):
        return True
    name = posixpath.basename(url.split("://", 1)[1])
    return "." not in name and not any(ch in name for ch in _GLOB_CHARS)


def _remote_refs(urls: Sequence[str], key: str, transport: Transport) -> list[ShardRef]:
    found = []
    for url in urls:
        if url.endswith(INDEX_NAME):
            found.extend(_remote_index_refs(url, key, transport))
        elif _is_remote_folder(url):
            found.extend(_remote_index_refs(url.rstrip("/") + "/" + INDEX_NAME, key, transport))
    files = [url for url in urls if not url.endswith(INDEX_NAME) and not _is_remote_folder(url)]
    if files:
        found.extend(_remote_file_refs(files, key, transport))
    return found


def resolve_shards(spec: str | Sequence[str], data_cfg: Any = None, key: str = "data.train_shards") -> list[ShardRef]:
    """Expand a shard spec (see the module docstring) into ShardRefs, checking that each exists or is listed.

    ``data_cfg``: the ``data`` config section (transport keys; None = defaults and ``AWS_*`` variables).
    ``key`` names the config key in errors. Raises ConfigError (one line naming ``key`` and the path or URL)
    when nothing matches, a file or URL is missing or access is denied, and UserError when a server does not
    answer after the retries.
    """
    transport = Transport.from_config(data_cfg)
    items = split_spec(spec)
    if not items:
        raise ConfigError(key, "is empty; give a directory of .tar shards, a glob, a brace pattern or a URL")
    refs: list[ShardRef] = []
    for item in items:
        scheme = url_scheme(item)
        if scheme == "pipe":
            found = _pipe_refs(item, key, transport)
        elif scheme in ("", "file"):
            local = item[len("file://"):] if scheme == "file" else item
            found = [ref for path in _expand_local(os.path.expanduser(local)) for ref in _local_refs(path, key, transport)]
        elif scheme in REMOTE_SCHEMES:
            try:
                found = _remote_refs(expand_braces(item), key, transport)
            except MissingTransport as err:
                raise ConfigError(key, str(err)) from None
        else:
            raise ConfigError(key, f"{item!r}: unsupported scheme {scheme}:// (use a path, file://, http(s)://, "
                                   f"s3://, gs:// or pipe:)")
        if not found:
            raise ConfigError(key, f"{item!r} matches no .tar shards")
        refs.extend(found)
    return refs


def _expand_local(item: str) -> list[str]:
    """Brace patterns in local items (a path containing braces that exists as such stays whole)."""
    if "{" in item and not os.path.exists(item):
        return expand_braces(item)
    return [item]


def check_shard_sources(data_cfg: Any) -> None:
    """Resolve ``data.train_shards`` and (when set) ``data.val_shards`` now: one line naming the key at start,
    not after the backbone loaded or in the final evaluation."""
    resolve_shards(data_cfg.train_shards, data_cfg, "data.train_shards")
    if data_cfg.val_shards:
        resolve_shards(data_cfg.val_shards, data_cfg, "data.val_shards")
