"""Batch inference over WebDataset shards: every rank its own shards, every sample once, resumable.

    torchrun --nproc_per_node=8 -m primaps_dist.predict --checkpoint ckpt/latest --shards data/{000000..000999}.tar \
        --out labels/ [--format shards|png]

Rank r of W takes shards ``r, r + W, r + 2W, ...`` of the sorted list, so each sample is segmented by exactly one
rank. Outputs, named after the input shard (``<stem>``, or ``<index>-<stem>`` when two inputs share a stem):

* ``--format shards``: ``<stem>.tar`` with one ``<key>.labels.png`` (8-bit ids) per sample, written to a temporary
  name and renamed when the shard is done. A rerun skips shards whose ``.tar`` exists.
* ``--format png``: ``<stem>/<key>.png``, each written atomically; ``<stem>/.complete`` marks a finished shard. A
  rerun skips finished shards and, inside an unfinished one, images whose PNG exists.

Samples that do not decode are skipped with a warning (counted); the shard still completes. Shards are any spec
``data.train_shards`` takes (local, http(s), s3, gs, ``pipe:``): a rank starts fetching its next unfinished remote
shard while it segments the current one.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("primaps_dist.predict")

FORMATS = ("shards", "png")
COMPLETE_MARKER = ".complete"
LABEL_MEMBER = "labels.png"


@dataclass
class ShardJobStats:
    images: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    images_skipped: int = 0  # PNGs found from an earlier run
    problems: Counter = field(default_factory=Counter)


def output_stems(shards: Sequence[str]) -> list[str]:
    """One output name per input shard, unique even when two folders hold ``000000.tar``."""
    stems = [Path(shard).name.removesuffix(".tar") for shard in shards]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    return [f"{index:06d}-{stem}" if stem in repeated else stem for index, stem in enumerate(stems)]


def png_bytes(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(shard: str, stats: ShardJobStats) -> Iterator[tuple[str, np.ndarray]]:
    from primaps_dist.data.shardio import ShardProblem, read_shard
    from primaps_dist.data.transforms import SampleError, find_image_member, open_image, to_rgb

    for sample in read_shard(shard):
        if isinstance(sample, ShardProblem):
            log.warning("skipped: %s", sample.describe())
            stats.problems[sample.reason] += 1
            continue
        member = find_image_member(sample)
        if member is None:
            log.warning("skipped: %s key %s: no image member", shard, sample["__key__"])
            stats.problems["no image member"] += 1
            continue
        try:
            yield sample["__key__"], np.array(to_rgb(open_image(sample[member])))
        except SampleError as err:
            log.warning("skipped: %s key %s: %s", shard, sample["__key__"], err)
            stats.problems[str(err)] += 1


def _batches(items: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    batch: list[tuple[str, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def safe_stem(key: str) -> str:
    """A sample key as one file name inside the output folder (no separators, no leading dot)."""
    stem = key.replace("/", "__").replace("\\", "__")
    return "_" + stem if stem.startswith(".") else stem


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def segment_shards(segmenter, shards: Sequence[str], out: Path, *, fmt: str, rank: int, world_size: int,
                   batch_size: int, progress=None) -> ShardJobStats:
    """Segment this rank's shards of ``shards`` (the full sorted list) into ``out``; see the module docstring."""
    from primaps_dist.data.remote_cache import prefetch_shards
    from primaps_dist.data.synthetic import write_tar

    stats = ShardJobStats()
    mine = list(zip(shards, output_stems(shards)))[rank::world_size]
    finished = [(out / f"{stem}.tar").is_file() if fmt == "shards" else (out / stem / COMPLETE_MARKER).is_file()
                for _, stem in mine]
    for position, (shard, stem) in enumerate(mine):
        if finished[position]:
            stats.shards_skipped += 1
            continue
        following = [other for (other, _), done in zip(mine[position + 1:], finished[position + 1:]) if not done]
        prefetch_shards(following[:1])  # no-op for local shards
        if fmt == "shards":
            target = out / f"{stem}.tar"
            members: list[tuple[str, bytes]] = []
            for batch in _batches(_decoded(shard, stats), batch_size):
                maps = segmenter.segment([image for _, image in batch])
                members += [(f"{key}.{LABEL_MEMBER}", png_bytes(ids.cpu().numpy())) for (key, _), ids in zip(batch, maps)]
                stats.images += len(batch)
                if progress is not None:
                    progress.update(len(batch))
            tmp = out / f".{stem}.tar.tmp-{os.getpid()}"
            write_tar(tmp, members)
            os.replace(tmp, target)
        else:
            folder = out / stem
            folder.mkdir(parents=True, exist_ok=True)
            for batch in _batches(_decoded(shard, stats), batch_size):
                todo = [(key, image) for key, image in batch if not (folder / f"{safe_stem(key)}.png").is_file()]
                stats.images_skipped += len(batch) - len(todo)
                if todo:
                    maps = segmenter.segment([image for _, image in todo])
                    for (key, _), ids in zip(todo, maps):
                        _write_atomic(folder / f"{safe_stem(key)}.png", png_bytes(ids.cpu().numpy()))
                stats.images += len(todo)
                if progress is not None:
                    progress.update(len(batch))
            (folder / COMPLETE_MARKER).write_text(f"{shard}\n")
        stats.shards_done += 1
    return stats
