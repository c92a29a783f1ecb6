"""The frozen feature extractor wrapper shared by every backbone kind.

A :class:`FeatureExtractor` owns a ``body`` module that maps *normalised* images to a feature map. It adds the
things every caller relies on: input checks, the model's own input normalisation, autocast on CUDA, no autograd
graph, float32 output, and a module that stays frozen (no trainable parameters, always in eval mode).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from primaps_dist.errors import ConfigError, UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain float32.

    Autocast is used on CUDA only (CPU runs in float32). ``auto`` picks bfloat16 where the GPU supports it,
    else float16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class FeatureExtractor(nn.Module):
    """Frozen backbone: ``[B, 3, H, W]`` float RGB in 0..1 -> ``[B, C, H/stride, W/stride]`` float32.

    Attributes:
        stride: feature stride in pixels; H and W must be multiples of it.
        out_channels: C.
        name: the configured backbone name (a preset, ``timm:<model>`` or ``module:function``).
        body: the wrapped module; it receives ``(images - mean) / std`` (or the raw 0..1 images when the
            extractor was built without mean/std).

    The forward pass runs under ``torch.no_grad()`` (not inference mode, so the features can feed modules that
    are trained afterwards) and, on CUDA, under autocast with the configured precision. ``train()`` is a no-op:
    the extractor stays in eval mode, and all its parameters have ``requires_grad=False``.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        stride: int,
        out_channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        precision: str = "auto",
    ):
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.body = body
        self.name = name
        self.stride = int(stride)
        self.out_channels = int(out_channels)
        self.precision = precision
        self.normalises_input = mean is not None
        mean_t = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0), dtype=torch.float32)
        std_t = torch.tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=torch.float32)
        if mean_t.shape != (3,) or std_t.shape != (3,) or bool((std_t <= 0).any()):
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, 3, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always eval mode: a frozen backbone must not update batch-norm statistics or use dropout."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[B, 3, H, W]`` float in 0..1 -> features ``[B, C, H/stride, W/stride]`` float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in 0..1, got {images.dtype}")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the stride {self.stride} of backbone {self.name}"
            )
        dtype = autocast_dtype(self.precision, images.device)
        autocast = contextlib.nullcontext()
        if dtype is not None:
            autocast = torch.autocast(device_type=images.device.type, dtype=dtype)
        with torch.no_grad():
            x = images.float()
            if self.normalises_input:
                x = (x - self.mean) / self.std
            with autocast:
                features = self.body(x)
            if not isinstance(features, torch.Tensor):
                raise UserError(
                    f"backbone {self.name}: the feature module returned {type(features).__name__}, not a tensor"
                )
            expected = (images.shape[0], self.out_channels, height // self.stride, width // self.stride)
            if tuple(features.shape) != expected:
                raise UserError(
                    f"backbone {self.name}: features have shape {list(features.shape)}, expected {list(expected)} "
                    f"(stride {self.stride}, {self.out_channels} channels)"
                )
            return features.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, out_channels={self.out_channels}, precision={self.precision}"


def check_input_size(extractor: FeatureExtractor, crop_size: int, key: str = "data.crop_size") -> None:
    """Raise ``ConfigError(key, ...)`` when ``crop_size`` is not a positive multiple of the extractor's stride."""
    if crop_size < extractor.stride or crop_size % extractor.stride:
        raise ConfigError(
            key, f"{crop_size} is not a multiple of the backbone stride {extractor.stride} ({extractor.name})"
        )
