"""The CPU kernel of the proposal loop (``rounds.cpp``), built on first use with torch's C++ extension JIT.

On the CPU the batched loop (:mod:`primaps_dist.primaps.rounds`) spends most of a round on Python and
dispatch overhead and on streaming every image's Gram matrix through the cache once per product.
``rounds.cpp`` runs the same method one image at a time, all rounds of an image back to back, images in
parallel over torch's intra-op threads. Both paths give the same proposals (tests compare them map for
map); accelerators always take the batched path.

The kernel is compiled once per source version into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``; ``make install`` builds it) and needs a C++ compiler. The name
carries a hash of the source, its path, the flags and the torch version, so jobs running other
versions or other checkouts never rebuild each other's copy.

``PRIMAPS_DIST_NATIVE``: ``auto`` (default: use the kernel when it builds, else warn once and use the
batched path), ``0`` (never), ``1`` (always: a build failure is an error).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

__all__ = ["NativeUnavailable", "build", "forced_mode", "mode", "native_kernel"]

_SOURCE = Path(__file__).with_name("rounds.cpp")
_HEADERS = (Path(__file__).with_name("linalg.h"),)  # included by rounds.cpp
_FLAGS = ("-O3",)
_MODES = ("auto", "0", "1")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_kernel: ModuleType | None = None
_failure: str | None = None
_warned = False  # a failed build under auto has been reported


class NativeUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded (the message says why)."""


def mode() -> str:
    """The ``PRIMAPS_DIST_NATIVE`` setting, validated."""
    return _checked(os.environ.get("PRIMAPS_DIST_NATIVE", "auto").strip().lower() or "auto")


def _checked(setting: str) -> str:
    if setting not in _MODES:
        raise ValueError(f"PRIMAPS_DIST_NATIVE must be one of {', '.join(_MODES)}, got {setting!r}")
    return setting


def _extension_name() -> str:
    # The source's path is part of the name: two checkouts with the same source would otherwise share
    # one build folder and rebuild it in turn (its build file records the path).
    digest = hashlib.sha256(str(_SOURCE.resolve()).encode())
    for path in (_SOURCE, *_HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"primaps_native_{digest.hexdigest()[:12]}"


def _quiet_import_of_load():
    """torch.utils.cpp_extension.load, imported without its "No CUDA runtime is found" warning (this
    kernel is CPU-only, so the CUDA toolkit does not matter)."""
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        extension_log.setLevel(level)
    return load


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Run the body with environment variable ``name`` set to ``value``, then restore it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def forced_mode(setting: str) -> contextlib.AbstractContextManager[None]:
    """``with forced_mode("0"):`` runs the body with ``PRIMAPS_DIST_NATIVE`` set to ``setting`` (e.g. to time
    the batched loop on the CPU)."""
    return _environment("PRIMAPS_DIST_NATIVE", _checked(setting))


def _pinned_ninja() -> contextlib.AbstractContextManager[None]:
    """The ninja of the ``ninja`` package first on PATH while building. ninja 1.12 changed the command
    hash in its build log, so processes that find different ninjas on PATH (a system 1.11 and the
    package's 1.13 were both found in CI) took each other's builds for stale and rebuilt in turn."""
    try:
        import ninja

        directory = ninja.BIN_DIR
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
    return _environment("PATH", os.pathsep.join([directory, os.environ.get("PATH", "")]).rstrip(os.pathsep))


def build(verbose: bool = False) -> ModuleType:
    """Build (or load the cached build of) the kernel; raises :class:`NativeUnavailable` on failure."""
    global _kernel, _failure
    with _lock:
        if _kernel is not None:
            return _kernel
        if _failure is not None:
            raise NativeUnavailable(_failure)
        try:
            load = _quiet_import_of_load()
            with _pinned_ninja():
                _kernel = load(
                    name=_extension_name(), sources=[str(_SOURCE)], extra_cflags=list(_FLAGS), verbose=verbose
                )
        except Exception as error:  # noqa: BLE001 - compiler missing, build error, broken cache: all mean "unavailable"
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            _failure = f"building the PriMaPs C++ kernel ({_SOURCE.name}) failed: {first_line}"
            raise NativeUnavailable(_failure) from error
        return _kernel


def native_kernel(device: torch.device) -> ModuleType | None:
    """The kernel for proposals on ``device``, or None where the batched path runs (accelerators,
    ``PRIMAPS_DIST_NATIVE=0``, or a failed build under ``auto``, which warns once)."""
    if device.type != "cpu":
        return None
    setting = mode()
    if setting == "0":
        return None
    global _warned
    try:
        return build()
    except NativeUnavailable as error:
        if setting == "1":
            raise
        if not _warned:
            _warned = True
            _log.warning("%s; using the batched torch path (set PRIMAPS_DIST_NATIVE=0 to silence)", error)
        return None


def _reset_for_tests() -> None:
    """Forget a build result (tests that simulate a failed build)."""
    global _kernel, _failure, _warned
    with _lock:
        _kernel, _failure, _warned = None, None, False

