"""Row bookkeeping of the proposal loop's stored features ``[b, Q, C]``: gathering rows per image and
moving the rows selected by a mask to the front in row-major order."""

from __future__ import annotations

import torch

__all__ = ["compact_order", "rows_dot", "take_rows"]


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


def rows_dot(points: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Dot products of every stored row with per-image vectors: points [b, Q, C], vectors [b, k, C]
    -> [b, Q, k] (``points @ vectors^T``), a memory-bound pass over ``points``.

    On the CPU, MKL's batched GEMM streams a [Q, C] operand times a few columns at about a third of
    the memory bandwidth; one matrix-vector product per image (k = 1) or the product formed as
    ``vectors @ points^T`` (k > 1) runs 1.5-2.8x faster (bench/bench_primaps.py sizes, 1 thread).
    Each image's result depends on that image alone, as with the batched call.
    """
    if points.device.type != "cpu":
        return points @ vectors.transpose(1, 2)
    if vectors.shape[1] == 1:
        out = torch.empty(points.shape[0], points.shape[1], 1, dtype=points.dtype)
        for image in range(points.shape[0]):
            torch.mv(points[image], vectors[image, 0], out=out[image, :, 0])
        return out
    return (vectors @ points.transpose(1, 2)).transpose(1, 2)
