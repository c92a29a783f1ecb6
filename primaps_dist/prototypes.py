"""Nearest-prototype scoring, assignment and prediction: the one home of ``argmax_k cos(mu_k, f)``.

Every stage that turns features into class ids goes through here: the K-means assignment
(:func:`nearest_prototype`), the prototype class of a pixel at label resolution inside pseudo-label
generation (:func:`nearest_prototype_upsampled`), and evaluation / prediction (:func:`cosine_scores`,
:func:`predict_clusters`). Prototypes are ``[K, C]`` rows; exact ties go to the lowest k (``torch.argmax``
returns the first maximum).

The three resolutions differ on purpose, and each keeps the rule its stage has always used:

* :func:`nearest_prototype` works at the features' own positions; the feature norm does not change the
  argmax, so features are not normalised.
* :func:`nearest_prototype_upsampled` equals ``argmax_k <mu_k, normalise(upsample(f))>`` (features
  upsampled bilinearly, then compared); computed cheaply by upsampling the K scores instead of the C channels.
* :func:`cosine_scores` normalises every position first; evaluation upsamples these cosine scores (and the
  CRF reads them, sharpened by :data:`CRF_TEMPERATURE`, as log-probabilities).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from primaps_dist.ops import argmax_channels

__all__ = ["CRF_TEMPERATURE", "cosine_scores", "nearest_prototype", "nearest_prototype_upsampled", "predict_clusters"]

CRF_TEMPERATURE = 0.1  # cosine similarities (in [-1, 1]) are sharpened before the CRF sees them as log-probs

# Upper bound on elements of one label-resolution [chunk, K, H, W] score tensor (~256 MB).
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def _check_prototypes(prototypes: torch.Tensor, channels: int) -> None:
    if prototypes.dim() != 2 or prototypes.shape[1] != channels:
        raise ValueError(f"prototypes have shape {tuple(prototypes.shape)}, expected [K, {channels}]")


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every position to every prototype: ``[B, C, h, w], [K, C] -> [B, K, h, w]`` float32.

    Both features and prototypes are L2-normalised here.
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape [B, C, h, w], got {tuple(features.shape)}")
    _check_prototypes(prototypes, features.shape[1])
    unit = F.normalize(features.float(), dim=1)
    return torch.einsum("kc,bchw->bkhw", F.normalize(prototypes.float().to(unit.device), dim=1), unit)


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar prototype per row or position.

    Args:
        features: ``[N, C]`` or ``[B, C, H, W]`` (need not be normalised; the argmax is scale invariant).
        prototypes: ``[K, C]`` unit rows.
    Returns:
        int64 labels ``[N]`` or ``[B, H, W]`` on the features' device.
    """
    if features.dim() == 4:
        batch, channels, height, width = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    elif features.dim() == 2:
        rows = features
    else:
        raise ValueError(f"features must be [N, C] or [B, C, H, W], got shape {tuple(features.shape)}")
    _check_prototypes(prototypes, rows.shape[1])
    scores = rows.to(torch.float32) @ prototypes.to(device=rows.device, dtype=torch.float32).T
    labels = scores.argmax(dim=1)
    if features.dim() == 4:
        labels = labels.reshape(batch, height, width)
    return labels


def _chunks(batch: int, per_image: int) -> list[slice]:
    size = max(1, _CHUNK_ELEMENTS // max(1, per_image))
    return [slice(start, min(batch, start + size)) for start in range(0, batch, size)]


def nearest_prototype_upsampled(
    features: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Nearest prototype per pixel at label resolution ``size``.

    ``argmax_k <mu_k, normalise(upsample(f))>``. Normalisation does not change the argmax over k and
    bilinear upsampling is linear and acts on every channel alike, so this equals
    ``argmax_k upsample(<mu_k, f>)``, which is what is computed: the K scores at patch resolution are
    upsampled (bilinear, align_corners=False) instead of the C-channel features. The prototypes are
    used as given (pass unit vectors for cosine similarity).

    Args:
        features: [B, C, h, w] float.
        prototypes: [K, C] float.
        size: (H, W) label resolution.

    Returns:
        [B, H, W] int64 class ids in [0, K).
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape [B, C, h, w], got {tuple(features.shape)}")
    _check_prototypes(prototypes, features.shape[1])
    height, width = int(size[0]), int(size[1])
    weights = prototypes.to(device=features.device, dtype=torch.float32)
    scores = torch.einsum("kc,bchw->bkhw", weights, features.to(torch.float32))
    out = torch.empty(features.shape[0], height, width, dtype=torch.int64, device=features.device)
    scores = scores.contiguous(memory_format=torch.channels_last)  # fast resize and channel argmax on CPU
    for part in _chunks(features.shape[0], prototypes.shape[0] * height * width):
        resized = F.interpolate(scores[part], size=(height, width), mode="bilinear", align_corners=False)
        out[part] = argmax_channels(resized)
    return out


def predict_clusters(
    backbone: torch.nn.Module,
    prototypes: torch.Tensor,
    images: torch.Tensor,
    *,
    flip: bool = False,
    crf_fn: Any = None,
) -> torch.Tensor:
    """Cluster id per pixel (the evaluation protocol): images ``[B, 3, H, W]`` in 0..1 -> ``[B, H, W]`` int64.

    Cosine scores at feature resolution (features averaged with those of the horizontally flipped images
    when ``flip``), upsampled bilinearly to the image size, optionally refined by ``crf_fn(log-probabilities,
    images in 0..255)``, then the argmax.
    """
    features = backbone(images)
    if flip:
        features = 0.5 * (features + backbone(images.flip(-1)).flip(-1))
    scores = cosine_scores(features, prototypes)
    scores = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
    if crf_fn is not None:
        probabilities = crf_fn(F.log_softmax(scores / CRF_TEMPERATURE, dim=1), images * 255.0)
        return probabilities.argmax(1)
    return scores.argmax(1)
