"""Label maps for a folder of images, or for WebDataset shards on many ranks (:class:`primaps_dist.Segmenter`).

    python -m primaps_dist.predict --checkpoint runs/x/checkpoints/latest --images photos/ --out predictions/
    python -m primaps_dist.predict --export model/ --images photos/ --out predictions/ [eval.crf=true]
    torchrun --nproc_per_node=4 -m primaps_dist.predict --checkpoint ... --shards data/ --out labels/ [--format png]
    python -m primaps_dist.predict --export model/ --shards s3://bucket/val/ --out labels/ [data.s3_endpoint_url=...]

Every image is segmented at its own resolution (sliding windows of the training crop, scores averaged), with the
CRF and flip averaging of ``eval.crf`` / ``eval.flip``, exactly as ``evaluate`` predicts. ``--images`` writes
``<name>.png`` (8-bit cluster ids, or matched class ids with ``--assignment metrics.json``) and
``<name>_overlay.jpg``; ``--shards`` writes new shards or PNGs, one slice of the shards per rank, resumable
(:mod:`primaps_dist.segmenter.batch`). ``--shards`` takes every spec ``data.train_shards`` takes (local, http(s),
s3, gs, ``pipe:``, an ``index.json`` folder), read with the ``data`` section's transport settings (the checkpoint's
config plus overrides; with ``--export`` the defaults plus ``data.*`` overrides).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from primaps_dist import checkpoint as ckpt
from primaps_dist.errors import UserError, run_cli
from primaps_dist.image_io import IMAGE_SUFFIXES, find_images, read_rgb

log = logging.getLogger("primaps_dist.predict")


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


def list_images(root: Path) -> list[Path]:
    """The images ``--images`` names; UserError for an unknown format or a folder without images."""
    if root.is_file() and root.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--images {root}: unknown image format {root.suffix or '(no suffix)'!r} "
                        f"(use one of {', '.join(IMAGE_SUFFIXES)})")
    paths = list(find_images(root))
    if not paths:
        raise UserError(f"--images {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="primaps_dist.predict", description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a training checkpoint (any path evaluate takes)")
    model.add_argument("--export", help="a folder written by primaps-dist export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="an image file or a directory (searched recursively)")
    source.add_argument("--shards", help="WebDataset shards: a folder, glob, brace pattern or comma list")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("shards", "png"), default="shards", help="--shards output (default shards)")
    parser.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("--assignment", help="metrics.json from evaluate: write matched class ids")
    parser.add_argument("--batch-size", type=int, default=0, help="windows per forward pass (0 = data.eval_batch_size)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--limit", type=int, default=0, help="--images: stop after this many images (0 = all)")
    parser.add_argument("--no-overlays", action="store_true", help="--images: label maps only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (eval.crf=true, eval.flip=true)")
    return parser


def load_segmenter(args: argparse.Namespace, device):
    from primaps_dist.segmenter import Segmenter

    if args.export:  # overrides checked by check_model_and_data_config
        crf = {"eval.crf=true": True, "eval.crf=false": False}.get(next(
            (o for o in args.overrides if o.startswith("eval.crf=")), ""), None)
        segmenter = Segmenter.from_export(args.export, device=device, crf=crf, batch_size=args.batch_size or 8)
    else:
        segmenter = Segmenter.from_checkpoint(args.checkpoint, config=args.config, overrides=args.overrides,
                                              device=device, batch_size=args.batch_size or None)
    if args.assignment:
        segmenter.with_class_names(args.assignment)
    return segmenter


def predict_folder(segmenter, paths: list[Path], root: Path, out_dir: Path, *, limit: int, overlays: bool) -> int:
    from primaps_dist import visualize

    written = failed = 0
    taken: set[str] = set()
    paths = paths[:limit] if limit else paths
    for begin in range(0, len(paths), segmenter.batch_size):
        batch = []
        for path in paths[begin:begin + segmenter.batch_size]:
            try:
                batch.append((path, read_rgb(path)))
            except UserError as err:
                log.warning("skipped: %s", err)
                failed += 1
        if not batch:
            continue
        for (path, image), ids in zip(batch, segmenter.segment([image for _, image in batch])):
            labels = ids.cpu().numpy()
            stem = output_name(path, root, taken)
            Image.fromarray(labels.astype(np.uint8)).save(out_dir / f"{stem}.png")
            if overlays:
                Image.fromarray(visualize.overlay(image, labels)).save(out_dir / f"{stem}_overlay.jpg", quality=90)
            written += 1
    what = "label maps and overlays" if overlays else "label maps"
    print(f"wrote {written} {what} to {out_dir}" + (f"; {failed} unreadable images skipped" if failed else ""))
    if written == 0:
        raise UserError(f"--images {root}: no readable images found")
    return written


def predict_shards(segmenter, shards: list[str], out_dir: Path, env, args: argparse.Namespace) -> None:
    import torch

    from primaps_dist import distributed as dist
    from primaps_dist.segmenter.batch import segment_shards

    progress = None
    if env.is_master:
        try:
            from tqdm import tqdm

            progress = tqdm(desc="predict", unit="img", dynamic_ncols=True)
        except ImportError:
            progress = None
    try:
        stats = segment_shards(segmenter, shards, out_dir, fmt=args.format, rank=env.rank, world_size=env.world_size,
                               batch_size=segmenter.batch_size, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    log.info("rank %d of %d: %d images from %d shards (%d shards already finished)", env.rank, env.world_size,
             stats.images, stats.shards_done, stats.shards_skipped)
    totals = torch.tensor([stats.images, stats.shards_done, stats.shards_skipped, stats.images_skipped,
                           sum(stats.problems.values())], dtype=torch.float64)
    dist.all_reduce_sum(totals)
    images, done, skipped, images_skipped, problems = (int(v) for v in totals)
    if env.is_master:
        print(f"segmented {images} images in {done} shards on {env.world_size} ranks into {out_dir} "
              f"({skipped} shards already finished, {images_skipped} images already written, "
              f"{problems} unreadable samples skipped)")


def check_model_and_data_config(args: argparse.Namespace):
    """Check the model source (no model loaded yet) and return the ``data`` section whose transport settings read
    remote ``--shards``: the checkpoint's config (or ``--config``) plus overrides, or with ``--export`` the
    defaults plus the ``data.*`` overrides."""
    from primaps_dist.config import Config, apply_overrides, resolve_run_config

    if args.export:
        from primaps_dist.segmenter.export import check_export_folder

        check_export_folder(Path(args.export))
        if args.config:
            raise UserError("--config applies to --checkpoint only (an export carries its own config)")
        others = [o for o in args.overrides if not o.startswith(("eval.crf=", "data."))]
        if others:
            raise UserError(f"with --export only eval.crf=true|false and data.* (shard transport) can be overridden, "
                            f"got {others[0]!r}")
        return apply_overrides(Config(), [o for o in args.overrides if o.startswith("data.")]).validate().data
    from primaps_dist.train_state import load_train_state

    saved = load_train_state(args.checkpoint)
    return resolve_run_config(saved.config, args.config, list(args.overrides)).data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.batch_size < 0:
        raise UserError(f"--batch-size must be >= 0, got {args.batch_size}")
    # Inputs and outputs are checked before the model is loaded.
    root = Path(args.images) if args.images else None
    paths = list_images(root) if root is not None else []
    out_dir = Path(args.out)
    ckpt.ensure_writable_dir(out_dir, "--out")
    data_cfg = check_model_and_data_config(args)
    shards: list[str] = []
    if args.shards:
        from primaps_dist.data.shardio import resolve_shards

        shards = resolve_shards(args.shards, "--shards", data_cfg)

    if not shards:
        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        segmenter = load_segmenter(args, None if args.device == "auto" and args.checkpoint else device)
        predict_folder(segmenter, paths, root, out_dir, limit=args.limit, overlays=not args.no_overlays)
        return 0

    from primaps_dist import distributed as dist
    from primaps_dist.config import DistConfig

    env = dist.init_distributed(DistConfig(), "auto" if args.device == "auto" else args.device)
    try:
        segmenter = load_segmenter(args, env.device)
        predict_shards(segmenter, shards, out_dir, env, args)
        return 0
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(run_cli(main))
