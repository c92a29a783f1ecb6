"""The pydensecrf reference backend: the PriMaPs reference CRF itself, one image at a time on the CPU.

Needs the optional ``pydensecrf`` package (the ``crf`` extra); a missing package is a one-line
:class:`~primaps_dist.errors.UserError`. Label channels that are ``-inf`` over a whole image are dropped
before inference and re-inserted as zeros; pydensecrf cannot forbid a label at single pixels (its 1e-5
clip applies there). Always full resolution: ``downsample`` is a torch-backend setting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from primaps_dist.errors import UserError

__all__ = ["dense_crf_pydensecrf", "import_pydensecrf"]


def import_pydensecrf():
    """``(pydensecrf.densecrf, pydensecrf.utils.unary_from_softmax)``, or a one-line :class:`UserError`."""
    try:
        import pydensecrf.densecrf as densecrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise UserError(
            "crf backend 'pydensecrf' needs the pydensecrf package: pip install 'primaps-dist[crf]' "
            f"(or use crf.backend=torch) [{err}]"
        ) from None
    return densecrf, unary_from_softmax


def _images_to_uint8(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` float 0..255 -> ``[B, H, W, 3]`` uint8 (rounded, clipped), on the CPU."""
    return images.detach().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()


def dense_crf_pydensecrf(
    logits: Tensor,
    images: Tensor,
    iterations: int,
    gaussian_sxy: float,
    gaussian_weight: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_weight: float,
) -> Tensor:
    """pydensecrf inference: ``logits`` ``[B, L, H, W]``, ``images`` ``[B, 3, H, W]`` -> ``[B, L, H, W]`` float32.

    Inputs as :func:`primaps_dist.crf.dense_crf` (which validates them); the result is contiguous, on
    the device of ``logits``.
    """
    import numpy as np

    densecrf, unary_from_softmax = import_pydensecrf()
    batch, labels, height, width = logits.shape
    logits_cpu = logits.detach().to("cpu", torch.float32)
    rgb = _images_to_uint8(images).numpy()
    out = torch.zeros(batch, labels, height, width, dtype=torch.float32)
    for b in range(batch):  # pydensecrf works on one image at a time
        used = ~torch.isneginf(logits_cpu[b]).all(dim=2).all(dim=1)  # [L]
        used_index = torch.nonzero(used).flatten()
        prob = torch.softmax(logits_cpu[b, used_index], dim=0).numpy()
        crf = densecrf.DenseCRF2D(width, height, int(used_index.numel()))
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_weight)
        crf.addPairwiseBilateral(
            sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(rgb[b]), compat=bilateral_weight
        )
        q = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(-1, height, width)
        out[b, used_index] = torch.from_numpy(q)
    return out.to(logits.device)

