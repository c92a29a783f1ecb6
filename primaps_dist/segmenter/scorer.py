"""The window scorer: the part of a :class:`~primaps_dist.Segmenter` that the export turns into a program."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from primaps_dist.prototypes import cosine_scores


class WindowScorer(nn.Module):
    """Windows ``[N, 3, S, S]`` float RGB in 0..1 -> cosine scores ``[N, K, S, S]`` (bilinear from the features'
    grid). This module is what the export turns into a program."""

    def __init__(self, backbone: nn.Module, prototypes: torch.Tensor, flip: bool = False):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("prototypes", prototypes.detach().float().clone())
        self.flip = bool(flip)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        features = self.backbone(windows)
        if self.flip:
            features = 0.5 * (features + self.backbone(windows.flip(-1)).flip(-1))
        scores = cosine_scores(features, self.prototypes)
        return F.interpolate(scores, size=windows.shape[-2:], mode="bilinear", align_corners=False)
