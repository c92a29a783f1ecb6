"""Permutohedral lattice: the sparse Gaussian filter behind the bilateral (appearance) CRF kernel.

Builds the lattice of Adams et al. (2010) for N points with d-dimensional features, reproducing
pydensecrf's lattice arithmetic step for step (float32 elevation, rounding half to even to the
remainder-0 point, ranks with pydensecrf's tie rule, barycentric weights, ``[1/2, 1, 1/2]`` blur along
the d+1 lattice axes in the same order, alpha). Several images go into one lattice (the image index is
the top digit of every vertex key, so images never share vertices). The fast sparse-matrix form the CRF
iterates with is :class:`primaps_dist.crf.operators.LatticeOperator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PermutohedralLattice"]


@dataclass
class PermutohedralLattice:
    """A Gaussian filter over N points with d-dimensional features, as a fixed sparse linear map.

    :meth:`filter` computes ``alpha * S^T B S values``: ``S`` splats each point onto the d+1 vertices
    of its enclosing simplex with barycentric weights, ``B`` blurs along the d+1 lattice axes and
    ``S^T`` slices back (pydensecrf's ``Permutohedral::compute``). Vertices are numbered class by class
    (the remainder r = 0..d of the simplex corner), and by key within a class, so every row of the
    splat, slice and blur matrices comes out with ascending column indices.

    Attributes:
        point_vertices: ``[N, d+1]`` int64, column r = index of the point's remainder-r vertex.
        point_weights: ``[N, d+1]`` float32 barycentric weights (sum to 1 per point).
        splat_crow: ``[M+1]`` int64, splat entries of vertex m are ``splat_crow[m]:splat_crow[m+1]``.
        splat_points: ``[N*(d+1)]`` int64, point of each splat entry (ascending within a vertex).
        splat_weights: ``[N*(d+1)]`` float32, its barycentric weight.
        neighbours: ``[d+1, 2, M]`` int64, the two blur neighbours of each vertex along each lattice
            axis (``key - 1 + (d+1) e_j`` first, then its opposite), ``-1`` where absent.
        num_vertices: M.
        alpha: pydensecrf's scaling constant ``1 / (1 + 2^-d)``.
    """

    point_vertices: Tensor
    point_weights: Tensor
    splat_crow: Tensor
    splat_points: Tensor
    splat_weights: Tensor
    neighbours: Tensor
    num_vertices: int
    alpha: float

    @property
    def num_points(self) -> int:
        return self.point_vertices.shape[0]

    @property
    def dim(self) -> int:
        return self.point_vertices.shape[1] - 1

    @classmethod
    def build(cls, features: Tensor, num_groups: int = 1) -> "PermutohedralLattice":
        """Build the lattice for ``features`` ``[N, d]`` (cast to float32).

        The points form ``num_groups`` equal contiguous blocks (images) that never share a vertex, so one
        lattice filters a whole batch. Vertices are numbered by (group, remainder class, key): each
        image's vertices are contiguous (cache locality) and every sparse row has ascending columns.
        """
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"features must be [N, d] with N >= 1 and d >= 1, got shape {tuple(features.shape)}")
        num_points, dim = features.shape
        if num_groups < 1 or num_points % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide the number of points {num_points}")
        features = features.to(torch.float32)
        device = features.device
        group_size = num_points // num_groups
        classes = dim + 1
        rem0, rank, barycentric = _enclosing_simplex(features)

        # Integer vertex keys (first d coordinates; the last one is implied) packed into one int64,
        # with a margin of 2(d+1) around the data so that blur neighbours (key -1 / +d) stay in the box,
        # and the group as the most significant digit.
        key_lo = [int(v) - 2 * classes for v in rem0[:dim].amin(dim=1).tolist()]
        key_hi = [int(v) + 2 * classes for v in rem0[:dim].amax(dim=1).tolist()]
        radix = [hi - lo + 1 for lo, hi in zip(key_lo, key_hi)]
        if num_groups * math.prod(radix) >= 2**62:
            raise ValueError(
                "permutohedral lattice keys overflow int64: the features span too many kernel widths "
                "(use larger kernel widths or fewer images per call)"
            )
        strides = [math.prod(radix[i + 1 :]) for i in range(dim)]
        group_stride = strides[0] * radix[0]
        stride_sum = sum(strides)
        base = torch.arange(num_groups, device=device).repeat_interleave(group_size) * group_stride  # [N]
        for i in range(dim):
            base += (rem0[i].to(torch.int64) - key_lo[i]) * strides[i]
        # Corner r: key_i = rem0_i + r - (d+1) [rank_i > d - r]  (pydensecrf's canonical simplex), so
        # code_r = code_0 + r * sum(strides) - (d+1) * (sum of the strides of the r highest ranks).
        stride_of_rank = torch.zeros(classes, num_points, dtype=torch.int64, device=device)
        rank_strides = torch.tensor(strides + [0], device=device)[:, None].expand(classes, num_points)
        stride_of_rank.scatter_(0, rank, rank_strides)
        wraps = torch.zeros(num_points, dtype=torch.int64, device=device)

        # Corners of remainder r all have coordinates = r mod (d+1): the d+1 classes are disjoint and are
        # deduplicated separately (d+1 sorts of N keys instead of one of N*(d+1)).
        keys, key_groups, orders, new_corner = [], [], [], []
        counts = torch.zeros(num_groups, classes, dtype=torch.int64, device=device)
        for r in range(classes):
            if r > 0:
                wraps += stride_of_rank[dim - r + 1]
            sorted_codes, order = torch.sort(base + (r * stride_sum) - classes * wraps, stable=True)
            is_new = torch.ones(num_points, dtype=torch.bool, device=device)
            is_new[1:] = sorted_codes[1:] != sorted_codes[:-1]
            keys.append(sorted_codes[is_new])
            key_groups.append(torch.div(keys[-1], group_stride, rounding_mode="floor"))
            counts[:, r] = torch.bincount(key_groups[-1], minlength=num_groups)
            orders.append(order)
            new_corner.append(is_new)
        num_vertices = int(counts.sum())
        block_start = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view(num_groups, classes)
        class_group_start = torch.cumsum(counts, dim=0) - counts  # where group g starts among class-r keys

        point_vertices = torch.empty(classes, num_points, dtype=torch.int64, device=device)
        splat_crow = torch.empty(num_vertices + 1, dtype=torch.int64, device=device)
        splat_crow[-1] = num_points * classes
        vertex_ids = []
        for r in range(classes):
            key_index = torch.arange(keys[r].numel(), device=device)
            ids = block_start[key_groups[r], r] + key_index - class_group_start[key_groups[r], r]
            vertex_ids.append(ids)
            point_vertices[r].scatter_(0, orders[r], ids[torch.cumsum(new_corner[r], dim=0) - 1])
            # Splat entries in (group, class, key) order: class r, sorted position e of group g = e // n
            # moves to g*(d+1)*n + r*n + e % n; a vertex's entries start where its key first appears.
            first = torch.nonzero(new_corner[r]).flatten()
            splat_crow[ids] = first + (first // group_size) * (classes - 1) * group_size + r * group_size
        # Splat entries in (group, class, key) order: block (g, r) is class r's sorted entries of group g.
        entry_order = torch.empty(num_groups, classes, group_size, dtype=torch.int64, device=device)
        splat_weights = torch.empty(num_groups, classes, group_size, dtype=torch.float32, device=device)
        for r in range(classes):
            entry_order[:, r] = orders[r].view(num_groups, group_size)
            splat_weights[:, r] = barycentric[r][orders[r]].view(num_groups, group_size)

        # Blur neighbours along axis j: n1 = key - 1 on every coordinate except key_j + d (j < d; all
        # -1 for j = d) lies in class r - 1; n2 = key + 1 except key_j - d lies in class r + 1, and
        # n2(n1(v)) = v, so one lookup per axis and class gives both.
        neighbours = torch.full((classes, 2, num_vertices + 1), -1, dtype=torch.int64, device=device)
        for j in range(classes):
            delta = -stride_sum + (classes * strides[j] if j < dim else 0)
            for r in range(classes):
                target = (r - 1) % classes
                found = _lookup_sorted(keys[target], keys[r] + delta)
                hit = found >= 0
                found_ids = vertex_ids[target][found.clamp(min=0)]
                neighbours[j, 0, vertex_ids[r]] = torch.where(hit, found_ids, -1)
                neighbours[j, 1, torch.where(hit, found_ids, num_vertices)] = vertex_ids[r]
        return cls(
            point_vertices=point_vertices.T.contiguous(),
            point_weights=barycentric.T.contiguous(),
            splat_crow=splat_crow,
            splat_points=entry_order.view(-1),
            splat_weights=splat_weights.view(-1),
            neighbours=neighbours[:, :, :num_vertices].contiguous(),
            num_vertices=num_vertices,
            alpha=1.0 / (1.0 + 2.0 ** (-dim)),
        )

    def filter(self, values: Tensor) -> Tensor:
        """Reference (index-based, unnormalised) lattice filter: ``values`` ``[N, C]`` -> ``[N, C]``.

        Simple and slow; :class:`LatticeOperator` is the fast sparse form the CRF uses.
        """
        num_vertices = self.num_vertices
        channels = values.shape[1]
        vertex_values = values.new_zeros(num_vertices + 1, channels)  # last row: absent neighbour
        weighted = self.point_weights[:, :, None] * values[:, None, :]
        vertex_values.index_add_(0, self.point_vertices.reshape(-1), weighted.reshape(-1, channels))
        neighbours = torch.where(self.neighbours >= 0, self.neighbours, num_vertices)
        for j in range(self.dim + 1):
            blurred = vertex_values.clone()
            blurred[:num_vertices] += 0.5 * (vertex_values[neighbours[j, 0]] + vertex_values[neighbours[j, 1]])
            vertex_values = blurred
        sliced = (self.point_weights[:, :, None] * vertex_values[self.point_vertices]).sum(dim=1)
        return sliced * self.alpha


def _lookup_sorted(sorted_keys: Tensor, queries: Tensor) -> Tensor:
    """Index of each query in ascending ``sorted_keys`` or -1 where absent. Shapes ``[M]``, ``[Q]``."""
    if sorted_keys.numel() == 0:
        return torch.full_like(queries, -1)
    position = torch.searchsorted(sorted_keys, queries).clamp_(max=sorted_keys.numel() - 1)
    return torch.where(sorted_keys[position] == queries, position, -1)


def _enclosing_simplex(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Elevate ``features`` ``[N, d]`` onto the permutohedral hyperplane and find each point's simplex.

    Returns ``rem0`` ``[d+1, N]`` float32 holding integers (the remainder-0 vertex), ``rank``
    ``[d+1, N]`` int64 (a permutation of 0..d per point) and
    ``barycentric`` ``[d+1, N]`` float32. Follows pydensecrf's float32 arithmetic step by step (its SSE
    path, which rounds half to even) so that points fall into the same simplices with the same weights.
    """
    num_points, dim = features.shape
    device = features.device
    feats = features.T.contiguous()  # [d, N]; free when features is a transposed [d, N] tensor
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (dim + 1), dtype=torch.float32))
    scale = [1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(dim)]  # double, then float32
    scale = [float(torch.tensor(value, dtype=torch.float32)) for value in scale]
    elevated = torch.empty(dim + 1, num_points, dtype=torch.float32, device=device)
    partial_sum = torch.zeros(num_points, dtype=torch.float32, device=device)
    for j in range(dim, 0, -1):
        scaled = feats[j - 1] * scale[j - 1]
        elevated[j] = partial_sum - j * scaled
        partial_sum += scaled
    elevated[0] = partial_sum

    inv_dim1 = float(torch.tensor(1.0 / (dim + 1), dtype=torch.float32))
    nearest = torch.round(elevated * inv_dim1)  # half to even, like _mm_round_ps
    rem0 = nearest * (dim + 1)  # float32 holding exact small integers, as in pydensecrf
    residual = elevated - rem0

    # rank_i = number of coordinates with a larger residual (ties: the lower index ranks higher),
    # shifted by the coordinate sum and wrapped into 0..d; float32 counts like the SSE code.
    rank = nearest.sum(dim=0, keepdim=True).repeat(dim + 1, 1)
    for i in range(dim):
        for j in range(i + 1, dim + 1):
            i_below = residual[i] < residual[j]
            rank[i] += i_below
            rank[j] += ~i_below
    wrapped = torch.remainder(rank, dim + 1)  # ranks in -d..2d back into 0..d; the vertex moves along
    rem0 += wrapped - rank
    rank_index = wrapped.to(torch.int64)

    # barycentric[d - rank_i] += v_i and barycentric[d - rank_i + 1] -= v_i, then wrap around.
    v = (elevated - rem0) * inv_dim1
    by_rank = torch.empty_like(v).scatter_(0, rank_index, v)  # by_rank[k] = v of the coordinate of rank k
    barycentric = torch.empty(dim + 1, num_points, dtype=torch.float32, device=device)
    by_position = by_rank[torch.arange(dim, -1, -1, device=device)]  # by_position[p] = by_rank[d - p]
    barycentric[1:] = by_position[1:] - by_position[:-1]
    barycentric[0] = by_rank[dim] + (1.0 - by_rank[0])
    return rem0, rank_index, barycentric

