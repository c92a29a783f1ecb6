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
from typing import Sequence

import torch

from primaps_dist.backbones.head import HEAD_KEY, ProjectionHead, load_projection_head
from primaps_dist.errors import UserError, run_cli

__all__ = ["ProjectionHead", "load_projection_head", "main"]  # the head itself lives in backbones/head.py


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
