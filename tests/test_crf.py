"""Dense CRF: agreement with pydensecrf on real photos, exactness of the lattice, contract, validation."""

from __future__ import annotations

import builtins
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from primaps_dist import crf
from primaps_dist.crf import PermutohedralLattice, crf_from_config, dense_crf, make_crf
from primaps_dist.errors import UserError
from primaps_dist.testing.crf_samples import sample_batch

HAVE_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None
needs_pydensecrf = pytest.mark.skipif(not HAVE_PYDENSECRF, reason="pydensecrf not importable (install the crf extra)")


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def photos_320():
    """Four real photos at 320x320 with PriMaPs-like logits; images 1 and 3 have one -inf channel."""
    return sample_batch(4, 320, 6, unused=1)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image fraction of pixels with the same argmax label: ``[B]``."""
    return (a.argmax(dim=1) == b.argmax(dim=1)).float().mean(dim=(1, 2))


def _random_inputs(batch=2, labels=4, height=9, width=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, labels, height, width, generator=generator) * 2
    images = torch.rand(batch, 3, height, width, generator=generator) * 255
    return logits, images


# --------------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------------


@needs_pydensecrf
def test_argmax_matches_pydensecrf_on_real_photos(photos_320):
    logits, images = photos_320
    ours = dense_crf(logits, images)
    reference = dense_crf(logits, images, backend="pydensecrf")
    agreement = _agreement(ours, reference)
    no_crf = _agreement(logits, reference)
    assert agreement.min() >= 0.99, agreement  # brief: >= 95 %; measured > 99.9 %
    # The CRF really changes the labels, so the agreement above is not just the unary argmax.
    assert no_crf.mean() < 0.985, no_crf
    assert agreement.mean() > no_crf.mean() + 0.01


@needs_pydensecrf
def test_bilateral_lattice_reproduces_pydensecrf_exactly(photos_320):
    # Gaussian weight 0 isolates the permutohedral lattice, which follows pydensecrf step for step.
    logits, images = (t[:2, :, 96:224, 64:256].contiguous() for t in photos_320)
    ours = dense_crf(logits, images, gaussian_weight=0.0)
    reference = dense_crf(logits, images, gaussian_weight=0.0, backend="pydensecrf")
    assert (ours - reference).abs().max() < 1e-4


@needs_pydensecrf
def test_gaussian_kernel_close_to_pydensecrf(photos_320):
    logits, images = (t[:2, :, :160, :160].contiguous() for t in photos_320)
    ours = dense_crf(logits, images, bilateral_weight=0.0)
    reference = dense_crf(logits, images, bilateral_weight=0.0, backend="pydensecrf")
    assert _agreement(ours, reference).min() > 0.995
    assert (ours - reference).abs().mean() < 5e-3


@needs_pydensecrf
def test_pydensecrf_backend_handles_unused_channels(photos_320):
    logits, images = (t[:, :, :64, :64].contiguous() for t in photos_320)
    out = dense_crf(logits, images, backend="pydensecrf")
    unused = torch.isneginf(logits).all(dim=3).all(dim=2)  # [B, L]
    assert unused.any()
    assert torch.all(out.permute(0, 2, 3, 1)[unused[:, None, None, :].expand(-1, 64, 64, -1)] == 0)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(4, 64, 64), atol=1e-5, rtol=0)


@needs_pydensecrf
@pytest.mark.parametrize("downsample, worst, mean", [(2, 0.965, 0.975), (4, 0.925, 0.955)])
def test_coarse_grid_still_agrees_with_pydensecrf(photos_320, downsample, worst, mean):
    # Measured on these photos: f=2 mean 98.0 % (worst image 96.9 %), f=4 mean 96.0 % (93.2 %); the
    # unary argmax alone gives 93.6 % (91.1 %), so the coarse CRF still moves most pixels the right way.
    logits, images = photos_320
    reference = dense_crf(logits, images, backend="pydensecrf")
    agreement = _agreement(dense_crf(logits, images, downsample=downsample), reference)
    no_crf = _agreement(logits, reference)
    assert agreement.min() >= worst and agreement.mean() >= mean, agreement
    assert agreement.mean() > no_crf.mean() + 0.015
    assert bool((agreement > no_crf).all())


# --------------------------------------------------------------------------------------------------
# The lattice itself (no pydensecrf needed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_lattice_approximates_a_unit_gaussian(dim):
    generator = torch.Generator().manual_seed(dim)
    features = torch.rand(300, dim, generator=generator) * 4
    kernel = PermutohedralLattice.build(features).filter(torch.eye(300))
    exact = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
    correlation = torch.corrcoef(torch.stack([kernel.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.95
    assert torch.allclose(kernel.sum(dim=0), kernel.sum(dim=0).clamp(min=0))  # non-negative weights
    # Far-apart points do not interact at all.
    far = torch.cat([features, features + 100.0])
    block = PermutohedralLattice.build(far).filter(torch.eye(600))
    assert block[:300, 300:].abs().max() == 0


def test_lattice_structure_is_consistent():
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(2 * 150, 5, generator=generator) * 3
    lattice = PermutohedralLattice.build(features, num_groups=2)
    torch.testing.assert_close(lattice.point_weights.sum(dim=1), torch.ones(300), atol=1e-5, rtol=0)
    assert (lattice.point_weights >= -1e-6).all()
    # Each corner class owns a disjoint, contiguous id range per group; images share no vertex.
    first, second = lattice.point_vertices[:150], lattice.point_vertices[150:]
    assert first.max() < second.min()
    # Blur neighbours are symmetric: the opposite neighbour of my neighbour is me.
    for axis in range(6):
        n1, n2 = lattice.neighbours[axis]
        has = n1 >= 0
        assert torch.equal(n2[n1[has]], torch.nonzero(has).flatten())
    # The sparse operator equals the index-based reference filter (normalised, weighted).
    operator = crf.LatticeOperator(lattice, weight=2.5)
    values = torch.rand(300, 3, generator=generator)
    degree = lattice.filter(torch.ones(300, 1))
    expected = 2.5 * degree.rsqrt() * lattice.filter(values * degree.rsqrt())
    torch.testing.assert_close(operator(values), expected, atol=1e-5, rtol=1e-4)


def test_sparse_matrices_satisfy_csr_invariants():
    # Sorted, unique column indices per row: required by cuSPARSE, checked here on the CPU.
    generator = torch.Generator().manual_seed(2)
    lattice = PermutohedralLattice.build(torch.rand(400, 5, generator=generator) * 3, num_groups=2)
    operator = crf.LatticeOperator(lattice, weight=1.0)
    matrices = [operator._splat, operator._slice, *operator._blur]
    assert len(matrices) >= 3
    for matrix in matrices:
        assert matrix.layout == torch.sparse_csr
        rows, columns = matrix.crow_indices(), matrix.col_indices()
        assert rows[0] == 0 and rows[-1] == columns.numel() == matrix.values().numel()
        assert bool((rows[1:] >= rows[:-1]).all())
        assert bool(((columns >= 0) & (columns < matrix.shape[1])).all())
        row_of_entry = torch.repeat_interleave(torch.arange(matrix.shape[0]), rows.diff())
        same_row = row_of_entry[1:] == row_of_entry[:-1]
        assert bool((columns[1:] > columns[:-1])[same_row].all()), "columns not sorted and unique within a row"
        torch._validate_sparse_csr_tensor_args(rows, columns, matrix.values(), matrix.shape)


def test_lattice_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        PermutohedralLattice.build(torch.rand(5))
    with pytest.raises(ValueError, match="num_groups=3"):
        PermutohedralLattice.build(torch.rand(10, 2), num_groups=3)
    with pytest.raises(ValueError, match="overflow"):
        PermutohedralLattice.build(torch.tensor([[0.0] * 5, [1e4] * 5]))


# --------------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------------


def test_probabilities_deterministic_and_unused_labels_stay_zero():
    logits, images = _random_inputs(batch=3, labels=5, height=17, width=13)
    logits[0, 4] = float("-inf")  # label unused by image 0
    logits[1, 2, 3:9, 2:6] = float("-inf")  # label forbidden at some pixels only
    first = dense_crf(logits, images)
    second = dense_crf(logits.clone(), images.clone())
    assert first.dtype == torch.float32 and first.shape == logits.shape
    assert torch.equal(first, second)
    torch.testing.assert_close(first.sum(dim=1), torch.ones(3, 17, 13), atol=1e-5, rtol=0)
    assert (first >= 0).all()
    assert torch.all(first[torch.isneginf(logits)] == 0)
    assert (first[2, 4] > 0).all()  # unaffected elsewhere


def test_batch_equals_images_one_by_one():
    logits, images = _random_inputs(batch=3, labels=4, height=24, width=20, seed=3)
    batched = dense_crf(logits, images)
    for b in range(3):
        alone = dense_crf(logits[b : b + 1], images[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("downsample, height, width, offset", [(1, 24, 32, 4), (2, 48, 64, 8), (4, 48, 64, 8)])
def test_refinement_follows_image_edges(downsample, height, width, offset):
    # Left half dark, right half bright; the unary is ambiguous in a band around the edge and slightly
    # wrong on both sides (edge placed `offset` px too far right): the bilateral kernel must snap the labels
    # to the colour edge, also when all but the last update run on 2 or 4 px cells.
    images = torch.zeros(1, 3, height, width)
    images[..., width // 2 :] = 200.0
    columns = torch.arange(width, dtype=torch.float32)
    score = torch.tanh((columns - (width // 2 + offset)) / (1.5 * offset)) * 0.3
    logits = torch.stack([-score, score]).view(1, 2, 1, width).expand(1, 2, height, width).contiguous()
    refined = dense_crf(logits, images, downsample=downsample).argmax(dim=1)
    expected = (columns >= width // 2).long().expand(1, height, width)
    assert (logits.argmax(dim=1) != expected).float().mean() > 0.1
    assert torch.equal(refined, expected)


def test_iterations_zero_gives_clipped_unary_softmax():
    logits, images = _random_inputs()
    logits[:, 0] -= 30.0  # probabilities below the 1e-5 clip
    out = dense_crf(logits, images, iterations=0)
    clipped = torch.softmax(logits, dim=1).clamp(min=crf.UNARY_CLIP)
    torch.testing.assert_close(out, clipped / clipped.sum(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 5, 4), (1, 3, 1, 1), (2, 2, 1, 6), (1, 4, 3, 2)])
def test_tiny_shapes(shape):
    logits = torch.randn(shape)
    images = torch.rand(shape[0], 3, *shape[2:]) * 255
    out = dense_crf(logits, images)
    assert out.shape == shape
    torch.testing.assert_close(out.sum(dim=1), torch.ones(shape[0], *shape[2:]), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    labels=st.integers(1, 5),
    height=st.integers(1, 10),
    width=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 20.0),
    downsample=st.integers(1, 4),
)
def test_properties_hold_for_random_inputs(batch, labels, height, width, seed, scale, downsample):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, labels, height, width, generator=generator) * scale
    forbidden = torch.rand(batch, labels, height, width, generator=generator) < 0.3
    forbidden[:, 0] = False  # every pixel keeps at least one label
    logits[forbidden] = float("-inf")
    images = torch.rand(batch, 3, height, width, generator=generator) * 255
    out = dense_crf(logits, images, downsample=downsample)
    assert torch.isfinite(out).all()
    assert torch.all(out[forbidden] == 0)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(batch, height, width), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Coarse grid (downsample > 1)
# --------------------------------------------------------------------------------------------------


def test_coarse_grid_builds_the_lattice_on_cells(monkeypatch):
    built = []
    real_build = PermutohedralLattice.build.__func__

    def recording_build(cls, features, num_groups=1):
        built.append((features.shape[0], num_groups, features[:, :2].min(0).values, features[:, :2].max(0).values))
        return real_build(cls, features, num_groups)

    monkeypatch.setattr(PermutohedralLattice, "build", classmethod(recording_build))
    logits, images = _random_inputs(batch=2, labels=3, height=40, width=28, seed=1)
    dense_crf(logits, images, downsample=4, bilateral_sxy=2.0)
    [(points, groups, low, high)] = built
    assert (points, groups) == (2 * 10 * 7, 2)  # cells, not pixels
    # Cell centres in full-image pixels: x from 1.5 to 25.5, y from 1.5 to 37.5 (divided by sxy = 2).
    torch.testing.assert_close(low, torch.tensor([0.75, 0.75]))
    torch.testing.assert_close(high, torch.tensor([12.75, 18.75]))
    built.clear()
    dense_crf(logits, images, downsample=1)
    assert built[0][0] == 2 * 40 * 28


@pytest.mark.parametrize("downsample", [2, 3, 4, 64])
def test_coarse_grid_keeps_the_output_contract(downsample):
    # Sizes that the factor does not divide, a grid of one cell (64), forbidden labels at single pixels.
    logits, images = _random_inputs(batch=3, labels=5, height=17, width=13, seed=downsample)
    logits[0, 4] = float("-inf")
    logits[1, 2, 3:9, 2:6] = float("-inf")
    logits[2, 1, 5, 7] = float("-inf")
    out = dense_crf(logits, images, downsample=downsample)
    assert out.shape == logits.shape and out.dtype == torch.float32
    assert torch.equal(out, dense_crf(logits.clone(), images.clone(), downsample=downsample))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3, 17, 13), atol=1e-5, rtol=0)
    assert torch.all(out[torch.isneginf(logits)] == 0)
    assert (out[~torch.isneginf(logits)] > 0).all()
    for b in range(3):
        alone = dense_crf(logits[b : b + 1], images[b : b + 1], downsample=downsample)
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("downsample, edge", [(2, 31), (4, 30), (4, 34), (4, 33)])
def test_coarse_grid_places_an_edge_inside_a_cell_within_that_cell(downsample, edge):
    # An edge inside a cell: that cell averages both colours, and the last (full-resolution) update only
    # sees upsampled coarse messages, so the boundary may miss the colour edge by up to f - 1 pixels
    # (measured: f = 4, edge at 33 -> 36; README: the price of downsample).
    height, width = 48, 64
    images = torch.zeros(1, 3, height, width)
    images[..., edge:] = 200.0
    columns = torch.arange(width, dtype=torch.float32)
    score = torch.tanh((columns - (edge + 8)) / 12.0) * 0.3
    logits = torch.stack([-score, score]).view(1, 2, 1, width).expand(1, 2, height, width).contiguous()
    refined = dense_crf(logits, images, downsample=downsample).argmax(dim=1)[0]  # [H, W]
    boundary = (refined == 0).sum(dim=1)  # columns labelled 0 per row (the labels are monotone per row)
    assert torch.equal(refined, (columns >= boundary[:, None]).long())
    assert (boundary - edge).abs().max() <= downsample - 1, boundary
    assert (logits.argmax(dim=1)[0] == 0).sum(dim=1).sub(edge).abs().min() >= 8  # the unary was 8 px off


def test_gaussian_operator_with_a_width_per_axis_matches_the_dense_kernel():
    height, width, sigma_rows, sigma_cols = 7, 5, 0.6, 1.7
    values = torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dy = (ys.reshape(-1, 1) - ys.reshape(1, -1)).double()
    dx = (xs.reshape(-1, 1) - xs.reshape(1, -1)).double()
    kernel = torch.exp(-0.5 * (dy / sigma_rows) ** 2 - 0.5 * (dx / sigma_cols) ** 2)
    kernel = kernel * (dy.abs() <= math.ceil(3 * sigma_rows)) * (dx.abs() <= math.ceil(3 * sigma_cols))
    norm = kernel.sum(dim=1).rsqrt()[None, :, None]  # D^-1/2, [1, P, 1]
    flat = values.double().reshape(2, height * width, 3)
    expected = 2.5 * norm * torch.einsum("pq,bqc->bpc", kernel, norm * flat)
    operator = crf.GaussianOperator(height, width, (sigma_rows, sigma_cols), 2.5, torch.device("cpu"))
    got = operator(values).reshape(2, height * width, 3).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_coarse_grid_scales_the_gaussian_width_per_axis(monkeypatch):
    widths = []
    real_operator = crf.GaussianOperator

    def recording_operator(height, width, sxy, weight, device):
        widths.append(((height, width), sxy))
        return real_operator(height, width, sxy, weight, device)

    monkeypatch.setattr(crf.operators, "GaussianOperator", recording_operator)  # where pairwise_operators looks
    logits, images = _random_inputs(batch=1, labels=2, height=17, width=13, seed=6)
    dense_crf(logits, images, downsample=4, gaussian_sxy=2.0)
    [((rows, cols), (sigma_rows, sigma_cols))] = widths
    assert (rows, cols) == (5, 4)
    assert sigma_rows == pytest.approx(2.0 * 5 / 17) and sigma_cols == pytest.approx(2.0 * 4 / 13)


def test_cells_sit_at_the_mean_position_of_their_pixels():
    # 10 pixels into 3 area cells: windows [0, 4), [3, 7), [6, 10) -> centres 1.5, 4.5, 7.5.
    xs, ys = crf.pixel_grid(3, 2, torch.device("cpu"), full_size=(10, 8))
    torch.testing.assert_close(ys, torch.tensor([1.5, 1.5, 4.5, 4.5, 7.5, 7.5]))
    torch.testing.assert_close(xs, torch.tensor([1.5, 5.5] * 3))
    positions = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 8)
    torch.testing.assert_close(F.interpolate(positions, size=(3, 2), mode="area")[0, 0, :, 0], ys[::2])


def test_coarse_grid_with_zero_or_one_iteration():
    logits, images = _random_inputs(height=12, width=12, seed=2)
    assert torch.equal(dense_crf(logits, images, iterations=0, downsample=3), dense_crf(logits, images, iterations=0))
    one = dense_crf(logits, images, iterations=1, downsample=3)
    torch.testing.assert_close(one.sum(dim=1), torch.ones(2, 12, 12), atol=1e-5, rtol=0)
    assert not torch.allclose(one, dense_crf(logits, images, iterations=0), atol=1e-3)


def test_output_is_channels_last_and_channels_last_input_is_not_modified():
    logits, images = _random_inputs(batch=2, labels=4, height=10, width=9, seed=4)
    channels_last = logits.contiguous(memory_format=torch.channels_last)
    kept = channels_last.clone()
    out = dense_crf(channels_last, images)
    assert torch.equal(channels_last, kept)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, dense_crf(logits, images))


# --------------------------------------------------------------------------------------------------
# Validation and the config-facing helper
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, images, kwargs, message",
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 3, 4), {}, r"logits must be \[B, L, H, W\]"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), {}, r"images must be \[B, 3, H, W\]"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 5), {}, "do not match"),
        (torch.zeros(2, 2, 4, 4), torch.zeros(1, 3, 4, 4), {}, "do not match"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.float64), torch.zeros(1, 3, 4, 4), {}, "logits must be float32"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.uint8), {}, r"images\.float\(\)"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4, dtype=torch.float64), {}, "images must be float32"),
        (torch.full((1, 2, 4, 4), math.nan), torch.zeros(1, 3, 4, 4), {}, "NaN"),
        (torch.full((1, 2, 4, 4), -math.inf), torch.zeros(1, 3, 4, 4), {}, "at least one finite logit"),
        (torch.zeros(1, 2, 4, 4), torch.full((1, 3, 4, 4), math.inf), {}, "images contain"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"iterations": -1}, "iterations"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"bilateral_srgb": 0.0}, "bilateral_srgb"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"gaussian_weight": -1.0}, "gaussian_weight"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"backend": "dcrf"}, "unknown backend 'dcrf'"),
        (torch.zeros(0, 2, 4, 4), torch.zeros(0, 3, 4, 4), {}, "non-empty"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"downsample": 0}, "downsample must be an int >= 1"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"downsample": 2.0}, "downsample must be an int"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"downsample": True}, "downsample must be an int"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), {"downsample": 2, "backend": "pydensecrf"},
         "needs the torch backend"),
    ],
)
def test_bad_input_raises_precise_value_error(logits, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dense_crf(logits, images, **kwargs)


def test_missing_pydensecrf_is_a_one_line_user_error(monkeypatch):
    real_import = builtins.__import__

    def fail_pydensecrf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail_pydensecrf)
    logits, images = _random_inputs()
    for call in (lambda: dense_crf(logits, images, backend="pydensecrf"), lambda: make_crf("pydensecrf")):
        with pytest.raises(UserError, match=r"primaps-dist\[crf\]") as info:
            call()
        assert "\n" not in str(info.value)


def test_make_crf_binds_the_config_fields():
    from dataclasses import asdict

    from primaps_dist.config import CRFConfig

    logits, images = _random_inputs(seed=5)
    config = CRFConfig(iterations=3, bilateral_srgb=10.0, downsample=2)
    crf_fn = make_crf(**asdict(config))
    expected = dense_crf(logits, images, iterations=3, bilateral_srgb=10.0, downsample=2)
    torch.testing.assert_close(crf_fn(logits, images), expected)
    assert not torch.allclose(expected, dense_crf(logits, images, iterations=3, bilateral_srgb=10.0))
    none_fn = make_crf(backend="none")
    torch.testing.assert_close(none_fn(logits, images), torch.softmax(logits, dim=1))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        make_crf(backend="fast")


def test_crf_from_config_returns_none_for_backend_none_unless_forced():
    from primaps_dist.config import CRFConfig

    logits, images = _random_inputs(height=16, width=16, seed=7)
    assert crf_from_config(CRFConfig(backend="none")) is None
    configured = crf_from_config(CRFConfig(iterations=3))  # the config's downsample (4)
    assert torch.equal(configured(logits, images), dense_crf(logits, images, iterations=3, downsample=4))
    full = crf_from_config(CRFConfig(iterations=3), downsample=1)  # eval.crf_downsample replaces it
    assert torch.equal(full(logits, images), dense_crf(logits, images, iterations=3))
    assert not torch.equal(full(logits, images), configured(logits, images))
    forced = crf_from_config(CRFConfig(backend="none", iterations=3), downsample=2, force=True)
    assert torch.equal(forced(logits, images), dense_crf(logits, images, iterations=3, downsample=2))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        crf_from_config(CRFConfig(backend="fast"))


def test_pipeline_code_builds_its_crf_only_through_crf_from_config():
    # One home for the meaning of crf.backend: no caller outside primaps_dist/crf tests it or calls make_crf.
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "primaps_dist").rglob("*.py"), *(root / "bench").glob("*.py")]:
        if "crf" in path.relative_to(root).parts[:2]:
            continue
        text = path.read_text()
        if re.search(r"backend\s*[!=]=\s*[\"']none[\"']|\bmake_crf\(", text):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_benchmark_set_up_equals_what_dense_crf_builds(monkeypatch):
    # bench_crf times crf.grid_size + crf.pairwise_operators as "the set-up": the same operators as dense_crf's.
    built = []
    real = crf.operators.pairwise_operators

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(crf.mean_field, "pairwise_operators", recording)
    logits, images = _random_inputs(batch=2, labels=3, height=20, width=12, seed=8)
    dense_crf(logits, images, downsample=2)
    gaussian, bilateral = crf.pairwise_operators(
        images, crf.grid_size(20, 12, 2), gaussian_sxy=1.0, gaussian_weight=3.0, bilateral_sxy=67.0,
        bilateral_srgb=3.0, bilateral_weight=4.0,
    )
    [(used_gaussian, used_bilateral)] = built
    q = torch.rand(2, 10, 6, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian(q), used_gaussian(q))
    assert torch.equal(bilateral(q.view(-1, 3)), used_bilateral(q.view(-1, 3)))


def test_config_defaults_and_function_defaults_are_the_same_numbers():
    # One source of truth (primaps_dist.crf.defaults): CRFConfig's field defaults, dense_crf's and
    # make_crf's keyword defaults must agree name by name. The only intended difference is downsample
    # (config: a coarse grid for pseudo labels; functions: full resolution like the reference).
    import dataclasses
    import inspect

    from primaps_dist.config import CRFConfig
    from primaps_dist.crf.defaults import CONFIG_DOWNSAMPLE, REFERENCE

    config = dataclasses.asdict(CRFConfig())
    assert config == {**dataclasses.asdict(REFERENCE), "downsample": CONFIG_DOWNSAMPLE}
    for function in (dense_crf, make_crf):
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        assert set(defaults) == set(config), function.__name__  # every config field is a keyword, and back
        differing = {name: (config[name], defaults[name]) for name in config if config[name] != defaults[name]}
        assert differing == {"downsample": (CONFIG_DOWNSAMPLE, 1)}, function.__name__
