"""Test data and tiny runs: the demo data set, hand-made shards, and the overrides of a run of seconds.

The session's demo data set is the fixture ``demo_data`` (tests/conftest.py), built once by
:func:`build_demo_data`: 16 train + 8 val texture mosaics (96 x 96, 6 classes) made by ``make-demo-data``
and written as shards of 4 samples by ``make-shards`` (4 train, 2 val shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from support.env import REPO

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
NUM_CLASSES = 6
IMAGE_SIZE = 96
CROP = 64
# The demo preset concatenates EfficientNet-Lite0 stages 2 and 3: stride 8, 40 + 112 channels.
DEMO_STRIDE = 8
DEMO_CHANNELS = 40 + 112


@dataclass(frozen=True)
class DemoData:
    """Paths of the session's demo data set."""

    root: Path
    train_images: Path
    train_labels: Path
    val_images: Path
    val_labels: Path
    classes: Path  # classes.json (make-shards --classes)
    train_shards: Path  # folder of 000000.tar ...
    val_shards: Path


def demo_data_paths(root: Path) -> DemoData:
    """The paths :func:`build_demo_data` writes under ``root``."""
    images = root / "images"
    return DemoData(
        root=root,
        train_images=images / "train" / "images",
        train_labels=images / "train" / "labels",
        val_images=images / "val" / "images",
        val_labels=images / "val" / "labels",
        classes=images / "classes.json",
        train_shards=root / "shards" / "train",
        val_shards=root / "shards" / "val",
    )


def build_demo_data(root: Path) -> DemoData:
    """Generate the images and shard them (in this process: the CLI mains, no interpreter start-up)."""
    from primaps_dist.data import demo, shards

    data = demo_data_paths(root)
    assert demo.main(["--out", str(root / "images"), "--train", "16", "--val", "8", "--size", str(IMAGE_SIZE)]) == 0
    for split_images, split_labels, out in ((data.train_images, data.train_labels, data.train_shards),
                                            (data.val_images, data.val_labels, data.val_shards)):
        assert shards.main(["--images", str(split_images), "--labels", str(split_labels), "--out", str(out),
                            "--shard-size", "4", "--classes", str(data.classes)]) == 0
    return data


def write_shard(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar shard with exactly these ``(member name, bytes)`` (names used verbatim, even unsafe ones)."""
    from primaps_dist.data.synthetic import write_tar

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(path, members)
    return path


def tiny_overrides(train_shards: str | os.PathLike, output_dir: str | os.PathLike, *extra: str,
                   val_shards: str | os.PathLike = "", pca: int = 1, kmeans: int = 1, em: int = 0,
                   tracking: bool = False, log_model: bool = False) -> list[str]:
    """``key=value`` overrides that turn configs/demo.yaml into a CPU run of a few seconds.

    A checkpoint after every step, no final evaluation unless ``val_shards`` is given, MLflow only with
    ``tracking``, the end-of-run MLflow model (a few seconds of ``torch.export``) only with ``log_model``.
    ``extra`` overrides come last, so they win over these.
    """
    return [
        f"data.train_shards={train_shards}", f"data.val_shards={val_shards}",
        f"data.crop_size={CROP}", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=0", "data.train_scale=[1.0,1.0]",
        f"train.pca_steps={pca}", f"train.kmeans_steps={kmeans}", f"train.em_steps={em}",
        f"train.output_dir={output_dir}", "train.log_every=1", "checkpoint.every_steps=1",
        "train.device=cpu", "proposals.max_masks=4", "proposals.label_size=0", "crf.iterations=2",
        "tracking.num_overlays=0",
        f"tracking.enabled={'true' if tracking else 'false'}", "tracking.system_metrics=false",
        f"tracking.log_model={'true' if log_model else 'false'}",
        *extra,
    ]


def tiny_train_args(train_shards: str | os.PathLike, output_dir: str | os.PathLike, *extra: str,
                    **options) -> list[str]:
    """``--config configs/demo.yaml`` followed by :func:`tiny_overrides`."""
    return ["--config", str(DEMO_CONFIG), *tiny_overrides(train_shards, output_dir, *extra, **options)]


def total_steps(overrides: Sequence[str]) -> int:
    """PCA + K-means + EM steps of a run with these overrides (the last value of each key wins)."""
    values = dict(item.split("=", 1) for item in overrides if "=" in item)
    return sum(int(values[f"train.{stage}"]) for stage in ("pca_steps", "kmeans_steps", "em_steps"))
