"""Gradient mode: cosine head, focal class-weighted CE, momentum prototypes, student view, engines."""

from __future__ import annotations

import json
import math

import pytest
import torch

import _dist_utils as utils
from primaps_dist import distributed
from primaps_dist.em.gradient import (
    GradientEngine,
    MomentumPrototypes,
    PhotometricParams,
    PrototypeHead,
    _gaussian_blur,
    focal_class_weighted_ce,
    focal_class_weights,
    load_deepspeed_config,
    make_engine,
    make_head_engine,
    photometric_view,
)
from primaps_dist.errors import UserError

torch.set_num_threads(1)


def test_ema_schedule_values_are_exact():
    decays = [MomentumPrototypes.decay_for_update(k, 0.98) for k in range(1, 61)]
    assert decays[:5] == [0.0, 0.5, 1 - 1 / 3, 0.75, 0.8]  # the first update copies theta_R
    assert decays[2] == pytest.approx(0.6667, abs=5e-5)
    assert decays[48] == pytest.approx(1 - 1 / 49) and decays[48] < 0.98
    assert all(d == 0.98 for d in decays[49:])  # capped from the 50th update on
    with pytest.raises(ValueError):
        MomentumPrototypes.decay_for_update(0, 0.98)


def test_momentum_updates_every_n_steps_by_hand():
    momentum = MomentumPrototypes(torch.tensor([[1.0, 0.0]]), every=3, max_decay=0.6)
    running = [torch.tensor([[0.0, float(step)]]) for step in range(1, 13)]
    used = [momentum.step(w) for w in running]
    assert used == [None, None, 0.0, None, None, 0.5, None, None, 0.6, None, None, 0.6]
    expected = torch.tensor([[0.0, 3.0]])  # update 1: copy of step 3
    expected = 0.5 * expected + 0.5 * torch.tensor([[0.0, 6.0]])
    expected = 0.6 * expected + 0.4 * torch.tensor([[0.0, 9.0]])
    expected = 0.6 * expected + 0.4 * torch.tensor([[0.0, 12.0]])
    torch.testing.assert_close(momentum.weight, expected)
    torch.testing.assert_close(momentum.prototypes, torch.tensor([[0.0, 1.0]]))
    restored = MomentumPrototypes(torch.tensor([[1.0, 0.0]]), every=3, max_decay=0.6)
    restored.load_state_dict(momentum.state_dict())
    assert (restored.steps, restored.updates) == (12, 4) and torch.equal(restored.weight, momentum.weight)


def test_focal_weights_and_loss_by_hand():
    # One image, two pixels, two classes: softmax (0.5, 0.5) and (0.75, 0.25).
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # [B=1, K=2, H=1, W=2]
    weights = focal_class_weights(logits, gamma=2.0)
    torch.testing.assert_close(weights, torch.tensor([0.375**2, 0.625**2]))
    labels = torch.tensor([[[1, 0]]])
    expected = (0.625**2 * -math.log(0.5) + 0.375**2 * -math.log(0.75)) / 2
    assert float(focal_class_weighted_ce(logits, labels, gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    # An ignored pixel contributes nothing but still counts in the denominator (reference behaviour).
    ignored = torch.tensor([[[1, 255]]])
    expected_ignored = (0.625**2 * -math.log(0.5)) / 2
    assert float(focal_class_weighted_ce(logits, ignored, gamma=2.0)) == pytest.approx(expected_ignored, rel=1e-6)
    # gamma = 0: plain CE summed / pixel count.
    plain = (-math.log(0.5) - math.log(0.75)) / 2
    assert float(focal_class_weighted_ce(logits, labels, gamma=0.0)) == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="must be \\[B, K, H, W\\] and \\[B, H, W\\]"):
        focal_class_weighted_ce(logits, torch.zeros(1, 2, 2, dtype=torch.long), 2.0)


def test_focal_weights_are_detached():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert not focal_class_weights(logits, 2.0).requires_grad
    loss = focal_class_weighted_ce(logits, torch.randint(0, 3, (2, 4, 4)), 2.0)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_head_gives_cosine_logits():
    prototypes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    head = PrototypeHead(prototypes)
    features = torch.randn(2, 3, 4, 5)
    logits = head(features)
    assert logits.shape == (2, 2, 4, 5)
    normed = torch.nn.functional.normalize(features, dim=1)
    expected = torch.einsum("bchw,kc->bkhw", normed, torch.nn.functional.normalize(prototypes, dim=1))
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        head.weight.mul_(5.0)
    torch.testing.assert_close(head(features), expected)  # scale of the weight does not matter
    torch.testing.assert_close(head.prototypes().norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="features must be"):
        head(torch.randn(2, 4, 3, 3))


def test_photometric_view_is_seeded_batched_and_in_range():
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    first = photometric_view(images, torch.Generator().manual_seed(1))
    again = photometric_view(images, torch.Generator().manual_seed(1))
    other = photometric_view(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not torch.equal(first, images)
    with pytest.raises(ValueError, match="images must be"):
        photometric_view(torch.rand(2, 1, 8, 8), torch.Generator())


def test_photometric_branches():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    always_grey = PhotometricParams(jitter_branch_p=0.0, greyscale_p=1.0)
    grey = photometric_view(images, torch.Generator().manual_seed(0), always_grey)
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(grey[:, 1], grey[:, 2], rtol=0, atol=0)
    nothing = PhotometricParams(blur_sigma=(1e-3, 1e-3), jitter_branch_p=1.0, jitter_p=0.0)
    torch.testing.assert_close(photometric_view(images, torch.Generator(), nothing), images)  # delta kernel
    jitter_only = PhotometricParams(blur_sigma=(1e-3, 1e-3), jitter_branch_p=1.0, jitter_p=1.0)
    jittered = photometric_view(images, torch.Generator().manual_seed(5), jitter_only)
    change = (jittered - images).abs().mean(dim=(1, 2, 3))
    assert (change > 1e-3).all() and (change < 0.2).all()


def test_batched_blur_equals_per_image_blur():
    images = torch.rand(3, 3, 20, 18, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    batched = _gaussian_blur(images, sigma, 21)
    for index in range(3):
        single = _gaussian_blur(images[index : index + 1], sigma[index : index + 1], 21)
        torch.testing.assert_close(batched[index : index + 1], single)
    # A constant image stays constant (normalised kernel, reflect padding).
    flat = torch.full((1, 3, 12, 12), 0.25)
    torch.testing.assert_close(_gaussian_blur(flat, torch.tensor([2.0]), 21), flat)


def test_single_process_engine_learns_and_round_trips(tmp_path):
    engine = make_engine(torch.randn(utils.K, utils.C), utils.gradient_cfg("ddp"))
    assert isinstance(engine, GradientEngine)
    (features, labels), = utils.global_batches(3, 1, 4)
    distributed.reset_collective_counts()
    losses = []
    for _ in range(30):
        loss, counts = engine.step(features, labels)
        losses.append(loss)
    assert distributed.collective_counts() == {"all_reduce_sum": 30}  # focal weights + label counts, one each
    assert isinstance(losses[0], float) and losses[-1] < losses[0] - 0.05
    expected_counts = torch.bincount(labels[labels != 255], minlength=utils.K)
    assert torch.equal(counts, expected_counts)
    assert engine.momentum.updates == 15 and engine.last_ema_decay == pytest.approx(1 - 1 / 15)
    assert not torch.equal(engine.teacher_prototypes(), engine.running_prototypes())
    state, writer = engine.checkpoint_parts()
    assert writer is None and state["sharded_subdir"] == ""  # DDP: everything is in the state dict
    torch.save(state, tmp_path / "grad.pt")
    restored = make_engine(torch.zeros(utils.K, utils.C), utils.gradient_cfg("ddp"))
    restored.load_state_dict(torch.load(tmp_path / "grad.pt", weights_only=True))
    assert torch.equal(restored.head.weight, engine.head.weight)
    assert torch.equal(restored.teacher_prototypes(), engine.teacher_prototypes())
    # Same optimizer state -> the next step is identical.
    engine.step(features, labels)
    restored.step(features, labels)
    assert torch.equal(restored.head.weight, engine.head.weight)


def test_engine_choice_and_deepspeed_config(tmp_path):
    head = PrototypeHead(torch.randn(3, 4))
    with pytest.raises(UserError, match="em.engine"):
        make_head_engine(head, utils.gradient_cfg("horovod"), distributed.current_env())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "optimizer": {"type": "Adam", "params": {"lr": 1.0}}}))
    config = load_deepspeed_config(path, lr=5e-3, device=torch.device("cpu"))
    assert config["optimizer"]["params"] == {"lr": 5e-3, "torch_adam": True}
    assert "train_batch_size" not in config and config["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(UserError, match="file not found"):
        load_deepspeed_config(tmp_path / "missing.json", 1e-3, torch.device("cpu"))
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_deepspeed_config(path, 1e-3, torch.device("cpu"))


def test_two_rank_ddp_keeps_heads_identical_and_matches_one_rank():
    """2 gloo ranks x 2 images == 1 rank x 4 images (the focal weights are all-reduced)."""
    rank0, rank1 = utils.load_ranks("core", "ddp")
    single = utils.run_gradient_pipeline("ddp", 7, 0, 1, per_rank_batch=4)
    assert all(rank0["consistent"]) and len(rank0["consistent"]) == utils.GRADIENT_STEPS
    for step, (w0, w1, ref) in enumerate(zip(rank0["running"], rank1["running"], single["running"])):
        assert torch.equal(w0, w1), f"step {step}: ranks differ"
        torch.testing.assert_close(w0, ref, rtol=0, atol=1e-5)
    assert not torch.equal(rank0["running"][-1], rank0["running"][0])
    assert rank0["decay"] == [None, 0.0, None, 0.5]
    for counts0, counts1, counts_single in zip(rank0["counts"], rank1["counts"], single["counts"]):
        assert torch.equal(counts0, counts_single) and torch.equal(counts1, counts_single)  # global counts
    torch.testing.assert_close(rank0["momentum"][-1], single["momentum"][-1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_rank_deepspeed_on_cpu():
    """DeepSpeed (ZeRO-0 and ZeRO-1, gloo, CPU): same result as DDP; ZeRO-1 resumes from its checkpoint."""
    rank0, rank1 = utils.load_ranks("deepspeed", "deepspeed")
    single = utils.run_gradient_pipeline("ddp", 7, 0, 1, per_rank_batch=4)
    assert all(rank0["consistent"])
    for w0, w1, ref in zip(rank0["running"], rank1["running"], single["running"]):
        assert torch.equal(w0, w1)
        torch.testing.assert_close(w0, ref, rtol=0, atol=1e-5)
    assert rank0["state"]["engine"]["optimizer"] is not None  # ZeRO-0: replicated torch optimizer
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in rank0["zero1_files"]
    assert rank0["zero1_optimizer_in_state_dict"] is False and rank0["zero1_writer_all_ranks"]
    assert rank0["zero1_consistent"]
    assert torch.equal(rank0["zero1_original"], rank0["zero1_resumed"])
    assert torch.equal(rank1["zero1_original"], rank1["zero1_resumed"])
