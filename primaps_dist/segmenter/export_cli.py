"""``primaps-dist export``: the command line of :mod:`primaps_dist.segmenter.export` (folder layout there).

    primaps-dist export --checkpoint runs/demo/checkpoints/latest --out model/ [--assignment metrics.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from primaps_dist.errors import UserError, run_cli
from primaps_dist.segmenter.core import Segmenter
from primaps_dist.segmenter.export import EXPORT_FILES, write_export


def main(argv: Sequence[str] | None = None) -> int:
    from primaps_dist import checkpoint as ckpt
    from primaps_dist.train_state import load_train_state

    parser = argparse.ArgumentParser(prog="primaps-dist export", description="Write a self-contained model folder from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoint.pt, checkpoints dir or latest")
    parser.add_argument("--out", required=True, help="the export folder (created; must be empty if it exists)")
    parser.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("--assignment", help="metrics.json from evaluate: the model outputs matched class ids")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (eval.crf, eval.flip, ...)")
    args = parser.parse_args(argv)

    load_train_state(args.checkpoint)  # an incomplete or damaged checkpoint fails here, before the backbone
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder")
    ckpt.ensure_writable_dir(out, "--out")
    segmenter = Segmenter.from_checkpoint(args.checkpoint, config=args.config, overrides=args.overrides, device="cpu")
    if args.assignment:
        segmenter.with_class_names(args.assignment)
    write_export(segmenter, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported step {segmenter.config.get('step')} to {out} ({size / 1e6:.1f} MB: "
          f"{', '.join(EXPORT_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

