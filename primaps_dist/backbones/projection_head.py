"""A trained projection head on top of the backbone: PriMaPs-EM in a STEGO / HP feature space.

``backbone.head_weights=PATH`` applies a user's trained segmentation head to the backbone's features, frozen
like the backbone; PCA, K-means, proposals and the EM then all work on the head's output.

The head is STEGO's: ``code = linear(x) + nonlinear(x)``, with ``linear`` a 1x1 convolution C -> D and the
optional ``nonlinear`` branch 1x1 conv C -> H, ReLU, 1x1 conv H -> D (dropout, used in training, is the
identity here). The file is a state dict (torch ``.pt``/``.pth`` read without unpickling code, or
``.safetensors``) holding, under any common prefix (such as STEGO's ``net.``):

=======================================  ==================================  =========================
this project's names                     STEGO's names                       shape
=======================================  ==================================  =========================
``linear.weight`` / ``linear.bias``      ``cluster1.0.weight`` / ``.bias``   [D, C, 1, 1] or [D, C] / [D]
``nonlinear.0.weight`` / ``.bias``       ``cluster2.0.weight`` / ``.bias``   [H, C, 1, 1] or [H, C] / [H]
``nonlinear.2.weight`` / ``.bias``       ``cluster2.2.weight`` / ``.bias``   [D, H, 1, 1] or [D, H] / [D]
=======================================  ==================================  =========================

Biases are optional; other keys (e.g. the ViT's own weights in a full checkpoint) are ignored. The head must
have been trained on the features this backbone gives (same model, layer and input size).

Command line::

    python -m primaps_dist.backbones.projection_head check HEAD [--config CONFIG] [--set key=value ...]
    python -m primaps_dist.backbones.projection_head random OUT --in-channels C --out-channels D
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.backbones.weights import load_weights_file
from primaps_dist.errors import ConfigError, UserError, run_cli

HEAD_KEY = "backbone.head_weights"

# Leaf names this project writes, and STEGO's names for the same tensors.
_LEAVES = ("linear.weight", "linear.bias", "nonlinear.0.weight", "nonlinear.0.bias",
           "nonlinear.2.weight", "nonlinear.2.bias")
_ALIASES = {
    "cluster1.0.weight": "linear.weight", "cluster1.0.bias": "linear.bias",
    "cluster2.0.weight": "nonlinear.0.weight", "cluster2.0.bias": "nonlinear.0.bias",
    "cluster2.2.weight": "nonlinear.2.weight", "cluster2.2.bias": "nonlinear.2.bias",
}


class ProjectionHead(nn.Module):
    """``[B, C, h, w] -> [B, D, h, w]``: ``linear(x) + nonlinear(x)`` (1x1 convolutions; no branch if hidden=0)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 0, bias: bool = True):
        super().__init__()
        if min(in_channels, out_channels) < 1 or hidden_channels < 0:
            raise ValueError(f"bad head sizes: in {in_channels}, out {out_channels}, hidden {hidden_channels}")
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.linear = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.nonlinear: nn.Module | None = None
        if hidden_channels:
            self.nonlinear = nn.Sequential(
                nn.Conv2d(in_channels, hidden_channels, 1, bias=bias),
                nn.ReLU(),
                nn.Conv2d(hidden_channels, out_channels, 1, bias=bias),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        code = self.linear(features)
        return code if self.nonlinear is None else code + self.nonlinear(features)

    def describe(self) -> str:
        branch = f" + conv-ReLU-conv branch (hidden {self.hidden_channels})" if self.hidden_channels else ""
        return f"projection head {self.in_channels} -> {self.out_channels} channels (linear 1x1{branch})"


def _head_tensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors under this project's leaf names (one common prefix, STEGO names translated)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for leaf in (*_LEAVES, *_ALIASES):
            if key == leaf or key.endswith("." + leaf):
                prefix = key[: len(key) - len(leaf)]
                found.setdefault(prefix, {})[_ALIASES.get(leaf, leaf)] = value
                break
    heads = {prefix: tensors for prefix, tensors in found.items() if "linear.weight" in tensors}
    if not heads:
        raise ConfigError(HEAD_KEY, f"{path} holds no projection head: expected 'linear.weight' (this project) "
                                    f"or 'cluster1.0.weight' (STEGO), under any prefix")
    if len(heads) > 1:
        names = ", ".join(repr(prefix or "(none)") for prefix in sorted(heads))
        raise ConfigError(HEAD_KEY, f"{path} holds several projection heads (prefixes {names}); save only one")
    return next(iter(heads.values()))


def _as_1x1(tensors: dict[str, torch.Tensor], name: str, rows: int | None, cols: int | None,
            path: Path) -> torch.Tensor:
    """``tensors[name]`` as a [rows, cols, 1, 1] float32 kernel (None = any size), or a one-line error."""
    weight = tensors[name]
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    want = f"[{rows if rows else 'out'}, {cols if cols else 'in'}, 1, 1]"
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or (rows and weight.shape[0] != rows) or (
        cols and weight.shape[1] != cols
    ):
        raise ConfigError(HEAD_KEY, f"{path}: '{name}' has shape {list(tensors[name].shape)}, expected {want} "
                                    "(1x1 convolutions only)")
    return weight.to(torch.float32)


def _bias(tensors: dict[str, torch.Tensor], name: str, size: int, path: Path) -> torch.Tensor | None:
    bias = tensors.get(name)
    if bias is not None and tuple(bias.shape) != (size,):
        raise ConfigError(HEAD_KEY, f"{path}: '{name}' has shape {list(bias.shape)}, expected [{size}]")
    return None if bias is None else bias.to(torch.float32)


def load_projection_head(path: str | Path, in_channels: int | None = None, backbone: str = "") -> ProjectionHead:
    """Read the head in ``path`` (format in the module docstring) into a :class:`ProjectionHead` in eval mode.

    Raises a one-line UserError naming ``backbone.head_weights`` and the file: missing or unreadable file, no
    head inside, a malformed tensor, or (when ``in_channels`` is given) a head made for a different channel count.
    """
    path = Path(path)
    tensors = _head_tensors(load_weights_file(path, key=HEAD_KEY), path)
    linear = _as_1x1(tensors, "linear.weight", None, None, path)
    out_channels, channels = int(linear.shape[0]), int(linear.shape[1])
    if in_channels is not None and channels != in_channels:
        raise ConfigError(HEAD_KEY, f"{path} is a head for {channels}-channel features, but backbone "
                                    f"{backbone or '(configured)'} gives {in_channels} channels")
    parts = {"linear.weight": linear, "linear.bias": _bias(tensors, "linear.bias", out_channels, path)}
    hidden = 0
    if "nonlinear.0.weight" in tensors or "nonlinear.2.weight" in tensors:
        for name in ("nonlinear.0.weight", "nonlinear.2.weight"):
            if name not in tensors:
                raise ConfigError(HEAD_KEY, f"{path}: the nonlinear branch needs both 'nonlinear.0.weight' "
                                            "and 'nonlinear.2.weight' (STEGO: cluster2.0 / cluster2.2); "
                                            f"'{name}' is missing")
        first = _as_1x1(tensors, "nonlinear.0.weight", None, channels, path)
        hidden = int(first.shape[0])
        parts.update({
            "nonlinear.0.weight": first,
            "nonlinear.0.bias": _bias(tensors, "nonlinear.0.bias", hidden, path),
            "nonlinear.2.weight": _as_1x1(tensors, "nonlinear.2.weight", out_channels, hidden, path),
            "nonlinear.2.bias": _bias(tensors, "nonlinear.2.bias", out_channels, path),
        })
    head = ProjectionHead(channels, out_channels, hidden, bias=True)
    state = head.state_dict()
    for name, value in parts.items():
        state[name] = value if value is not None else torch.zeros_like(state[name])
    head.load_state_dict(state)
    return head.eval()


def with_projection_head(extractor: FeatureExtractor, path: str | Path) -> FeatureExtractor:
    """``extractor`` followed by the head in ``path``: a frozen :class:`FeatureExtractor` with the head's channels
    (same stride, input normalisation and precision)."""
    head = load_projection_head(path, extractor.out_channels, extractor.name)
    mean = std = None
    if extractor.normalises_input:
        mean, std = extractor.mean.flatten().tolist(), extractor.std.flatten().tolist()
    return FeatureExtractor(
        nn.Sequential(extractor.body, head),
        name=f"{extractor.name} + head {Path(path).name}",
        stride=extractor.stride,
        out_channels=head.out_channels,
        mean=mean,
        std=std,
        precision=extractor.precision,
    )


# ------------------------------------------------------------------------------------------- command line


def _check(args: argparse.Namespace) -> int:
    if args.config is None:
        print(f"{args.head}: {load_projection_head(args.head).describe()}")
        return 0
    from primaps_dist.backbones.build import build_backbone
    from primaps_dist.config import load_config

    cfg = load_config(args.config, [*args.set, f"{HEAD_KEY}={args.head}"])
    extractor = build_backbone(cfg.backbone)
    head = load_projection_head(args.head)
    print(f"{args.head}: {head.describe()}; fits backbone {cfg.backbone.name} "
          f"(stride {extractor.stride}, {head.in_channels} channels)")
    return 0


def _random(args: argparse.Namespace) -> int:
    if min(args.in_channels, args.out_channels) < 1 or (args.hidden is not None and args.hidden < 0):
        raise UserError("--in-channels and --out-channels must be >= 1, --hidden >= 0")
    torch.manual_seed(args.seed)
    hidden = args.in_channels if args.hidden is None else args.hidden
    head = ProjectionHead(args.in_channels, args.out_channels, hidden)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), out)
    print(f"wrote a random {head.describe()} to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m primaps_dist.backbones.projection_head",
                                     description="Inspect or create projection-head files for backbone.head_weights.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read a head file; with --config, check it fits that backbone")
    check.add_argument("head")
    check.add_argument("--config", help="YAML config whose backbone the head must fit")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="section.key=value override of the config (repeatable)")
    check.set_defaults(run=_check)
    random = commands.add_parser("random", help="write a head with random weights (to try the mechanics)")
    random.add_argument("out")
    random.add_argument("--in-channels", type=int, required=True, help="the backbone's channels C")
    random.add_argument("--out-channels", type=int, required=True, help="the head's output channels D")
    random.add_argument("--hidden", type=int, default=None, help="hidden channels of the branch (default C; 0: none)")
    random.add_argument("--seed", type=int, default=0)
    random.set_defaults(run=_random)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
