"""Bad input, end to end: every command refuses it with ONE line naming the key or file, or copes and says so.

One table (:data:`CASES`) drives one parametrised test. A case is a CLI command (``train``, ``evaluate``,
``predict``, ``make-shards``) and what must happen:

- ``fails(*needles)``: exit status 2, no ``Traceback`` anywhere in the output, and the last non-empty line
  of stderr is ``error: ...`` containing every needle (the config key or the file).
- ``works(check)``: exit status 0, no traceback, then ``check`` looks at the outputs (checkpoint contents,
  ``skipped_total``, logged warnings, index.json).

About a third of the cases run as real subprocesses (the console entry points, torchrun for the multi-rank
case); the rest call the module's ``main`` through :func:`primaps_dist.errors.run_cli` in this process with
stderr captured, which is the same code path without the interpreter start-up.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

from primaps_dist.data.synthetic import encode_image
from support.checkpoints import newest_payload
from support.demo import DEMO_CHANNELS, DEMO_CONFIG, NUM_CLASSES, DemoData, tiny_train_args, write_shard
from support.env import REPO, child_env
from support.net import free_port
from support.run import (
    Result,
    assert_one_line_error,
    module_command,
    run_command,
    run_main_in_process,
    torchrun_command,
)

pytestmark = pytest.mark.slow

TRAIN, EVALUATE, PREDICT = "primaps_dist.train", "primaps_dist.evaluate", "primaps_dist.predict"
CLI = "primaps_dist.cli"


@dataclass
class Ctx:
    """What a case's command may refer to: the shared demo data, a trained checkpoint, its own tmp dir."""

    data: DemoData
    tmp: Path
    checkpoint: Path | None = None

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, data=self.data, ckpt=self.checkpoint)


@dataclass(frozen=True)
class Case:
    id: str
    module: str
    argv: Callable[[Ctx], Sequence[str]]
    expect: Callable[[Ctx, Result], None]
    subprocess: bool = False
    nproc: int = 1  # > 1: launched with torchrun
    env: dict = field(default_factory=dict)
    needs_checkpoint: bool = False
    timeout: float = 180.0
    known_bug: str = ""  # a bug in a file this test does not own: strict xfail until it is fixed


# ----------------------------------------------------------------------------------------------- expectations


def fails(*needles: str) -> Callable[[Ctx, Result], None]:
    def expect(ctx: Ctx, result: Result) -> None:
        assert_one_line_error(result, *(ctx.fill(needle) for needle in needles))

    return expect


def works(check: Callable[[Ctx, Result], None] | None = None) -> Callable[[Ctx, Result], None]:
    def expect(ctx: Ctx, result: Result) -> None:
        assert result.returncode == 0, result.describe()
        assert "Traceback" not in result.stderr + result.stdout, result.describe()
        if check is not None:
            check(ctx, result)

    return expect


def shows_traceback(ctx: Ctx, result: Result) -> None:
    assert result.returncode == 1, result.describe()  # --debug re-raises: Python's status for an uncaught error
    assert "Traceback (most recent call last)" in result.stderr, result.describe()
    assert "UserError: config file not found" in result.stderr, result.describe()


def trained(skipped: int = 0, *log_needles: str) -> Callable[[Ctx, Result], None]:
    """The tiny run finished: final checkpoint at step 2 with unit prototypes and ``skipped_total == skipped``."""

    def check(ctx: Ctx, result: Result) -> None:
        payload = newest_payload(ctx.tmp / "run")
        assert payload["step"] == 2
        prototypes = payload["prototypes"]
        assert prototypes.shape == (NUM_CLASSES, DEMO_CHANNELS) and torch.isfinite(prototypes).all()
        assert torch.allclose(prototypes.norm(dim=1), torch.ones(NUM_CLASSES), atol=1e-4)
        assert payload["skipped_total"] == skipped, result.describe()
        for needle in log_needles:
            assert ctx.fill(needle) in result.stderr, f"{ctx.fill(needle)!r} not logged\n{result.describe()}"

    return works(check)


def shards_report(reason: str, label_name: str) -> Callable[[Ctx, Result], None]:
    """make-shards wrote the good sample, named the bad label file and counted it in index.json."""

    def check(ctx: Ctx, result: Result) -> None:
        label = ctx.tmp / "labels" / label_name
        lines = [line for line in result.stderr.splitlines() if str(label) in line]
        assert len(lines) == 1 and lines[0].startswith("skipped ") and f"[{reason}]" in lines[0], result.describe()
        index = json.loads((ctx.tmp / "out" / "index.json").read_text())
        assert index["num_samples"] == 1 and index["skipped"] == {reason: 1}
        assert f"skipped 1 ({reason}=1)" in result.stdout

    return works(check)


def fewer_shards_check(ctx: Ctx, result: Result) -> None:
    """Two ranks x two loader workers on ONE train shard and ONE val shard: trains, evaluates every val sample once."""
    payload = newest_payload(ctx.tmp / "run")
    assert payload["step"] == 2 and payload["world_size"] == 2 and payload["skipped_total"] == 0
    metrics = json.loads((ctx.tmp / "run" / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 4  # the one val shard holds 4 samples; rank 1 has none and waits
    assert 0.0 <= metrics["accuracy"] <= 100.0


def mlflow_spooled(ctx: Ctx, result: Result) -> None:
    trained()(ctx, result)
    warnings = [line for line in result.stderr.splitlines() if "is unreachable (" in line]
    assert len(warnings) == 1 and "training continues" in warnings[0], result.describe()
    spool = ctx.tmp / "run" / "mlflow_spool.jsonl"
    kinds = [json.loads(line)["kind"] for line in spool.read_text().splitlines()]
    assert kinds[0] == "run" and kinds[-1] == "end" and "metrics" in kinds


# ----------------------------------------------------------------------------------------------- bad files


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _jpeg(rng: np.random.Generator, height: int = 80, width: int = 96) -> bytes:
    return encode_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "JPEG", quality=90)


def _good_jpegs(count: int) -> list[tuple[str, bytes]]:
    rng = _rng()
    return [(f"good{i}.jpg", _jpeg(rng)) for i in range(count)]


def corrupt_jpeg_shard(ctx: Ctx) -> Path:
    """First sample: a JPEG cut after 200 bytes (header only). shuffle_buffer=0 keeps file order."""
    broken = _jpeg(_rng())[:200]
    return write_shard(ctx.tmp / "shards" / "000000.tar", [("c0.jpg", broken)] + _good_jpegs(7)).parent


def non_image_shard(ctx: Ctx) -> Path:
    return write_shard(ctx.tmp / "shards" / "000000.tar", [("n0.txt", b"not an image")] + _good_jpegs(7)).parent


def empty_shard_only(ctx: Ctx) -> Path:
    folder = ctx.tmp / "shards"
    folder.mkdir(parents=True)
    (folder / "000000.tar").write_bytes(b"")
    return folder


def empty_shard_among_good(ctx: Ctx) -> Path:
    folder = empty_shard_only(ctx)
    write_shard(folder / "000001.tar", _good_jpegs(8))
    return folder


def truncated_shard(ctx: Ctx) -> Path:
    """A demo shard cut in the middle of a member."""
    whole = (ctx.data.train_shards / "000000.tar").read_bytes()
    folder = ctx.tmp / "shards"
    folder.mkdir(parents=True)
    (folder / "000000.tar").write_bytes(whole[: len(whole) // 2 + 100])
    return folder


def small_image_shard(ctx: Ctx) -> Path:
    rng = _rng()
    members = [(f"s{i}.png", encode_image(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))) for i in range(4)]
    return write_shard(ctx.tmp / "shards" / "000000.tar", members).parent


def grey_and_rgba_shard(ctx: Ctx) -> Path:
    rng = _rng()
    grey = [encode_image(rng.integers(0, 256, (80, 90), dtype=np.uint8)) for _ in range(2)]
    rgba = [encode_image(rng.integers(0, 256, (90, 80, 4), dtype=np.uint8)) for _ in range(2)]
    members = [("g0.png", grey[0]), ("a0.png", rgba[0]), ("g1.png", grey[1]), ("a1.png", rgba[1])]
    return write_shard(ctx.tmp / "shards" / "000000.tar", members).parent


def label_out_of_range_shard(ctx: Ctx) -> Path:
    rng = _rng()
    image = encode_image(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    label = encode_image(np.full((96, 96), NUM_CLASSES + 3, dtype=np.uint8))
    return write_shard(ctx.tmp / "val" / "000000.tar", [("x.png", image), ("x.label.png", label)]).parent


def one_shard_each(ctx: Ctx) -> tuple[Path, Path]:
    train, val = ctx.tmp / "train", ctx.tmp / "val"
    for source, target in ((ctx.data.train_shards, train), (ctx.data.val_shards, val)):
        target.mkdir(parents=True)
        (target / "000000.tar").write_bytes((source / "000000.tar").read_bytes())
    return train, val


def labelled_folder(ctx: Ctx, bad_label: np.ndarray | None) -> list[str]:
    """Two demo images with labels; the second label replaced by ``bad_label`` (None: both replaced)."""
    from PIL import Image

    images, labels = ctx.tmp / "images", ctx.tmp / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("train_000000.png", "train_000001.png"):
        (images / name).write_bytes((ctx.data.train_images / name).read_bytes())
        (labels / name).write_bytes((ctx.data.train_labels / name).read_bytes())
    wrong = bad_label if bad_label is not None else np.zeros((50, 60), np.uint8)
    targets = ["train_000001.png"] if bad_label is not None else ["train_000000.png", "train_000001.png"]
    for name in targets:
        Image.fromarray(wrong).save(labels / name)
    return ["make-shards", "--images", str(images), "--labels", str(labels), "--out", str(ctx.tmp / "out"),
            "--shard-size", "4", "--classes", str(ctx.data.classes)]


def write_text(ctx: Ctx, name: str, text: str) -> Path:
    path = ctx.tmp / name
    path.write_text(text)
    return path


def empty_folder(ctx: Ctx) -> Path:
    folder = ctx.tmp / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


def write_bytes(ctx: Ctx, name: str, data: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def a_file(ctx: Ctx) -> Path:
    return write_text(ctx, "file", "a regular file where a directory should be")


def tiny(ctx: Ctx, shards: str | Path, *extra: str, **options) -> list[str]:
    return tiny_train_args(shards, ctx.tmp / "run", *extra, **options)


# ----------------------------------------------------------------------------------------------- the table

CASES = [
    # --- configuration
    Case("unknown_config_key", TRAIN, lambda c: ["--config", str(DEMO_CONFIG), "train.bogus=1"],
         fails("config key 'train.bogus'", "unknown key"), subprocess=True),
    Case("wrong_type", TRAIN, lambda c: ["--config", str(DEMO_CONFIG), "data.batch_size=abc"],
         fails("config key 'data.batch_size'", "expected an integer")),
    Case("num_classes_below_2", TRAIN, lambda c: ["--config", str(DEMO_CONFIG), "data.num_classes=1"],
         fails("config key 'data.num_classes'", "must be >= 2")),
    Case("crop_not_multiple_of_patch", TRAIN,
         lambda c: ["--config", str(DEMO_CONFIG), "backbone.name=dino_vits8", "backbone.layers=[]",
                    "data.crop_size=100"],
         fails("config key 'data.crop_size'", "not a multiple of the backbone stride 8"), subprocess=True),
    Case("missing_config_file", TRAIN, lambda c: ["--config", str(c.tmp / "missing.yaml")],
         fails("config file not found", "{tmp}/missing.yaml"), subprocess=True),
    Case("invalid_yaml", TRAIN, lambda c: ["--config", str(write_text(c, "bad.yaml", "data: [unclosed\n  x: 1\n"))],
         fails("config file {tmp}/bad.yaml", "not valid YAML")),
    Case("debug_shows_traceback", TRAIN, lambda c: ["--config", str(c.tmp / "missing.yaml"), "--debug"],
         shows_traceback, subprocess=True),
    # --- shards and samples
    Case("shard_pattern_matches_nothing", TRAIN, lambda c: tiny(c, c.tmp / "nowhere" / "*.tar"),
         fails("config key 'data.train_shards'", "matches no .tar shards")),
    Case("fewer_shards_than_ranks_x_workers", TRAIN,
         lambda c: tiny(c, one_shard_each(c)[0], "data.num_workers=2", val_shards=c.tmp / "val"),
         works(fewer_shards_check), subprocess=True, nproc=2, timeout=300),
    Case("empty_shard_only", TRAIN, lambda c: tiny(c, empty_shard_only(c)),
         fails("data.train_shards", "no shard yields any sample")),
    Case("empty_shard_among_good", TRAIN, lambda c: tiny(c, empty_shard_among_good(c)),
         trained(1, "{tmp}/shards/000000.tar: empty shard")),
    Case("truncated_tar", TRAIN, lambda c: tiny(c, truncated_shard(c)),
         trained(1, "{tmp}/shards/000000.tar", "truncated")),
    Case("corrupt_jpeg", TRAIN, lambda c: tiny(c, corrupt_jpeg_shard(c)),
         trained(1, "skipped unusable sample (1 so far", "{tmp}/shards/000000.tar key c0: not a decodable image"),
         subprocess=True),
    Case("non_image_member", TRAIN, lambda c: tiny(c, non_image_shard(c)),
         trained(1, "{tmp}/shards/000000.tar key n0: no image member (has txt)")),
    Case("images_smaller_than_crop", TRAIN, lambda c: tiny(c, small_image_shard(c)), trained(0)),
    Case("greyscale_and_rgba_images", TRAIN, lambda c: tiny(c, grey_and_rgba_shard(c)), trained(0)),
    Case("make_shards_label_wrong_size", CLI, lambda c: labelled_folder(c, np.zeros((50, 60), np.uint8)),
         shards_report("label_size_mismatch", "train_000001.png")),
    Case("make_shards_label_ids_out_of_range", CLI,
         lambda c: labelled_folder(c, np.full((96, 96), NUM_CLASSES + 3, np.uint8)),
         shards_report("label_out_of_range", "train_000001.png")),
    Case("make_shards_every_label_bad", CLI, lambda c: labelled_folder(c, None),
         fails("no sample was written to {tmp}/out")),
    Case("make_shards_no_images", CLI,
         lambda c: ["make-shards", "--images", str(empty_folder(c)), "--out", str(c.tmp / "out")],
         fails("--images {tmp}/empty")),
    Case("evaluate_label_ids_out_of_range", EVALUATE,
         lambda c: ["--checkpoint", str(c.checkpoint / "latest"), "--shards", str(label_out_of_range_shard(c)),
                    "--out", str(c.tmp / "metrics.json")],
         fails("{tmp}/val/000000.tar key x", f"label ids [{NUM_CLASSES + 3}]", f"data.num_classes={NUM_CLASSES}"),
         needs_checkpoint=True),
    # --- checkpoints
    Case("evaluate_checkpoint_of_other_backbone", EVALUATE,
         lambda c: ["--checkpoint", str(c.checkpoint / "latest"), "backbone.layers=[3]",
                    f"data.val_shards={c.data.val_shards}"],
         fails("backbone.layers=[2,3] but the config says [3]"), needs_checkpoint=True),
    Case("predict_checkpoint_of_other_k", PREDICT,
         lambda c: ["--checkpoint", str(c.checkpoint), "--images", str(c.data.val_images), "--out",
                    str(c.tmp / "pred"), "data.num_classes=5"],
         fails(f"data.num_classes={NUM_CLASSES} but the config says 5"), needs_checkpoint=True),
    Case("checkpoint_of_random_bytes", EVALUATE,
         lambda c: ["--checkpoint", str(write_bytes(c, "garbage.pt", np.random.default_rng(3).bytes(4096)))],
         fails("checkpoint {tmp}/garbage.pt is not a PyTorch checkpoint"), subprocess=True),
    # A text file whose first byte is a pickle opcode (a..e, s, t, ...) makes the unpickler raise IndexError.
    Case("checkpoint_is_a_text_file", EVALUATE,
         lambda c: ["--checkpoint", str(write_text(c, "pointer", "step_000000010\n"))],
         fails("checkpoint {tmp}/pointer is not a PyTorch checkpoint"),
         ),
    Case("checkpoint_missing", PREDICT,
         lambda c: ["--checkpoint", str(c.tmp / "nothing"), "--images", str(c.data.val_images), "--out",
                    str(c.tmp / "pred")],
         fails("checkpoint not found: {tmp}/nothing")),
    # --- backbones
    Case("missing_weights_file", TRAIN,
         lambda c: ["--config", str(DEMO_CONFIG), f"backbone.weights={c.tmp / 'weights.pth'}"],
         fails("config key 'backbone.weights'", "file not found: {tmp}/weights.pth"), subprocess=True),
    # The hub endpoint points at a closed loopback port: "no network" that can never download 85 MB by accident.
    Case("hub_backbone_without_network", TRAIN,
         lambda c: tiny(c, c.data.train_shards, "backbone.name=dino_vits8", "backbone.layers=[]",
                        "backbone.weights=pretrained"),
         fails("backbone.weights", "vit_small_patch8_224.dino", "set backbone.weights=PATH"), subprocess=True,
         env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HTTPS_PROXY": None,
              "https_proxy": None, "ALL_PROXY": None, "all_proxy": None, "HF_HOME": "{tmp}/hf"},
         timeout=120),
    # --- tracking and outputs
    Case("unreachable_mlflow_uri", TRAIN,
         lambda c: tiny(c, c.data.train_shards, f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
                        tracking=True),
         works(mlflow_spooled), subprocess=True),
    Case("output_dir_under_a_file", TRAIN, lambda c: tiny_train_args(c.data.train_shards, a_file(c) / "run"),
         fails("train.output_dir", "{tmp}/file/run"), subprocess=True),
    Case("predict_out_under_a_file", PREDICT,
         lambda c: ["--checkpoint", str(c.checkpoint), "--images", str(c.data.val_images), "--out",
                    str(a_file(c) / "pred")],
         fails("--out", "{tmp}/file/pred"), needs_checkpoint=True),
]


def test_the_table_is_large_and_one_third_runs_in_subprocesses():
    assert len(CASES) >= 22
    assert len({case.id for case in CASES}) == len(CASES)
    assert 3 * sum(case.subprocess for case in CASES) >= len(CASES)


def test_readme_states_the_size_of_the_table():
    readme = (REPO / "README.md").read_text()
    stated = re.search(r"`tests/test_bad_input\.py` holds the table \((\d+) cases\)", readme)
    assert stated is not None, "README no longer points at the table"
    assert int(stated.group(1)) == len(CASES)


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id,
                 marks=[pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else [])
    for case in CASES
])
def test_bad_input(case: Case, demo_data, request, tmp_path):
    ctx = Ctx(demo_data, tmp_path)
    if case.needs_checkpoint:
        ctx.checkpoint = request.getfixturevalue("demo_checkpoint")
    argv = [str(arg) for arg in case.argv(ctx)]
    if case.subprocess:
        command = module_command(case.module, *argv) if case.nproc == 1 else torchrun_command(
            case.nproc, case.module, *argv)
        env = child_env(tmp_path, **{name: ctx.fill(value) if isinstance(value, str) else value
                                     for name, value in case.env.items()})
        result = run_command(command, env=env, timeout=case.timeout)
    else:
        assert not case.env, "in-process cases cannot change the environment"
        torch.set_num_threads(1)
        result = run_main_in_process(case.module, argv)
    case.expect(ctx, result)
    assert not list(ctx.tmp.rglob("*.tmp-*")), "an interrupted checkpoint folder was left behind"

