"""PCA initialisation of the prototypes from a streamed, all-reduced C x C covariance.

The reference gathers millions of feature vectors in memory; here every rank accumulates, in float64,
the count, the sum ``[C]`` and the sum of outer products ``[C, C]`` of its features, on the features' own
device (no host copy per step; float32 only on devices without float64, e.g. Apple's MPS), ONE all-reduce
adds them up, and the covariance's eigenvectors give the same principal directions in O(C^2) memory.

Features are L2-normalised per position before accumulating (the prototypes live in cosine geometry), and
centred through the pooled mean (a proper PCA). :meth:`CovarianceAccumulator.principal_directions`:

* eigenvectors by descending eigenvalue (``torch.linalg.eigh`` in float64 on the CPU);
* sign rule: the component with the largest absolute value is made positive (first one on exact ties);
* K > C: the K - C extra rows are random unit vectors from ``torch.Generator().manual_seed(seed)``
  (float64 Gaussian, normalised); they cannot be orthogonal to the first C;
* ``sync=True`` broadcasts rank 0's result so every rank starts from bitwise identical prototypes even
  on heterogeneous hardware (one broadcast; all ranks must call it).
"""

from __future__ import annotations

import torch

from primaps_dist import distributed
from primaps_dist.em.stats import as_pixel_rows, normalise_rows

__all__ = ["CovarianceAccumulator", "orient_rows"]

_CHUNK_ROWS = 65536


def orient_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``[K, C]`` so that its largest-magnitude component is positive."""
    index = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.where(vectors.gather(1, index) < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors * signs


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64, except on devices that lack it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class CovarianceAccumulator:
    """Streamed covariance of L2-normalised features of dimension ``dim`` (float64 on ``device``).

    ``device=None``: the statistics move to the device of the first features given to :meth:`update`
    (the CPU until then), so a GPU run accumulates on the GPU without copying features to the host.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = dim
        self._follow_features = device is None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = accumulation_dtype(self.device)
        self.count = torch.zeros((), dtype=dtype, device=self.device)
        self.sum = torch.zeros(dim, dtype=dtype, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=dtype, device=self.device)
        self.reduced = False

    def _move_to(self, device: torch.device) -> None:
        dtype = accumulation_dtype(device)
        self.device = device
        self.count, self.sum, self.outer = (
            tensor.to(device=device, dtype=dtype) for tensor in (self.count, self.sum, self.outer)
        )

    def update(self, features: torch.Tensor) -> None:
        """Add ``[N, C]`` or ``[B, C, H, W]`` features (any float dtype) of this rank."""
        if self.reduced:
            raise ValueError("update() after reduce(): the accumulator already holds the global statistics")
        rows, _ = as_pixel_rows(features)
        if rows.shape[1] != self.dim:
            raise ValueError(f"features have {rows.shape[1]} channels, the accumulator expects {self.dim}")
        if self._follow_features:
            self._follow_features = False
            if rows.device != self.device:
                self._move_to(rows.device)
        dtype = self.outer.dtype
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = normalise_rows(rows[start : start + _CHUNK_ROWS].to(device=self.device, dtype=dtype))
            self.count += chunk.shape[0]
            self.sum += chunk.sum(dim=0)
            self.outer += chunk.T @ chunk

    def reduce(self) -> "CovarianceAccumulator":
        """Sum the statistics over all ranks with ONE packed all-reduce (every rank must call it once)."""
        if self.reduced:
            raise ValueError("reduce() called twice: the statistics would be counted twice")
        packed = torch.cat([self.count.reshape(1), self.sum, self.outer.reshape(-1)])
        distributed.all_reduce_sum(packed)
        self.count = packed[0].clone()
        self.sum = packed[1 : 1 + self.dim].clone()
        self.outer = packed[1 + self.dim :].reshape(self.dim, self.dim).clone()
        self.reduced = True
        return self

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Population covariance ``[C, C]`` float64 of the accumulated normalised features."""
        if float(self.count) <= 0:
            raise ValueError("no features were accumulated")
        mean = self.mean()
        cov = self.outer / self.count - torch.outer(mean, mean)
        return 0.5 * (cov + cov.T)

    def principal_directions(self, num_directions: int, seed: int = 0, sync: bool = True) -> torch.Tensor:
        """First ``num_directions`` principal directions ``[K, C]`` float32, unit rows, on ``device``."""
        if num_directions < 1:
            raise ValueError(f"number of directions must be >= 1, got {num_directions}")
        if distributed.is_distributed() and not self.reduced:
            raise ValueError("call reduce() on every rank before principal_directions()")
        cov = self.covariance().cpu().to(torch.float64)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues, eigenvectors in columns
        directions = orient_rows(vectors.flip(1).T[: min(num_directions, self.dim)].contiguous())
        extra = num_directions - directions.shape[0]
        if extra > 0:
            generator = torch.Generator().manual_seed(seed)
            filler = torch.randn(extra, self.dim, generator=generator, dtype=torch.float64)
            directions = torch.cat([directions, normalise_rows(filler)])
        directions = normalise_rows(directions).to(torch.float32).to(self.device)
        if sync:
            distributed.broadcast(directions, src=0)
        return directions
