"""``primaps-dist show-proposals IMAGE... --out DIR``: the PriMaPs proposals of each image, coloured over it.

Uses the configured backbone (default: the offline EfficientNet-Lite0 preset), the configured proposal
parameters and CRF. Images are resized (short side = ``data.crop_size``) and centre-cropped like evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from primaps_dist.config import load_config
from primaps_dist.errors import UserError, run_cli
from primaps_dist.image_io import center_crop, find_images, read_rgb, resize_short_side, to_tensor


def main(argv: Sequence[str] | None = None) -> int:
    from primaps_dist import visualize
    from primaps_dist.backbones import build_backbone
    from primaps_dist.checkpoint import ensure_writable_dir
    from primaps_dist.crf import crf_from_config
    from primaps_dist.ops import upsample_logits
    from primaps_dist.primaps import mask_logits

    parser = argparse.ArgumentParser(prog="primaps-dist show-proposals", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files or directories")
    parser.add_argument("--out", required=True, help="output directory for the pictures")
    parser.add_argument("--config", help="YAML config (default: built-in defaults, offline backbone)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set proposals.threshold=0.5)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    backbone = build_backbone(cfg.backbone, device)
    crf_fn = crf_from_config(cfg.crf)  # None for crf.backend=none
    out_dir = Path(args.out)
    ensure_writable_dir(out_dir, "--out")
    count = 0
    for root in args.images:
        for path in find_images(Path(root)):
            image = center_crop(resize_short_side(to_tensor(read_rgb(path)).to(device), cfg.data.crop_size),
                                cfg.data.crop_size)
            with torch.inference_mode():
                logits = mask_logits(backbone(image), threshold=cfg.proposals.threshold,
                                     coverage=cfg.proposals.coverage, max_masks=cfg.proposals.max_masks,
                                     median_filter=cfg.proposals.median_filter)
                logits = upsample_logits(logits, image.shape[-2:])  # keeps -inf channels NaN-free
                if crf_fn is not None:
                    logits = crf_fn(logits, image * 255.0)
            mask_ids = logits.argmax(1)[0].cpu().numpy()
            picture = (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            target = out_dir / f"{path.stem}_proposals.png"
            visualize.draw_proposals(picture, mask_ids, target)
            print(f"{path}: {int(mask_ids.max())} proposals -> {target}")
            count += 1
    if count == 0:
        raise UserError(f"show-proposals: no images found in {', '.join(args.images)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
