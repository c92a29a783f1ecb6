"""Pairwise CRF messages: the bilateral and Gaussian kernels as fixed linear operators on label maps.

* :class:`LatticeOperator`: the bilateral kernel ``weight * D^-1/2 K D^-1/2`` on a
  :class:`~primaps_dist.crf.lattice.PermutohedralLattice`, as CSR sparse-dense products (built once per
  call, reused by every mean-field iteration).
* :class:`GaussianOperator`: the small spatial kernel (sxy = 1), an exact truncated Gaussian applied as a
  separable depthwise convolution. pydensecrf evaluates it with a 2-d lattice whose mean stencil is that
  Gaussian plus a small ripple, the only approximation of the torch backend.
* :func:`pairwise_operators` builds both for a batch of images on a (possibly coarser) grid, and
  :func:`grid_size` gives that grid for a ``downsample`` factor; this is everything
  :func:`primaps_dist.crf.dense_crf` sets up before its iterations.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from primaps_dist.crf.lattice import PermutohedralLattice

__all__ = ["GaussianOperator", "LatticeOperator", "grid_size", "pairwise_operators", "pixel_grid"]


def _csr(crow: Tensor, col: Tensor, value: Tensor, size: tuple[int, int]) -> Tensor:
    """CSR matrix; int32 indices when they fit (MKL and cuSPARSE take int32 without a conversion copy)."""
    if col.numel() < 2**31 and max(size) < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, value, size=size, check_invariants=False)


def _with_values(matrix: Tensor, values: Tensor) -> Tensor:
    """Same sparsity pattern as the CSR ``matrix``, new ``values``."""
    return _csr(matrix.crow_indices(), matrix.col_indices(), values, tuple(matrix.shape))


class LatticeOperator:
    """``values [N, C] -> weight * D^-1/2 K D^-1/2 values`` for one lattice, as CSR matrix products.

    ``K`` is :meth:`PermutohedralLattice.filter` (pydensecrf's DenseKernel with NORMALIZE_SYMMETRIC)
    and ``D = K 1``. The normalisation, the kernel weight and alpha are folded into the splat and slice
    matrices once, so a call costs one splat, d+1 blur and one slice sparse-dense product.
    """

    def __init__(self, lattice: PermutohedralLattice, weight: float):
        num_points, num_vertices, dim = lattice.num_points, lattice.num_vertices, lattice.dim
        device = lattice.point_vertices.device
        self.num_points, self.num_vertices = num_points, num_vertices
        slice_crow = torch.arange(0, num_points * (dim + 1) + 1, dim + 1, device=device)
        self._blur = [self._blur_matrix(lattice.neighbours[j]) for j in range(dim + 1)]
        splat = _csr(lattice.splat_crow, lattice.splat_points, lattice.splat_weights, (num_vertices, num_points))
        slice_weights = lattice.point_weights.reshape(-1)
        slice_ = _csr(slice_crow, lattice.point_vertices.reshape(-1), slice_weights, (num_points, num_vertices))
        self._splat, self._slice = splat, slice_
        degree = self(torch.ones(num_points, 1, dtype=torch.float32, device=device))[:, 0] * lattice.alpha
        norm = torch.rsqrt(degree + 1e-20)  # [N]
        self._splat = _with_values(splat, lattice.splat_weights * norm[lattice.splat_points])
        slice_scale = (norm * (lattice.alpha * weight))[:, None]
        self._slice = _with_values(slice_, (lattice.point_weights * slice_scale).reshape(-1))

    @staticmethod
    def _blur_matrix(neighbours: Tensor) -> Tensor:
        """``[M, M]`` CSR of ``I + (P_1 + P_2) / 2`` for one axis; ``neighbours`` ``[2, M]`` (-1 = absent)."""
        num_vertices = neighbours.shape[1]
        device = neighbours.device
        absent = num_vertices  # sorts after every real column, dropped below
        first = torch.where(neighbours[0] >= 0, neighbours[0], absent)
        second = torch.where(neighbours[1] >= 0, neighbours[1], absent)
        own = torch.arange(num_vertices, device=device)
        # Three-element sorting network per row -> ascending column indices.
        low, high = torch.minimum(first, second), torch.maximum(first, second)
        mid, high = torch.minimum(high, own), torch.maximum(high, own)
        low, mid = torch.minimum(low, mid), torch.maximum(low, mid)
        cols = torch.stack([low, mid, high], dim=1)
        present = cols < absent
        crow = torch.zeros(num_vertices + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(present.sum(dim=1), dim=0)
        vals = torch.full((int(crow[-1]),), 0.5, dtype=torch.float32, device=device)
        vals[crow[:-1] + (cols < own[:, None]).sum(dim=1)] = 1.0  # the diagonal entry of each row
        return _csr(crow, cols[present], vals, (num_vertices, num_vertices))

    def __call__(self, values: Tensor) -> Tensor:
        """``values`` ``[N, C]`` float32 -> ``[N, C]`` float32."""
        vertex_values = self._splat @ values
        for blur in self._blur:
            vertex_values = blur @ vertex_values
        return self._slice @ vertex_values


class GaussianOperator:
    """Spatial Gaussian message ``weight * D^-1/2 G D^-1/2 values`` on ``[B, H, W, C]`` maps.

    ``G`` is an exact, truncated (3 sigma) separable Gaussian of standard deviation ``sxy`` pixels (one
    width, or ``(rows, columns)`` widths when the grid is coarser along one axis) with zero padding,
    applied as a depthwise convolution; ``D = G 1``. pydensecrf evaluates this kernel with a 2-d
    permutohedral lattice, whose average stencil is this Gaussian (per-axis variance 0.997 for
    sxy = 1, measured) up to a small position-dependent ripple.
    """

    def __init__(
        self, height: int, width: int, sxy: float | tuple[float, float], weight: float, device: torch.device
    ):
        sigma_rows, sigma_cols = (sxy, sxy) if isinstance(sxy, (int, float)) else sxy
        self._rows, self._row_radius = self._taps(sigma_rows, height, device)
        self._cols, self._col_radius = self._taps(sigma_cols, width, device)
        ones = torch.ones(1, 1, height, width, dtype=torch.float32, device=device)
        degree = self._blur(ones)  # [1, 1, H, W]
        norm = torch.rsqrt(degree + 1e-20)
        self._norm_in = norm.permute(0, 2, 3, 1)  # [1, H, W, 1]
        self._norm_out = self._norm_in * weight

    @staticmethod
    def _taps(sigma: float, length: int, device: torch.device) -> tuple[Tensor, int]:
        radius = min(int(math.ceil(3.0 * sigma)), length - 1)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        return torch.exp(-0.5 * (offsets / sigma) ** 2).to(torch.float32), radius

    def _blur(self, maps: Tensor) -> Tensor:
        channels = maps.shape[1]
        along_cols = self._cols.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        along_rows = self._rows.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        maps = F.conv2d(maps, along_cols, padding=(0, self._col_radius), groups=channels)
        return F.conv2d(maps, along_rows, padding=(self._row_radius, 0), groups=channels)

    def __call__(self, values: Tensor) -> Tensor:
        """``values`` ``[B, H, W, C]`` float32 -> ``[B, H, W, C]`` float32."""
        scaled = (values * self._norm_in).permute(0, 3, 1, 2)  # channels-last NCHW view: no copy
        return self._blur(scaled).permute(0, 2, 3, 1) * self._norm_out


def pixel_grid(
    height: int, width: int, device: torch.device, full_size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Column (x) and row (y) of every cell of a ``height x width`` grid, row-major, ``[H*W]`` float32 each.

    In pixels of the ``full_size`` image the grid covers (default: the grid itself): a cell of a coarser
    grid sits at the mean position of the pixels ``F.interpolate(mode="area")`` averages into it (the
    cell centre when the factor divides the size; windows overlap by a pixel where it does not).
    """
    full_height, full_width = full_size or (height, width)

    def centres(cells: int, pixels: int) -> Tensor:
        positions = torch.arange(pixels, dtype=torch.float32, device=device).view(1, 1, pixels)
        return positions if cells == pixels else F.adaptive_avg_pool1d(positions, cells)

    ys, xs = centres(height, full_height).flatten(), centres(width, full_width).flatten()
    return xs.repeat(height), ys.repeat_interleave(width)


def _bilateral_operator(
    images: Tensor, sxy: float, srgb: float, weight: float, full_size: tuple[int, int] | None = None
) -> LatticeOperator:
    """One lattice for the whole batch ``images`` ``[B, 3, H, W]`` (image index in the vertex keys).

    Features per pixel, as pydensecrf's ``addPairwiseBilateral``: ``(x/sxy, y/sxy, r/srgb, g/srgb, b/srgb)``,
    with ``x, y`` in pixels of the ``full_size`` image when ``images`` is a downsampled copy of it.
    """
    batch, _, height, width = images.shape
    xs, ys = pixel_grid(height, width, images.device, full_size)
    features = torch.empty(5, batch, height * width, dtype=torch.float32, device=images.device)  # [d, N]
    features[0] = xs / sxy
    features[1] = ys / sxy
    features[2:] = images.reshape(batch, 3, height * width).transpose(0, 1) / srgb
    return LatticeOperator(PermutohedralLattice.build(features.view(5, -1).T, num_groups=batch), weight)


def grid_size(height: int, width: int, downsample: int) -> tuple[int, int]:
    """Rows and columns of the grid ``downsample`` times coarser per side (partial cells count)."""
    return -(-height // downsample), -(-width // downsample)


def pairwise_operators(
    images: Tensor,
    grid: tuple[int, int],
    *,
    gaussian_sxy: float,
    gaussian_weight: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_weight: float,
) -> tuple[GaussianOperator | None, LatticeOperator | None]:
    """The Gaussian and bilateral message operators on ``grid`` for ``images`` ``[B, 3, H, W]``.

    ``images`` are float32 RGB in 0..255 and ``grid`` is ``(rows, columns)``, e.g.
    ``grid_size(H, W, downsample)``. Kernel widths are in pixels of the ``H x W`` images (parameters as
    :func:`primaps_dist.crf.dense_crf`); a coarser grid averages the colours of its cells (area
    interpolation). A kernel with weight 0 is ``None``. The Gaussian operator maps ``[B, rows, columns, L]``
    to the same shape, the bilateral one ``[B * rows * columns, L]``.
    """
    height, width = images.shape[2:]
    gaussian = bilateral = None
    if gaussian_weight != 0.0:
        cell_sxy = (gaussian_sxy * grid[0] / height, gaussian_sxy * grid[1] / width)
        gaussian = GaussianOperator(grid[0], grid[1], cell_sxy, gaussian_weight, images.device)
    if bilateral_weight != 0.0:
        grid_images = images if grid == (height, width) else F.interpolate(images, size=grid, mode="area")
        bilateral = _bilateral_operator(
            grid_images, bilateral_sxy, bilateral_srgb, bilateral_weight, full_size=(height, width)
        )
    return gaussian, bilateral
