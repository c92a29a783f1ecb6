"""Mean-field inference of the torch backend: the iteration loop and the coarse-grid (``downsample``) logic.

Model (per image; ``Q`` is over labels at every pixel; Potts compatibility as in pydensecrf)::

    U      = -log(clip(softmax(logits), 1e-5))          # pydensecrf.utils.unary_from_softmax
    Q_0    = softmax(-U)
    Q_t+1  = softmax(-U + w_g * Kg(Q_t) + w_b * Kb(Q_t))

The messages ``Kg`` and ``Kb`` come from :func:`primaps_dist.crf.operators.pairwise_operators`, built
once per call for the whole batch. ``downsample=f`` runs all updates but the last on a grid f times
coarser per side and the last one at full resolution (see :func:`mean_field`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from primaps_dist.crf.operators import grid_size, pairwise_operators

__all__ = ["UNARY_CLIP", "mean_field"]

UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax default


def _softmax_last_(energy: Tensor) -> Tensor:
    """In-place softmax over the last (small) dim; much faster than ``torch.softmax`` for ``[..., L]``
    with small L on CPU. Rows that are all ``-inf`` do not occur (checked by ``dense_crf``)."""
    energy -= energy.amax(dim=-1, keepdim=True)
    energy.exp_()
    return energy.div_(energy.sum(dim=-1, keepdim=True))


def mean_field(
    logits: Tensor,
    images: Tensor,
    iterations: int,
    gaussian_sxy: float,
    gaussian_weight: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_weight: float,
    downsample: int = 1,
) -> Tensor:
    """Mean-field inference: ``logits`` ``[B, L, H, W]``, ``images`` ``[B, 3, H, W]`` -> ``[B, L, H, W]``.

    Inputs as :func:`primaps_dist.crf.dense_crf`, which validates them and disables gradients before
    calling this; the result is in channels-last memory format, on the device of ``logits``.

    With ``downsample`` f > 1 the first ``iterations - 1`` updates run on a grid f times coarser per
    side (unary probabilities and colours averaged over each f x f cell, kernel widths in full-image
    pixels); the messages of the last coarse ``Q`` are upsampled bilinearly and the final update is
    made at full resolution with the full-resolution unary (so forbidden labels stay forbidden per
    pixel).
    """
    batch, labels, height, width = logits.shape
    # Pixel-major [B, H, W, L] (= [N, L]): rows for the sparse products, channels-last for the conv.
    # A copy in any case (the softmax below works in place); a plain memcpy for channels-last logits.
    neg_unary = logits.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
    forbidden = torch.isneginf(neg_unary)
    # Clipped unary probabilities, exactly 0 where a label is forbidden (log -> -inf there).
    clipped = _softmax_last_(neg_unary).clamp_(min=UNARY_CLIP).masked_fill_(forbidden, 0.0)
    grid = grid_size(height, width, downsample)
    coarse = iterations > 0 and grid != (height, width)
    if coarse:
        # Cells average the clipped probabilities: a label is forbidden in a cell only where it is
        # forbidden at all of the cell's pixels, so no cell ends up with every label forbidden.
        cell_prob = F.interpolate(clipped.permute(0, 3, 1, 2), size=grid, mode="area").permute(0, 2, 3, 1)
        grid_unary = cell_prob.log()
        neg_unary = clipped.log_()
    else:
        grid_unary = neg_unary = clipped.log_()
    gaussian = bilateral = None
    if iterations > 0:
        gaussian, bilateral = pairwise_operators(
            images, grid, gaussian_sxy=gaussian_sxy, gaussian_weight=gaussian_weight, bilateral_sxy=bilateral_sxy,
            bilateral_srgb=bilateral_srgb, bilateral_weight=bilateral_weight,
        )

    def messages(q: Tensor) -> Tensor:  # [B, h, w, L] -> pairwise energy [B, h, w, L]
        energy = torch.zeros_like(q) if gaussian is None else gaussian(q)
        if bilateral is not None:
            energy += bilateral(q.view(-1, labels)).view(q.shape)
        return energy

    q = _softmax_last_(grid_unary.clone())
    for _ in range(iterations - 1 if coarse else iterations):
        q = _softmax_last_(messages(q).add_(grid_unary))
    if coarse:
        upsampled = F.interpolate(messages(q).permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                  align_corners=False)
        q = _softmax_last_(upsampled.permute(0, 2, 3, 1).add(neg_unary))
    return q.permute(0, 3, 1, 2)  # [B, L, H, W] in channels-last memory format: no copy

