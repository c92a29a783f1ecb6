"""Experiment tracking with MLflow on rank 0 that never stalls or stops training.

Every rank builds a :class:`Tracker`; only the main rank talks to MLflow, on the others every method is a
no-op. Every record (run creation, params, metrics, tags, artifacts, the final status) is appended to an
on-disk journal on the calling thread and delivered to MLflow by a background thread, in order: metrics
batched (one ``log_batch`` per ``flush_interval_s``), everything else at once. A slow server therefore
costs a training step nothing. When MLflow does not answer (down at start, or gone mid-run) the tracker
prints ONE warning and keeps going; the journal grows, the thread retries with exponential backoff and
sends it once the server is back, and :meth:`Tracker.finish` keeps trying for a bounded time. Nothing is
lost: a crashed process leaves its undelivered records in the journal (the next start on the same output
directory sends them), and if the server never comes back the journal can be sent later with::

    python -m primaps_dist.tracking replay <output_dir or spool file> [--uri http://host:5000]

A run started while MLflow is unreachable gets a local key ``local-<hex>`` as :attr:`Tracker.run_id`;
``mlflow_runs.json`` maps it to the real id once the run exists, so a checkpoint that stored the local
key still resumes the same MLflow run.

Modules, one job each:

- :mod:`~primaps_dist.tracking.common`: file names, MLflow's limits, the tracking URI, error helpers.
- :mod:`~primaps_dist.tracking.journal`: the on-disk journal (``mlflow_spool.jsonl``).
- :mod:`~primaps_dist.tracking.delivery`: sending records to MLflow in order (live and for replay).
- :mod:`~primaps_dist.tracking.sender`: the background thread that delivers the journal.
- :mod:`~primaps_dist.tracking.system_metrics`: CPU/memory/GPU samples as metrics.
- :mod:`~primaps_dist.tracking.tracker`: the :class:`Tracker` facade the trainer uses.
- :mod:`~primaps_dist.tracking.replay`: the replay command (``python -m primaps_dist.tracking replay``).
- :mod:`~primaps_dist.tracking.server`: ``primaps-dist mlflow-server``, a loopback MLflow server.
"""

from primaps_dist.tracking.common import (
    MAX_PARAM_VALUE_LENGTH,
    RUN_MAP_NAME,
    SPOOL_NAME,
    config_params,
    resolve_tracking_uri,
)
from primaps_dist.tracking.journal import Spool
from primaps_dist.tracking.replay import main, replay_spool
from primaps_dist.tracking.tracker import Tracker

__all__ = [
    "MAX_PARAM_VALUE_LENGTH",
    "RUN_MAP_NAME",
    "SPOOL_NAME",
    "Spool",
    "Tracker",
    "config_params",
    "main",
    "replay_spool",
    "resolve_tracking_uri",
]
