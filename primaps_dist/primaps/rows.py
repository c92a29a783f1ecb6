"""Row bookkeeping of the proposal loop's stored features ``[b, Q, C]``: gathering rows per image and
moving the rows selected by a mask to the front in row-major order."""

from __future__ import annotations

import torch

__all__ = ["compact_order", "take_rows"]


def compact_order(mask: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows where ``mask`` holds, in row-major order (stable), moved to the front.

    mask [b, Q] bool, counts [b] = ``mask.sum(1)``, width >= counts.max() -> (order [b, width] int64 row
    indices, valid [b, width] bool); entries past an image's count are padding (``valid`` False).
    """
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return order, valid


def take_rows(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``points[i, index[i]]`` for every image: points [b, Q, C], index [b, w] -> [b, w, C]."""
    batch, stored, channels = points.shape
    flat = index + stored * torch.arange(batch, device=index.device)[:, None]
    return points.reshape(batch * stored, channels).index_select(0, flat.reshape(-1)).reshape(batch, -1, channels)
