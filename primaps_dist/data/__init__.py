"""Data layer: WebDataset shards in, batches out (plus the shard writer and the demo data generator).

Public entry points: :func:`make_train_loader`, :func:`make_eval_loader`, :func:`collect_state`,
:func:`resolve_shards`; command-line tools ``primaps-dist make-shards`` (:mod:`.shards`) and
``primaps-dist make-demo-data`` (:mod:`.demo`). Attributes are imported lazily so that the
command-line tools start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalLoader": "primaps_dist.data.loader",
    "TrainLoader": "primaps_dist.data.loader",
    "collect_state": "primaps_dist.data.loader",
    "make_eval_loader": "primaps_dist.data.loader",
    "make_train_loader": "primaps_dist.data.loader",
    "resolve_shards": "primaps_dist.data.shardio",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'primaps_dist.data' has no attribute {name!r}")
