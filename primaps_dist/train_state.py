"""The training state a checkpoint holds, as one typed record with a schema version.

:class:`TrainState` is everything needed to continue a run bit for bit, and what evaluation and prediction read
back. The trainer builds one at every save and writes :meth:`TrainState.to_payload` with
:func:`primaps_dist.checkpoint.save_checkpoint`; every reader goes through :func:`load_train_state`, which
refuses a payload of another schema version with one line naming the file. The payload is a plain dict of
tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it without this code.

Change the layout -> bump :data:`SCHEMA_VERSION`. Checkpoints written before the version existed have no
``schema_version`` key and are refused the same way (their field set differed). Older versions that only
carried a field more (:data:`READABLE_VERSIONS`) are still read; the retired field is ignored.
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from primaps_dist import checkpoint as ckpt
from primaps_dist.errors import UserError

__all__ = ["READABLE_VERSIONS", "SCHEMA_VERSION", "BackboneRecord", "TrainState", "load_train_state"]

# 2: one global data position (data_position) instead of one loader state per rank.
# 3: no per-rank student_generators: the photometric view is seeded by each sample's place in the data.
SCHEMA_VERSION = 3
# A version 2 payload is version 3 plus student_generators, which is ignored: a run resumed from one draws its
# remaining student views the version 3 way (seeded by sample), not from the saved generators.
READABLE_VERSIONS = (2, 3)
VERSION_KEY = "schema_version"


@dataclass(frozen=True)
class BackboneRecord:
    """The backbone the prototypes were trained on: ``backbone.name``, ``backbone.layers`` and the channel
    count C of its features (after any projection head)."""

    name: str
    layers: list[int]
    channels: int


@dataclass
class TrainState:
    """One snapshot of a run that resumes on any number of ranks (no part of it is per rank; ``world_size``
    only records how many wrote it).

    prototypes: [K, C] float32 unit rows (theta_M's in ``gradient`` mode).
    step: global steps done; stage: the stage of the last step done (``pca``, ``kmeans`` or ``em``).
    config: the resolved config (:meth:`Config.to_dict`).
    em_state: :meth:`PrototypeState.state_dict` (prototypes, moving statistics M [K, C], W [K], step).
    data_position: the global position of the training stream, valid on any number of ranks
        (:func:`primaps_dist.data.loader.merge_states`), or None (an injected loader without positions).
    kmeans_prototypes: [K, C] K-means result kept to report the baseline, or None before it exists.
    gradient_state: :meth:`GradientEngine.state_dict` in ``gradient`` mode, else None.
    mlflow_run_id: "" when no MLflow run was started.
    """

    prototypes: torch.Tensor
    step: int
    stage: str
    config: dict[str, Any]
    backbone: BackboneRecord
    num_classes: int
    world_size: int
    em_state: dict[str, torch.Tensor]
    data_position: dict[str, Any] | None
    skipped_total: int = 0
    mlflow_run_id: str = ""
    kmeans_prototypes: torch.Tensor | None = None
    gradient_state: dict[str, Any] | None = None
    source: str = dataclasses.field(default="", compare=False)  # the file it was read from (not saved)

    # -- payload ----------------------------------------------------------------------------------------

    def to_payload(self) -> dict[str, Any]:
        """The checkpoint payload: a plain dict, ``schema_version`` first."""
        payload: dict[str, Any] = {VERSION_KEY: SCHEMA_VERSION}
        for item in dataclasses.fields(self):
            if item.name != "source":
                payload[item.name] = getattr(self, item.name)
        payload["backbone"] = dataclasses.asdict(self.backbone)
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str | os.PathLike = "") -> "TrainState":
        """Read a payload of a readable schema version (:data:`READABLE_VERSIONS`; fields of older versions that
        this one no longer has, e.g. version 2's ``student_generators``, are ignored); UserError in one line
        (naming ``source``) for any other version, a missing field or a field of the wrong type."""
        where = f"checkpoint {source}" if str(source) else "the checkpoint"
        version = payload.get(VERSION_KEY) if isinstance(payload, dict) else None
        if version is None:
            raise UserError(f"{where} has no {VERSION_KEY}: it was written by an older primaps-dist whose "
                            f"checkpoints this version ({VERSION_KEY} {SCHEMA_VERSION}) cannot read; train anew")
        if type(version) is not int or version not in READABLE_VERSIONS:
            readable = " or ".join(map(str, READABLE_VERSIONS))
            raise UserError(f"{where} has {VERSION_KEY} {version!r}, but this primaps-dist reads {VERSION_KEY} "
                            f"{readable} only; use the primaps-dist that wrote it")
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name == "source":
                continue
            if item.name not in payload:
                raise UserError(f"{where} lacks '{item.name}' ({VERSION_KEY} {version}): the file is damaged")
            values[item.name] = payload[item.name]
        _check_types(values, where)
        backbone = values["backbone"]
        values["backbone"] = BackboneRecord(str(backbone["name"]), [int(x) for x in backbone["layers"]],
                                            int(backbone["channels"]))
        return cls(**values, source=str(source))

    # -- compatibility ----------------------------------------------------------------------------------

    def check_compatible(self, cfg: Any, *, channels: int | None = None) -> None:
        """Raise UserError when these prototypes cannot serve ``cfg`` (a Config).

        Compared: ``backbone.name``, ``backbone.layers``, random versus trained ``backbone.weights``, with
        or without a projection head (``backbone.head_weights``; two different head files are refused
        when both can still be read and their bytes differ), the number of prototypes K
        (``data.num_classes``) and, when the built backbone's ``channels`` are given, the channel count C.
        The message names the key, e.g. "checkpoint X was trained with
        backbone.name=dino_vits8 but the config says efficientnet_lite0".
        """
        where = f"checkpoint {self.source}" if self.source else "the checkpoint"
        saved = self.config["backbone"]

        def differ(key: str, old: Any, new: Any) -> None:
            raise UserError(f"{where} was trained with {key}={_show(old)} but the config says {_show(new)}")

        if saved["name"] != cfg.backbone.name:
            differ("backbone.name", saved["name"], cfg.backbone.name)
        if list(saved["layers"]) != list(cfg.backbone.layers):
            differ("backbone.layers", list(saved["layers"]), list(cfg.backbone.layers))
        if (saved["weights"] == "random") != (cfg.backbone.weights == "random"):
            differ("backbone.weights", saved["weights"], cfg.backbone.weights)
        saved_head, head = saved.get("head_weights", ""), cfg.backbone.head_weights
        if bool(saved_head) != bool(head) or (saved_head and head and _different_files(saved_head, head)):
            differ("backbone.head_weights", saved_head or "none", head or "none")
        if self.prototypes.shape[0] != cfg.data.num_classes:
            differ("data.num_classes", int(self.prototypes.shape[0]), cfg.data.num_classes)
        if channels is not None and self.prototypes.shape[1] != channels:
            raise UserError(
                f"{where} has {self.prototypes.shape[1]}-channel prototypes but backbone {cfg.backbone.name} gives "
                f"{channels} channels (backbone.name / backbone.layers)"
            )


def _different_files(first: str, second: str) -> bool:
    """True when both files can be read and their bytes differ (a moved head file is accepted)."""
    if os.path.abspath(first) == os.path.abspath(second) or not (os.path.isfile(first) and os.path.isfile(second)):
        return False
    return not filecmp.cmp(first, second, shallow=False)


def _check_types(values: dict[str, Any], where: str) -> None:
    def bad(name: str, expected: str) -> UserError:
        return UserError(f"{where}: '{name}' is not {expected}")

    for name in ("step", "num_classes", "world_size", "skipped_total"):
        if type(values[name]) is not int:
            raise bad(name, "an integer")
    for name in ("stage", "mlflow_run_id"):
        if not isinstance(values[name], str):
            raise bad(name, "a string")
    for name in ("config", "em_state"):
        if not isinstance(values[name], dict):
            raise bad(name, "a dict")
    if not isinstance(values["config"].get("backbone"), dict) or not {"name", "layers", "weights"} <= set(
            values["config"]["backbone"]):
        raise bad("config.backbone", "a dict with name, layers and weights")
    backbone = values["backbone"]
    if not isinstance(backbone, dict) or not {"name", "layers", "channels"} <= set(backbone):
        raise bad("backbone", "a dict with name, layers and channels")
    if values["data_position"] is not None and not isinstance(values["data_position"], dict):
        raise bad("data_position", "a dict or None")
    for name in ("kmeans_prototypes", "gradient_state"):
        if values[name] is None:
            continue
        if name == "kmeans_prototypes" and not isinstance(values[name], torch.Tensor):
            raise bad(name, "a tensor or None")
        if name == "gradient_state" and not isinstance(values[name], dict):
            raise bad(name, "a dict or None")


def _show(value: Any) -> str:
    return str(value) if not isinstance(value, list) else "[" + ",".join(map(str, value)) + "]"


def load_train_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainState:
    """The :class:`TrainState` of the checkpoint that ``path`` designates (a ``checkpoint.pt``, a step folder,
    a ``checkpoints`` folder, a run folder or ``.../latest``; see :func:`checkpoint.resolve_checkpoint`).

    One-line UserErrors name the file: unreadable or unsafe files (from :func:`checkpoint.load_checkpoint`),
    another schema version, missing or mistyped fields.
    """
    file = ckpt.resolve_checkpoint(path)
    return TrainState.from_payload(ckpt.load_checkpoint(file, map_location=map_location), source=Path(file))
