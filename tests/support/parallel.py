"""Two test processes at once (pytest-xdist) without tests disturbing each other.

Tests with wall-clock bounds (a peer's timeout noticed within a few seconds of it, ranks that must meet at a
barrier within ``dist.timeout_s`` of each other) are marked ``@pytest.mark.alone``: while one runs, the other
worker starts no test. :class:`RunLock` does that with two ``flock`` files in the run's folder, shared by the
workers: every test holds the lock shared, an ``alone`` test holds it exclusively.

The pytest hooks at the end are imported by ``tests/conftest.py`` (and can be loaded with ``-p support.parallel``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest


class RunLock:
    """A readers-writer lock across the processes of one test run.

    Args:
        folder: a folder every worker of the run sees (created if missing).

    A waiting exclusive holder closes a turnstile that every new shared holder passes first, so a worker
    that runs test after test cannot keep an ``alone`` test waiting for ever.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._turnstile = open(folder / "alone.turnstile", "a+")
        self._lock = open(folder / "alone.lock", "a+")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def close(self) -> None:
        self._turnstile.close()
        self._lock.close()


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that ``build(folder)`` filled once for the whole run: under xdist the first worker to ask
    builds it in the run's folder and the others wait for it (the result of a session fixture, built once
    instead of once per worker). Tests only read it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / "built-once"  # getbasetemp(): .../pytest-N/popen-gwN
    shared.mkdir(exist_ok=True)
    folder = shared / name
    with open(shared / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            build(folder)
            (shared / f"{name}.done").touch()
    return folder


# fixture -> xdist group: a test using the fixture runs on the group's worker. One SLURM cluster per run: two
# would both number their jobs from 1 (fixed per-job ports 12000 + id) and share the node's two CPUs.
SHARED_RESOURCE_GROUPS = {"slurm_cluster": "slurm"}


def _group_names(item: pytest.Item) -> list[str]:
    return sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                   for mark in item.iter_markers("xdist_group")})


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module- (or class-, package-) scoped fixture: such tests share one worker, or
    each worker would build the fixture again (a model, a server, an export)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's per-test fixture closure (no public accessor)
    for definitions in getattr(info, "name2fixturedefs", {}).values():
        if definitions and definitions[-1].scope in ("module", "class", "package"):
            return True
    return False


def _set_nodeid(item: pytest.Item, nodeid: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9.2 keeps a structured id; xdist 3.8 still writes the old _nodeid
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(nodeid)
    else:
        item._nodeid = nodeid


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which suffixes node ids on older pytest only
def pytest_collection_modifyitems(config, items):
    """Group the tests that use a shared resource (:data:`SHARED_RESOURCE_GROUPS`), the ``alone`` tests, and
    a module's tests that use one of its module-scoped fixtures, for ``--dist loadgroup``.

    xdist's scheduler reads a test's group from a ``@group`` suffix of its node id, which xdist 3.8 fails to
    write under pytest 9.2 (pytest-dev/pytest-xdist#1386: every test is then scheduled on its own, silently).
    So the suffix is written here when it is missing, and a run whose grouping would not hold stops.
    """
    for item in items:
        for fixture, group in SHARED_RESOURCE_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()) and group not in _group_names(item):
                item.add_marker(pytest.mark.xdist_group(group))
        if item.get_closest_marker("alone") is not None and not _group_names(item):
            item.add_marker(pytest.mark.xdist_group("alone"))
        if _uses_a_module_fixture(item) and not _group_names(item):
            item.add_marker(pytest.mark.xdist_group(f"module:{item.path.name}"))
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    # Slow tests first, so that the run ends with short ones on both workers instead of one long test on one.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        names = _group_names(item)
        if not names:
            continue
        suffix = "@" + "_".join(names)
        if not item.nodeid.endswith(suffix):
            _set_nodeid(item, item.nodeid + suffix)
        if not item.nodeid.endswith(suffix):
            raise pytest.UsageError(f"cannot put {item.nodeid} into xdist group {suffix[1:]} with this "
                                    f"pytest / pytest-xdist; run serially (-n 0)")


_RUN_LOCK = pytest.StashKey[RunLock]()


def pytest_configure(config):
    if hasattr(config, "workerinput") and config.option.basetemp:  # an xdist worker; basetemp: .../popen-gwN
        config.stash[_RUN_LOCK] = RunLock(Path(config.option.basetemp).parent / "run-lock")


def pytest_unconfigure(config):
    lock = config.stash.get(_RUN_LOCK, None)
    if lock is not None:
        lock.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, hold the run lock around each test: exclusively for ``alone`` tests, else shared."""
    lock = item.config.stash.get(_RUN_LOCK, None)
    if lock is None:
        yield
        return
    with lock.exclusive() if item.get_closest_marker("alone") is not None else lock.shared():
        yield
