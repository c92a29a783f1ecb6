"""The :class:`Segmenter`: a trained model that turns images of any size into class-id maps.

    from primaps_dist import Segmenter
    segmenter = Segmenter.from_checkpoint("runs/demo/checkpoints/latest")      # or .from_export / .from_mlflow
    label_maps = segmenter.segment([rgb_uint8_array, ...])                     # int64 [H, W] each

One image, one rule, used by ``evaluate``, ``predict``, the export and the MLflow model alike: windows of the
training crop S (sliding, a third overlap, :mod:`primaps_dist.segmenter.standalone`), per window the cosine scores
of the features to the prototypes upsampled to S x S (features averaged with the flipped image's when
``eval.flip``), scores averaged per pixel, then the argmax, or the CRF of ``eval.crf`` (built by
:func:`primaps_dist.crf.crf_from_config`, the evaluation's CRF) on the averaged scores, then the argmax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from primaps_dist.errors import UserError
from primaps_dist.labels import IGNORE_INDEX
from primaps_dist.prototypes import CRF_TEMPERATURE
from primaps_dist.segmenter.scorer import WindowScorer
from primaps_dist.segmenter.standalone import as_image_tensor, sliding_window_scores

__all__ = ["Segmenter", "WindowScorer", "evaluation_crf", "load_assignment"]


def evaluation_crf(cfg: Any):
    """The CRF that ``eval.crf`` asks for (``crf`` section parameters, ``eval.crf_downsample``), or None."""
    if not cfg.eval.crf:
        return None
    from primaps_dist.crf import crf_from_config

    # eval.crf asks for a CRF: force=True gives the torch backend where crf.backend is none.
    return crf_from_config(cfg.crf, downsample=cfg.eval.crf_downsample, force=True)


def load_assignment(path: str | os.PathLike) -> tuple[list[int], list[str] | None]:
    """The Hungarian assignment (cluster -> class, -1 unmatched) and class names of an ``evaluate`` metrics.json."""
    try:
        metrics = json.loads(Path(path).read_text())
        assignment = [int(a) for a in metrics["assignment"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a metrics.json with an 'assignment' list") from None
    names = metrics.get("class_names")
    return assignment, [str(n) for n in names] if isinstance(names, list) else None


class Segmenter:
    """Images -> class-id maps at the input resolution.

    Args:
        scorer: windows ``[N, 3, S, S]`` -> scores ``[N, K, S, S]`` (a :class:`WindowScorer` or an exported program).
        crop_size: S, the training crop.
        crf_fn: ``crf_fn(log-probabilities [1, K, H, W], image [1, 3, H, W] in 0..255) -> probabilities``, or None.
        assignment: cluster -> class id (-1 = unmatched, mapped to 255); None keeps cluster ids.
        class_names: the name of every output id, or None.
        batch_size: windows per forward pass.
        config: what an export records about the model (the run's config as a dict, the checkpoint step).
    """

    def __init__(self, scorer: nn.Module, *, crop_size: int, crf_fn: Any = None, assignment: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None, batch_size: int = 8, config: Mapping[str, Any] | None = None,
                 device: torch.device | str = "cpu"):
        self.scorer = scorer
        self.crop_size = int(crop_size)
        self.crf_fn = crf_fn
        self.batch_size = int(batch_size)
        self.config = dict(config or {})
        self.device = torch.device(device)
        self.assignment: list[int] | None = None
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        if assignment is not None:
            self.set_assignment(assignment, class_names)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                        overrides: Sequence[str] = (), device: torch.device | str | None = None,
                        crf: bool | None = None, flip: bool | None = None, batch_size: int | None = None,
                        backbone: nn.Module | None = None) -> "Segmenter":
        """The segmenter of a training checkpoint (any path ``evaluate --checkpoint`` takes).

        The backbone is built from the checkpoint's config (``config`` / ``overrides`` replace it, as in
        ``evaluate``); ``crf`` and ``flip`` default to ``eval.crf`` and ``eval.flip``; ``batch_size`` to
        ``data.eval_batch_size``. ``backbone``: an already built one (evaluate and train pass theirs).
        """
        from primaps_dist.config import resolve_run_config
        from primaps_dist.train_state import load_train_state

        saved = load_train_state(path)
        cfg = resolve_run_config(saved.config, config, list(overrides))
        if crf is not None or flip is not None:
            cfg.eval.crf = cfg.eval.crf if crf is None else bool(crf)
            cfg.eval.flip = cfg.eval.flip if flip is None else bool(flip)
        if device is None:
            device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
        if backbone is None:
            from primaps_dist.backbones import build_backbone

            backbone = build_backbone(cfg.backbone, device)
        saved.check_compatible(cfg, channels=backbone.out_channels)
        segmenter = cls.from_parts(cfg, backbone, saved.prototypes, device=device, batch_size=batch_size)
        segmenter.config.update(step=saved.step, source=str(saved.source))
        return segmenter

    @classmethod
    def from_parts(cls, cfg: Any, backbone: nn.Module, prototypes: torch.Tensor, *,
                   device: torch.device | str = "cpu", batch_size: int | None = None) -> "Segmenter":
        """A segmenter from a Config, a built backbone and ``[K, C]`` prototypes (what evaluate and train hold)."""
        crf_fn = evaluation_crf(cfg)
        scorer = WindowScorer(backbone, prototypes.to(device), flip=cfg.eval.flip).to(device)
        return cls(scorer, crop_size=cfg.data.crop_size, crf_fn=crf_fn, device=device,
                   batch_size=batch_size or cfg.data.eval_batch_size, config={"run_config": cfg.to_dict()})

    @classmethod
    def from_export(cls, folder: str | os.PathLike, *, device: torch.device | str = "cpu",
                    crf: bool | None = None, batch_size: int = 8) -> "Segmenter":
        """The segmenter of a ``primaps-dist export`` folder, rebuilt from its safetensors and config.json."""
        from primaps_dist.segmenter.export import read_export

        parts = read_export(Path(folder), crf=crf)
        segmenter = cls(parts["scorer"], crop_size=parts["crop_size"], crf_fn=parts["crf_fn"], batch_size=batch_size,
                        config=parts["config"], class_names=parts["class_names"])
        if parts["assignment"] is not None:
            segmenter.set_assignment(parts["assignment"], parts["class_names"])
        return segmenter.to(device)

    @classmethod
    def from_mlflow(cls, uri: str, *, device: torch.device | str = "cpu", crf: bool | None = None,
                    batch_size: int = 8) -> "Segmenter":
        """The segmenter of an MLflow model (``runs:/<id>/segmenter``, ``models:/<name>/<version>``, a folder)."""
        from primaps_dist.segmenter.mlflow_model import export_folder_of

        return cls.from_export(export_folder_of(uri), device=device, crf=crf, batch_size=batch_size)

    # -- classes -----------------------------------------------------------------------------------------

    def set_assignment(self, assignment: Sequence[int], class_names: Sequence[str] | None = None) -> "Segmenter":
        """Output class ids instead of cluster ids: cluster k -> ``assignment[k]`` (-1 -> 255)."""
        self.assignment = [int(a) for a in assignment]
        if len(self.assignment) != self.num_clusters:
            raise UserError(f"the class assignment has {len(self.assignment)} entries but the model has "
                            f"{self.num_clusters} clusters")
        if class_names is not None:
            self.class_names = list(class_names)
        return self

    def with_class_names(self, source: str | os.PathLike | Mapping[int, str] | Sequence[str]) -> "Segmenter":
        """Name the output ids: an ``evaluate`` metrics.json (its Hungarian assignment and class names; the
        output becomes class ids) or a user mapping / list, cluster id -> name (the output stays cluster ids)."""
        if isinstance(source, (str, os.PathLike)):
            assignment, names = load_assignment(source)
            return self.set_assignment(assignment, names)
        if isinstance(source, Mapping):
            self.class_names = [str(source.get(k, source.get(str(k), f"cluster_{k}"))) for k in range(self.num_clusters)]
        else:
            self.class_names = [str(name) for name in source]
        return self

    @property
    def num_clusters(self) -> int:
        return int(self.scorer.prototypes.shape[0]) if hasattr(self.scorer, "prototypes") else int(
            self.config["num_classes"])

    def to(self, device: torch.device | str) -> "Segmenter":
        self.device = torch.device(device)
        self.scorer.to(self.device)
        return self

    # -- inference ---------------------------------------------------------------------------------------

    def _tensors(self, images: Any) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if images.dtype == torch.uint8:  # a loader's uint8 batch
                return list(images.to(self.device).float() / 255.0)
            if not images.is_floating_point():
                raise ValueError(f"a batch tensor must be float in 0..1 or uint8 [B, 3, H, W], got {images.dtype}")
            return list(images.to(self.device).float())
        if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 3:
            images = [images]
        return [as_image_tensor(image, self.device) for image in images]

    def scores(self, images: Any) -> list[torch.Tensor]:
        """Averaged window scores ``[K, H, W]`` float32 per image (the exported program's numbers)."""
        with torch.inference_mode():
            return sliding_window_scores(self.scorer, self._tensors(images), self.crop_size, self.batch_size)

    def segment(self, images: Any) -> Any:
        """Class-id maps at the input resolution.

        ``images``: a tensor ``[B, 3, H, W]``, float in 0..1 or uint8 (-> int64 tensor ``[B, H, W]``), or a sequence of
        images of any sizes (-> list of int64 ``[H_i, W_i]`` tensors), each a ``uint8 [H, W, 3]`` array or tensor,
        a float ``[3, H, W]`` tensor in 0..1 or a PIL image. Ids are cluster ids, or class ids (255 = unmatched)
        after :meth:`with_class_names` with a metrics.json.
        """
        tensors = self._tensors(images)
        with torch.inference_mode():
            scores = sliding_window_scores(self.scorer, tensors, self.crop_size, self.batch_size)
            maps = []
            for image, score in zip(tensors, scores):
                if self.crf_fn is not None:  # per image: the result never depends on what else is in the batch
                    score = self.crf_fn(F.log_softmax(score[None] / CRF_TEMPERATURE, dim=1), image[None] * 255.0)[0]
                maps.append(score.argmax(0))
            if self.assignment is not None:
                lookup = torch.tensor([a if a >= 0 else IGNORE_INDEX for a in self.assignment], device=self.device)
                maps = [lookup[ids] for ids in maps]
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return torch.stack(maps)
        return maps
