"""Label maps and colour overlays for a folder of images.

    python -m primaps_dist.predict --checkpoint runs/x/checkpoints/latest --images photos/ --out predictions/

Each image is resized so its short side equals ``data.crop_size``, padded to the backbone stride, predicted with
the checkpoint's prototypes and upsampled back to its original size. Writes ``<name>.png`` (8-bit cluster ids,
or matched class ids with ``--assignment metrics.json``) and ``<name>_overlay.jpg``, one image at a time, so any
number of images streams through in constant memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from primaps_dist import checkpoint as ckpt
from primaps_dist.config import resolve_run_config
from primaps_dist.errors import UserError, run_cli
from primaps_dist.image_io import find_images, pad_to_multiple, read_rgb, resize_short_side, to_tensor
from primaps_dist.prototypes import cosine_scores
from primaps_dist.train_state import load_train_state

log = logging.getLogger("primaps_dist.predict")


def predict_image(backbone: torch.nn.Module, prototypes: torch.Tensor, image: np.ndarray, short_side: int,
                  device: torch.device) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``int64 [H, W]`` cluster ids at the original resolution."""
    height, width = image.shape[:2]
    x = resize_short_side(to_tensor(image).to(device), short_side)
    resized_h, resized_w = x.shape[-2:]
    x = pad_to_multiple(x, backbone.stride)
    with torch.inference_mode():
        logits = cosine_scores(backbone(x), prototypes)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits[..., :resized_h, :resized_w]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu().numpy()


def output_name(path: Path, root: Path, taken: set[str]) -> str:
    """A flat, safe output stem from the image's path relative to the input root, unique among ``taken``
    (``x.png`` and ``x.jpg``, or ``a/b.png`` and ``a__b.png``, must not overwrite each other)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    stem = "__".join(relative.with_suffix("").parts)
    name, counter = stem, 1
    while name in taken:
        name, counter = f"{stem}-{counter}", counter + 1
    taken.add(name)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    from primaps_dist import visualize
    from primaps_dist.backbones import build_backbone

    parser = argparse.ArgumentParser(prog="primaps_dist.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True, help="an image file or a directory (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("--assignment", help="metrics.json from evaluate: write matched class ids")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many images (0 = all)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    saved = load_train_state(args.checkpoint)
    cfg = resolve_run_config(saved.config, args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    backbone = build_backbone(cfg.backbone, device)
    saved.check_compatible(cfg, channels=backbone.out_channels)
    prototypes = saved.prototypes.to(device)
    lookup = None
    if args.assignment:
        try:
            assignment = json.loads(Path(args.assignment).read_text())["assignment"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"{args.assignment}: not a metrics.json with an 'assignment' list") from None
        lookup = np.asarray(assignment, dtype=np.int64)

    root = Path(args.images)
    out_dir = Path(args.out)
    ckpt.ensure_writable_dir(out_dir, "--out")
    written = failed = 0
    taken: set[str] = set()
    for path in find_images(root):
        if args.limit and written >= args.limit:
            break
        try:
            image = read_rgb(path)
        except UserError as err:
            log.warning("skipped: %s", err)
            failed += 1
            continue
        clusters = predict_image(backbone, prototypes, image, cfg.data.crop_size, device)
        labels = lookup[clusters] if lookup is not None else clusters
        stem = output_name(path, root, taken)
        Image.fromarray(labels.astype(np.uint8)).save(out_dir / f"{stem}.png")
        Image.fromarray(visualize.overlay(image, labels)).save(out_dir / f"{stem}_overlay.jpg", quality=90)
        written += 1
    print(f"wrote {written} label maps and overlays to {out_dir}" + (f"; {failed} unreadable images skipped" if failed else ""))
    if written == 0:
        raise UserError(f"--images {root}: no readable images found")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
