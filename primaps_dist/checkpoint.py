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

Ranks: only rank 0 writes (:func:`save_checkpoint`); :func:`save_checkpoint_distributed` wraps the
collective protocol (every rank reaches every collective, a failure on rank 0 raises on all ranks).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
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


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS_DIR_NAME


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


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    payload: Mapping[str, Any],
    *,
    keep: int,
    extra_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``payload`` atomically as ``<checkpoint_dir>/step_<step>/``; returns that folder.

    ``payload`` must hold at least ``prototypes`` (float tensor ``[K, C]``), ``step`` and ``config`` (the
    resolved config dict); usually also ``mlflow_run_id`` and the trainer state (EM statistics, head and
    optimizer state dicts, loader state, RNG states from :func:`capture_rng_state`). ``extra_writer(tmp)``
    may add files to the folder before it is marked complete. Keeps the newest ``keep`` checkpoints.
    Raises ValueError for a payload that ``weights_only`` loading could not read back, UserError for an
    unwritable directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _check_required(payload)
    check_payload(dict(payload))
    checkpoint_dir = ensure_writable_dir(checkpoint_dir, "checkpoint directory")
    _remove_leftovers(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(step)
    tmp_dir = checkpoint_dir / f"{final.name}.tmp-{os.getpid()}"
    tmp_dir.mkdir()
    try:
        _write_payload(tmp_dir, step, payload, extra_writer)
        _commit(checkpoint_dir, tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _apply_retention(checkpoint_dir, keep, final)
    return final


def _check_required(payload: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    prototypes = payload["prototypes"]
    if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 or not prototypes.is_floating_point():
        raise ValueError("checkpoint payload 'prototypes' must be a float tensor [K, C]")


def save_checkpoint_distributed(
    checkpoint_dir: str | os.PathLike,
    step: int,
    payload: Mapping[str, Any] | None,
    *,
    keep: int,
    extra_writer: Callable[[Path], None] | None = None,
    all_ranks_writer: Callable[[Path], None] | None = None,
    group: Any = None,
) -> Path:
    """Collective save: call on EVERY rank. Rank 0 writes ``payload`` (ignored elsewhere).

    ``all_ranks_writer(tmp_dir)`` runs on every rank between the folder's creation and its commit (for
    sharded state such as DeepSpeed ZeRO; needs a file system shared by all ranks). A failure on any rank
    raises on every rank (RuntimeError there, the original error where it happened), so none waits forever
    in a later collective. Without an initialised process group this is :func:`save_checkpoint`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        def both_writers(tmp: Path) -> None:
            if all_ranks_writer is not None:
                all_ranks_writer(tmp)
            if extra_writer is not None:
                extra_writer(tmp)

        return save_checkpoint(checkpoint_dir, step, payload or {}, keep=keep, extra_writer=both_writers)

    rank = dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")

    def agree(local_error: BaseException | None, what: str) -> None:
        flag = torch.tensor([1.0 if local_error is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if local_error is not None:
            raise local_error
        if flag.item() > 0:
            raise RuntimeError(f"checkpoint save of step {step} failed on another rank while {what}")

    # Rank 0's pid names the temp folder; every rank must agree on it.
    pid = torch.tensor([os.getpid() if rank == 0 else 0], dtype=torch.float64, device=device)
    dist.all_reduce(pid, op=dist.ReduceOp.SUM, group=group)
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(step)
    tmp_dir = checkpoint_dir / f"{final.name}.tmp-{int(pid.item())}"

    error: BaseException | None = None
    if rank == 0:
        try:
            if payload is None:
                raise ValueError("rank 0 needs the payload")
            _check_required(payload)
            check_payload(dict(payload))
            ensure_writable_dir(checkpoint_dir, "checkpoint directory")
            _remove_leftovers(checkpoint_dir)
            tmp_dir.mkdir()
        except BaseException as err:  # noqa: BLE001 - reported to every rank below
            error = err
    agree(error, "preparing the folder")
    if all_ranks_writer is not None:
        try:
            all_ranks_writer(tmp_dir)
        except BaseException as err:  # noqa: BLE001
            error = err
        agree(error, "writing sharded state")
    if rank == 0:
        try:
            _write_payload(tmp_dir, step, payload, extra_writer)
            _commit(checkpoint_dir, tmp_dir, final)
            _apply_retention(checkpoint_dir, keep, final)
        except BaseException as err:  # noqa: BLE001
            shutil.rmtree(tmp_dir, ignore_errors=True)
            error = err
    agree(error, "committing the checkpoint")
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


def check_compatible(payload: Mapping[str, Any], cfg: Any, *, channels: int | None = None,
                     source: str | os.PathLike | None = None) -> None:
    """Raise UserError when the checkpoint's prototypes cannot serve ``cfg`` (a Config).

    Compared: ``backbone.name``, ``backbone.layers``, random versus trained ``backbone.weights``, the
    number of prototypes K (``data.num_classes``) and, when the built backbone's ``channels`` are given,
    the channel count C. The message names the key, e.g. "checkpoint X was trained with
    backbone.name=dino_vits8 but the config says efficientnet_lite0".
    """
    where = f"checkpoint {source}" if source is not None else "the checkpoint"
    saved = payload.get("config") or {}
    saved_backbone = saved.get("backbone", {}) if isinstance(saved, dict) else {}

    def differ(key: str, old: Any, new: Any) -> None:
        raise UserError(f"{where} was trained with {key}={_show(old)} but the config says {_show(new)}")

    if "name" in saved_backbone and saved_backbone["name"] != cfg.backbone.name:
        differ("backbone.name", saved_backbone["name"], cfg.backbone.name)
    if "layers" in saved_backbone and list(saved_backbone["layers"]) != list(cfg.backbone.layers):
        differ("backbone.layers", list(saved_backbone["layers"]), list(cfg.backbone.layers))
    old_weights = saved_backbone.get("weights")
    if old_weights is not None and (old_weights == "random") != (cfg.backbone.weights == "random"):
        differ("backbone.weights", old_weights, cfg.backbone.weights)
    prototypes = payload["prototypes"]
    if prototypes.shape[0] != cfg.data.num_classes:
        differ("data.num_classes", int(prototypes.shape[0]), cfg.data.num_classes)
    if channels is not None and prototypes.shape[1] != channels:
        raise UserError(
            f"{where} has {prototypes.shape[1]}-channel prototypes but backbone {cfg.backbone.name} gives "
            f"{channels} channels (backbone.name / backbone.layers)"
        )


def _show(value: Any) -> str:
    return str(value) if not isinstance(value, list) else "[" + ",".join(map(str, value)) + "]"


# ----------------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain numbers (weights_only safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": None if py_gauss_next is None else float(py_gauss_next)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), int(numpy_state["pos"]),
        int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"]),
    ))
    python_state = state["python"]
    random.setstate((int(python_state["version"]), tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda_states])
