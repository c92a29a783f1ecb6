"""The typed training state of a checkpoint: payload round trip, schema version, one-line refusals of other
versions and damaged payloads, and the compatibility check against a config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from primaps_dist import checkpoint as ckpt
from primaps_dist import evaluate
from primaps_dist.config import Config
from primaps_dist.errors import UserError, run_cli
from primaps_dist.train_state import READABLE_VERSIONS, SCHEMA_VERSION, BackboneRecord, TrainState, load_train_state

K, C = 5, 8


def make_state(world_size: int = 2, seed: int = 0, **changes) -> TrainState:
    generator = torch.Generator().manual_seed(seed)
    cfg = Config()
    cfg.data.num_classes = K
    values = dict(
        prototypes=torch.nn.functional.normalize(torch.randn(K, C, generator=generator), dim=1),
        step=12,
        stage="em",
        config=cfg.to_dict(),
        backbone=BackboneRecord(cfg.backbone.name, list(cfg.backbone.layers), C),
        num_classes=K,
        world_size=world_size,
        em_state={"prototypes": torch.randn(K, C, generator=generator),
                  "M": torch.randn(K, C, generator=generator, dtype=torch.float64),
                  "W": torch.rand(K, generator=generator, dtype=torch.float64), "step": torch.tensor(4)},
        data_position={"version": 2, "step": 12, "positions": {str(s): [s, 3] for s in range(4)}},
        skipped_total=3,
        mlflow_run_id="abc",
        kmeans_prototypes=torch.randn(K, C, generator=generator),
        gradient_state=None,
    )
    values.update(changes)
    return TrainState(**values)


def same(left, right) -> bool:
    """Exact equality of nested tensors, dicts, lists and plain values."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and torch.equal(left, right)
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right))
    return type(left) is type(right) and left == right


def assert_same_state(expected: TrainState, actual: TrainState) -> None:
    for item in dataclasses.fields(TrainState):
        if item.name != "source":
            assert same(getattr(expected, item.name), getattr(actual, item.name)), item.name


def save(state: TrainState, root: Path, payload: dict | None = None) -> Path:
    return ckpt.save_checkpoint(root, state.step, payload if payload is not None else state.to_payload(), keep=3)


def test_round_trip_through_a_checkpoint(tmp_path):
    state = make_state(gradient_state={"engine": {"head": {"weight": torch.ones(K, C)}}, "sharded_subdir": ""})
    folder = save(state, tmp_path)
    raw = torch.load(folder / "checkpoint.pt", weights_only=True)  # any reader can load it
    assert raw["schema_version"] == SCHEMA_VERSION == 3
    assert "student_generators" not in raw  # the views are seeded per sample: no per-rank state
    assert raw["backbone"] == {"name": "efficientnet_lite0", "layers": [], "channels": C}
    assert raw["step"] == 12 and raw["world_size"] == 2 and raw["mlflow_run_id"] == "abc"
    loaded = load_train_state(tmp_path)
    assert_same_state(state, loaded)
    assert loaded.source == str(folder / "checkpoint.pt")
    assert torch.equal(loaded.gradient_state["engine"]["head"]["weight"], torch.ones(K, C))


def test_schema_2_checkpoint_loads_and_its_student_generators_are_ignored(tmp_path):
    """Version 2 (before the views were seeded per sample) is version 3 plus one state per rank of the
    student-view generators: still read, that field ignored, on any world size."""
    state = make_state(world_size=2)
    payload = state.to_payload()
    payload.update(schema_version=2,
                   student_generators=[torch.Generator().manual_seed(rank).get_state() for rank in range(2)])
    folder = save(state, tmp_path, payload)
    loaded = load_train_state(folder)
    assert_same_state(state, loaded)
    assert not hasattr(loaded, "student_generators") and "student_generators" not in loaded.to_payload()
    assert loaded.to_payload()["schema_version"] == 3  # saved again, it is a version 3 checkpoint
    assert 2 in READABLE_VERSIONS and SCHEMA_VERSION in READABLE_VERSIONS
    payload.update(student_generators=[None])  # not checked: the field is not read at all
    assert TrainState.from_payload(payload).step == 12
    del payload["em_state"]
    with pytest.raises(UserError, match=r"lacks 'em_state' \(schema_version 2\)"):
        TrainState.from_payload(payload)


def test_payload_without_schema_version_is_refused_in_one_line(tmp_path):
    payload = make_state().to_payload()
    del payload["schema_version"]  # what primaps-dist wrote before the version existed
    folder = save(make_state(), tmp_path, payload)
    with pytest.raises(UserError) as err:
        load_train_state(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / "checkpoint.pt") in message and "no schema_version" in message


def test_payload_of_another_version_is_refused_in_one_line(tmp_path):
    payload = make_state().to_payload()
    payload["schema_version"] = 4
    folder = save(make_state(), tmp_path, payload)
    with pytest.raises(UserError, match=r"has schema_version 4, but this primaps-dist reads schema_version 2 or 3 "
                                        r"only"):
        load_train_state(folder)
    for version in (1, "3", 3.0):
        payload["schema_version"] = version
        with pytest.raises(UserError, match="but this primaps-dist reads"):
            TrainState.from_payload(payload)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("em_state"), "lacks 'em_state'"),
        (lambda p: p.update(step=12.0), "'step' is not an integer"),
        (lambda p: p.update(data_position=[None]), "'data_position' is not a dict or None"),
        (lambda p: p.update(backbone={"name": "x"}), "'backbone' is not a dict with name, layers and channels"),
        (lambda p: p.update(kmeans_prototypes=[1.0]), "'kmeans_prototypes' is not a tensor or None"),
    ],
)
def test_damaged_payloads_are_refused_in_one_line(tmp_path, change, message):
    payload = make_state().to_payload()
    change(payload)
    with pytest.raises(UserError, match=message):
        TrainState.from_payload(payload, source=tmp_path / "checkpoint.pt")


def test_evaluate_refuses_an_old_checkpoint_with_exit_2(tmp_path, capsys):
    payload = make_state(world_size=1).to_payload()
    del payload["schema_version"]
    folder = save(make_state(), tmp_path / "checkpoints", payload)
    assert run_cli(evaluate.main, ["--checkpoint", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: checkpoint {folder / 'checkpoint.pt'} has no schema_version")


def test_check_compatible_names_the_differing_key():
    state = make_state()
    state.config["backbone"]["name"] = "dino_vits8"
    state.source = "run/checkpoints/step_000000001/checkpoint.pt"
    cfg = Config()
    cfg.data.num_classes = 5
    with pytest.raises(UserError, match=r"checkpoint run/checkpoints/step_000000001/checkpoint.pt was trained with "
                                        r"backbone.name=dino_vits8 but the config says efficientnet_lite0"):
        state.check_compatible(cfg)
    state.config["backbone"]["name"] = cfg.backbone.name
    state.check_compatible(cfg, channels=8)  # compatible: no error
    cfg.backbone.layers = [3]
    with pytest.raises(UserError, match=r"backbone.layers=\[\] but the config says \[3\]"):
        state.check_compatible(cfg)
    cfg.backbone.layers = []
    cfg.backbone.weights = "random"
    with pytest.raises(UserError, match="backbone.weights=pretrained"):
        state.check_compatible(cfg)
    cfg.backbone.weights = "pretrained"
    cfg.data.num_classes = 27
    with pytest.raises(UserError, match="data.num_classes=5 but the config says 27"):
        state.check_compatible(cfg)
    cfg.data.num_classes = 5
    with pytest.raises(UserError, match="8-channel prototypes but backbone efficientnet_lite0 gives 384 channels"):
        state.check_compatible(cfg, channels=384)


def test_check_compatible_refuses_another_projection_head(tmp_path):
    """Prototypes live in the head's output space: a run without a head, or with another head of the
    same output size (which the channel check cannot see), must be refused by name."""
    first, same, other = tmp_path / "head.pt", tmp_path / "moved" / "head.pt", tmp_path / "other.pt"
    same.parent.mkdir()
    first.write_bytes(b"weights A")
    same.write_bytes(b"weights A")
    other.write_bytes(b"weights B")
    state = make_state()
    state.config["backbone"]["head_weights"] = str(first)
    cfg = Config()
    cfg.data.num_classes = 5
    with pytest.raises(UserError, match=rf"backbone.head_weights={first} but the config says none"):
        state.check_compatible(cfg)
    cfg.backbone.head_weights = str(other)
    with pytest.raises(UserError, match=rf"backbone.head_weights={first} but the config says {other}"):
        state.check_compatible(cfg)
    cfg.backbone.head_weights = str(same)  # a copy of the same file elsewhere
    state.check_compatible(cfg)
    first.unlink()  # the training run's file is gone: the bytes cannot be compared
    cfg.backbone.head_weights = str(other)
    state.check_compatible(cfg)
    state.config["backbone"]["head_weights"] = ""
    with pytest.raises(UserError, match=rf"backbone.head_weights=none but the config says {other}"):
        state.check_compatible(cfg)
