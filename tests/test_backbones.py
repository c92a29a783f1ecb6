"""Frozen feature extractors: presets, timm models by name, plug-ins, weight files, offline weights.

Nothing here downloads (HF_HUB_OFFLINE=1 from conftest); ViT presets use random weights.
"""

from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

timm = pytest.importorskip("timm")

from primaps_dist.backbones import (  # noqa: E402
    PRESETS,
    FeatureExtractor,
    autocast_dtype,
    build_backbone,
    check_input_size,
    load_weights_file,
)
from primaps_dist.backbones import offline, weights  # noqa: E402
from primaps_dist.config import BackboneConfig, Config  # noqa: E402
from primaps_dist.errors import ConfigError, UserError  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("two_threads")


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return build_backbone(BackboneConfig(name="efficientnet_lite0", weights="pretrained"))


def chelsea(size: int) -> torch.Tensor:
    import skimage.data

    array = np.ascontiguousarray(skimage.data.chelsea())
    image = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    ("name", "crop", "batch"),
    [
        ("dino_vits8", 320, 1),  # the paper setting at full size
        ("dino_vitb8", 64, 1),  # full size is slow on a CPU; see the slow test
        ("dinov2_vits14", 322, 1),
        ("dinov2_vitb14", 126, 1),
        ("efficientnet_lite0", 320, 2),
    ],
)
def test_preset_output_shape(name, crop, batch):
    preset = PRESETS[name]
    extractor = build_backbone(BackboneConfig(name=name, weights="random"))
    features = extractor(images(batch, crop))
    assert (extractor.stride, extractor.out_channels) == (preset.stride, preset.channels)
    assert features.shape == (batch, preset.channels, crop // preset.stride, crop // preset.stride)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert features.std() > 0  # not a constant map


@pytest.mark.slow
@pytest.mark.parametrize(("name", "crop"), [("dino_vitb8", 320), ("dinov2_vitb14", 322)])
def test_large_preset_at_paper_crop(name, crop):
    preset = PRESETS[name]
    extractor = build_backbone(BackboneConfig(name=name, weights="random"))
    assert extractor(images(1, crop)).shape == (1, preset.channels, crop // preset.stride, crop // preset.stride)


def test_vit_layer_selection_errors():
    with pytest.raises(ConfigError, match="backbone.layers"):
        build_backbone(BackboneConfig(name="timm:vit_tiny_patch16_224", weights="random", layers=[12]))
    with pytest.raises(ConfigError, match="backbone.layers"):
        build_backbone(BackboneConfig(name="timm:vit_tiny_patch16_224", weights="random", layers=[1, 2]))


def test_offline_preset_stage_selection_matches_config_stride():
    cfg = BackboneConfig(name="efficientnet_lite0", weights="random", layers=[2, 3])
    extractor = build_backbone(cfg)
    assert (extractor.stride, extractor.out_channels) == (8, 40 + 112)
    assert cfg.preset_stride() == extractor.stride
    assert extractor(images(1, 192)).shape == (1, 152, 24, 24)


# ------------------------------------------------------------------------------------------------ timm by name


def _stage_outputs(model, module_names, x):
    captured = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in module_names
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return [captured[name] for name in module_names]


def test_timm_cnn_concatenates_upsampled_stages():
    torch.manual_seed(7)
    extractor = build_backbone(BackboneConfig(name="timm:resnet18", weights="random", layers=[1, 2, 3]))
    assert (extractor.stride, extractor.out_channels, extractor.name) == (4, 64 + 128 + 256, "timm:resnet18")
    torch.manual_seed(7)
    reference = timm.create_model("resnet18").eval()  # same random init as the extractor's full model
    x = images(2, 64)
    normalised = (x - IMAGENET_MEAN) / IMAGENET_STD
    layer1, layer2, layer3 = _stage_outputs(reference, ["layer1", "layer2", "layer3"], normalised)
    size = layer1.shape[-2:]
    expected = torch.cat(
        [layer1] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in (layer2, layer3)], 1
    )
    features = extractor(x)
    assert features.shape == (2, 448, 16, 16)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_timm_cnn_default_stage_and_flattened_names():
    # convnext's features_only twin renames stem.0 -> stem_0; weights must still be copied over.
    torch.manual_seed(1)
    extractor = build_backbone(BackboneConfig(name="timm:convnext_atto", weights="random"))
    assert (extractor.stride, extractor.out_channels) == (16, 160)  # default: deepest stage with stride <= 16
    torch.manual_seed(1)
    reference = timm.create_model("convnext_atto").eval()
    torch.testing.assert_close(extractor.body.features.stem_0.weight, reference.stem[0].weight)


def test_timm_vit_by_name_with_block_index():
    torch.manual_seed(2)
    extractor = build_backbone(BackboneConfig(name="timm:vit_tiny_patch16_224", weights="random", layers=[4]))
    torch.manual_seed(2)
    reference = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    x = images(1, 96)
    with torch.no_grad():
        (expected,) = reference.forward_intermediates(
            (x - 0.5) / 0.5, indices=[4], norm=True, output_fmt="NCHW", intermediates_only=True
        )  # this model's pretrained_cfg normalises with mean = std = 0.5
    assert (extractor.stride, extractor.out_channels) == (16, 192)
    assert len(extractor.body.model.blocks) == 5  # blocks after the selected one are pruned
    features = extractor(x)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        last = reference.forward_features((x - 0.5) / 0.5)[:, 1:]  # another block: different features
    assert not torch.allclose(features.flatten(2).transpose(1, 2), last, atol=1e-2)


def test_timm_errors():
    with pytest.raises(UserError, match="backbone.name"):
        build_backbone(BackboneConfig(name="timm:no_such_model_xyz", weights="random"))
    with pytest.raises(ConfigError, match="backbone.layers"):
        build_backbone(BackboneConfig(name="timm:resnet18", weights="random", layers=[7]))
    with pytest.raises(ConfigError, match="backbone.stride"):
        build_backbone(BackboneConfig(name="timm:resnet18", weights="random", layers=[2], stride=16))


# ------------------------------------------------------------------------------------------------ plug-ins

PLUGIN_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Pool(nn.Module):
        def __init__(self, stride, announce):
            super().__init__()
            self.proj = nn.Conv2d(3, 5, 1)
            if announce:
                self.stride = stride
            self.pool = nn.AvgPool2d(stride)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0, "plug-ins get raw 0..1 images"
            return self.drop(self.proj(self.pool(x)))

    def make(cfg):
        return Pool(4, announce=True)

    def make_silent(cfg):
        return Pool(cfg.stride or 4, announce=False)

    def not_a_module(cfg):
        return 42
    """
)


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_backbone_plugin.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "tiny_backbone_plugin.py"


def test_plugin_by_module_name(plugin_module):
    extractor = build_backbone(BackboneConfig(name="tiny_backbone_plugin:make", weights="random"))
    assert (extractor.stride, extractor.out_channels) == (4, 5)
    extractor.train()  # must stay in eval mode: dropout off, so the output is deterministic
    x = images(2, 32)
    first, second = extractor(x), extractor(x)
    assert first.shape == (2, 5, 8, 8)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_plugin_by_file_path_with_configured_stride(plugin_module):
    extractor = build_backbone(BackboneConfig(name=f"{plugin_module}:make_silent", weights="random", stride=8))
    assert (extractor.stride, extractor.out_channels) == (8, 5)
    assert extractor(images(1, 32)).shape == (1, 5, 4, 4)


def test_plugin_errors(plugin_module):
    with pytest.raises(UserError, match="backbone.name.*no_such_module_xyz"):
        build_backbone(BackboneConfig(name="no_such_module_xyz:make"))
    with pytest.raises(UserError, match="backbone.name.*missing_function"):
        build_backbone(BackboneConfig(name="tiny_backbone_plugin:missing_function"))
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_backbone(BackboneConfig(name="tiny_backbone_plugin:not_a_module"))
    with pytest.raises(ConfigError, match="backbone.stride"):
        build_backbone(BackboneConfig(name="tiny_backbone_plugin:make_silent"))  # no stride anywhere
    with pytest.raises(ConfigError, match="backbone.stride"):
        build_backbone(BackboneConfig(name="tiny_backbone_plugin:make", stride=8))  # disagrees with the module


# ------------------------------------------------------------------------------------------------ weight files


@pytest.fixture(scope="module")
def saved_vits8(tmp_path_factory):
    """A randomly initialised DINO ViT-S/8 saved as .pth, as a DINO-style wrapped .pth and as .safetensors."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(11)
    model = timm.create_model("vit_small_patch8_224.dino", dynamic_img_size=True).eval()
    state = model.state_dict()
    paths = {
        "pth": directory / "vits8.pth",
        "wrapped": directory / "teacher.pth",
        "safetensors": directory / "vits8.safetensors",
    }
    torch.save(state, paths["pth"])
    wrapped = {f"backbone.{k}": v for k, v in state.items()} | {"head.last_layer.weight": torch.zeros(4, 4)}
    torch.save({"teacher": wrapped, "epoch": 100}, paths["wrapped"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    return model, paths


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_local_weights_reproduce_saved_model(saved_vits8, kind):
    model, paths = saved_vits8
    extractor = build_backbone(BackboneConfig(name="dino_vits8", weights=str(paths[kind])))
    x = images(2, 48, seed=5)
    with torch.no_grad():
        tokens = model.forward_features((x - IMAGENET_MEAN) / IMAGENET_STD)  # [B, 1 + 36, C] after the final norm
    expected = tokens[:, 1:].reshape(2, 6, 6, 384).permute(0, 3, 1, 2)  # CLS token dropped
    torch.testing.assert_close(extractor(x), expected, rtol=1e-4, atol=1e-4)


def test_wrapped_checkpoint_is_unwrapped(saved_vits8):
    model, paths = saved_vits8
    state = load_weights_file(paths["wrapped"])  # {"teacher": {"backbone.*": ..., "head.*": ...}, "epoch": ...}
    expected = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_weights_that_do_not_fit_name_file_and_key(saved_vits8, tmp_path):
    _, paths = saved_vits8
    state = torch.load(paths["pth"], weights_only=True)
    state["blocks.3.attn.qkv.weight"] = torch.zeros(5, 5)
    bad = tmp_path / "bad_shape.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"backbone.weights: .*bad_shape.pth.*'blocks.3.attn.qkv.weight'"):
        build_backbone(BackboneConfig(name="dino_vits8", weights=str(bad)))
    foreign = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), foreign)
    with pytest.raises(UserError, match=r"resnet.pth does not fit .*'cls_token' is missing"):
        build_backbone(BackboneConfig(name="dino_vits8", weights=str(foreign)))


class _CustomObject:
    pass


def test_unsafe_or_foreign_files_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(UserError, match=r"backbone.weights: .*notes.pth is not a PyTorch checkpoint"):
        load_weights_file(text)
    whole_model = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), whole_model)  # pickles the class: needs code to load
    with pytest.raises(UserError, match=r"whole_model.pth holds Python objects .*refusing to unpickle"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", weights=str(whole_model)))
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"w": _CustomObject()}))
    with pytest.raises(UserError, match=r"raw.pkl .*refusing to unpickle"):
        load_weights_file(raw_pickle)
    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    with pytest.raises(UserError, match="no state dict of tensors"):
        load_weights_file(no_tensors)
    bad_safetensors = tmp_path / "broken.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="broken.safetensors is not a readable safetensors file"):
        load_weights_file(bad_safetensors)


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match=r"backbone.weights: file not found: .*absent.pth"):
        build_backbone(BackboneConfig(name="dino_vits8", weights=str(tmp_path / "absent.pth")))


# ------------------------------------------------------------------------------------------------ the hub


def test_hub_only_preset_offline_fails_fast_with_advice():
    with pytest.raises(UserError, match=r"backbone.weights: .*vit_small_patch8_224.dino.*backbone.weights=PATH"):
        build_backbone(BackboneConfig(name="dino_vits8", weights="pretrained"))


def test_unreachable_hub_switches_to_offline_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not weights._hub_endpoint_reachable(timeout_s=1.0)
    with pytest.raises(UserError, match="backbone.weights=PATH"):
        build_backbone(BackboneConfig(name="dinov2_vits14", weights="pretrained"))
    assert constants.HF_HUB_OFFLINE is False  # restored after the attempt


# ------------------------------------------------------------------------------------------------ offline preset


def test_offline_weights_label_chelsea_egyptian_cat():
    logits = offline.classify(chelsea(224))
    assert logits.shape == (1, 1000) and logits.dtype == torch.float32
    assert int(logits.argmax()) == 285  # ImageNet "Egyptian cat"
    assert float(logits.softmax(-1)[0, 285]) > 0.5


def test_offline_extractor_uses_packaged_weights(lite0):
    # Stage 3 of the extractor must equal blocks.4 of the classifier that labels chelsea correctly.
    x = chelsea(192)
    (expected,) = _stage_outputs(offline._pretrained_classifier(), ["blocks.4"], (x - 127 / 255) / (128 / 255))
    features = lite0(x)
    assert features.shape == (1, 112, 12, 12)
    assert len(lite0.body.features.blocks) == 5  # blocks 5 and 6 (stride 32) are never run
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_offline_preset_weight_files(tmp_path):
    state = load_weights_file(offline.packaged_weights_path())
    assert len(state) == offline.NUM_TENSORS
    torch.manual_seed(4)
    timm_named = timm.create_model("tf_efficientnet_lite0").eval()  # a file in timm's naming loads by name
    torch.save(timm_named.state_dict(), tmp_path / "timm_named.pth")
    extractor = build_backbone(BackboneConfig(name="efficientnet_lite0", weights=str(tmp_path / "timm_named.pth")))
    x = images(1, 64)
    (expected,) = _stage_outputs(timm_named, ["blocks.4"], (x - 127 / 255) / (128 / 255))
    torch.testing.assert_close(extractor(x), expected, rtol=1e-4, atol=1e-4)
    truncated = dict(list(state.items())[:-2])
    path = tmp_path / "lite0_truncated.pth"
    torch.save(truncated, path)
    with pytest.raises(UserError, match=r"lite0_truncated.pth has 294 tensors, tf_efficientnet_lite0 needs 296"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", weights=str(path)))


# ------------------------------------------------------------------------------------------------ the contract


def test_frozen_eval_float32_no_grad_deterministic(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    x = images(2, 64).double().requires_grad_(True)
    first, second = lite0(x), lite0(x)
    assert first.dtype == torch.float32 and not first.requires_grad and first.grad_fn is None
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    batch_of_one = lite0(x[:1])
    torch.testing.assert_close(batch_of_one, first[:1], rtol=1e-4, atol=1e-4)


def test_input_checks(lite0):
    check_input_size(lite0, 320)
    with pytest.raises(ConfigError, match=r"data.crop_size.*330.*stride 16"):
        check_input_size(lite0, 330)
    with pytest.raises(ValueError, match="not a multiple of the stride 16"):
        lite0(images(1, 40))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        lite0(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_validation_agrees_with_built_strides(name):
    """Validation knows a preset's stride before any model exists; the model built from it (random weights,
    offline) has that stride, and the crops validation accepts or rejects the built model accepts or rejects."""
    preset = PRESETS[name]
    cfg = Config()
    cfg.backbone.name = name
    cfg.backbone.weights = "random"
    extractor = build_backbone(cfg.backbone, "cpu")
    assert extractor.stride == preset.stride
    assert cfg.backbone.preset_stride() == extractor.stride

    training_crop = 322 if preset.stride == 14 else 320
    for crop, valid in ((training_crop, True), (training_crop + 2, False), (4 * preset.stride, True)):
        cfg.data.crop_size = crop
        if valid:
            cfg.validate()
            check_input_size(extractor, crop)
        else:
            with pytest.raises(ConfigError, match="data.crop_size"):
                cfg.validate()
            with pytest.raises(ConfigError, match="data.crop_size"):
                check_input_size(extractor, crop)

    # One forward pass on a small crop (4 x stride: fast for the ViT-B presets on CPU), not square so that
    # swapped axes show: a [crop, crop + stride] image gives [crop / stride, crop / stride + 1] features.
    crop = 4 * preset.stride
    with torch.no_grad():
        features = extractor(torch.rand(1, 3, crop, crop + preset.stride))
    assert features.shape == (1, preset.channels, crop // preset.stride, crop // preset.stride + 1)


def test_autocast_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("bf16", cuda) is torch.bfloat16
    assert autocast_dtype("fp16", cuda) is torch.float16
    with pytest.raises(ValueError):
        autocast_dtype("int8", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_cuda_autocast_output_float32(precision):
    cfg = BackboneConfig(name="efficientnet_lite0", weights="pretrained", precision=precision)
    extractor = build_backbone(cfg, "cuda")
    reference = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="pretrained"), "cpu")
    x = chelsea(192)
    features = extractor(x.cuda())
    assert features.dtype == torch.float32 and features.device.type == "cuda"
    cosine = F.cosine_similarity(features.cpu(), reference(x), dim=1)
    assert float(cosine.min()) > 0.98


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 5), width=st.integers(1, 5), batch=st.integers(1, 2))
def test_output_size_property(lite0, height, width, batch):
    x = torch.rand(batch, 3, 16 * height, 16 * width)
    assert lite0(x).shape == (batch, 112, height, width)
