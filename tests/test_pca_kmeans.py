"""PCA initialisation from the streamed covariance and mini-batch spherical K-means (the nearest-prototype
assignment itself: test_prototypes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from primaps_dist import distributed
from primaps_dist.em import CovarianceAccumulator, PrototypeState, kmeans_step
from primaps_dist.em.pca import orient_rows
from support import dist_pipelines as utils

torch.set_num_threads(1)


def numpy_pca(rows: np.ndarray, k: int) -> np.ndarray:
    """Reference: PCA of the L2-normalised rows with numpy (SVD of the centred data)."""
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    centred = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k]


def assert_same_directions(ours: torch.Tensor, reference: np.ndarray, atol: float = 1e-5) -> None:
    """Equal up to the sign of each row."""
    ours = ours.double().numpy()
    cosines = np.abs(np.sum(ours * reference, axis=1))
    np.testing.assert_allclose(cosines, 1.0, atol=atol)


def anisotropic_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, dim)  # distinct variances -> well-separated eigenvalues
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    return (torch.randn(n, dim, generator=generator) * scales) @ rotation.T + 0.3


def test_orient_rows_sign_rule():
    rows = torch.tensor([[0.1, -0.9, 0.3], [0.5, 0.2, -0.5], [-0.2, 0.1, 0.0]])
    oriented = orient_rows(rows)
    torch.testing.assert_close(oriented, torch.tensor([[-0.1, 0.9, -0.3], [0.5, 0.2, -0.5], [0.2, -0.1, 0.0]]))


def test_pca_matches_numpy_and_streaming_is_exact():
    rows = anisotropic_rows(600, 8, seed=1)
    whole = CovarianceAccumulator(8)
    whole.update(rows)
    streamed = CovarianceAccumulator(8)
    for chunk in rows.split(97):
        streamed.update(chunk)
    torch.testing.assert_close(streamed.covariance(), whole.covariance(), rtol=0, atol=1e-14)
    directions = whole.principal_directions(5)
    assert directions.dtype == torch.float32 and directions.shape == (5, 8)
    assert_same_directions(directions, numpy_pca(rows.double().numpy(), 5))
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(5))
    index = directions.abs().argmax(dim=1)
    assert (directions.gather(1, index[:, None]) > 0).all()  # sign rule applied


def test_feature_maps_are_flattened_per_position():
    maps = torch.randn(2, 4, 3, 5)
    from_maps, from_rows = CovarianceAccumulator(4), CovarianceAccumulator(4)
    from_maps.update(maps)
    from_rows.update(maps.permute(0, 2, 3, 1).reshape(-1, 4))
    torch.testing.assert_close(from_maps.covariance(), from_rows.covariance(), rtol=0, atol=1e-15)
    assert float(from_maps.count) == 30


def test_more_directions_than_dimensions_are_seeded_random_units():
    acc = CovarianceAccumulator(3)
    acc.update(anisotropic_rows(50, 3, seed=2))
    first = acc.principal_directions(7, seed=4)
    assert first.shape == (7, 3)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(first[:3] @ first[:3].T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.equal(first, acc.principal_directions(7, seed=4))
    assert not torch.equal(first[3:], acc.principal_directions(7, seed=5)[3:])
    assert torch.equal(first[:3], acc.principal_directions(7, seed=5)[:3])


def test_accumulator_misuse():
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="no features were accumulated"):
        acc.principal_directions(2)
    with pytest.raises(ValueError, match="expects 4"):
        acc.update(torch.randn(3, 5))
    acc.update(torch.randn(10, 4))
    distributed.reset_collective_counts()
    acc.reduce()
    assert distributed.collective_counts() == {"all_reduce_sum": 1}
    with pytest.raises(ValueError, match="update\\(\\) after reduce\\(\\)"):
        acc.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="called twice"):
        acc.reduce()


def test_kmeans_lloyd_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(4, 10, generator=generator), dim=1)
    ids = torch.arange(400) % 4
    features = centres[ids] + 0.05 * torch.randn(400, 10, generator=generator)
    state = PrototypeState.from_prototypes(centres[[0, 1, 2, 3]] + 0.3 * torch.randn(4, 10, generator=generator))
    distributed.reset_collective_counts()
    for _ in range(5):
        result = kmeans_step(state, features, momentum=0.0)
    assert distributed.collective_counts() == {"all_reduce_sum": 5}
    torch.testing.assert_close(state.prototypes, centres, atol=0.02, rtol=0)
    assert float(result.objective) > 0.98  # noise norm ~0.16 -> cos ~0.99
    assert result.counts.tolist() == [100, 100, 100, 100]


def test_seeded_pipeline_is_reproducible():
    first = utils.run_stats_pipeline(11, 0, 1, per_rank_batch=4)
    again = utils.run_stats_pipeline(11, 0, 1, per_rank_batch=4)
    other = utils.run_stats_pipeline(12, 0, 1, per_rank_batch=4)
    assert torch.equal(first["pca"], again["pca"])
    for key in ("kmeans", "em"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
    assert not torch.equal(first["em"][-1], other["em"][-1])


def test_two_rank_pca_and_kmeans_match_pooled_single_process():
    """2 gloo ranks: PCA == numpy PCA of the pooled features; K-means == 1 rank with the doubled batch."""
    rank0, rank1 = utils.load_ranks("core", "stats")
    pooled = torch.cat([features for features, _ in utils.global_batches(7, utils.PCA_STEPS, 6)])
    rows = pooled.permute(0, 2, 3, 1).reshape(-1, utils.C).double().numpy()
    assert_same_directions(rank0["pca"], numpy_pca(rows, utils.K))
    np.testing.assert_allclose(rank0["pca_mean"].numpy(), (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0))
    assert torch.equal(rank0["pca"], rank1["pca"])
    assert rank0["pca_collectives"] == {"all_reduce_sum": 1, "broadcast": 1}
    single = utils.run_stats_pipeline(7, 0, 1, per_rank_batch=6)
    for step, (p0, p1, ref) in enumerate(zip(rank0["kmeans"], rank1["kmeans"], single["kmeans"])):
        assert torch.equal(p0, p1), f"K-means step {step}: ranks differ"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5)
