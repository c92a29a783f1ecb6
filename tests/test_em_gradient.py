"""Gradient mode: weight-normalised head, focal class-weighted CE, momentum prototypes, student view, engines."""

from __future__ import annotations

import json
import math

import pytest
import torch

from support import dist_pipelines as utils
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
    photometric_draws,
    photometric_view,
    step_metrics,
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


def _torch_weight_norm_conv(directions: torch.Tensor, gains: torch.Tensor) -> torch.nn.Module:
    """Independent oracle: torch's own weight norm (dim 0) on a bias-free 1x1 conv, v and g set by hand."""
    conv = torch.nn.Conv2d(directions.shape[1], directions.shape[0], 1, bias=False)
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original1.copy_(directions[:, :, None, None])  # v
        conv.parametrizations.weight.original0.copy_(gains[:, None, None, None])  # g
    return conv


def test_head_is_a_weight_normalised_conv_on_raw_features():
    prototypes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    head = PrototypeHead(prototypes)
    torch.testing.assert_close(head.gain, torch.ones(2))  # gain starts at 1 (the reference's weight_g = 1)
    features = 40.0 * torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    logits = head(features)
    assert logits.shape == (2, 2, 4, 5)
    oracle = _torch_weight_norm_conv(prototypes, torch.ones(2))
    torch.testing.assert_close(logits, oracle(features).detach(), rtol=1e-5, atol=1e-4)
    # Logits are NOT cosines: they scale with the feature norm (the logit scale is ||f||).
    cosines = torch.einsum(
        "bchw,kc->bkhw", torch.nn.functional.normalize(features, dim=1), torch.nn.functional.normalize(prototypes, dim=1)
    )
    torch.testing.assert_close(logits, cosines * features.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-4)
    assert logits.abs().max() > 10.0
    torch.testing.assert_close(head(3.0 * features), 3.0 * logits, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        head.weight.mul_(5.0)  # weight norm: the length of v does not matter ...
        head.gain.copy_(torch.tensor([0.5, 2.0]))  # ... g does, per class
    torch.testing.assert_close(head(features), oracle(features).detach() * torch.tensor([0.5, 2.0]).view(1, 2, 1, 1),
                               rtol=1e-5, atol=1e-4)
    oracle_scaled = _torch_weight_norm_conv(5.0 * prototypes, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(head(features), oracle_scaled(features).detach(), rtol=1e-5, atol=1e-4)
    # Prototypes are the unit directions; the gain is not part of them.
    torch.testing.assert_close(head.prototypes(), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5**0.5, 0.5**0.5]]))
    with pytest.raises(ValueError, match="features must be"):
        head(torch.randn(2, 4, 3, 3))


def test_head_gradients_follow_weight_norm():
    """Weight norm: the gradient on v is orthogonal to v (only the direction learns there); g gets the rest."""
    generator = torch.Generator().manual_seed(1)
    head = PrototypeHead(torch.randn(4, 8, generator=generator))
    features = 30.0 * torch.randn(3, 8, 5, 5, generator=generator)
    labels = torch.randint(0, 4, (3, 5, 5), generator=generator)
    focal_class_weighted_ce(head(features), labels, gamma=2.0).backward()
    along_v = (head.weight.grad * head.weight.detach()).sum(dim=1)
    assert along_v.abs().max() < 1e-5 * head.weight.grad.norm()
    assert head.gain.grad is not None and head.gain.grad.abs().min() > 0
    oracle = _torch_weight_norm_conv(head.weight.detach(), torch.ones(4))
    focal_class_weighted_ce(oracle(features), labels, gamma=2.0).backward()
    torch.testing.assert_close(head.gain.grad, oracle.parametrizations.weight.original0.grad.flatten(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, oracle.parametrizations.weight.original1.grad[:, :, 0, 0],
                               rtol=1e-4, atol=1e-6)


def test_upsampled_logits_equal_logits_of_upsampled_features():
    """The head is linear in f, so upsampling logits (cheap, K channels) equals the reference's order."""
    head = PrototypeHead(torch.randn(3, 6, generator=torch.Generator().manual_seed(2)))
    features = 20.0 * torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(3))
    up = lambda t: torch.nn.functional.interpolate(t, size=(10, 14), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(up(head(features)), head(up(features)), rtol=1e-5, atol=1e-4)


def _peaked_batch(scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prototypes ``[3, 16]``, features ``[4, 16, 8, 8]`` of norm ``scale`` near their class's prototype,
    labels with class shares 3/4, 3/16, 1/16 (a frequent, a middle and a rare class)."""
    generator = torch.Generator().manual_seed(4)
    prototypes = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=1)
    shares = torch.tensor([48, 12, 4])
    ids = torch.repeat_interleave(torch.arange(3), shares)
    ids = ids[torch.randperm(64, generator=generator)].reshape(8, 8).repeat(4, 1, 1)  # [4, 8, 8]
    noisy = prototypes[ids] + 0.15 * torch.randn(4, 8, 8, 16, generator=generator)
    features = scale * torch.nn.functional.normalize(noisy, dim=-1).permute(0, 3, 1, 2).contiguous()
    return prototypes, features, ids


def test_focal_weights_vary_on_a_peaked_batch():
    prototypes, features, labels = _peaked_batch(scale=60.0)  # the demo backbone's feature norm is ~60
    head = PrototypeHead(prototypes)
    weights = focal_class_weights(head(features), gamma=2.0)
    # Near one-hot softmax: the mean probability of a class is its share of the pixels.
    shares = torch.tensor([48, 12, 4]) / 64
    torch.testing.assert_close(weights, (1 - shares) ** 2, rtol=0, atol=0.02)
    assert weights.max() - weights.min() > 0.7
    # Unit features (the former cosine head, |logit| <= 1): the softmax stays soft, the weights close.
    _, unit_features, _ = _peaked_batch(scale=1.0)
    flat = focal_class_weights(head(unit_features), gamma=2.0)
    assert flat.max() - flat.min() < 0.4 * (weights.max() - weights.min())


def test_engine_step_reports_focal_weight_spread_and_gains():
    prototypes, features, labels = _peaked_batch(scale=60.0)
    engine = make_engine(prototypes, utils.gradient_cfg("ddp"))
    assert engine.last_metrics == {}
    head_before = PrototypeHead(prototypes)  # same start; weights are computed on the pre-step head
    probs = head_before(features).softmax(dim=1).mean(dim=(0, 2, 3)).detach()
    expected = (1 - probs) ** 2
    loss, _ = engine.step(features, labels)
    metrics = engine.last_metrics
    assert set(metrics) == {"em/focal_weight_min", "em/focal_weight_max", "em/focal_weight_std",
                            "em/head_gain_min", "em/head_gain_max"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["em/focal_weight_min"] == pytest.approx(float(expected.min()), abs=1e-5)
    assert metrics["em/focal_weight_max"] == pytest.approx(float(expected.max()), abs=1e-5)
    mean = float(expected.mean())
    std = math.sqrt(sum((float(w) - mean) ** 2 for w in expected) / 3)
    assert metrics["em/focal_weight_std"] == pytest.approx(std, abs=1e-5)
    assert metrics["em/focal_weight_std"] > 0.25
    gains = engine.head.gain.detach()
    assert metrics["em/head_gain_min"] == pytest.approx(float(gains.min()))
    assert metrics["em/head_gain_max"] == pytest.approx(float(gains.max()))
    assert step_metrics(torch.tensor([0.5, 0.5]), torch.ones(2))["em/focal_weight_std"] == 0.0


def test_old_cosine_head_checkpoint_is_refused_in_one_line():
    engine = make_engine(torch.randn(utils.K, utils.C), utils.gradient_cfg("ddp"))
    state = engine.state_dict()
    old = {**state, "engine": {**state["engine"], "head": {"weight": state["engine"]["head"]["weight"]}}}
    with pytest.raises(UserError, match="no 'gain'") as err:
        engine.load_state_dict(old)
    assert "\n" not in str(err.value) and "checkpoint.resume=false" in str(err.value)


def draws_of(count: int, seed: int) -> torch.Tensor:
    """[8, count] uniforms for keys 0..count-1."""
    return photometric_draws(torch.arange(count), seed)


def test_photometric_view_is_seeded_batched_and_in_range():
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    first = photometric_view(images, draws_of(6, 1))
    again = photometric_view(images, draws_of(6, 1))
    other = photometric_view(images, draws_of(6, 2))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not torch.equal(first, images)
    with pytest.raises(ValueError, match="images must be"):
        photometric_view(torch.rand(2, 1, 8, 8), draws_of(2, 0))
    with pytest.raises(ValueError, match=r"draws must be \[8, B=2\]"):
        photometric_view(torch.rand(2, 3, 8, 8), draws_of(3, 0))
    with pytest.raises(ValueError, match="non-negative"):
        photometric_draws(torch.tensor([3, -1]), 0)


def test_photometric_draws_are_a_function_of_seed_and_key_only():
    keys = torch.tensor([0, 1, 7, 2**40 + 5, 123456789])
    draws = photometric_draws(keys, 3)
    assert draws.shape == (8, 5) and draws.dtype == torch.float64
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    for index, key in enumerate(keys.tolist()):  # alone, in another batch, in another order: the same column
        assert torch.equal(photometric_draws([key], 3)[:, 0], draws[:, index])
    assert torch.equal(photometric_draws(keys.flip(0), 3), draws.flip(1))
    assert torch.equal(photometric_draws(keys, 3 + 2**63), draws)  # the seed is taken modulo 2**63
    assert not torch.equal(photometric_draws(keys, 4), draws)
    columns = {tuple(column.tolist()) for column in photometric_draws(torch.arange(200), 3).T}
    assert len(columns) == 200  # different keys, different numbers
    many = photometric_draws(torch.arange(4000), 3)  # uniform: each row's mean ~0.5 (std of the mean 0.0046)
    assert (many.mean(dim=1) - 0.5).abs().max() < 0.025
    assert photometric_draws(torch.zeros(0, dtype=torch.int64), 3).shape == (8, 0)


def test_a_samples_view_does_not_depend_on_its_batch():
    """The view of a sample is decided by its key: the same key gives the same pixels in a batch of 5, a batch
    of 1 or another mix; another key (another sample, or the same image at a later visit) another view."""
    images = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(11))
    keys = torch.tensor([40, 41, 42, 43, 44])
    batch = photometric_view(images, photometric_draws(keys, 3))
    for index in range(5):
        alone = photometric_view(images[index:index + 1], photometric_draws(keys[index:index + 1], 3))
        torch.testing.assert_close(alone[0], batch[index], rtol=0, atol=1e-6)
    mixed = torch.tensor([4, 0, 2])  # another batch: other neighbours, other places
    other_batch = photometric_view(images[mixed], photometric_draws(keys[mixed], 3))
    torch.testing.assert_close(other_batch, batch[mixed], rtol=0, atol=1e-6)
    revisit = photometric_view(images, photometric_draws(keys + 8, 3))  # the same images, the next step's keys
    change = (revisit - batch).abs().amax(dim=(1, 2, 3))
    assert (change > 1e-2).all(), change


def test_photometric_branches():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    always_grey = PhotometricParams(jitter_branch_p=0.0, greyscale_p=1.0)
    grey = photometric_view(images, draws_of(4, 0), always_grey)
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(grey[:, 1], grey[:, 2], rtol=0, atol=0)
    nothing = PhotometricParams(blur_sigma=(1e-3, 1e-3), jitter_branch_p=1.0, jitter_p=0.0)
    torch.testing.assert_close(photometric_view(images, draws_of(4, 0), nothing), images)  # delta kernel
    jitter_only = PhotometricParams(blur_sigma=(1e-3, 1e-3), jitter_branch_p=1.0, jitter_p=1.0)
    jittered = photometric_view(images, draws_of(4, 5), jitter_only)
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
    assert torch.equal(restored.head.gain, engine.head.gain)
    assert (engine.head.gain - 1).abs().max() > 1e-2  # the gains are trained too
    assert torch.equal(restored.teacher_prototypes(), engine.teacher_prototypes())
    # Same optimizer state -> the next step is identical.
    engine.step(features, labels)
    restored.step(features, labels)
    assert torch.equal(restored.head.weight, engine.head.weight) and torch.equal(restored.head.gain, engine.head.gain)


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
