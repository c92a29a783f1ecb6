"""``build_backbone``: a :class:`~primaps_dist.config.BackboneConfig` -> a frozen :class:`FeatureExtractor`.

``backbone.name`` is one of

* a preset from :mod:`primaps_dist.backbones.presets` (DINO / DINOv2 ViTs via timm, the offline EfficientNet-Lite0),
* ``"timm:<model>"``: any timm model; ViTs give one block's patch tokens, CNNs the selected ``features_only``
  stages upsampled to the finest one and concatenated,
* ``"module:function"``: a plug-in (contract in :mod:`primaps_dist.backbones.plugin`).

With ``backbone.head_weights=PATH`` a trained projection head (STEGO / HP style) follows any of them
(:mod:`primaps_dist.backbones.head`; file format and command line: :mod:`primaps_dist.backbones.projection_head`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from primaps_dist.backbones import offline
from primaps_dist.backbones.cnn import cnn_extractor
from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.backbones.head import with_projection_head
from primaps_dist.backbones.plugin import plugin_extractor
from primaps_dist.backbones.presets import PRESETS
from primaps_dist.backbones.vit import is_timm_vit, vit_extractor
from primaps_dist.backbones.weights import create_timm_model
from primaps_dist.errors import ConfigError

TIMM_PREFIX = "timm:"


def build_backbone(cfg: Any, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build the frozen feature extractor described by ``cfg`` (a BackboneConfig) on ``device``.

    Raises UserError / ConfigError (naming ``backbone.*``) for an unknown name, unusable weights (missing or
    foreign file, no network for ``pretrained``), a bad layer selection, a stride that disagrees, or a
    projection head (``backbone.head_weights``) that is unreadable or made for another channel count.
    """
    device = torch.device(device)
    extractor = _base_extractor(cfg, device)
    head_weights = getattr(cfg, "head_weights", "")
    if head_weights:
        extractor = with_projection_head(extractor, head_weights)
    return extractor.to(device)


def _base_extractor(cfg: Any, device: torch.device) -> FeatureExtractor:
    name = cfg.name
    if name in PRESETS:
        extractor = _preset_extractor(cfg)
    elif name.startswith(TIMM_PREFIX):
        extractor = _timm_extractor(cfg, name[len(TIMM_PREFIX):])
    elif ":" in name:
        return plugin_extractor(cfg, device)
    else:
        raise ConfigError(
            "backbone.name",
            f"unknown preset {name!r}; use one of {', '.join(PRESETS)}, 'timm:<model>' or 'module:function'",
        )
    if cfg.stride and cfg.stride != extractor.stride:
        raise ConfigError("backbone.stride", f"{cfg.stride} disagrees with the stride {extractor.stride} of {name}")
    return extractor


def _preset_extractor(cfg: Any) -> FeatureExtractor:
    preset = PRESETS[cfg.name]
    layers = list(cfg.layers) or list(preset.default_layers)
    if preset.timm_name == offline.TIMM_NAME:
        model = offline.create_efficientnet_lite0(cfg.weights)
        extractor = cnn_extractor(
            preset.timm_name,
            model,
            name=cfg.name,
            layers=layers,
            precision=cfg.precision,
            mean=offline.INPUT_MEAN,
            std=offline.INPUT_STD,
        )
    elif preset.kind == "vit":
        model = create_timm_model(preset.timm_name, cfg.weights, dynamic_img_size=True)
        extractor = vit_extractor(model, name=cfg.name, layers=layers, precision=cfg.precision)
    else:
        model = create_timm_model(preset.timm_name, cfg.weights)
        extractor = cnn_extractor(preset.timm_name, model, name=cfg.name, layers=layers, precision=cfg.precision)
    if tuple(layers) == tuple(preset.default_layers) and (extractor.stride, extractor.out_channels) != (
        preset.stride,
        preset.channels,
    ):
        raise RuntimeError(
            f"preset {cfg.name} declares stride {preset.stride} / {preset.channels} channels, "
            f"the model gives {extractor.stride} / {extractor.out_channels}"
        )
    return extractor


def _create_timm_any(model_name: str, weights: str) -> nn.Module:
    """Create a timm model, with ``dynamic_img_size=True`` where the model takes it (ViTs)."""
    try:
        return create_timm_model(model_name, weights, dynamic_img_size=True)
    except TypeError:
        return create_timm_model(model_name, weights)


def _timm_extractor(cfg: Any, model_name: str) -> FeatureExtractor:
    model = _create_timm_any(model_name, cfg.weights)
    if is_timm_vit(model):
        return vit_extractor(model, name=cfg.name, layers=list(cfg.layers), precision=cfg.precision)
    return cnn_extractor(model_name, model, name=cfg.name, layers=list(cfg.layers), precision=cfg.precision)
