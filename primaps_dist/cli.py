"""The ``primaps-dist`` console script: one subcommand per job, each a module with ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from primaps_dist.errors import run_cli

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-shards": ("primaps_dist.data.shards", "write WebDataset tar shards from image (and label) folders"),
    "make-demo-data": ("primaps_dist.data.demo", "generate the labelled texture-mosaic demo set"),
    "show-proposals": ("primaps_dist.show_proposals", "draw the PriMaPs proposals of images"),
    "train": ("primaps_dist.train", "train (also: torchrun -m primaps_dist.train)"),
    "evaluate": ("primaps_dist.evaluate", "evaluate a checkpoint (also under torchrun)"),
    "predict": ("primaps_dist.predict", "write label maps for a folder of images or for shards (also under torchrun)"),
    "export": ("primaps_dist.segmenter.export_cli", "write a self-contained model folder (safetensors + torch.export)"),
    "mlflow-server": ("primaps_dist.tracking.server", "start a local MLflow server (loopback by default)"),
}


def _usage() -> str:
    lines = ["usage: primaps-dist <command> [args]  (add --help to a command for its options)", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _dispatch(argv: Sequence[str] | None) -> int:
    args = list(argv or [])
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"error: unknown command {command!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
