"""Straightforward per-image PriMaPs, written from the published method, used as a test oracle.

Deliberately unbatched and written independently of ``primaps_dist.primaps``: a Python loop over
proposals, the principal direction from ``torch.pca_lowrank(q=3, niter=100)`` called exactly as the
paper's code does, with the sign the library returns (no sign rule of our own), and the median
filter via ``unfold`` + ``median``. ``pca_lowrank`` is randomised: where the top singular values of a
round nearly tie, its sign (and so the proposals) can change with the seed, so callers compare
against several seeds (:func:`oracle_agreement`). The loop stops, like the package, when a round
covers nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def principal_direction(free_features: torch.Tensor) -> torch.Tensor:
    """First principal direction [C] of ``free_features`` [N, C] (rows are samples), as published:
    ``torch.pca_lowrank`` centres the rows itself; its sign is kept as returned."""
    rank = min(3, free_features.shape[0], free_features.shape[1])
    _, _, right = torch.pca_lowrank(free_features, q=rank, niter=100, center=True)
    return right[:, 0]


def reference_proposals(
    feature_map: torch.Tensor,
    threshold: float = 0.4,
    coverage: float = 0.95,
    max_masks: int = 64,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Soft proposals of one map ``feature_map`` [C, h, w] -> list of [h, w] float32 masks.

    ``seed`` seeds ``pca_lowrank``'s random start (the global RNG is restored afterwards)."""
    feature_map = feature_map.float()
    channels, height, width = feature_map.shape
    unit = F.normalize(feature_map, dim=0).reshape(channels, -1)
    flat = feature_map.reshape(channels, -1)
    free = torch.ones(height * width, dtype=torch.bool)
    proposals: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while (~free).sum().float() / free.numel() < coverage and len(proposals) < max_masks:
            direction = principal_direction(flat[:, free].T)
            similarity = direction @ unit
            similarity[~free] = 0
            candidates = torch.where(free, similarity, torch.tensor(float("-inf")))
            seed_position = int(torch.nonzero(candidates == candidates.max())[0])
            similarity = unit[:, seed_position] @ unit
            similarity[~free] = 0
            peak = similarity.max()
            if peak <= 0:
                break
            similarity[similarity < threshold * peak] = 0
            similarity = similarity / peak
            proposals.append(similarity.reshape(height, width))
            free[similarity > 0] = False
    return proposals


def reference_logits(proposals: list[torch.Tensor], median_filter: bool = True) -> torch.Tensor:
    """Post-processing of one image's proposals -> [1 + N, h, w] log-probabilities."""
    stack = torch.stack(proposals)
    if median_filter:
        padded = F.pad(stack[None], (1, 1, 1, 1), mode="reflect")[0]
        windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # [N, h, w, 3, 3]
        stack = windows.reshape(*windows.shape[:3], 9).median(dim=-1).values
    stack = (stack * 10).clamp(0, 1)
    nonzero = stack[stack != 0]
    mean = nonzero.mean() if nonzero.numel() else torch.tensor(1.0)
    background = (mean - stack.sum(dim=0)).clamp(0, 1)
    return torch.log_softmax(torch.cat([background[None], stack]), dim=0)


def reference_label_map(feature_map: torch.Tensor, **kwargs) -> tuple[np.ndarray, int]:
    """argmax label map [h, w] of the reference and its proposal count."""
    median_filter = kwargs.pop("median_filter", True)
    proposals = reference_proposals(feature_map, **kwargs)
    return reference_logits(proposals, median_filter).argmax(0).numpy(), len(proposals)


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index of two flat labelings (Hubert & Arabie), 1.0 for identical partitions."""
    labels_a = np.asarray(labels_a).ravel()
    labels_b = np.asarray(labels_b).ravel()
    _, a = np.unique(labels_a, return_inverse=True)
    _, b = np.unique(labels_b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x: np.ndarray) -> float:
        x = x.astype(np.float64)
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    total = pairs(np.array([labels_a.size]))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (all one cluster or all singletons)
        return 1.0
    return (index - expected) / (maximum - expected)


def planted_features(
    batch: int,
    channels: int = 384,
    size: int = 40,
    regions: int = 6,
    noise: float = 0.35,
    seed: int = 0,
) -> torch.Tensor:
    """Synthetic DINO-like maps [B, C, size, size]: random blob regions, each with its own mean
    feature (plus a shared positive offset, like real ViT features), smooth boundaries, noise."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(batch):
        centres = torch.rand(regions, 2, generator=generator) * size
        scales = 0.5 + torch.rand(regions, generator=generator)
        ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        distance = ((ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2)
        region = (distance.sqrt() * scales[:, None, None]).argmin(dim=0)  # [size, size]
        means = torch.randn(regions, channels, generator=generator)
        offset = 0.5 * torch.randn(channels, generator=generator)
        clean = means[region].permute(2, 0, 1) + offset[:, None, None]
        clean = F.avg_pool2d(clean[None], 3, stride=1, padding=1, count_include_pad=False)[0]
        maps.append(clean + noise * torch.randn(channels, size, size, generator=generator))
    return torch.stack(maps)


@dataclass(frozen=True)
class OracleAgreement:
    """Agreement of a method's label maps with the randomised oracle, per image ([N] arrays).

    ari: mean adjusted Rand index of the method against each oracle run (one run per seed).
    oracle_self: mean pairwise ARI between the oracle's own runs (1.0 where it is reproducible).
    stable: the oracle's runs all gave the same partition and proposal count.
    counts_equal: the method's proposal count equals that of one of the oracle's runs.
    """

    ari: np.ndarray
    oracle_self: np.ndarray
    stable: np.ndarray
    counts_equal: np.ndarray

    def summary(self) -> str:
        stable = self.ari[self.stable]
        return (f"ARI vs oracle mean {self.ari.mean():.4f} (min {self.ari.min():.4f}); on the "
                f"{int(self.stable.sum())}/{self.stable.size} images where the oracle is reproducible: mean "
                f"{stable.mean() if stable.size else float('nan'):.4f}, min "
                f"{stable.min() if stable.size else float('nan'):.4f}; oracle vs itself mean "
                f"{self.oracle_self.mean():.4f}; counts equal {self.counts_equal.mean():.0%}")


def oracle_agreement(
    features: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    seeds: tuple[int, ...] = (0, 1, 2),
    **kwargs,
) -> OracleAgreement:
    """Compare label maps ``labels`` [N, h, w] and proposal counts ``counts`` [N] of a method on
    ``features`` [N, C, h, w] with the oracle run once per seed (``kwargs`` as for
    :func:`reference_proposals`, plus ``median_filter``)."""
    ari, oracle_self, stable, counts_equal = [], [], [], []
    for index in range(features.shape[0]):
        runs = [reference_label_map(features[index], seed=seed, **kwargs) for seed in seeds]
        ari.append(np.mean([adjusted_rand_index(run, labels[index]) for run, _ in runs]))
        pairs = [adjusted_rand_index(runs[i][0], runs[j][0]) for i in range(len(runs)) for j in range(i + 1, len(runs))]
        oracle_self.append(np.mean(pairs) if pairs else 1.0)
        run_counts = {count for _, count in runs}
        stable.append(all(pair == 1.0 for pair in pairs) and len(run_counts) == 1)
        counts_equal.append(int(counts[index]) in run_counts)
    return OracleAgreement(np.array(ari), np.array(oracle_self), np.array(stable), np.array(counts_equal))
