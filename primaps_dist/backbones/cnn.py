"""Convolutional timm models as feature extractors: selected stages, upsampled and concatenated.

Stages are timm's ``features_only`` stages (``out_indices``); for most CNNs stage ``i`` has stride ``2**(i+1)``
(EfficientNet-Lite0: 0:s2/16ch, 1:s4/24, 2:s8/40, 3:s16/112, 4:s32/320). Coarser stages are upsampled
bilinearly to the finest selected stage and concatenated along channels.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_STRIDE = 16


class StageConcat(nn.Module):
    """Normalised images -> ``[B, sum(channels), H/s, W/s]``, ``s`` the finest stride among the stages.

    ``features`` is a timm ``features_only`` model returning one map per selected stage.
    """

    def __init__(self, features: nn.Module, channels: Sequence[int], reductions: Sequence[int]):
        super().__init__()
        self.features = features
        self.stride = int(min(reductions))
        self.out_channels = int(sum(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        resized = [
            m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)


def stage_reductions(model: nn.Module) -> list[int]:
    """Stride of every feature stage of a full timm model (from its ``feature_info``)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError("backbone.name", f"timm model {type(model).__name__} has no feature stages (feature_info)")
    return [int(stage["reduction"]) for stage in info]


def default_stages(reductions: Sequence[int]) -> list[int]:
    """The deepest stage whose stride is at most 16 (the usual choice for dense features)."""
    eligible = [index for index, reduction in enumerate(reductions) if reduction <= DEFAULT_MAX_STRIDE]
    return [eligible[-1] if eligible else 0]


def _full_key(feature_key: str, full_keys: set[str]) -> str | None:
    """The full model's key for a ``features_only`` key (timm flattens ``stem.0`` into ``stem_0``)."""
    if feature_key in full_keys:
        return feature_key
    head, _, rest = feature_key.partition(".")
    base, _, index = head.rpartition("_")
    if base and index.isdigit():
        candidate = f"{base}.{index}.{rest}" if rest else f"{base}.{index}"
        if candidate in full_keys:
            return candidate
    return None


def drop_unused_blocks(features: nn.Module) -> None:
    """Cut the blocks after the deepest selected stage from timm's EfficientNet/MobileNetV3 feature models.

    Those classes (unlike ``FeatureListNet``) run every block whatever ``out_indices`` says; their ``forward``
    loops over ``self.blocks`` and collects the output after block ``s - 1`` for each selected stage ``s`` (the
    keys of ``_stage_out_idx``).
    """
    stage_out = getattr(features, "_stage_out_idx", None)
    blocks = getattr(features, "blocks", None)
    if isinstance(stage_out, dict) and stage_out and isinstance(blocks, nn.Sequential):
        if getattr(features, "feature_hooks", None) is None:
            features.blocks = blocks[: max(stage_out)]


def copy_weights_into_features(full_state: Mapping[str, torch.Tensor], features: nn.Module) -> None:
    """Load the full model's weights into its ``features_only`` twin; every tensor must be found."""
    full_keys = set(full_state)
    mapped: dict[str, torch.Tensor] = {}
    for key in features.state_dict():
        source = _full_key(key, full_keys)
        if source is None:
            raise RuntimeError(f"cannot find weights for feature-model key {key!r} in the full model")
        mapped[key] = full_state[source]
    features.load_state_dict(mapped, strict=True)


def cnn_extractor(
    model_name: str,
    model: nn.Module,
    *,
    name: str,
    layers: Sequence[int] = (),
    precision: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FeatureExtractor:
    """Wrap the stages ``layers`` of the full timm CNN ``model`` (weights loaded) as a frozen extractor.

    ``layers``: stage indices (negative counts from the end; ``[]`` = the deepest stage with stride <= 16).
    Normalisation defaults to the model's ``pretrained_cfg`` mean/std.
    """
    import timm

    reductions = stage_reductions(model)
    num_stages = len(reductions)
    for index in layers:
        if not -num_stages <= index < num_stages:
            raise ConfigError(
                "backbone.layers", f"stage {index} is out of range for {model_name} with {num_stages} stages"
            )
    stages = sorted({index % num_stages for index in layers}) if layers else default_stages(reductions)
    features = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=tuple(stages))
    drop_unused_blocks(features)
    copy_weights_into_features(model.state_dict(), features)
    info = features.feature_info
    body = StageConcat(features.eval(), info.channels(), info.reduction())
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else tuple(pretrained_cfg.get("mean", IMAGENET_MEAN))
    std = std if std is not None else tuple(pretrained_cfg.get("std", IMAGENET_STD))
    return FeatureExtractor(
        body,
        name=name,
        stride=body.stride,
        out_channels=body.out_channels,
        mean=mean,
        std=std,
        precision=precision,
    )
