"""Frozen feature extractors: presets (DINO, DINOv2, offline EfficientNet-Lite0), any timm model, plug-ins.

``build_backbone(cfg.backbone, device)`` returns a :class:`FeatureExtractor` mapping ``[B, 3, H, W]`` RGB in 0..1
to ``[B, C, H/stride, W/stride]`` float32 features.
"""

from primaps_dist.backbones.build import build_backbone
from primaps_dist.backbones.extractor import FeatureExtractor, autocast_dtype, check_input_size
from primaps_dist.backbones.presets import PRESETS, BackbonePreset
from primaps_dist.backbones.weights import load_weights_file

__all__ = [
    "PRESETS",
    "BackbonePreset",
    "FeatureExtractor",
    "autocast_dtype",
    "build_backbone",
    "check_input_size",
    "load_weights_file",
]
