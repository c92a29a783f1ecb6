"""``primaps-dist export``: a model folder that needs neither the network nor primaps_dist.

    primaps-dist export --checkpoint runs/demo/checkpoints/latest --out model/ [--assignment metrics.json]

The folder holds

* ``weights.safetensors``: the backbone's state dict (``backbone.*``; with a projection head,
  ``backbone.head_weights``, the backbone is ``backbone.body.0.*`` and the head ``backbone.body.1.*``, so the
  head file is not needed to load the folder), the prototypes ``[K, C]`` and the preprocessing
  (``preprocessing.mean`` / ``preprocessing.std``, applied to RGB in 0..1 before the backbone);
* ``config.json``: format and version, backbone section, crop size, stride, channels, K, flip, the CRF settings of
  ``eval.crf`` (or null), class assignment and names, the source checkpoint and step;
* ``window_program.pt2``: a ``torch.export`` program, windows ``[N, 3, S, S]`` -> scores ``[N, K, S, S]``, loaded
  with ``torch.export.load`` alone;
* ``segment.py``: the sliding window and argmax around the program (:mod:`primaps_dist.segmenter.standalone`).

The CRF is not inside the program: ``segment.py`` returns the argmax without it; :meth:`Segmenter.from_export`
applies the CRF recorded in config.json, with primaps_dist's CRF code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import primaps_dist.segmenter.standalone as standalone
from primaps_dist.errors import UserError
from primaps_dist.segmenter.scorer import WindowScorer

WEIGHTS_NAME = "weights.safetensors"
RUNNER_NAME = "segment.py"
EXPORT_FILES = (standalone.CONFIG_NAME, WEIGHTS_NAME, standalone.PROGRAM_NAME, RUNNER_NAME)


def export_config(segmenter) -> dict[str, Any]:
    run = segmenter.config["run_config"]
    scorer = segmenter.scorer
    return {
        "format": standalone.FORMAT,
        "format_version": standalone.FORMAT_VERSION,
        "backbone": run["backbone"],
        "crop_size": segmenter.crop_size,
        "stride": int(scorer.backbone.stride),
        "channels": int(scorer.prototypes.shape[1]),
        "num_classes": int(scorer.prototypes.shape[0]),
        "flip": bool(scorer.flip),
        "crf": run["crf"] if run["eval"]["crf"] else None,
        "crf_downsample": run["eval"]["crf_downsample"],
        "input": "RGB float in 0..1, [N, 3, S, S] windows; preprocessing (x - mean) / std is inside the program",
        "assignment": segmenter.assignment,
        "class_names": segmenter.class_names,
        "source_checkpoint": segmenter.config.get("source", ""),
        "step": segmenter.config.get("step"),
    }


def write_export(segmenter, out: Path) -> Path:
    """Write the export folder of a :class:`~primaps_dist.Segmenter` (built from a checkpoint) into ``out``."""
    from safetensors.torch import save_file

    segmenter.to("cpu")
    scorer: WindowScorer = segmenter.scorer
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.detach().contiguous() for k, v in scorer.backbone.state_dict().items()}
    tensors["prototypes"] = scorer.prototypes.contiguous()
    tensors["preprocessing.mean"] = scorer.backbone.mean.reshape(3).contiguous()
    tensors["preprocessing.std"] = scorer.backbone.std.reshape(3).contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME))
    example = torch.rand(2, 3, segmenter.crop_size, segmenter.crop_size)
    batch = torch.export.Dim("windows", min=1, max=4096)
    program = torch.export.export(scorer.eval(), (example,), dynamic_shapes={"windows": {0: batch}})
    torch.export.save(program, str(out / standalone.PROGRAM_NAME))
    shutil.copyfile(standalone.__file__, out / RUNNER_NAME)
    (out / standalone.CONFIG_NAME).write_text(json.dumps(export_config(segmenter), indent=2))
    return out


def check_export_folder(folder: Path) -> dict[str, Any]:
    """The config.json of an export folder; UserError naming the folder or file when it is not one."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such export folder")
    missing = [name for name in (standalone.CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: not a complete export folder (missing {', '.join(missing)})")
    path = folder / standalone.CONFIG_NAME
    try:
        config = json.loads(path.read_text())
        ok = config.get("format") == standalone.FORMAT and {"backbone", "crop_size", "num_classes"} <= set(config)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{path}: not a {standalone.FORMAT} config (damaged or from another program)")
    if config.get("format_version") != standalone.FORMAT_VERSION:
        raise UserError(f"{path}: format_version {config.get('format_version')!r}, this primaps-dist reads "
                        f"{standalone.FORMAT_VERSION}")
    return config


def _with_exported_head(backbone, state: dict[str, torch.Tensor], label: str):
    """``backbone`` followed by a :class:`~primaps_dist.backbones.head.ProjectionHead` sized like the exported
    one (``state``'s ``body.1.*`` tensors; weights loaded later with the rest), attached as
    ``backbone.head_weights`` attaches it. ValueError naming ``body.1.*`` when no head fits those tensors."""
    from primaps_dist.backbones.head import HEAD_STATE_PREFIX as prefix
    from primaps_dist.backbones.head import attach_projection_head, projection_head_shaped_like

    head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        head = projection_head_shaped_like(head_state)
    except ValueError as err:
        raise ValueError(f"{prefix}*: {err}") from None
    return attach_projection_head(backbone, head, label)


def read_export(folder: Path, *, crf: bool | None = None) -> dict[str, Any]:
    """The parts :meth:`Segmenter.from_export` is made of (scorer, crop_size, crf_fn, assignment, class_names,
    config): the backbone rebuilt (random init, no network), followed by the projection head of
    ``backbone.head_weights`` when the model has one (sized from its exported tensors; the head file itself is
    not needed), with the safetensors' weights loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from primaps_dist.backbones import build_backbone
    from primaps_dist.config import Config, config_from_dict

    config = check_export_folder(folder)
    weights_path = folder / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{weights_path}: unreadable safetensors file ({str(err).splitlines()[0][:120]})") from None
    cfg = config_from_dict({"backbone": config["backbone"]})
    head_weights, cfg.backbone.head_weights = cfg.backbone.head_weights, ""  # the head's tensors are exported too
    cfg.backbone.weights = "random"  # the real weights come from the safetensors file below
    backbone = build_backbone(cfg.backbone, "cpu")
    state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}

    def misfit(first: str) -> UserError:
        head = f" + projection head {Path(head_weights).name}" if head_weights else ""
        return UserError(f"{weights_path}: the weights do not fit backbone {cfg.backbone.name} layers "
                         f"{list(cfg.backbone.layers)}{head} (first mismatch: {first})")

    if head_weights:
        try:
            backbone = _with_exported_head(backbone, state, Path(head_weights).name)
        except ValueError as err:
            raise misfit(str(err)) from None
    expected = backbone.state_dict()
    bad = sorted(set(state) ^ set(expected)) or [k for k in expected if state[k].shape != expected[k].shape]
    if bad or "prototypes" not in tensors:
        raise misfit(bad[0] if bad else "prototypes")
    backbone.load_state_dict(state)
    prototypes = tensors["prototypes"]
    if tuple(prototypes.shape) != (config["num_classes"], backbone.out_channels):
        raise UserError(f"{weights_path}: prototypes {list(prototypes.shape)} do not fit backbone {cfg.backbone.name} "
                        f"layers {list(cfg.backbone.layers)} ({config['num_classes']} classes of {backbone.out_channels} "
                        f"channels)")
    crf_fn = None
    use_crf = config.get("crf") is not None if crf is None else crf
    if use_crf:
        from primaps_dist.crf import crf_from_config

        crf_section = config_from_dict({"crf": config.get("crf") or {}}).crf
        crf_fn = crf_from_config(crf_section, downsample=int(config.get("crf_downsample", 1)), force=True)
    scorer = WindowScorer(backbone, prototypes, flip=bool(config.get("flip", False)))
    run = Config().to_dict()
    run["backbone"] = config["backbone"]
    return {"scorer": scorer, "crop_size": int(config["crop_size"]), "crf_fn": crf_fn, "config": {**config, "run_config": run},
            "assignment": config.get("assignment"), "class_names": config.get("class_names")}
