"""Evaluation of trained prototypes (docs/method.md, "7. Evaluation protocol").

    python -m primaps_dist.evaluate --config configs/demo.yaml --checkpoint runs/x/checkpoints/latest --out metrics.json
    torchrun --nproc_per_node=2 -m primaps_dist.evaluate ...                  # the confusion matrix is all-reduced

Resize the short side, centre-crop, predict ``argmax_k <mu_k, f>`` per pixel (optionally CRF-refined and with
horizontal-flip averaging of the features; :meth:`primaps_dist.Segmenter.segment`, the rule ``predict`` uses), accumulate one K x K confusion matrix over the whole split, match
clusters to classes with the Hungarian algorithm, report pixel accuracy, mIoU and per-class IoU. The checkpoint
given is the one reported: evaluation never selects checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from primaps_dist import distributed as dist
from primaps_dist.config import Config, resolve_run_config
from primaps_dist.errors import UserError, run_cli
from primaps_dist.labels import IGNORE_INDEX
from primaps_dist.metrics import confusion_matrix, hungarian_scores
from primaps_dist.runtime import setup_logging
from primaps_dist.train_state import load_train_state

log = logging.getLogger("primaps_dist.evaluate")


@dataclass
class EvalResult:
    scores: dict[str, Any]  # accuracy, miou (percent), per_class_iou, assignment, confusion
    num_images: int
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # image, pred, target


def eval_crf(cfg: Config):
    """The CRF that ``eval.crf`` asks for (``crf`` section parameters, ``eval.crf_downsample``), or None."""
    from primaps_dist.segmenter.core import evaluation_crf

    return evaluation_crf(cfg)


def evaluate_prototypes(
    cfg: Config,
    env: dist.DistEnv,
    backbone: torch.nn.Module,
    prototypes: torch.Tensor,
    device: torch.device,
    *,
    num_overlays: int = 0,
    shards: str | None = None,
) -> EvalResult:
    """Run the protocol on ``shards`` (default ``data.val_shards``); collective: every rank must call it."""
    from primaps_dist.data.loader import make_eval_loader

    from primaps_dist.segmenter import Segmenter

    segmenter = Segmenter.from_parts(cfg, backbone, prototypes, device=device)
    K = cfg.data.num_classes
    confusion = torch.zeros(K, K, dtype=torch.int64)
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    num_images = 0
    loader = make_eval_loader(
        cfg.data, rank=env.rank, world_size=env.world_size, shards=shards, resize_short=cfg.eval.resize_short,
        shards_key="--shards" if shards else None,
    )
    with torch.inference_mode():
        for batch in loader:
            images = batch["image"].to(device)
            targets = batch["label"]
            prediction = segmenter.segment(images)  # the rule predict, export and MLflow use too
            prediction = prediction.cpu()
            confusion += confusion_matrix(prediction.reshape(-1), targets.reshape(-1), K)
            num_images += images.shape[0]
            if env.is_master and len(overlays) < num_overlays:
                for i in range(min(images.shape[0], num_overlays - len(overlays))):
                    picture = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                    overlays.append((picture, prediction[i].numpy(), targets[i].numpy()))
    counts = torch.tensor([num_images], dtype=torch.int64)
    packed = torch.cat([confusion.reshape(-1), counts]).double()
    dist.all_reduce_sum(packed)  # one collective: the whole confusion matrix and the image count
    confusion = packed[:-1].round().long().reshape(K, K)
    num_images = int(packed[-1])
    if num_images == 0:
        raise UserError(f"config key 'data.val_shards': no evaluation images found in {shards or cfg.data.val_shards!r}")
    scores = hungarian_scores(confusion.numpy())
    assignment = np.asarray(scores["assignment"])
    overlays = [(image, _map_clusters(pred, assignment), target) for image, pred, target in overlays]
    return EvalResult(scores=scores, num_images=num_images, overlays=overlays)


def _map_clusters(prediction: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Cluster ids -> matched class ids (unmatched clusters -> IGNORE_INDEX)."""
    lookup = np.full(max(len(assignment), int(prediction.max()) + 1), IGNORE_INDEX, dtype=np.int64)
    lookup[: len(assignment)] = np.where(assignment >= 0, assignment, IGNORE_INDEX)
    return lookup[prediction]


def class_names(cfg: Config) -> list[str]:
    """Class names from the validation shards' index.json when present, else ``class_<i>``."""
    index = Path(cfg.data.val_shards) / "index.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text()).get("class_names") or []
        except (OSError, ValueError):
            names = []
        if len(names) == cfg.data.num_classes:
            return [str(name) for name in names]
    return [f"class_{i}" for i in range(cfg.data.num_classes)]


def write_reports(result: EvalResult, out_dir: Path, cfg: Config, metrics_path: Path | None = None) -> list[Path]:
    """metrics.json, confusion matrix picture, per-class IoU chart and overlays; returns the written paths."""
    from primaps_dist import visualize

    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names(cfg)
    metrics_path = metrics_path or out_dir / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result.scores, "num_images": result.num_images, "class_names": names}
    metrics_path.write_text(json.dumps(_jsonable(payload), indent=2))
    paths = [metrics_path]
    confusion = np.asarray(result.scores["confusion"])
    assignment = np.asarray(result.scores["assignment"])
    matched = np.zeros_like(confusion)
    matched[:, assignment[: confusion.shape[1]]] = confusion[:, : len(assignment)]
    paths.append(visualize.plot_confusion(matched, names, out_dir / "confusion.png"))
    paths.append(visualize.plot_per_class_iou(result.scores["per_class_iou"], names, out_dir / "per_class_iou.png"))
    if result.overlays:
        images, predictions, targets = zip(*result.overlays)
        paths.append(visualize.save_overlay_grid(list(images), list(predictions), list(targets), out_dir / "overlays.png"))
    return [Path(p) for p in paths]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_table(scores: dict[str, Any], names: Sequence[str]) -> str:
    lines = [f"pixel accuracy {scores['accuracy']:6.2f} %   mIoU {scores['miou']:6.2f} %", "class                IoU %"]
    for name, iou in zip(names, scores["per_class_iou"]):
        lines.append(f"{name:<20} {'   n/a' if iou is None or not np.isfinite(iou) else f'{iou:6.2f}'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from primaps_dist.backbones import build_backbone

    parser = argparse.ArgumentParser(prog="primaps_dist.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoint.pt, checkpoints dir or latest")
    parser.add_argument("--out", help="metrics.json path (default: <checkpoint dir>/eval/metrics.json)")
    parser.add_argument("--shards", help="shards to evaluate (default: data.val_shards)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    saved = load_train_state(args.checkpoint)
    cfg = resolve_run_config(saved.config, args.config, args.overrides)
    env = dist.init_distributed(cfg.dist, cfg.train.device)
    setup_logging(env.rank)
    try:
        device = env.device
        backbone = build_backbone(cfg.backbone, device)
        saved.check_compatible(cfg, channels=backbone.out_channels)
        prototypes = saved.prototypes.to(device)
        result = evaluate_prototypes(cfg, env, backbone, prototypes, device, num_overlays=cfg.tracking.num_overlays,
                                     shards=args.shards)
        if env.is_master:
            out = Path(args.out) if args.out else Path(saved.source).parent / "eval" / "metrics.json"
            write_reports(result, out.parent, cfg, metrics_path=out)
            print(format_table(result.scores, class_names(cfg)))
            print(f"evaluated {result.num_images} images at step {saved.step}; metrics in {out}")
        return 0
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(run_cli(main))
