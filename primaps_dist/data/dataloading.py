"""The DataLoader plumbing shared by the training and evaluation loaders: worker set-up, error records, and the
conversion of uint8 worker batches into the public batch layout (see :mod:`.loader`)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from primaps_dist.errors import UserError
from primaps_dist.labels import IGNORE_INDEX


def guard(items: Iterator[dict]) -> Iterator[dict]:
    """Turn a worker's UserError into an error record (a DataLoader would wrap it in a traceback)."""
    try:
        yield from items
    except UserError as err:
        yield {"__error__": str(err)}


def raise_error(raw: dict) -> dict:
    if "__error__" in raw:
        raise UserError(raw["__error__"])
    return raw


def _no_collate(batch: Any) -> Any:
    return batch


def _fixed_mmap_threshold() -> None:
    """Let glibc return freed large blocks (decoded images, crops) to the system at once: its adaptive mmap
    threshold otherwise grows to 32 MiB and a worker's RSS grows by several times its buffers (measured: +191 MB
    for a 32 MB shuffle-buffer budget, +22 MB with the fixed threshold; bench/streaming_elastic.py, rss)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)
    _fixed_mmap_threshold()


def data_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_no_collate,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def public_batch(raw: dict, crop: int, as_uint8: bool = False) -> dict:
    """uint8 image / label (or None) -> the public batch layout."""
    image, label = raw.pop("image"), raw.pop("label")
    count = len(raw["key"])
    if image is None:
        image = torch.zeros(0, 3, crop, crop, dtype=torch.uint8)
    raw["image"] = image if as_uint8 else image.float().div_(255.0)
    if label is None:
        raw["label"] = torch.full((count, crop, crop), IGNORE_INDEX, dtype=torch.int64)
    else:
        raw["label"] = label.long()
    return raw
