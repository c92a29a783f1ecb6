"""The student's view: the reference's photometric augmentation on 0..1 RGB, before any normalisation.

:func:`photometric_view` blurs every image, then applies colour jitter or greyscale by chance
(:class:`PhotometricParams`). Its random numbers are given per image, eight uniforms each
(:func:`photometric_draws`), drawn from the sample's own place in the training data: a sample gets the same
view whichever rank, loader worker or batch holds it, so W ranks give the views of one rank with the whole
global batch (elastic determinism), and a resumed run the views of the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NUM_DRAWS", "PhotometricParams", "photometric_draws", "photometric_view"]

NUM_DRAWS = 8  # uniforms per image: sigma, branch, jitter?, grey?, brightness, contrast, saturation, hue
_TAG_VIEW = 0x5649_4557  # "VIEW": keeps these streams apart from the data order's (crops, visits)


@dataclass(frozen=True)
class PhotometricParams:
    """The reference's student augmentation: blur always; then either jitter or greyscale branch."""

    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U(low, high), per image
    blur_kernel: int = 21
    jitter_branch_p: float = 0.5  # else the greyscale branch
    jitter_p: float = 0.3  # inside the jitter branch
    brightness: float = 0.1  # factor ~ U(1 - x, 1 + x)
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.1  # shift ~ U(-x, x) of a full turn
    greyscale_p: float = 0.1  # inside the greyscale branch


def photometric_draws(keys: torch.Tensor | list[int], seed: int) -> torch.Tensor:
    """The random numbers of the views of the samples ``keys`` ``[B]`` (non-negative int64, one per sample, e.g.
    the loader's ``sample_index``: the sample's place in the global training sequence): float64 ``[8, B]``
    uniform in [0, 1).

    Column ``b`` is a function of (``seed``, ``keys[b]``) only: numpy's ``default_rng([tag, seed, key])``
    (a SeedSequence hash of the three numbers, then PCG64) gives its 8 uniforms, the same way the data order
    seeds a sample's crop (:func:`primaps_dist.data.order.crop_rng`). So the same key gives the same view in
    any batch, on any rank and device; another key (another sample, or the same image at a later visit) an
    independent one. Costs ~20 us per sample on the CPU.
    """
    keys = torch.as_tensor(keys, dtype=torch.int64).flatten().tolist()
    if any(key < 0 for key in keys):
        raise ValueError(f"photometric keys must be non-negative, got {min(keys)}")
    seed = int(seed) % (1 << 63)
    columns = [np.random.default_rng([_TAG_VIEW, seed, key]).random(NUM_DRAWS) for key in keys]
    draws = np.stack(columns, axis=1) if columns else np.zeros((NUM_DRAWS, 0))
    return torch.tensor(draws, dtype=torch.float64)  # a copy of 8 x B numbers


_LUMA = (0.299, 0.587, 0.114)


def _luminance(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur with a per-image sigma ``[B]``: one grouped convolution per axis."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # [B, k]
    kernels = kernels.repeat_interleave(channels, dim=0)  # [B*3, k]
    mode = "reflect" if half < min(height, width) else "replicate"
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (half, half, half, half), mode=mode)
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def _hue_rotate(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by ``turns`` ``[B]`` of a full circle (luma preserved)."""
    to_yiq64 = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
    )
    to_rgb = torch.linalg.inv(to_yiq64).to(device=images.device, dtype=images.dtype)
    to_yiq = to_yiq64.to(device=images.device, dtype=images.dtype)
    angle = 2.0 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(turns.shape[0], 3, 3, dtype=images.dtype, device=images.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrices = to_rgb @ rotation @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrices, images)


def _colour_jitter(images: torch.Tensor, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (fixed order), each factor per image ``[B]``; clamped to 0..1."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    images = (images * view(brightness)).clamp(0.0, 1.0)
    mean_grey = _luminance(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (view(contrast) * images + (1.0 - view(contrast)) * mean_grey).clamp(0.0, 1.0)
    images = (view(saturation) * images + (1.0 - view(saturation)) * _luminance(images)).clamp(0.0, 1.0)
    return _hue_rotate(images, hue).clamp(0.0, 1.0)


def photometric_view(
    images: torch.Tensor, draws: torch.Tensor, params: PhotometricParams = PhotometricParams()
) -> torch.Tensor:
    """Photometrically augmented copy of ``images`` ``[B, 3, H, W]`` with values in 0..1 (un-normalised).

    Per image: Gaussian blur (sigma ~ U(0.1, 2), 21 taps, reflect padding); then with probability
    ``jitter_branch_p`` the jitter branch (colour jitter with probability ``jitter_p``), else the
    greyscale branch (greyscale with probability ``greyscale_p``) -- the reference's recipe. ``draws``: the
    random numbers, float64 ``[8, B]`` uniform in [0, 1) on the CPU (:func:`photometric_draws`); column ``b``
    alone decides image ``b``'s view (rows: sigma, branch, jitter?, greyscale?, brightness, contrast,
    saturation, hue), so equal columns give the same view in any batch and on any device. Hue is rotated in
    YIQ space (an approximation of an HSV hue shift that keeps luma). Returns a new tensor of the input
    dtype, clamped to 0..1.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in 0..1, got {images.dtype}")
    batch = images.shape[0]
    if tuple(draws.shape) != (NUM_DRAWS, batch):
        raise ValueError(f"draws must be [{NUM_DRAWS}, B={batch}], got shape {tuple(draws.shape)}")
    uniform = draws.detach().cpu().to(torch.float64)  # host values: the branch choices below read them
    low, high = params.blur_sigma
    sigma = low + (high - low) * uniform[0]
    jitter_branch = uniform[1] < params.jitter_branch_p
    do_jitter = jitter_branch & (uniform[2] < params.jitter_p)
    do_grey = ~jitter_branch & (uniform[3] < params.greyscale_p)
    brightness = 1.0 + params.brightness * (2.0 * uniform[4] - 1.0)
    contrast = 1.0 + params.contrast * (2.0 * uniform[5] - 1.0)
    saturation = 1.0 + params.saturation * (2.0 * uniform[6] - 1.0)
    hue = params.hue * (2.0 * uniform[7] - 1.0)

    device, dtype = images.device, images.dtype
    work = images.to(torch.float32)
    out = _gaussian_blur(work, sigma.to(device=device, dtype=torch.float32), params.blur_kernel)
    jitter_index = do_jitter.nonzero().flatten().to(device)
    if jitter_index.numel():
        pick = lambda t: t[do_jitter].to(device=device, dtype=torch.float32)  # noqa: E731
        out[jitter_index] = _colour_jitter(
            out[jitter_index], pick(brightness), pick(contrast), pick(saturation), pick(hue)
        )
    grey_index = do_grey.nonzero().flatten().to(device)
    if grey_index.numel():
        out[grey_index] = _luminance(out[grey_index]).expand(-1, 3, -1, -1)
    return out.clamp(0.0, 1.0).to(dtype)

