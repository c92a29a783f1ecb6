"""Dense-CRF inputs that look like the trainer's: real photos and PriMaPs-like log-probabilities.

Used by tests/test_crf.py (agreement with pydensecrf) and bench/bench_crf.py. The logits come from a small
K-means on colour + position, not from :mod:`primaps_dist.primaps`, so a CRF test does not depend on it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat",
)


def sample_photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image photo, short side resized to ``size`` and centre-cropped: ``[3, size, size]`` float32 0..255."""
    from skimage import data

    rgb = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3])).permute(2, 0, 1).float()
    height, width = rgb.shape[1:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    rgb = F.interpolate(rgb[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return rgb[:, top : top + size, left : left + size].clamp(0, 255).round().contiguous()


def primaps_like_logits(image: torch.Tensor, num_masks: int, grid: int = 40, seed: int = 0) -> torch.Tensor:
    """PriMaPs-style log-probabilities ``[1 + num_masks, H, W]`` for ``image`` ``[3, H, W]``.

    K-means (colour + position) at ``grid x grid`` gives ``num_masks`` soft masks (1 at the centre of a
    segment, falling off with feature distance), post-processed like PriMaPs (x10, clip to [0, 1]),
    a background channel ``clip(mean(nonzero) - sum, 0, 1)`` in front, ``log_softmax`` over channels,
    then bilinear upsampling to the image size.
    """
    generator = torch.Generator().manual_seed(seed)
    size = image.shape[1:]
    small = F.interpolate(image[None], size=(grid, grid), mode="area")[0] / 255.0
    ys, xs = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
    feats = torch.cat([small, 0.7 * xs[None], 0.7 * ys[None]]).reshape(5, -1).T  # [P, 5]
    centres = feats[torch.randperm(feats.shape[0], generator=generator)[:num_masks]]
    for _ in range(20):
        assign = torch.cdist(feats, centres).argmin(dim=1)
        for k in range(num_masks):
            members = feats[assign == k]
            if members.numel():
                centres[k] = members.mean(dim=0)
    dist = torch.cdist(feats, centres)  # [P, K]
    nearest = dist.min(dim=1, keepdim=True).values
    masks = ((1.0 - (dist - nearest) / (nearest + 0.05)) * (dist.argmin(1, keepdim=True) == torch.arange(num_masks)))
    masks = (masks.clamp(0, 1) * 10).clamp(0, 1).T.reshape(num_masks, grid, grid)
    masks = masks * (0.3 + 0.7 * torch.rand(num_masks, 1, 1, generator=generator))  # uneven confidence
    nonzero = masks[masks > 0]
    background = (nonzero.mean() - masks.sum(0, keepdim=True)).clamp(0, 1)
    logp = torch.log_softmax(torch.cat([background, masks]), dim=0)
    return F.interpolate(logp[None], size=size, mode="bilinear", align_corners=False)[0]


def sample_batch(batch: int, size: int, labels: int, unused: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` photos and PriMaPs-like logits: ``[B, labels, S, S]`` float32, ``[B, 3, S, S]`` float32.

    Image ``b`` uses ``labels - (b % (unused + 1))`` channels; the rest are ``-inf`` (unused labels).
    """
    images, logits = [], []
    for b in range(batch):
        image = sample_photo(SAMPLE_PHOTOS[b % len(SAMPLE_PHOTOS)], size)
        used = labels - (b % (unused + 1))
        logp = primaps_like_logits(image, used - 1, seed=b)
        pad = torch.full((labels - used, size, size), float("-inf"))
        images.append(image)
        logits.append(torch.cat([logp, pad]))
    return torch.stack(logits), torch.stack(images)
