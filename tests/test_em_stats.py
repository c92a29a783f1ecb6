"""Sufficient statistics, the moving-average prototype update and the one-collective stats EM step."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from primaps_dist import distributed
from primaps_dist.em.stats import PrototypeState, batch_stats, stats_step
from support import dist_pipelines as utils

torch.set_num_threads(1)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def loop_stats(features, labels, num_classes):
    """Per-pixel Python loop: the obvious definition."""
    channels = features.shape[1]
    sums = torch.zeros(num_classes, channels, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for row, label in zip(features.double(), labels.tolist()):
        if label == 255:
            continue
        sums[label] += unit(row)
        counts[label] += 1
    return sums, counts


def test_batch_stats_by_hand():
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, 255, 0])
    packed = batch_stats(features, labels, num_classes=3)
    assert packed.dtype == torch.float64 and packed.shape == (3, 3)
    half = 1 / math.sqrt(2)
    expected = torch.tensor([[0.6 + half, 0.8 + half, 2.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-15)


def test_batch_stats_matches_loop_and_map_layout():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 7, 3, 4, generator=generator)
    labels = torch.randint(0, 4, (2, 3, 4), generator=generator)
    labels[0, 0, :2] = 255
    packed = batch_stats(features, labels, 4)
    rows = features.permute(0, 2, 3, 1).reshape(-1, 7)
    sums, counts = loop_stats(rows, labels.reshape(-1), 4)
    torch.testing.assert_close(packed[:, :7], sums)
    torch.testing.assert_close(packed[:, 7], counts, rtol=0, atol=0)
    torch.testing.assert_close(batch_stats(rows, labels.reshape(-1), 4), packed, rtol=0, atol=0)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 5]), "label 5 is outside [0, 3)"),
        (torch.tensor([0, -1]), "label -1 is outside"),
        (torch.tensor([0.0, 1.0]), "must be an integer tensor"),
        (torch.tensor([0, 1, 2]), "labels have shape (3,)"),
    ],
)
def test_batch_stats_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError) as info:
        batch_stats(torch.ones(2, 4), labels, 3)
    assert message in str(info.value)


@settings(max_examples=40, deadline=None)
@given(
    n_a=st.integers(0, 30),
    n_b=st.integers(0, 30),
    num_classes=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_split_batches_sum_to_the_whole(n_a, n_b, num_classes, seed):
    """What the all-reduce relies on: stats(A) + stats(B) == stats(A u B)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_a + n_b, 5, generator=generator)
    labels = torch.randint(0, num_classes + 1, (n_a + n_b,), generator=generator)
    labels[labels == num_classes] = 255
    whole = batch_stats(features, labels, num_classes)
    first = batch_stats(features[:n_a], labels[:n_a], num_classes)
    parts = first + batch_stats(features[n_a:], labels[n_a:], num_classes)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)


def packed(sums, counts):
    sums, counts = torch.as_tensor(sums, dtype=torch.float64), torch.as_tensor(counts, dtype=torch.float64)
    return torch.cat([sums, counts[:, None]], dim=1)


def test_first_update_takes_batch_mean_and_unseen_class_keeps_prototype():
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    state = PrototypeState.from_prototypes(init)
    result = state.update(packed([[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]], [2, 3, 0]), momentum=0.98)
    assert result.updated.tolist() == [True, True, False] and result.counts.tolist() == [2, 3, 0]
    torch.testing.assert_close(state.prototypes, torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(state.W, torch.tensor([0.04, 0.06, 0.0], dtype=torch.float64))
    assert state.step == 1


def test_moving_average_by_hand():
    state = PrototypeState.from_prototypes(torch.eye(2))
    b = 0.75
    s1, s2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    state.update(packed(s1, [2, 1]), b)
    state.update(packed(s2, [3, 0]), b)
    m0 = b * (1 - b) * s1[0].double() + (1 - b) * s2[0].double()
    torch.testing.assert_close(state.M[0], m0)
    torch.testing.assert_close(state.prototypes[0], (m0 / m0.norm()).float())
    # Class 1 was absent in step 2: M, W and mu frozen at their step-1 values.
    torch.testing.assert_close(state.M[1], (1 - b) * s1[1].double())
    assert state.W[1].item() == pytest.approx((1 - b) * 1)
    torch.testing.assert_close(state.prototypes[1], torch.tensor([0.0, 1.0]))


def test_momentum_zero_is_a_lloyd_step_and_cancelling_features_keep_prototype():
    state = PrototypeState.from_prototypes(torch.eye(3))
    state.update(packed([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [2, 1, 4]), 0.0)
    torch.testing.assert_close(state.prototypes[0], unit(torch.tensor([1.0, 1.0, 0.0])))
    # Class 2: four features that sum to zero -> no direction -> prototype unchanged.
    torch.testing.assert_close(state.prototypes[2], torch.tensor([0.0, 0.0, 1.0]))
    state.update(packed([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [5, 1, 0]), 0.0)
    torch.testing.assert_close(state.prototypes[0], torch.tensor([0.0, 1.0, 0.0]))  # no memory at momentum 0


def test_placeholder_state_initialize_and_set_prototypes():
    state = PrototypeState(3, 2)
    assert state.prototypes.abs().sum() == 0 and state.M.dtype == torch.float64 and state.W.shape == (3,)
    state.update(packed([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [1, 0, 0]), 0.5)  # before initialisation
    state.initialize(torch.tensor([[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(state.prototypes, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5**0.5, 0.5**0.5]]))
    assert state.step == 0 and state.M.abs().sum() == 0 and state.W.abs().sum() == 0
    state.update(packed([[4.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [4, 0, 0]), 0.5)
    state.set_prototypes(torch.tensor([[0.0, -5.0], [1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(state.prototypes[0], torch.tensor([0.0, -1.0]))
    assert state.W[0] == 2.0 and state.step == 1  # statistics untouched by set_prototypes
    with pytest.raises(ValueError, match="prototypes have shape"):
        state.initialize(torch.ones(2, 2))


def test_update_rejects_bad_input():
    state = PrototypeState.from_prototypes(torch.eye(3))
    with pytest.raises(ValueError, match="momentum must be in"):
        state.update(torch.zeros(3, 4, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="packed statistics have shape"):
        state.update(torch.zeros(3, 7, dtype=torch.float64), 0.5)


def test_state_dict_round_trip_weights_only(tmp_path):
    state = PrototypeState.from_prototypes(torch.randn(4, 6))
    state.update(batch_stats(torch.randn(20, 6), torch.randint(0, 4, (20,)), 4), 0.9)
    torch.save(state.state_dict(), tmp_path / "state.pt")
    restored = PrototypeState.from_prototypes(torch.randn(4, 6))
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for key, value in state.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(ValueError, match="'M' has shape"):
        PrototypeState(5, 6).load_state_dict({**state.state_dict(), "prototypes": torch.zeros(5, 6)})


def test_stats_step_one_collective_objective_and_counts():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    state = PrototypeState.from_prototypes(prototypes)
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 255])
    # cosines to the class prototype: 1, 1/sqrt(2), 1; the ignored pixel does not count.
    distributed.reset_collective_counts()
    result = stats_step(state, features, labels, momentum=0.5)
    assert distributed.collective_counts() == {"all_reduce_sum": 1}
    expected = (1.0 + 1 / math.sqrt(2) + 1.0) / 3
    assert float(result.objective) == pytest.approx(expected, abs=1e-12)
    assert result.counts.tolist() == [2, 1] and int(result.labelled) == 3
    assert result.as_dict()["classes_used"] == 2
    empty = stats_step(state, features, torch.full((4,), 255), momentum=0.5)
    assert math.isnan(float(empty.objective)) and int(empty.labelled) == 0


def test_stats_em_on_two_ranks_matches_one_rank_and_stays_bitwise_identical():
    """2 gloo ranks x batch 3 == 1 rank x batch 6 (1e-5), bitwise equal ranks, one all-reduce per step."""
    rank0, rank1 = utils.load_ranks("core", "stats")
    single = utils.run_stats_pipeline(7, 0, 1, per_rank_batch=6)
    assert all(rank0["consistent"]) and len(rank0["consistent"]) == 1 + utils.KMEANS_STEPS + utils.EM_STEPS
    for step, (p0, p1, ref) in enumerate(zip(rank0["em"], rank1["em"], single["em"])):
        assert torch.equal(p0, p1), f"EM step {step}: ranks differ"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5)
    for counts in rank0["collectives"]:
        assert counts == {"all_reduce_sum": 1}
    assert rank0["em_objective"] == pytest.approx(single["em_objective"], abs=1e-9)
    for counts0, counts_single in zip(rank0["em_counts"], single["em_counts"]):
        assert torch.equal(counts0, counts_single)
        assert counts0[-1] == 0  # class K-1 never labelled ...
    torch.testing.assert_close(rank0["em"][-1][-1], single["kmeans"][-1][-1])  # ... so it kept its prototype
    assert torch.equal(rank0["state"]["M"], rank1["state"]["M"])
