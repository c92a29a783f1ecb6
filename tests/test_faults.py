"""Faults and hostile input, end to end: real trainer processes are killed, stopped, preempted and fed traps.

- SIGKILL of one rank under ``torchrun --max-restarts=1``: the job restarts from the newest complete
  checkpoint and ends with the prototypes of an uninterrupted run (``stats`` and ``gradient`` modes).
- A crash in the middle of a checkpoint write: the previous checkpoint stays the newest loadable one, the
  partial folder is ignored, and the next run resumes and removes it.
- SIGTERM (SLURM preemption, scancel): exit status 3 with a newer checkpoint; the next run resumes.
- A hung (SIGSTOP) or dead (SIGKILL) peer: the survivor ends within ``dist.timeout_s`` with one line.
- MLflow dead at start or going away mid-run: training finishes (exit 0), one warning, the spool is kept.
- Security: code in a checkpoint pickle or in YAML never runs, shard member names never become paths,
  make-shards keys and predict outputs stay inside their folders, the MLflow server binds to loopback.

Every subprocess is bounded by a timeout; the tests never leave processes behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from primaps_dist import checkpoint as ckpt
from primaps_dist.data.synthetic import encode_image
from support.checkpoints import complete_steps, count_tensors, newest_payload, payload_differences, read_payload
from support.demo import DemoData, tiny_train_args, write_shard
from support.env import REPO, child_env
from support.net import free_port
from support.run import Background, assert_one_line_error, module_command, run_command, wait_until

pytestmark = pytest.mark.slow

TRAIN = "primaps_dist.train"


def train_command(data: DemoData, out: Path, *extra: str, **options) -> list[str]:
    return module_command(TRAIN, *tiny_train_args(data.train_shards, out, *extra, **options))


# ----------------------------------------------------------------------------------------------- SIGKILL + restart


def _restart_args(data: DemoData, out: Path, mode: str) -> list[str]:
    # Steps 0-1 PCA, 2-3 K-means, 4-7 EM; checkpoints after steps 2, 4, 6, 8; rank 1 dies after step 7,
    # so the restart resumes inside the EM stage (EM statistics, or Adam + teacher state, must round-trip).
    return tiny_train_args(
        data.train_shards, out, "data.shuffle_buffer=8", "checkpoint.every_steps=2", "checkpoint.keep=10",
        "train.verify_every=1", "dist.timeout_s=60", f"em.mode={mode}", "em.ema_every=2",
        pca=2, kmeans=2, em=4,
    )


def _launch_single_node(data: DemoData, out: Path, mode: str, **env: str) -> list[str]:
    """launch/train_single_node.sh with 2 CPU processes. The test does not set TORCH_DISABLE_SHARE_RDZV_TCP_STORE:
    without it torchrun shares its rendezvous store with the workers' process group, and after an elastic
    restart gloo can read the killed attempt's peer addresses from it and fail ("Connection refused") or hang
    (pytorch/pytorch#135712; observed in 4 of 7 restarts). The launcher must set it."""
    return ["bash", str(REPO / "launch" / "train_single_node.sh"), *_restart_args(data, out, mode)]


@pytest.mark.parametrize("mode", ["stats", "gradient"])
def test_sigkill_of_a_rank_restarts_from_the_newest_checkpoint_and_matches(mode, demo_data, tmp_path):
    """The restarted job's checkpoints equal an uninterrupted run's bit for bit: prototypes, EM statistics,
    Adam + teacher state (gradient), loader positions and RNG states, counters; only the output path differs."""
    env = child_env(tmp_path, NPROC_PER_NODE="2", TORCH_DISABLE_SHARE_RDZV_TCP_STORE=None)
    reference_out, faulted_out = tmp_path / "reference", tmp_path / "faulted"
    reference = run_command(_launch_single_node(demo_data, reference_out, mode), env=env, timeout=300)
    assert reference.returncode == 0, reference.describe()
    faulted = run_command(_launch_single_node(demo_data, faulted_out, mode),
                          env={**env, "PRIMAPS_FAULT": "kill@7:1", "TORCHRUN_ARGS": "--max-restarts=1"}, timeout=300)
    assert faulted.returncode == 0, faulted.describe()
    assert "[rank 1]" in faulted.stderr and "fault injection: SIGKILL at step 7" in faulted.stderr
    resumed = f"resumed from {faulted_out / 'checkpoints' / 'step_000000006'} at step 6"
    assert faulted.stderr.count(resumed) == 2, faulted.describe()  # both ranks of the restarted attempt

    assert complete_steps(reference_out) == complete_steps(faulted_out) == [2, 4, 6, 8]
    for step in (2, 4, 6, 8):
        name = ckpt.step_dir_name(step)
        expected = read_payload(reference_out / "checkpoints" / name)
        actual = read_payload(faulted_out / "checkpoints" / name)
        assert expected["step"] == step and count_tensors(expected) >= 4  # EM, loader and RNG state too
        differences = payload_differences(expected, actual, ignore={"config.train.output_dir"})
        assert not differences, f"step {step}: " + "; ".join(differences[:20])
    # The interrupted run evolved: its last prototypes differ from the resume point's.
    before = newest_payload(faulted_out)["prototypes"]
    resume_point = read_payload(faulted_out / "checkpoints" / "step_000000006")
    assert (before - resume_point["prototypes"]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- crash mid-save

_DIE_WHILE_SAVING = """
import os, signal, sys
from primaps_dist import checkpoint as ckpt
from primaps_dist import train
from primaps_dist.errors import run_cli

real_write = ckpt._write_payload

def write_then_die(tmp_dir, step, payload, extra_writer):
    if step == int(os.environ["DIE_AT_SAVE"]):
        # Part of the file reaches the disk, then the process is gone (OOM killer, node failure).
        (tmp_dir / "checkpoint.pt").write_bytes(b"PK\\x03\\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(tmp_dir, step, payload, extra_writer)

ckpt._write_payload = write_then_die
sys.exit(run_cli(train.main, sys.argv[1:]))
"""


def test_crash_while_saving_keeps_the_previous_checkpoint_and_resumes(demo_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(demo_data.train_shards, out, "checkpoint.every_steps=2", pca=1, kmeans=5)
    env = child_env(tmp_path)
    crashed = run_command([sys.executable, "-c", _DIE_WHILE_SAVING, *args], env={**env, "DIE_AT_SAVE": "4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.describe()
    checkpoints = out / "checkpoints"
    partial = list(checkpoints.glob("step_000000004.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "checkpoint.pt").is_file()
    assert not (checkpoints / "step_000000004").exists()
    assert complete_steps(out) == [2]
    assert ckpt.load_checkpoint(checkpoints / "latest")["step"] == 2

    # Anything reading checkpoints sees the previous one, e.g. evaluation of ".../latest".
    evaluated = run_command(module_command("primaps_dist.evaluate", "--checkpoint", checkpoints / "latest",
                                           f"data.val_shards={demo_data.val_shards}", "--out",
                                           tmp_path / "metrics.json"), env=env)
    assert evaluated.returncode == 0, evaluated.describe()
    assert "at step 2;" in evaluated.stdout and json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 8

    resumed = run_command(module_command(TRAIN, *args), env=env)
    assert resumed.returncode == 0, resumed.describe()
    assert f"resumed from {checkpoints / 'step_000000002'} at step 2" in resumed.stderr
    assert complete_steps(out) == [2, 4, 6] and not partial[0].exists()
    assert newest_payload(out)["step"] == 6


# ----------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_checkpoints_exits_3_and_the_next_run_resumes(demo_data, tmp_path):
    out = tmp_path / "run"
    command = train_command(demo_data, out, "checkpoint.every_steps=5", pca=1, kmeans=150)
    env = child_env(tmp_path)
    with Background(command, env, tmp_path / "first.log") as first:
        wait_until(lambda: complete_steps(out), 120, "the first checkpoint", alive=first)
        seen = complete_steps(out)[-1]
        first.process.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 3, first.stderr()[-4000:]
        log = first.stderr()
    assert "received SIGTERM: will checkpoint and stop after this step" in log
    stopped = re.findall(r"stopped at step (\d+) on request; checkpoint written", log)
    assert len(stopped) == 1
    stop_step = int(stopped[0])
    assert seen < stop_step < 151 and complete_steps(out)[-1] == stop_step
    assert "Traceback" not in log

    second = run_command(command, env=env, timeout=240)
    assert second.returncode == 0, second.describe()
    assert f"resumed from {out / 'checkpoints' / ckpt.step_dir_name(stop_step)} at step {stop_step}" in second.stderr
    assert newest_payload(out)["step"] == 151


# ----------------------------------------------------------------------------------------------- hung / dead peer


# dist.timeout_s of the two-rank runs below. It bounds every collective of the run, the healthy ones before the
# fault too (start-up skew between the two hand-started ranks, one step's imbalance): too short and a slow but
# healthy collective fails on a loaded machine. Measured: the healthy phase still passes at 1 s when alone.
# - A dead peer (SIGKILL) is noticed at once from the closed connection, never from the timeout, so its run
#   takes a long timeout at no cost: only the healthy collectives are bounded by it.
# - A hung peer (SIGSTOP) is noticed only when the timeout passes: the test waits that long, so the value is a
#   trade-off: 10 s (10x the measured need, 2x the old 5 s) costs 5 s more than 5 s did.
DEAD_PEER_TIMEOUT_S = 60.0
HUNG_PEER_TIMEOUT_S = 10.0
DEAD_PEER_NOTICED_S = 10.0  # "at once": far below DEAD_PEER_TIMEOUT_S (measured 0.2-0.4 s)


@pytest.mark.alone  # wall-clock bounds below, and both ranks must meet within dist.timeout_s at every collective
@pytest.mark.parametrize("fault, timeout_s, message", [
    (signal.SIGSTOP, HUNG_PEER_TIMEOUT_S,
     f"timed out after {HUNG_PEER_TIMEOUT_S:g} s (a peer died or hung; see dist.timeout_s)"),
    (signal.SIGKILL, DEAD_PEER_TIMEOUT_S, "a peer closed the connection"),
], ids=["hung_peer_sigstop", "dead_peer_sigkill"])
def test_survivor_of_a_hung_or_dead_peer_exits_with_one_line(fault, timeout_s, message, demo_data, tmp_path):
    """Two ranks started by hand (no torchrun to clean up): rank 1 stops or dies, rank 0 must not hang.

    A hung peer is reported when dist.timeout_s has passed (give or take the step in flight), a dead one at
    once, long before the timeout; rank 0 then exits promptly."""
    out = tmp_path / "run"
    command = train_command(demo_data, out, f"dist.timeout_s={timeout_s:g}", kmeans=100000)
    port = free_port()
    ranks = []
    try:
        for rank in range(2):
            env = child_env(tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            ranks.append(Background(command, env, tmp_path / f"rank{rank}.log"))
        wait_until(lambda: 2 in complete_steps(out), 180, "the checkpoint of step 2", alive=ranks[0])
        os.kill(ranks[1].pid, fault)
        faulted_at = time.monotonic()
        wait_until(lambda: "error: " in ranks[0].stderr(), 90, "rank 0's error line", alive=None)
        noticed = time.monotonic() - faulted_at
        code = ranks[0].wait(timeout=90)
        ended = time.monotonic() - faulted_at
        result = ranks[0].result()
    finally:
        for process in ranks:
            process.kill()
    line = assert_one_line_error(result, "rank 0: collective", message)
    assert code == 2, line
    print(f"rank 0 wrote its error {noticed:.1f} s and ended {ended:.1f} s after {fault.name} of rank 1: {line}")
    if fault == signal.SIGSTOP:
        assert 0.8 * timeout_s <= noticed <= timeout_s + 4.0, noticed  # measured: timeout + 0.2 s
    else:
        assert noticed < DEAD_PEER_NOTICED_S, noticed  # the closed connection, not the timeout; measured: 0.2-0.4 s
    assert ended - noticed <= 15.0, (noticed, ended)  # no hang while exiting; measured: 2-4 s on 2 busy cores
    assert complete_steps(out)  # the checkpoints written before the fault are intact
    ckpt.load_checkpoint(out / "checkpoints")


# ----------------------------------------------------------------------------------------------- MLflow outages


def _spool_kinds(out: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (out / "mlflow_spool.jsonl").read_text().splitlines()]


def test_mlflow_dead_at_start_training_finishes_with_one_warning(demo_data, tmp_path):
    out = tmp_path / "run"
    env = child_env(tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    result = run_command(train_command(demo_data, out, tracking=True), env=env, timeout=240)
    assert result.returncode == 0, result.describe()
    assert "Traceback" not in result.stderr
    outage = [line for line in result.stderr.splitlines() if "is unreachable (" in line]
    assert len(outage) == 1 and "training continues" in outage[0], result.describe()
    assert result.stderr.count("python -m primaps_dist.tracking replay") == 1  # the closing note
    kinds = _spool_kinds(out)
    assert kinds[0] == "run" and kinds[-1] == "end" and kinds.count("metrics") >= 1
    assert newest_payload(out)["mlflow_run_id"].startswith("local-")


def test_mlflow_server_going_away_mid_run(demo_data, tmp_path):
    from mlflow import MlflowClient

    from primaps_dist.tracking.server import start_server

    backend = f"sqlite:///{tmp_path / 'server.db'}"
    server = start_server(port=free_port(), backend_store_uri=backend, artifacts_destination=tmp_path / "artifacts",
                          log_path=tmp_path / "server.log", timeout_s=180)
    out = tmp_path / "run"
    try:
        env = child_env(tmp_path, MLFLOW_TRACKING_URI=server.uri)
        command = train_command(demo_data, out, "checkpoint.every_steps=50", kmeans=300, tracking=True)
        with Background(command, env, tmp_path / "train.log") as training:
            wait_until(lambda: (out / "mlflow_runs.json").is_file() and complete_steps(out), 180,
                       "the MLflow run and a checkpoint", alive=training)
            server.stop()
            assert training.process.poll() is None, "training ended before the outage (make the run longer)"
            assert training.wait(timeout=300) == 0, training.stderr()[-4000:]
            log = training.stderr()
    finally:
        server.stop()
    outage = [line for line in log.splitlines() if "is unreachable (" in line]
    assert len(outage) == 1 and "training continues" in outage[0], log[-4000:]
    assert "Traceback" not in log
    kinds = _spool_kinds(out)
    assert "metrics" in kinds and kinds[-1] == "end"
    run_id = json.loads((out / "mlflow_runs.json").read_text())
    (mlflow_id,) = run_id.values()
    assert newest_payload(out)["mlflow_run_id"] == mlflow_id
    run = MlflowClient(backend).get_run(mlflow_id)  # what reached the server before it went away
    assert run.info.status == "RUNNING" and run.data.params["data.num_classes"] == "6"


# ----------------------------------------------------------------------------------------------- security


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_evaluate_refuses_a_checkpoint_that_carries_code(demo_checkpoint, tmp_path):
    marker = tmp_path / "code_ran"
    step_dir = tmp_path / "checkpoints" / "step_000000001"
    step_dir.mkdir(parents=True)
    payload = newest_payload(demo_checkpoint.parent)
    payload["extra"] = _RunsCodeWhenUnpickled(marker)
    torch.save(payload, step_dir / "checkpoint.pt")
    (step_dir / "COMPLETE").write_text("{}")
    result = run_command(module_command("primaps_dist.evaluate", "--checkpoint", step_dir), env=child_env(tmp_path))
    assert_one_line_error(result, f"checkpoint {step_dir / 'checkpoint.pt'} refused", "weights_only=True")
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_command(module_command(TRAIN, "--config", config), env=child_env(tmp_path))
    assert_one_line_error(result, f"config file {config}")
    assert not marker.exists()


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


def test_shard_member_names_are_never_used_as_paths(demo_data, tmp_path):
    """Members named ``../../evil.jpg``, ``/abs/evil.jpg``, a symlink and a hard link: reading writes nothing."""
    rng = np.random.default_rng(0)
    deep = tmp_path / "a" / "b"
    shard_dir = deep / "shards"
    absolute = tmp_path / "absolute_target" / "evil.jpg"
    jpeg = [encode_image(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8), "JPEG") for _ in range(6)]
    shard = write_shard(shard_dir / "000000.tar", [
        ("../../evil.jpg", jpeg[0]), (str(absolute), jpeg[1]), ("../../../escape/evil2.jpg", jpeg[2]),
        ("ok0.jpg", jpeg[3]), ("ok1.jpg", jpeg[4]), ("ok2.jpg", jpeg[5]),
    ])
    with tarfile.open(shard, "a") as archive:  # links pointing outside, as a malicious shard could carry
        for name, kind in (("link.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
    before = _files_under(tmp_path)
    out = deep / "run"
    result = run_command(module_command(TRAIN, *tiny_train_args(shard_dir, out, "data.batch_size=3")),
                         env=child_env(deep))
    assert result.returncode == 0, result.describe()
    created = _files_under(tmp_path) - before
    assert all(out in path.parents or path == out or path == deep / "mlflow.db" for path in created), sorted(created)
    assert not absolute.exists() and not (tmp_path / "evil.jpg").exists() and not (tmp_path / "escape").exists()
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("*passwd*"))

    from primaps_dist.data.shardio import read_shard

    keys = [item["__key__"] for item in read_shard(str(shard)) if isinstance(item, dict)]
    assert keys[:3] == ["../../evil", str(absolute.with_suffix("")), "../../../escape/evil2"]  # strings only
    assert "link" not in keys and "hard" not in keys  # non-regular members are skipped


def test_make_shards_keys_are_safe_member_names(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    names = ["..hidden/x.png", "a b/c.d;e.png", "-dash.png", "über/ünïcode.png", "nested/deeper/.dot.png",
             "$(touch pwned).png", "quote'\"name.png", "..png"]
    rng = np.random.default_rng(1)
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / name, format="PNG")
    result = run_command(module_command("primaps_dist.cli", "make-shards", "--images", images, "--out",
                                        tmp_path / "out", "--shard-size", "100"), env=child_env(tmp_path))
    assert result.returncode == 0, result.describe()
    members = []
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as archive:
            members += [(info.name, info.isreg()) for info in archive.getmembers()]
    assert len(members) == len(list(images.rglob("*.png")))
    for name, regular in members:
        assert regular and re.fullmatch(r"[A-Za-z0-9\-][A-Za-z0-9_\-]*\.(png|jpg)", name), name
    assert not (tmp_path / "pwned").exists()


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_safe_key_never_yields_a_path(text):
    from primaps_dist.data.shards import safe_key

    key = safe_key(text)
    assert re.fullmatch(r"[A-Za-z0-9\-][A-Za-z0-9_\-]*", key), key
    assert "/" not in key and "." not in key


def test_predict_outputs_stay_inside_the_output_folder(demo_checkpoint, demo_data, tmp_path):
    images = tmp_path / "photos"
    sources = sorted(demo_data.val_images.glob("*.png"))
    placed = ["..sneaky/a.png", "x y/../b.png", "deep/er/c.png", "d.png"]
    for source, name in zip(sources, placed):
        target = Path(os.path.normpath(images / name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    out = tmp_path / "predictions"
    before = _files_under(tmp_path)
    result = run_command(module_command("primaps_dist.predict", "--checkpoint", demo_checkpoint, "--images", images,
                                        "--out", out), env=child_env(tmp_path))
    assert result.returncode == 0, result.describe()
    created = _files_under(tmp_path) - before - {tmp_path / "mlflow.db"}
    assert created and all(path.parent == out for path in created - {out}), sorted(created)
    assert len(created - {out}) == 2 * len(placed)


def test_predict_outputs_of_distinct_images_do_not_collide(demo_checkpoint, demo_data, tmp_path):
    from PIL import Image

    images = tmp_path / "photos"
    (images / "a").mkdir(parents=True)
    sources = sorted(demo_data.val_images.glob("*.png"))
    (images / "x.png").write_bytes(sources[0].read_bytes())
    Image.open(sources[1]).convert("RGB").save(images / "x.jpg")
    (images / "a" / "b.png").write_bytes(sources[2].read_bytes())
    (images / "a__b.png").write_bytes(sources[3].read_bytes())
    out = tmp_path / "predictions"
    result = run_command(module_command("primaps_dist.predict", "--checkpoint", demo_checkpoint, "--images", images,
                                        "--out", out), env=child_env(tmp_path))
    assert result.returncode == 0, result.describe()
    assert len(list(out.glob("*.png"))) == 4, sorted(p.name for p in out.iterdir())


def test_mlflow_server_binds_to_loopback_by_default():
    """The server has no authentication. (test_mlflow_server checks the listening socket of a real server.)"""
    import inspect

    from primaps_dist.tracking import server as tracking_server

    assert tracking_server.DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(tracking_server.start_server).parameters["host"].default == "127.0.0.1"
    source = inspect.getsource(tracking_server.main)
    assert 'add_argument("--host", default=DEFAULT_HOST' in source
    for host, loopback in (("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
                           ("0.0.0.0", False), ("::", False), ("10.0.0.5", False)):
        assert tracking_server.is_loopback(host) is loopback, host
