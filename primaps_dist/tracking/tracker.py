"""The :class:`Tracker` facade the trainer uses: one MLflow run per training run, on the main rank only.

Every call builds a record (run creation, params, metrics, tags, artifacts, the final status), appends it
to the on-disk journal and returns; a background thread (:mod:`primaps_dist.tracking.sender`) delivers it.
So a slow or dead server never stalls a training step, and a crash loses nothing: the next start on the
same output directory sends what the journal still holds.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Mapping

from primaps_dist.config import TrackingConfig
from primaps_dist.tracking.common import (
    LOCAL_KEY_PREFIX,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    RUN_MAP_NAME,
    RUN_STATUSES,
    ErrorReporter,
    check_name,
    config_params,
    logger,
    now_ms,
    resolve_tracking_uri,
    short,
    use_short_http_timeouts,
)
from primaps_dist.tracking.delivery import Delivery
from primaps_dist.tracking.journal import Spool
from primaps_dist.tracking.sender import BackgroundSender
from primaps_dist.tracking.system_metrics import SystemMetricsSampler


class Tracker:
    """MLflow tracking for one training run; a no-op unless ``is_master`` and ``cfg.enabled``.

    Args:
        cfg: the ``tracking`` section of the config.
        is_master: True on global rank 0 only.
        output_dir: the run's output directory (holds the journal and the run-key map).
        run_id: an MLflow run id (or a ``local-...`` key) from a checkpoint: :meth:`start` resumes that
            run instead of creating one (a torchrun elastic restart continues the same MLflow run).
        retry_initial_s / retry_max_s: backoff between delivery attempts while MLflow is unreachable.
        start_timeout_s: how long :meth:`start` waits for the run to be created, so that :attr:`run_id`
            (stored in checkpoints) is MLflow's id, not a local key, when the server answers in time. A
            fresh sqlite store takes seconds to create its tables; a dead server fails at once.
        finish_timeout_s: how long :meth:`finish` keeps trying to deliver what is pending.
        flush_interval_s: metrics are journaled at once and sent as one batch at most this often
            (0 = as soon as possible); run creation, params, tags, artifacts and the end are sent at once.
        system_metrics_interval_s: sampling interval of system metrics (when ``cfg.system_metrics``).

    Raises ConfigError (a UserError naming ``tracking.tracking_uri``) for a URI scheme MLflow cannot use.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        is_master: bool,
        output_dir: str | os.PathLike,
        run_id: str | None = None,
        retry_initial_s: float = 2.0,
        retry_max_s: float = 60.0,
        start_timeout_s: float = 30.0,
        finish_timeout_s: float = 10.0,
        flush_interval_s: float = 2.0,
        system_metrics_interval_s: float = 10.0,
    ):
        self.cfg = cfg
        self.active = bool(cfg.enabled and is_master)
        self._requested_run_id = run_id or None
        self._key: str | None = None
        self._started = False
        self._finished = False
        self._last_step = 0
        self._sampler: SystemMetricsSampler | None = None
        if not self.active:
            return
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        use_short_http_timeouts()
        self.output_dir = Path(output_dir)
        self.spool = Spool(self.output_dir)
        self._errors = ErrorReporter()
        self._delivery = Delivery(self.tracking_uri, self.output_dir / RUN_MAP_NAME, self.output_dir)
        self._sender = BackgroundSender(self._delivery, self.spool, self._errors, flush_interval_s=flush_interval_s,
                                        retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)
        self._start_timeout_s = start_timeout_s
        self._finish_timeout_s = finish_timeout_s
        self._system_metrics_interval_s = system_metrics_interval_s

    # ----------------------------------------------------------------------------------- state

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; a ``local-...`` key while the run could not be created yet. Store it in checkpoints."""
        if not self.active or self._key is None:
            return self._requested_run_id
        return self._delivery.resolve(self._key) or self._key

    @property
    def offline(self) -> bool:
        """True from a failed delivery until every record waiting in the journal has been delivered."""
        return self.active and self._sender.offline

    # ----------------------------------------------------------------------------------- public API

    def start(self, params: Mapping[str, Any] | None = None, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None) -> str | None:
        """Create the MLflow run (or resume ``run_id``), log ``params`` (flattened) and ``tags``.

        Waits up to ``start_timeout_s`` for the run to exist in MLflow, then returns :attr:`run_id`.
        Never raises for an unreachable server (one warning; the records wait in the journal).
        """
        if not self.active:
            return self._requested_run_id
        if self._started:
            raise RuntimeError("Tracker.start() was already called")
        self._started = True
        self._sender.start(self._errors.run(self.spool.load) or [])  # a previous process may have left records
        self._key = self._requested_run_id or f"{LOCAL_KEY_PREFIX}{uuid.uuid4().hex}"
        run_tags = {"primaps.output_dir": str(self.output_dir.resolve()), "primaps.host": socket.gethostname()}
        run_tags.update({k: str(v) for k, v in (tags or {}).items()})
        self._sender.submit({
            "kind": "run",
            "run": self._key,
            "experiment": self.cfg.experiment,
            "run_name": run_name or self.cfg.run_name or None,
            "params": config_params(params or {}),
            "tags": run_tags,
            "time": now_ms(),
            "uri": self.tracking_uri,
        })
        if self.cfg.system_metrics:
            self._start_system_metrics()
        self._sender.wait_until_idle(self._start_timeout_s)
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``{name: number}`` at ``step`` as one record (numbers, 0-dim tensors and numpy scalars)."""
        if not self.active:
            return
        values = {check_name(k, "metric"): float(v) for k, v in metrics.items()}
        self._last_step = int(step)
        self._submit_system_metrics()
        if values:
            self._sender.submit({"kind": "metrics", "run": self._key, "step": int(step), "time": now_ms(),
                                 "values": values})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (flattened, values cut to MLflow's limit); MLflow refuses changing a logged param."""
        if not self.active:
            return
        values = config_params(params)
        for name in values:
            check_name(name, "param")
        for start in range(0, len(values), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(itertools.islice(values.items(), start, start + MAX_PARAMS_TAGS_PER_BATCH))
            self._sender.submit({"kind": "params", "run": self._key, "values": chunk})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {check_name(k, "tag"): str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}
        if values:
            self._sender.submit({"kind": "tags", "run": self._key, "values": values})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (its contents) under ``artifact_path`` of the run."""
        if not self.active:
            return
        path = Path(path)
        if not path.exists():
            logger.warning("artifact %s does not exist; not logged", path)
            return
        self._sender.submit({"kind": "artifact", "run": self._key, "path": str(path.resolve()),
                             "artifact_path": artifact_path})

    def register_model(self, name: str, artifact_path: str) -> None:
        """Register the model logged under ``artifact_path`` of this run as a new version of ``name`` (send it
        after the model's :meth:`log_artifact`: records are delivered in order). The record carries an id that
        the version is tagged with, so a record resent after an outage does not create a second version."""
        if not self.active:
            return
        self._sender.submit({"kind": "register_model", "run": self._key, "name": str(name),
                             "artifact_path": str(artifact_path), "record_id": uuid.uuid4().hex})

    def wait_until_idle(self, timeout_s: float = 30.0) -> bool:
        """Block until every record logged so far went through a delivery attempt (sent, or waiting for
        the next retry). Training never needs this; it makes the delivery thread observable in tests."""
        return not self.active or not self._started or self._sender.wait_until_idle(timeout_s)

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run with ``status`` (FINISHED, FAILED or KILLED) and deliver everything pending.

        Keeps trying for ``finish_timeout_s`` (at least one attempt; never longer than
        ``max(finish_timeout_s, 5 s)``); what still cannot be sent stays in the journal and a warning
        names the replay command. Returns True when everything was delivered.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if not self.active or not self._started or self._finished:
            return True
        self._finished = True
        if self._sampler is not None:
            self._sampler.stop()
        self._submit_system_metrics()
        self._sender.submit({"kind": "end", "run": self._key, "status": status, "time": now_ms()})
        left = self._sender.close(self._finish_timeout_s)
        if left:
            logger.warning(
                "MLflow at %s is unreachable: %d records stay in %s; send them later with: "
                "python -m primaps_dist.tracking replay %s --uri %s",
                self.tracking_uri, left, self.spool.path, self.output_dir, self.tracking_uri,
            )
            return False
        return True

    # ----------------------------------------------------------------------------------- internals

    def _start_system_metrics(self) -> None:
        try:
            import psutil  # noqa: F401 - MLflow's collectors need it

            self._sampler = SystemMetricsSampler(self.tracking_uri, self._system_metrics_interval_s)
        except Exception as err:  # noqa: BLE001 - optional feature
            logger.warning("system metrics disabled: %s", short(err))

    def _submit_system_metrics(self) -> None:
        if self._sampler is None:
            return
        for values in self._sampler.take():
            self._sender.submit({"kind": "metrics", "run": self._key, "step": self._last_step,
                                 "time": now_ms(), "values": values})
