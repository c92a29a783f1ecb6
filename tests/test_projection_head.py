"""A trained projection head on top of the backbone (``backbone.head_weights``): file formats, the maths, errors,
and the README's commands end to end on the tiny demo set."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from primaps_dist.backbones import build_backbone
from primaps_dist.backbones.projection_head import ProjectionHead, load_projection_head
from primaps_dist.backbones.projection_head import main as head_main
from primaps_dist.config import BackboneConfig, load_config
from primaps_dist.errors import ConfigError, UserError, run_cli
from support.checkpoints import newest_payload
from support.demo import DEMO_CHANNELS, DEMO_CONFIG, NUM_CLASSES, tiny_train_args
from support.env import REPO, child_env
from support.run import assert_one_line_error, module_command, run_command


pytestmark = pytest.mark.usefixtures("two_threads")


def random_head_tensors(channels: int, out: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Head weights in this project's names, as a user's training script would save them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "linear.weight": torch.randn(out, channels, 1, 1, generator=generator) / channels**0.5,
        "linear.bias": torch.randn(out, generator=generator),
        "nonlinear.0.weight": torch.randn(hidden, channels, 1, 1, generator=generator) / channels**0.5,
        "nonlinear.0.bias": torch.randn(hidden, generator=generator),
        "nonlinear.2.weight": torch.randn(out, hidden, 1, 1, generator=generator) / hidden**0.5,
        "nonlinear.2.bias": torch.randn(out, generator=generator),
    }


def expected_code(tensors: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """linear(x) + W2 relu(W1 x + b1) + b2, written with einsum on [B, C, h, w]."""
    def conv(name: str, x: torch.Tensor) -> torch.Tensor:
        weight = tensors[f"{name}.weight"].reshape(tensors[f"{name}.weight"].shape[0], -1)
        bias = tensors.get(f"{name}.bias", torch.zeros(weight.shape[0]))
        return torch.einsum("oc,bchw->bohw", weight, x) + bias[None, :, None, None]

    hidden = torch.relu(conv("nonlinear.0", features))
    return conv("linear", features) + conv("nonlinear.2", hidden)


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(tensors, path)
    return path


def test_head_applies_linear_plus_nonlinear_branch(tmp_path):
    tensors = random_head_tensors(24, 10, 16)
    head = load_projection_head(save(tensors, tmp_path / "head.pt"), in_channels=24)
    features = torch.randn(2, 24, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        code = head(features)
    assert (head.in_channels, head.out_channels, head.hidden_channels) == (24, 10, 16)
    assert code.shape == (2, 10, 5, 7)
    assert torch.allclose(code, expected_code(tensors, features), atol=1e-5)


def test_stego_names_prefix_flat_weights_and_extra_keys(tmp_path):
    tensors = random_head_tensors(24, 10, 16, seed=3)
    renamed = {"linear": "cluster1.0", "nonlinear.0": "cluster2.0", "nonlinear.2": "cluster2.2"}
    stego = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        stego[f"net.{renamed[module]}.{leaf}"] = value.flatten(1) if value.dim() == 4 else value  # [D, C] form
    stego["net.model.blocks.0.attn.qkv.weight"] = torch.randn(72, 24)  # the ViT in a full checkpoint: ignored
    stego["linear_probe.weight"] = torch.randn(27, 10)  # STEGO's probes: not part of the head
    stego["cluster_probe.clusters"] = torch.randn(27, 10)
    head = load_projection_head(save({"state_dict": stego}, tmp_path / "stego.pt"))
    features = torch.randn(1, 24, 3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(head(features), expected_code(tensors, features), atol=1e-5)

    linear_only = {"linear.weight": tensors["linear.weight"]}
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(linear_only, str(tmp_path / "linear.safetensors"))
    head = load_projection_head(tmp_path / "linear.safetensors")
    assert head.hidden_channels == 0
    with torch.no_grad():
        expected = torch.einsum("oc,bchw->bohw", tensors["linear.weight"].flatten(1), features)
        assert torch.allclose(head(features), expected, atol=1e-5)


def test_backbone_with_head_gives_head_channels(tmp_path):
    """The demo backbone (EfficientNet-Lite0 stages [2, 3], 152 channels) followed by a random 32-channel head."""
    tensors = random_head_tensors(DEMO_CHANNELS, 32, 48, seed=5)
    path = save(tensors, tmp_path / "head.pt")
    plain = build_backbone(BackboneConfig(name="efficientnet_lite0", layers=[2, 3]))
    headed = build_backbone(BackboneConfig(name="efficientnet_lite0", layers=[2, 3], head_weights=str(path)))
    assert (headed.stride, headed.out_channels) == (plain.stride, 32)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = headed(images)
    assert features.shape == (2, 32, 8, 8) and features.dtype == torch.float32
    assert torch.allclose(features, expected_code(tensors, plain(images)), atol=1e-4)
    assert not any(p.requires_grad for p in headed.parameters()) and not headed.training


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"model.weight": torch.zeros(3, 3)}, "holds no projection head"),
        ({"linear.weight": torch.zeros(8, 24, 3, 3)}, "'linear.weight' has shape [8, 24, 3, 3]"),
        ({"linear.weight": torch.zeros(8, 24), "linear.bias": torch.zeros(7)}, "'linear.bias' has shape [7]"),
        ({"linear.weight": torch.zeros(8, 24), "nonlinear.0.weight": torch.zeros(24, 24)},
         "'nonlinear.2.weight' is missing"),
        ({"linear.weight": torch.zeros(8, 24), "nonlinear.0.weight": torch.zeros(16, 24),
          "nonlinear.2.weight": torch.zeros(8, 12)}, "expected [8, 16, 1, 1]"),
        ({"a.linear.weight": torch.zeros(8, 24), "b.cluster1.0.weight": torch.zeros(8, 24)},
         "several projection heads"),
    ],
    ids=["no-head", "3x3-kernel", "bias-shape", "half-branch", "branch-shape", "two-heads"],
)
def test_malformed_head_files(tmp_path, tensors, message):
    path = save(tensors, tmp_path / "head.pt")
    with pytest.raises(ConfigError) as caught:
        load_projection_head(path)
    text = str(caught.value)
    assert message in text and "backbone.head_weights" in text and str(path) in text and "\n" not in text


def test_config_validation_missing_file_and_channel_mismatch(tmp_path):
    with pytest.raises(ConfigError, match=r"backbone.head_weights.*file not found: .*nothere.pt"):
        load_config(None, [f"backbone.head_weights={tmp_path / 'nothere.pt'}"])
    path = save(random_head_tensors(100, 8, 4), tmp_path / "head100.pt")
    # A preset whose channels the config tells (ViT-S/8: 384): refused at config time, before any model exists.
    with pytest.raises(ConfigError, match=r"backbone.head_weights.*head100.pt is a head for 100-channel features, "
                                          r"but backbone dino_vits8 gives 384 channels"):
        load_config(None, ["backbone.name=dino_vits8", f"backbone.head_weights={path}"])
    # Only the built model tells the channels (Lite0 stages [2, 3]): refused by the builder.
    cfg = load_config(None, ["backbone.layers=[2,3]", f"backbone.head_weights={path}"])
    with pytest.raises(UserError, match=rf"head100.pt is a head for 100-channel features, but backbone "
                                        rf"efficientnet_lite0 gives {DEMO_CHANNELS} channels"):
        build_backbone(cfg.backbone)
    not_a_checkpoint = tmp_path / "text.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(UserError, match=r"backbone.head_weights: .*text.pt is not a PyTorch checkpoint"):
        load_config(None, [f"backbone.head_weights={not_a_checkpoint}"])


def test_head_module_state_dict_round_trip(tmp_path):
    head = ProjectionHead(12, 5, 7)
    torch.save(head.state_dict(), tmp_path / "own.pt")
    loaded = load_projection_head(tmp_path / "own.pt", in_channels=12)
    features = torch.randn(1, 12, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(features), head(features))


def test_head_command_line_random_and_check(tmp_path, capsys):
    path = tmp_path / "random.pt"
    assert run_cli(head_main, ["random", str(path), "--in-channels", str(DEMO_CHANNELS), "--out-channels", "16",
                               "--hidden", "0"]) == 0
    head = load_projection_head(path, in_channels=DEMO_CHANNELS)
    assert (head.out_channels, head.hidden_channels) == (16, 0)
    assert run_cli(head_main, ["check", str(path), "--config", str(DEMO_CONFIG), "--set", "data.crop_size=64"]) == 0
    assert f"{DEMO_CHANNELS} -> 16 channels" in capsys.readouterr().out
    # The paper's backbone gives 384 channels: one line, exit 2, before any ViT is built.
    assert run_cli(head_main, ["check", str(path), "--config", str(REPO / "configs/cityscapes_dino_vits8.yaml")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: config key 'backbone.head_weights'") and "gives 384 channels" in line
    assert "\n" not in line


@pytest.mark.slow
def test_train_cli_refuses_a_head_that_does_not_fit(tmp_path, demo_data):
    path = save(random_head_tensors(100, 8, 4), tmp_path / "head100.pt")
    args = tiny_train_args(demo_data.train_shards, tmp_path / "run", f"backbone.head_weights={path}", em=1)
    result = run_command(module_command("primaps_dist.train", *args), env=child_env(tmp_path), timeout=240,
                         cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "backbone.head_weights", "head100.pt", f"gives {DEMO_CHANNELS} channels")
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training step


def _readme_demo_commands() -> list[str]:
    """The ``python -m primaps_dist...`` lines of the README section's demo block (the one with make demo-data)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## PriMaPs-EM on top of STEGO/HP heads", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (demo_block,) = [block for block in blocks if "make demo-data" in block]
    return [line for line in demo_block.splitlines() if line.startswith("python -m primaps_dist")]


@pytest.mark.slow
def test_readme_commands_run_end_to_end_on_tiny_data(tmp_path, demo_data):
    """The README's demo commands (random head, then training with it), on the tiny demo shards with tiny
    settings appended; the run evaluates too, so the head is applied there as well."""
    commands = _readme_demo_commands()
    assert [shlex.split(c)[2] for c in commands] == ["primaps_dist.backbones.projection_head", "primaps_dist.train"]
    tiny = tiny_train_args(demo_data.train_shards, tmp_path / "demo_out" / "run_head", val_shards=demo_data.val_shards,
                           pca=1, kmeans=1, em=2)
    assert tiny[:2] == ["--config", str(DEMO_CONFIG)]
    env = child_env(tmp_path)
    for command in commands:
        words = [str(REPO / w) if w.startswith("configs/") else w for w in shlex.split(command)]
        words = [w.replace("demo_out/", f"{tmp_path / 'demo_out'}/") for w in words]
        if words[2] == "primaps_dist.train":
            words += tiny[2:]  # the README's own keys come first; the tiny settings override the rest
        result = run_command(module_command(*words[2:]), env=env, timeout=400, cwd=tmp_path)
        assert result.returncode == 0, result.describe()
    payload = newest_payload(tmp_path / "demo_out" / "run_head")
    assert payload["prototypes"].shape == (NUM_CLASSES, 64)  # the README's --out-channels
    assert payload["backbone"]["channels"] == 64
    assert payload["config"]["backbone"]["head_weights"].endswith("random_head.pt")
    assert (tmp_path / "demo_out" / "run_head" / "eval" / "metrics.json").is_file()
