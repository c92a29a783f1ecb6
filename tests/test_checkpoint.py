"""Atomic checkpoints: layout, retention, crash safety, pointer staleness, safe loading, the collective save
(what a payload holds and its compatibility with a config: test_train_state.py)."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from primaps_dist import checkpoint as ckpt
from primaps_dist.config import Config
from primaps_dist.errors import UserError

torch.set_num_threads(1)


def make_payload(step: int, k: int = 5, c: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + step)
    prototypes = torch.nn.functional.normalize(torch.randn(k, c, generator=generator), dim=1)
    head = torch.nn.Linear(c, k)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
    head(torch.randn(3, c, generator=generator)).sum().backward()
    optimizer.step()
    cfg = Config()
    cfg.data.num_classes = k
    return {
        "prototypes": prototypes,
        "step": step,
        "config": cfg.to_dict(),
        "mlflow_run_id": "abc123",
        "em_state": {"sums": torch.randn(k, c, generator=generator, dtype=torch.float64),
                     "counts": torch.arange(k, dtype=torch.float64)},
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader_state": {"epoch": 1, "shards": ["a.tar", "b.tar"], "offset": 17},
        "rng": {"torch": torch.get_rng_state(), "position": 624, "cached": None, "gauss": 0.25},
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_roundtrip_layout_and_pointer(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    payload = make_payload(120)
    folder = ckpt.save_checkpoint(root, 120, payload, keep=3)
    assert folder == root / "step_000000120"
    assert (folder / "checkpoint.pt").is_file() and (folder / "COMPLETE").is_file()
    assert os.readlink(root / "latest") == "step_000000120"
    loaded = torch.load(folder / "checkpoint.pt", weights_only=True)  # plain weights_only works
    assert_same(payload, loaded)
    for where in (folder, folder / "checkpoint.pt", root, tmp_path / "run", root / "latest"):
        assert_same(payload, ckpt.load_checkpoint(where))
    # an optimizer restored from the checkpoint continues identically
    head = torch.nn.Linear(8, 5)
    head.load_state_dict(loaded["head"])
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == payload["optimizer"]["state"][0]["step"]


def test_extra_writer_files_are_part_of_the_checkpoint(tmp_path):
    def write_engine(tmp: Path) -> None:
        (tmp / "engine").mkdir()
        (tmp / "engine" / "shard0.bin").write_bytes(b"x" * 100)

    folder = ckpt.save_checkpoint(tmp_path, 5, make_payload(5), keep=1, extra_writer=write_engine)
    assert (folder / "engine" / "shard0.bin").read_bytes() == b"x" * 100
    assert "engine/shard0.bin" in (folder / "COMPLETE").read_text()


def test_keep_newest_n(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        ckpt.save_checkpoint(tmp_path, step, make_payload(step), keep=3)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [40, 50, 60]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000040", "step_000000050", "step_000000060"]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 60


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, make_payload(10, seed=1), keep=2)
    second = make_payload(10, seed=2)
    ckpt.save_checkpoint(tmp_path, 10, second, keep=2)
    assert torch.equal(ckpt.load_checkpoint(tmp_path)["prototypes"], second["prototypes"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == ["step_000000010"]


def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = make_payload(10)
    ckpt.save_checkpoint(tmp_path, 10, first, keep=3)
    real_save = torch.save

    def crash_half_way(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")  # some bytes reach the disk, then the process "dies"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 20, make_payload(20), keep=3)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert ckpt.find_latest(tmp_path).name == "step_000000010"
    assert_same(first, ckpt.load_checkpoint(tmp_path / "latest"))
    assert not list(tmp_path.glob("*.tmp-*"))

    def broken_extra(tmp):
        raise RuntimeError("engine save failed")

    with pytest.raises(RuntimeError, match="engine save failed"):
        ckpt.save_checkpoint(tmp_path, 20, make_payload(20), keep=3, extra_writer=broken_extra)
    assert ckpt.find_latest(tmp_path).name == "step_000000010"


def test_killed_process_mid_write_leaves_previous_valid(tmp_path):
    """SIGKILL a real process while it writes a large checkpoint; the partial folder must not count."""
    ckpt.save_checkpoint(tmp_path, 10, make_payload(10), keep=3)
    ready = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from primaps_dist import checkpoint as ckpt
        from primaps_dist.config import Config
        payload = {{"prototypes": torch.zeros(5, 8), "step": 20, "config": Config().to_dict(),
                    "big": torch.zeros(8_000_000)}}
        def slow_engine(tmp):
            (tmp / "engine.bin").write_bytes(b"x" * 1000)
            Path({str(ready)!r}).write_text(str(tmp))
            time.sleep(600)
        ckpt.save_checkpoint({str(tmp_path)!r}, 20, payload, keep=3, extra_writer=slow_engine)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never reached the middle of the save"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    partial = Path(ready.read_text())
    assert partial.is_dir() and (partial / "checkpoint.pt").stat().st_size > 30_000_000
    assert not (tmp_path / "step_000000020").exists()
    assert ckpt.find_latest(tmp_path).name == "step_000000010"
    assert ckpt.load_checkpoint(tmp_path)["step"] == 10
    # the next save removes the partial folder
    ckpt.save_checkpoint(tmp_path, 30, make_payload(30), keep=3)
    assert not partial.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 30]


def test_find_latest_ignores_stale_pointer_and_incomplete_folders(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, make_payload(step), keep=5)
    # newest folder loses its marker (e.g. copied without it): not a checkpoint any more
    (tmp_path / "step_000000030" / "COMPLETE").unlink()
    assert ckpt.find_latest(tmp_path).name == "step_000000020"
    with pytest.raises(UserError, match="incomplete"):
        ckpt.load_checkpoint(tmp_path / "step_000000030")
    # pointer to the incomplete folder -> scan
    assert ckpt.load_checkpoint(tmp_path / "latest")["step"] == 20
    # dangling pointer -> scan
    os.remove(tmp_path / "latest")
    os.symlink("step_000000999", tmp_path / "latest")
    assert ckpt.load_checkpoint(tmp_path / "latest")["step"] == 20
    # no pointer at all -> scan
    os.remove(tmp_path / "latest")
    assert ckpt.load_checkpoint(tmp_path / "latest")["step"] == 20
    # text pointer (file systems without symlinks)
    (tmp_path / "latest.txt").write_text("step_000000010\n")
    assert ckpt.load_checkpoint(tmp_path / "latest.txt")["step"] == 10
    # an empty folder has nothing to resume
    (tmp_path / "empty").mkdir()
    assert ckpt.find_latest(tmp_path / "empty") is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing")


class _Evil:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    zip_file = tmp_path / "evil_zip.pt"
    torch.save({"prototypes": torch.zeros(2, 2), "step": 1, "config": {}, "x": _Evil(marker)}, zip_file)
    raw_file = tmp_path / "evil_raw.pt"
    raw_file.write_bytes(pickle.dumps({"prototypes": _Evil(marker)}, protocol=2))
    for file in (zip_file, raw_file):
        with pytest.raises(UserError) as err:
            ckpt.load_checkpoint(file)
        assert str(file) in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists(), f"loading {file.name} executed code"
    assert "refused" in str(pytest.raises(UserError, ckpt.load_checkpoint, zip_file).value)
    # control: the payload is live, an unsafe load does run it
    torch.load(zip_file, weights_only=False)
    assert marker.exists()


def test_non_checkpoint_files_are_user_errors(tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    no_prototypes = tmp_path / "no_prototypes.pt"
    torch.save({"step": 3, "config": {}}, no_prototypes)
    bare_tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), bare_tensor)
    bad_prototypes = tmp_path / "bad_prototypes.pt"
    torch.save({"prototypes": torch.zeros(3, dtype=torch.long), "step": 1, "config": {}}, bad_prototypes)
    expectations = {random_bytes: "not a PyTorch checkpoint", text: "not a PyTorch checkpoint",
                    empty: "not a PyTorch checkpoint", no_prototypes: "missing prototypes",
                    bare_tensor: "holds a Tensor", bad_prototypes: "not a float tensor"}
    for file, reason in expectations.items():
        with pytest.raises(UserError) as err:
            ckpt.load_checkpoint(file)
        assert str(file) in str(err.value) and reason in str(err.value), str(err.value)


def test_payload_must_load_with_weights_only(tmp_path):
    payload = make_payload(1)
    payload["em_state"]["counts"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"payload\['em_state'\]\['counts'\] is a numpy.ndarray"):
        ckpt.save_checkpoint(tmp_path, 1, payload, keep=1)
    payload = make_payload(1)
    payload["loss"] = np.float64(0.5)  # a float subclass that would pickle as a NumPy object
    with pytest.raises(ValueError, match=r"payload\['loss'\]"):
        ckpt.save_checkpoint(tmp_path, 1, payload, keep=1)
    with pytest.raises(ValueError, match="lacks prototypes"):
        ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "config": {}}, keep=1)
    assert ckpt.find_latest(tmp_path) is None


def test_unwritable_output_dir_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"train.output_dir: .*file/out"):
        ckpt.ensure_writable_dir(blocker / "out", "train.output_dir")
    with pytest.raises(UserError, match="checkpoint directory"):
        ckpt.save_checkpoint(blocker / "checkpoints", 1, make_payload(1), keep=1)


def test_unwritable_output_dir_read_only_file_system(tmp_path, monkeypatch):
    """Root ignores permission bits, so os.access says yes; the real write is what catches a read-only mount."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"train.output_dir: directory .* is not writable \(Read-only file system\)"):
        ckpt.ensure_writable_dir(tmp_path, "train.output_dir")


def _ensure_writable_as(uid: int, path: Path) -> str:
    """Run ensure_writable_dir in a forked child with user id ``uid``; returns the error text ('' = ok)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, check, report, exit without running pytest's handlers
        message = b""
        try:
            os.setgid(uid)
            os.setuid(uid)
            ckpt.ensure_writable_dir(path, "train.output_dir")
        except UserError as err:
            message = str(err).encode()
        except BaseException as err:  # noqa: BLE001
            message = f"unexpected {type(err).__name__}: {err}".encode()
        os.write(write_end, message or b"ok")
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return "" if text == "ok" else text


def test_unwritable_output_dir_permission_denied():
    """A directory without write permission, checked by a process that permission bits apply to."""
    base = Path(tempfile.mkdtemp(prefix="primaps-perm-"))  # pytest's tmp_path is private (0700) to root
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        for parent in base.parents:  # the unprivileged user must be able to reach the folder
            if (parent.stat().st_mode & 0o001) == 0:
                pytest.skip(f"{parent} is not traversable by other users")
        if os.geteuid() == 0:  # root bypasses permission bits: check as 'nobody'
            message = _ensure_writable_as(65534, locked / "out")
            assert _ensure_writable_as(65534, base / "nobody_can_not") != ""  # base is 0755 root-owned
            assert ckpt.ensure_writable_dir(locked / "out", "train.output_dir")  # root itself may write
        else:
            try:
                ckpt.ensure_writable_dir(locked / "out", "train.output_dir")
                message = ""
            except UserError as err:
                message = str(err)
        assert message.startswith("train.output_dir: ") and "Permission denied" in message, message
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_distributed_save_without_process_group_is_a_plain_save(tmp_path):
    calls = []
    folder = ckpt.save_checkpoint(tmp_path, 7, make_payload(7), keep=2,
                                  all_ranks_writer=lambda tmp: calls.append(tmp.name))
    assert folder.name == "step_000000007" and calls == ["step_000000007.tmp-%d" % os.getpid()]
    assert ckpt.load_checkpoint(folder)["step"] == 7


def test_failing_all_ranks_writer_in_one_process_commits_nothing(tmp_path):
    """World size 1 takes the collective path too: a failing shard writer raises and leaves no folder behind."""
    ckpt.save_checkpoint(tmp_path, 10, make_payload(10), keep=3)

    def broken_shards(tmp: Path) -> None:
        (tmp / "shard_0.bin").write_bytes(b"x" * 10)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 20, make_payload(20), keep=3, all_ranks_writer=broken_shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000010"]
    assert ckpt.load_checkpoint(tmp_path / "latest")["step"] == 10


def _distributed_worker(rank, world, init_file, root, fail_rank):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def shard_writer(tmp):
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} shard failed")
            (tmp / f"shard_{rank}.bin").write_bytes(bytes([rank]) * 10)

        payload = make_payload(5) if rank == 0 else None
        try:
            ckpt.save_checkpoint(root, 5, payload, keep=2, all_ranks_writer=shard_writer)
            outcome = "ok"
        except RuntimeError as err:
            outcome = f"error: {err}"
        Path(root, f"outcome_{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [-1, 1])
def test_distributed_save_two_ranks(tmp_path, fail_rank):
    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    root.mkdir()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(root), fail_rank), nprocs=2, join=True)
    outcomes = [(root / f"outcome_{r}.txt").read_text() for r in range(2)]
    if fail_rank < 0:
        assert outcomes == ["ok", "ok"]
        folder = ckpt.find_latest(root)
        assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "checkpoint.pt", "shard_0.bin", "shard_1.bin"]
    else:  # both ranks learn about the failure; nothing is committed
        assert outcomes[1] == "error: rank 1 shard failed"
        assert outcomes[0].startswith("error: checkpoint save of step 5 failed on another rank")
        assert ckpt.find_latest(root) is None
