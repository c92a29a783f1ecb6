"""Vision transformers from timm as patch-feature extractors (DINO, DINOv2 and any timm ViT).

The feature map is one block's patch tokens after the model's final norm, with the CLS and register tokens
dropped, reshaped to ``[B, C, H/patch, W/patch]``. Models are created with ``dynamic_img_size=True`` so that any
input side that is a multiple of the patch size works (320 for patch 8, 322 for patch 14); the position
embedding is interpolated by timm.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT-style model with patch tokens and ``forward_intermediates``."""
    return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "forward_intermediates"))


class TimmViTFeatures(nn.Module):
    """Normalised images ``[B, 3, H, W]`` -> block ``block_index``'s patch tokens ``[B, C, H/p, W/p]``.

    The blocks after ``block_index`` and the classifier head are removed from ``model`` (they are never used).
    """

    def __init__(self, model: nn.Module, block_index: int = -1, key: str = "backbone.layers"):
        super().__init__()
        num_blocks = len(model.blocks)
        if not -num_blocks <= block_index < num_blocks:
            raise ConfigError(key, f"block index {block_index} is out of range for a ViT with {num_blocks} blocks")
        self.block_index = block_index % num_blocks
        if hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers([self.block_index], prune_norm=False, prune_head=True)
        self.model = model
        patch = model.patch_embed.patch_size
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise ConfigError("backbone.name", f"non-square patches {patch} are not supported")
        self.stride = int(patch[0])
        self.out_channels = int(getattr(model, "embed_dim", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = self.model.forward_intermediates(
            x,
            indices=[self.block_index],
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return features


def vit_extractor(
    model: nn.Module,
    *,
    name: str,
    layers: Sequence[int] = (),
    precision: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FeatureExtractor:
    """Wrap a timm ViT as a frozen :class:`FeatureExtractor`.

    ``layers``: ``[]`` (last block) or ``[block index]`` (negative counts from the end). Normalisation defaults
    to the model's ``pretrained_cfg`` mean/std (ImageNet for DINO and DINOv2).
    """
    if len(layers) > 1:
        raise ConfigError("backbone.layers", f"a ViT takes one block index, got {list(layers)}")
    block_index = layers[0] if layers else -1
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else tuple(pretrained_cfg.get("mean", IMAGENET_MEAN))
    std = std if std is not None else tuple(pretrained_cfg.get("std", IMAGENET_STD))
    body = TimmViTFeatures(model, block_index)
    return FeatureExtractor(
        body,
        name=name,
        stride=body.stride,
        out_channels=body.out_channels,
        mean=mean,
        std=std,
        precision=precision,
    )
