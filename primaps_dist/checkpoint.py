"""Atomic checkpoints that a crash cannot corrupt, and the checks that make resuming safe.

Layout (torchtitan style)::

    <output_dir>/checkpoints/
        step_000000120/checkpoint.pt     torch.save'd payload (tensors and plain data only)
        step_000000120/...               optional extra files (e.g. a DeepSpeed engine folder)
        step_000000120/COMPLETE          written last: a folder counts only when it has this marker
        latest -> step_000000120         convenience pointer (symlink; latest.txt where symlinks fail)

A save writes everything into ``step_<N>.tmp-<pid>`` next to the final folder, fsyncs the files, writes
the marker, then renames the folder into place (one atomic rename on POSIX file systems). A crash at any
point leaves the previous checkpoint untouched; the partial folder is ignored by :func:`find_latest` and
deleted by the next save. :func:`find_latest` scans the folders, so a stale or dangling ``latest``
pointer cannot break a resume.

Payloads are loaded with ``torch.load(weights_only=True)`` only: a file carrying pickled code is refused.
:func:`save_checkpoint` checks that the payload holds only tensors, numbers, strings, booleans, None,
lists, tuples and dicts, so every checkpoint it writes can be loaded that way.

Ranks: :func:`save_checkpoint` is the one save path. One process is world size 1; with a process group every
rank calls it (every rank reaches every collective, a failure anywhere raises on all ranks) and rank 0 writes.
What a payload holds is :class:`primaps_dist.train_state.TrainState`'s business; this module only needs
``prototypes``, ``step`` and ``config``.

The module stays whole (~420 lines) on purpose: the folder layout, the collective atomic save and the loader
are one on-disk protocol (the ``COMPLETE`` marker, the ``.tmp-``/``.old-`` folders and the ``latest`` pointer
that the save writes are what :func:`find_latest` and :func:`load_checkpoint` read), best read in one place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from primaps_dist.errors import UserError

logger = logging.getLogger("primaps_dist.checkpoint")

CHECKPOINTS_DIR_NAME = "checkpoints"
CHECKPOINT_FILE = "checkpoint.pt"
COMPLETE_MARKER = "COMPLETE"
LATEST_NAME = "latest"
LATEST_TEXT_NAME = "latest.txt"
REQUIRED_KEYS = ("prototypes", "step", "config")

_STEP_DIR = re.compile(r"^step_(\d{9,})$")
_LEFTOVER_DIR = re.compile(r"^step_\d{9,}\.(tmp|old)-\d+$")
_PLAIN_TYPES = (int, float, bool, str, bytes, type(None))


# ----------------------------------------------------------------------------------------------- paths


def step_dir_name(step: int) -> str:
    """``step_000000120`` for step 120 (zero padded, so names sort by step)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{int(step):09d}"


def is_complete(step_dir: str | os.PathLike) -> bool:
    """True when ``step_dir`` holds a checkpoint file and the COMPLETE marker."""
    step_dir = Path(step_dir)
    return (step_dir / COMPLETE_MARKER).is_file() and (step_dir / CHECKPOINT_FILE).is_file()


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``checkpoint_dir`` as ``(step, folder)``, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for entry in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and not entry.is_symlink() and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``checkpoint_dir`` (by step), or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def ensure_writable_dir(path: str | os.PathLike, key: str) -> Path:
    """Create ``path`` if needed and prove it is writable by writing a file; else UserError naming ``key``.

    Permission bits alone say nothing for root (who ignores them) or for read-only mounts, hence the real
    write. Call it early (before hours of training) on the output directory.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{key}: {path} cannot be a directory (it or a parent is a file)") from None
    except OSError as err:
        raise UserError(f"{key}: cannot create directory {path} ({err.strerror or err})") from None
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{key}: directory {path} is not writable (permission denied)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{key}: directory {path} is not writable ({err.strerror or err})") from None
    return path


# ----------------------------------------------------------------------------------------------- saving


def check_payload(value: Any, where: str = "payload") -> None:
    """Raise ValueError naming the first entry ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_payload(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):  # dict and OrderedDict (state_dicts) load with weights_only
        for key, item in value.items():
            if type(key) not in (str, int):
                raise ValueError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_payload(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints hold only tensors, "
        "numbers, strings, booleans, None, lists, tuples and dicts (convert arrays with torch.from_numpy)"
    )


def _fsync_dir(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(handle)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _remove_leftovers(checkpoint_dir: Path, keep: Path | None = None) -> None:
    """Delete partial folders of interrupted saves (``.tmp-<pid>``) and replaced ones (``.old-<pid>``)."""
    for entry in checkpoint_dir.iterdir():
        if _LEFTOVER_DIR.match(entry.name) and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _write_payload(tmp_dir: Path, step: int, payload: Mapping[str, Any],
                   extra_writer: Callable[[Path], None] | None) -> None:
    with open(tmp_dir / CHECKPOINT_FILE, "wb") as handle:
        torch.save(dict(payload), handle)
        handle.flush()
        os.fsync(handle.fileno())
    if extra_writer is not None:
        extra_writer(tmp_dir)
    _fsync_tree(tmp_dir)
    marker = {"step": int(step), "time": time.time(), "files": sorted(
        str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file())}
    with open(tmp_dir / COMPLETE_MARKER, "w") as handle:
        json.dump(marker, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp_dir)


def _commit(checkpoint_dir: Path, tmp_dir: Path, final: Path) -> None:
    """Rename the finished temp folder into place (moving an existing folder of the same step aside)."""
    replaced = None
    if final.exists():
        replaced = checkpoint_dir / f"{final.name}.old-{os.getpid()}"
        os.rename(final, replaced)
    os.rename(tmp_dir, final)
    _fsync_dir(checkpoint_dir)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _point_latest(checkpoint_dir, final)


def _point_latest(checkpoint_dir: Path, final: Path) -> None:
    link = checkpoint_dir / LATEST_NAME
    tmp_link = checkpoint_dir / f".{LATEST_NAME}.tmp-{os.getpid()}"
    try:
        tmp_link.unlink(missing_ok=True)
        os.symlink(final.name, tmp_link)
        os.replace(tmp_link, link)
    except OSError:  # no symlinks on this file system: a text pointer instead
        tmp_text = checkpoint_dir / f".{LATEST_TEXT_NAME}.tmp-{os.getpid()}"
        tmp_text.write_text(final.name + "\n")
        os.replace(tmp_text, checkpoint_dir / LATEST_TEXT_NAME)


def _apply_retention(checkpoint_dir: Path, keep: int, newest: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints (never ``newest``)."""
    complete = list_checkpoints(checkpoint_dir)
    for _, folder in complete[: max(0, len(complete) - keep)]:
        if folder == newest:
            continue
        # Marker first: a crash mid-delete leaves an incomplete (ignored) folder, never a damaged "complete" one.
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _check_required(payload: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    prototypes = payload["prototypes"]
    if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 or not prototypes.is_floating_point():
        raise ValueError("checkpoint payload 'prototypes' must be a float tensor [K, C]")


class _Ranks:
    """The ranks taking part in one save: a process group, or this process alone (world size 1)."""

    def __init__(self, group: Any):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1
        self.rank = 0 if self.single else dist.get_rank(group)
        self.is_master = self.rank == 0  # rank 0 of the group writes the payload
        self.device = torch.device("cpu")
        if not self.single and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def rank0_pid(self) -> int:
        """Rank 0's process id (it names the temporary folder; every rank must agree on the name)."""
        if self.single:
            return os.getpid()
        pid = torch.tensor([os.getpid() if self.is_master else 0], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(pid, op=self.dist.ReduceOp.SUM, group=self.group)
        return int(pid.item())

    def agree(self, local_error: BaseException | None, step: int, what: str) -> None:
        """Raise on every rank when any rank failed: the original error where it happened, else RuntimeError."""
        failed_elsewhere = False
        if not self.single:
            flag = torch.tensor([1.0 if local_error is not None else 0.0], device=self.device)
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX, group=self.group)
            failed_elsewhere = flag.item() > 0
        if local_error is not None:
            raise local_error
        if failed_elsewhere:
            raise RuntimeError(f"checkpoint save of step {step} failed on another rank while {what}")


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    payload: Mapping[str, Any] | None,
    *,
    keep: int,
    extra_writer: Callable[[Path], None] | None = None,
    all_ranks_writer: Callable[[Path], None] | None = None,
    group: Any = None,
) -> Path:
    """Write ``payload`` atomically as ``<checkpoint_dir>/step_<step>/``; returns that folder.

    The one save path, for one process (world size 1) and for a process group alike. Collective when
    torch.distributed is initialised with several ranks: call it on EVERY rank; rank 0 writes ``payload``
    (other ranks may pass None). ``payload`` must hold at least ``prototypes`` (float tensor ``[K, C]``),
    ``step`` and ``config`` (the trainer writes :meth:`primaps_dist.train_state.TrainState.to_payload`).

    ``all_ranks_writer(tmp_dir)`` runs on every rank after the folder is created (sharded state such as
    DeepSpeed ZeRO; needs a file system shared by all ranks); ``extra_writer(tmp_dir)`` runs on rank 0 after
    ``checkpoint.pt`` is written. Both may add files before the folder is marked complete. Keeps the newest
    ``keep`` checkpoints. A failure on any rank raises on every rank (the original error where it happened,
    RuntimeError elsewhere), so none waits forever in a later collective, and nothing is committed. Raises
    ValueError for a payload that ``weights_only`` loading could not read back, UserError for an unwritable
    directory.
    """
    ranks = _Ranks(group)
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(step)
    tmp_dir = checkpoint_dir / f"{final.name}.tmp-{ranks.rank0_pid()}"
    error: BaseException | None = None
    if ranks.is_master:
        try:
            if keep < 1:
                raise ValueError(f"keep must be >= 1, got {keep}")
            if payload is None:
                raise ValueError("rank 0 needs the payload")
            _check_required(payload)
            check_payload(dict(payload))
            ensure_writable_dir(checkpoint_dir, "checkpoint directory")
            _remove_leftovers(checkpoint_dir)
            tmp_dir.mkdir()
        except BaseException as err:  # noqa: BLE001 - reported to every rank below
            error = err
    ranks.agree(error, step, "preparing the folder")
    try:
        if all_ranks_writer is not None:
            try:
                all_ranks_writer(tmp_dir)
            except BaseException as err:  # noqa: BLE001
                error = err
            ranks.agree(error, step, "writing sharded state")
        if ranks.is_master:
            try:
                _write_payload(tmp_dir, step, payload, extra_writer)
                _commit(checkpoint_dir, tmp_dir, final)
                _apply_retention(checkpoint_dir, keep, final)
            except BaseException as err:  # noqa: BLE001
                error = err
        ranks.agree(error, step, "committing the checkpoint")
    except BaseException:
        if ranks.is_master:  # every rank has passed the last agreement: nobody writes into tmp_dir any more
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The ``checkpoint.pt`` that ``path`` designates.

    Accepts the file itself, a step folder, the ``checkpoints`` folder or a run's output folder (newest
    complete checkpoint), or ``.../latest`` (falls back to a scan when the pointer is stale).
    """
    path = Path(path)
    if path.name in (LATEST_NAME, LATEST_TEXT_NAME) and not (path.is_dir() and not path.is_symlink()):
        target = _pointer_target(path)
        if target is not None and is_complete(target):
            return target / CHECKPOINT_FILE
        latest = find_latest(path.parent)
        if latest is None:
            raise UserError(f"checkpoint {path}: no complete checkpoint in {path.parent}")
        if path.exists() or path.is_symlink():
            logger.warning("checkpoint pointer %s is stale; using the newest complete one, %s", path, latest)
        return latest / CHECKPOINT_FILE
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        if not (path / COMPLETE_MARKER).is_file():
            raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker: an interrupted save)")
        return path / CHECKPOINT_FILE
    for folder in (path, path / CHECKPOINTS_DIR_NAME):
        latest = find_latest(folder)
        if latest is not None:
            return latest / CHECKPOINT_FILE
    raise UserError(f"checkpoint {path}: no complete checkpoint found there")


def _pointer_target(pointer: Path) -> Path | None:
    """The folder a ``latest`` symlink or ``latest.txt`` names (None when unreadable)."""
    try:
        if pointer.is_symlink():
            return pointer.resolve()
        if pointer.is_file():
            return pointer.parent / pointer.read_text().strip()
    except OSError:
        pass
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint payload with ``torch.load(weights_only=True)``.

    ``path``: see :func:`resolve_checkpoint`. Raises UserError naming the file for a pickle that carries
    code or objects, for a file that is not a PyTorch checkpoint, and for a payload without
    ``prototypes`` ([K, C] float tensor), ``step`` or ``config``.
    """
    file = resolve_checkpoint(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names what it refused ("GLOBAL io.open"); anything else is garbage.
        refused = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", str(err))
        if refused:
            raise UserError(
                f"checkpoint {file} refused: it contains pickled code or objects ({refused.group(1) or refused.group(2)}),"
                " not just tensors and plain data (loaded with weights_only=True)"
            ) from None
        raise UserError(f"checkpoint {file} is not a PyTorch checkpoint (unreadable pickle)") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, OSError) as err:
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EISDIR):
            raise UserError(f"checkpoint {file}: {err.strerror}") from None
        raise UserError(f"checkpoint {file} is not a PyTorch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - the legacy unpickler fails on arbitrary bytes in arbitrary ways
        raise UserError(f"checkpoint {file} is not a PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict):
        raise UserError(f"checkpoint {file} is not a primaps-dist checkpoint (holds a {type(payload).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"checkpoint {file} is not a primaps-dist checkpoint (missing {', '.join(missing)})")
    prototypes = payload["prototypes"]
    if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 or not prototypes.is_floating_point():
        raise UserError(f"checkpoint {file}: 'prototypes' is not a float tensor [K, C]")
    return payload


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]
