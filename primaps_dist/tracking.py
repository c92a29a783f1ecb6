"""Experiment tracking with MLflow on rank 0 that never stops training.

Every rank builds a :class:`Tracker`; only the main rank talks to MLflow, on the others every method
is a no-op. Every record (run creation, params, metrics, tags, artifacts, the final status) is first
appended to a local spool, then the spool is sent in order: run creation, params, tags, artifacts and
the end at once, metrics batched (one ``log_batch`` per ``flush_interval_s``). When MLflow does not answer
(server down at start, or gone mid-run) the tracker prints ONE warning and keeps going; the spool grows,
later calls retry with exponential backoff and send it once the server is back, and
:meth:`Tracker.finish` retries for a while. Nothing is lost: a crashed process leaves its undelivered
records in the spool (the next start on the same output directory sends them), and if the server never
comes back the spool can be sent later with::

    python -m primaps_dist.tracking replay <output_dir or spool file> [--uri http://host:5000]

Files in ``output_dir`` (all written by the main rank only):

- ``mlflow_spool.jsonl``: one JSON record per line, not yet delivered (absent when all is delivered).
- ``mlflow_spool_artifacts/``: copies of artifacts logged while offline (the originals may change).
- ``mlflow_runs.json``: ``{local run key: MLflow run id}``. A run started while MLflow is unreachable
  gets a local key ``local-<hex>`` as :attr:`Tracker.run_id`; once the run exists in MLflow the key maps
  to the real id, so a checkpoint that stored the local key still resumes the same MLflow run.

Resending is idempotent: MLflow stores a metric (key, step, timestamp, value) once, identical params
are accepted again, artifacts overwrite themselves, and run creation is recorded in ``mlflow_runs.json``
before anything else is sent for the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from primaps_dist.config import TrackingConfig, flatten
from primaps_dist.errors import ConfigError, UserError, run_cli

logger = logging.getLogger("primaps_dist.tracking")

SPOOL_NAME = "mlflow_spool.jsonl"
SPOOL_ARTIFACTS_NAME = "mlflow_spool_artifacts"
RUN_MAP_NAME = "mlflow_runs.json"
LOCAL_KEY_PREFIX = "local-"
FIGURES_DIR_NAME = "figures"

# A dead server must cost seconds, not minutes (MLflow's defaults: 7 retries, 120 s timeout). Values the
# user exported are kept.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# MLflow limits (mlflow.utils.validation): values longer than this are rejected.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

_KNOWN_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")
_NAME_PATTERN = re.compile(r"^[/\w.\- :]+$")
# Error codes meaning "MLflow answered and refused this record": retrying cannot help.
_REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE"}
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


# ----------------------------------------------------------------------------------------------- helpers


def resolve_tracking_uri(configured: str = "") -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Raises ConfigError naming the setting when the URI scheme is not one MLflow can track to.
    """
    if configured:
        uri, key = configured, "tracking.tracking_uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, key = os.environ["MLFLOW_TRACKING_URI"], "tracking.tracking_uri (from $MLFLOW_TRACKING_URI)"
    else:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ("" if ":" not in uri else uri.split(":", 1)[0])
    supported = set(_KNOWN_SCHEMES)
    try:  # schemes registered by MLflow plugins are fine too
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        supported |= set(_tracking_store_registry._registry)
    except Exception:  # pragma: no cover - private API moved; the static list still applies
        pass
    base_scheme = scheme.split("+", 1)[0]  # postgresql+psycopg2://
    if base_scheme not in supported:
        raise ConfigError(
            key,
            f"unsupported URI scheme {scheme!r} in {uri!r}; use http(s)://host:port, sqlite:///file.db, "
            "postgresql://..., mysql://... or file:///dir",
        )
    return uri


def config_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a (nested) config dict into MLflow params: dotted keys, string values cut to MLflow's limit."""
    params = {}
    for key, value in flatten(dict(values)).items():
        text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        params[key] = text
    return params


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or name.startswith("/") or ".." in name:
        raise ValueError(
            f"invalid MLflow {what} name {name!r}: use letters, digits, '_', '-', '.', ' ', ':' and '/'"
        )
    return name


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_rejection(err: BaseException) -> bool:
    """True when MLflow answered and refused the request (bad value, unknown run), i.e. not an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and str(getattr(err, "error_code", "")) in _REJECTION_CODES


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class _QuietRetries(logging.Filter):
    """Drops urllib3's per-retry warnings while the tracker talks to MLflow (it reports outages itself)."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_QUIET_RETRIES = _QuietRetries()
logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)


class _Unreachable(Exception):
    """MLflow did not answer; ``delivered`` records at the front of the batch did get through."""

    def __init__(self, cause: BaseException, delivered: int):
        super().__init__(_short(cause))
        self.cause = cause
        self.delivered = delivered


# ----------------------------------------------------------------------------------------------- spool


class Spool:
    """The on-disk journal of records MLflow has not received yet (JSON lines, in logging order)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / SPOOL_NAME
        self.artifacts_dir = self.directory / SPOOL_ARTIFACTS_NAME

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        with open(self.path) as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # A crash mid-append leaves a torn last line; everything before it is intact.
                    logger.warning("MLflow spool %s line %d is damaged and was skipped", self.path, number)
        return records

    def append(self, records: Iterable[dict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()

    def rewrite(self, records: Sequence[dict]) -> None:
        """Replace the spool by ``records`` (atomically); remove it and unused artifact copies when empty."""
        if records:
            _atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in records))
            # stashed copies live in <artifacts_dir>/<uuid>/<name>; keep the folders still referenced
            keep = {Path(record["path"]).parts[1] for record in records
                    if record.get("kind") == "artifact" and record.get("stashed")}
            if self.artifacts_dir.is_dir():
                for entry in self.artifacts_dir.iterdir():
                    if entry.name not in keep:
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            return
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.artifacts_dir, ignore_errors=True)

    def stash_artifact(self, path: Path) -> str:
        """Copy ``path`` (file or folder) into the spool so later changes to the original do not matter.

        Returns the copy's path relative to the spool's directory (the folder may be moved before a replay).
        """
        relative = Path(SPOOL_ARTIFACTS_NAME) / uuid.uuid4().hex / path.name
        target = self.directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return str(relative)


# ----------------------------------------------------------------------------------------------- delivery


class _Delivery:
    """Sends spool records to one MLflow tracking URI, in order; used live and for replay."""

    def __init__(self, tracking_uri: str, run_map_path: Path | None, base_dir: Path):
        self.tracking_uri = tracking_uri
        self.run_map_path = run_map_path
        self.base_dir = base_dir  # relative (stashed) artifact paths are relative to this
        self.run_map: dict[str, str] = {}
        if run_map_path is not None and run_map_path.is_file():
            try:
                self.run_map = dict(json.loads(run_map_path.read_text()))
            except (OSError, ValueError):
                logger.warning("MLflow run map %s is unreadable; local run keys cannot be resolved", run_map_path)
        self._client = None
        self._experiment_ids: dict[str, str] = {}
        self.rejected: list[tuple[dict, str]] = []

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def resolve(self, key: str | None) -> str | None:
        if not key:
            return None
        if key in self.run_map:
            return self.run_map[key]
        return None if key.startswith(LOCAL_KEY_PREFIX) else key

    def _remember(self, key: str, run_id: str) -> None:
        self.run_map[key] = run_id
        if self.run_map_path is not None:
            # Written before anything else is sent for the run: a re-sent "run" record must not create
            # a second MLflow run.
            self.run_map_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.run_map_path, json.dumps(self.run_map, indent=1))

    def deliver(self, records: Sequence[dict]) -> int:
        """Send ``records`` in order; returns how many went through. Raises _Unreachable on an outage.

        A record MLflow refuses (e.g. a changed param) is set aside in ``self.rejected`` and counted as
        delivered, so one bad record cannot block the spool forever.
        """
        _QUIET_RETRIES.active.on = True
        try:
            return self._deliver(records)
        finally:
            _QUIET_RETRIES.active.on = False

    def _deliver(self, records: Sequence[dict]) -> int:
        done = 0
        while done < len(records):
            group = self._next_group(records, done)
            try:
                self._send_group(group)
            except Exception as err:  # noqa: BLE001 - classify every failure: refusal or outage
                if not _is_rejection(err):
                    raise _Unreachable(err, done) from err
                if len(group) == 1:
                    self.rejected.append((group[0], _short(err)))
                else:  # find the culprit record by record
                    for position, record in enumerate(group):
                        try:
                            self._send_group([record])
                        except Exception as single_err:  # noqa: BLE001
                            if not _is_rejection(single_err):
                                raise _Unreachable(single_err, done + position) from single_err
                            self.rejected.append((record, _short(single_err)))
            done += len(group)
        return done

    @staticmethod
    def _next_group(records: Sequence[dict], start: int) -> list[dict]:
        """Consecutive metrics/params/tags records of one run that fit into a single log_batch."""
        first = records[start]
        if first["kind"] not in ("metrics", "params", "tags"):
            return [first]
        group, n_metrics, n_params, n_tags = [], 0, 0, 0
        for record in records[start:]:
            if record["kind"] not in ("metrics", "params", "tags") or record["run"] != first["run"]:
                break
            size = len(record["values"])
            m = n_metrics + (size if record["kind"] == "metrics" else 0)
            p = n_params + (size if record["kind"] == "params" else 0)
            t = n_tags + (size if record["kind"] == "tags" else 0)
            if group and (m > MAX_METRICS_PER_BATCH or p > MAX_PARAMS_TAGS_PER_BATCH or t > MAX_PARAMS_TAGS_PER_BATCH):
                break
            group.append(record)
            n_metrics, n_params, n_tags = m, p, t
        return group

    def _run_id_for(self, record: dict) -> str:
        run_id = self.resolve(record["run"])
        if run_id is None:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

            raise MlflowException(f"no MLflow run for local key {record['run']}", RESOURCE_DOES_NOT_EXIST)
        return run_id

    def _send_group(self, group: list[dict]) -> None:
        kind = group[0]["kind"]
        if kind == "run":
            self._open_run(group[0])
        elif kind == "artifact":
            record = group[0]
            path = Path(record["path"])
            if not path.is_absolute():
                path = self.base_dir / path
            run_id = self._run_id_for(record)
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), record.get("artifact_path"))
            else:
                self.client.log_artifact(run_id, str(path), record.get("artifact_path"))
        elif kind == "end":
            record = group[0]
            self.client.set_terminated(self._run_id_for(record), record["status"], record["time"])
        else:
            self._log_batch(group)

    def _log_batch(self, group: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = [], [], []
        for record in group:
            if record["kind"] == "metrics":
                metrics += [Metric(k, float(v), record["time"], record["step"]) for k, v in record["values"].items()]
            elif record["kind"] == "params":
                params += [Param(k, str(v)) for k, v in record["values"].items()]
            else:
                tags += [RunTag(k, str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in record["values"].items()]
        self.client.log_batch(self._run_id_for(group[0]), metrics=metrics, params=params, tags=tags)

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            from mlflow.exceptions import MlflowException

            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiment_ids[name] = self.client.create_experiment(name)
                except MlflowException as err:  # created concurrently by another job
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise err
                    self._experiment_ids[name] = experiment.experiment_id
            else:
                self._experiment_ids[name] = experiment.experiment_id
        return self._experiment_ids[name]

    def _open_run(self, record: dict) -> None:
        """Create the run, or resume it (status back to RUNNING) when its id is known."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        key = record["run"]
        run_id = self.resolve(key)
        params = {k: str(v) for k, v in record.get("params", {}).items()}
        tags = {k: str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in record.get("tags", {}).items()}
        existing_params: dict[str, str] = {}
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as err:
                if not _is_rejection(err):
                    raise
                logger.warning("MLflow run %s to resume does not exist at %s; starting a new run",
                               run_id, self.tracking_uri)
                tags["resumed_from"] = run_id
                run_id = None
            else:
                existing_params = run.data.params
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
        if run_id is None:
            experiment_id = self._experiment_id(record["experiment"])
            run = self.client.create_run(
                experiment_id, start_time=record["time"], tags={}, run_name=record.get("run_name") or None
            )
            run_id = run.info.run_id
        if self.resolve(key) != run_id:
            self._remember(key, run_id)
        changed = {k: v for k, v in params.items() if k in existing_params and existing_params[k] != v}
        if changed:
            # MLflow forbids changing a param; keep the new values visible as one tag instead.
            logger.warning("resumed MLflow run %s with changed params: %s", run_id, ", ".join(sorted(changed)))
            tags["resume_changed_params"] = "; ".join(f"{k}={v}" for k, v in sorted(changed.items()))
        new_params = [Param(k, v) for k, v in params.items() if k not in existing_params]
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        for chunk_start in range(0, max(len(new_params), len(tag_items), 1), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = slice(chunk_start, chunk_start + MAX_PARAMS_TAGS_PER_BATCH)
            if new_params[chunk] or tag_items[chunk]:
                self.client.log_batch(run_id, params=new_params[chunk], tags=tag_items[chunk])


# ----------------------------------------------------------------------------------------------- tracker


class _SystemMetricsSampler:
    """MLflow's built-in system metric collectors (CPU, memory, disk, network, GPU) on a thread.

    Samples go into a queue that the tracker drains on the training thread, so they take the same
    spooled path as every other metric and survive an outage. Logged with the current training step.
    """

    def __init__(self, tracking_uri: str, sampling_interval_s: float = 10.0, samples_before_logging: int = 1):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        options = dict(run_id="unused", sampling_interval=sampling_interval_s,
                       samples_before_logging=samples_before_logging)
        try:  # its (unused) logger builds a client: point it at our URI, not a default ./mlflow.db
            self._monitor = SystemMetricsMonitor(**options, tracking_uri=tracking_uri)
        except TypeError:  # MLflow < 2.16 has no tracking_uri argument
            self._monitor = SystemMetricsMonitor(**options)
        self.samples: queue.SimpleQueue[dict[str, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="primaps-system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        monitor = self._monitor
        prefix = "system/" + (f"{monitor.node_id}/" if monitor.node_id else "")
        while not self._stop.is_set():
            try:
                for _ in range(int(monitor.samples_before_logging)):
                    monitor.collect_metrics()
                    if self._stop.wait(float(monitor.sampling_interval)):
                        return
                aggregated = monitor.aggregate_metrics()
                for collector in monitor.monitors:
                    collector.clear_metrics()
            except Exception as err:  # noqa: BLE001 - a broken collector must not touch training
                logger.warning("system metrics sampling stopped: %s", _short(err))
                return
            self.samples.put({prefix + k: float(v) for k, v in aggregated.items()})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Tracker:
    """MLflow tracking for one training run; a no-op unless ``is_main`` and ``cfg.enabled``.

    Args:
        cfg: the ``tracking`` section of the config.
        is_main: True on global rank 0 only.
        output_dir: the run's output directory (holds the spool and the run-key map).
        run_id: an MLflow run id (or a ``local-...`` key) from a checkpoint: :meth:`start` resumes that
            run instead of creating one (a torchrun elastic restart continues the same MLflow run).
        retry_initial_s / retry_max_s: backoff between delivery attempts while MLflow is unreachable.
        finish_timeout_s: how long :meth:`finish` keeps retrying an unreachable server.
        flush_interval_s: metrics are journaled to the spool at once and sent as one batch at most this
            often (0 = every call); run creation, params, tags, artifacts and the end are sent at once.
        system_metrics_interval_s: sampling interval of system metrics (when ``cfg.system_metrics``).

    Raises ConfigError (a UserError naming ``tracking.tracking_uri``) for a URI scheme MLflow cannot use.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        is_main: bool,
        output_dir: str | os.PathLike,
        run_id: str | None = None,
        retry_initial_s: float = 2.0,
        retry_max_s: float = 60.0,
        finish_timeout_s: float = 10.0,
        flush_interval_s: float = 2.0,
        system_metrics_interval_s: float = 10.0,
    ):
        self.cfg = cfg
        self.active = bool(cfg.enabled and is_main)
        self._requested_run_id = run_id or None
        self._key: str | None = None
        self._started = False
        self._finished = False
        self._last_step = 0
        self._sampler: _SystemMetricsSampler | None = None
        if not self.active:
            return
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.output_dir = Path(output_dir)
        self.spool = Spool(self.output_dir)
        self._delivery = _Delivery(self.tracking_uri, self.output_dir / RUN_MAP_NAME, self.output_dir)
        self._pending: list[dict] = []
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._retry_delay_s = retry_initial_s
        self._next_retry = 0.0
        self._unreachable = False
        self._last_flush = time.monotonic()
        self._flush_interval_s = flush_interval_s
        self._finish_timeout_s = finish_timeout_s
        self._system_metrics_interval_s = system_metrics_interval_s
        self._reported_rejections = 0
        self._reported_errors: set[type] = set()
        self.log_seconds = 0.0  # wall time spent inside tracker calls (overhead measurement)

    # ----------------------------------------------------------------------------------- state

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; a ``local-...`` key while the run could not be created yet. Store it in checkpoints."""
        if not self.active:
            return self._requested_run_id
        if self._key is None:
            return self._requested_run_id
        return self._delivery.resolve(self._key) or self._key

    @property
    def offline(self) -> bool:
        """True from a failed delivery until the next successful one (records wait in the spool)."""
        return self.active and self._unreachable

    @property
    def pending_records(self) -> int:
        return len(self._pending) if self.active else 0

    # ----------------------------------------------------------------------------------- public API

    def start(self, params: Mapping[str, Any] | None = None, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None) -> str | None:
        """Create the MLflow run (or resume ``run_id``), log ``params`` (flattened) and ``tags``.

        Returns :attr:`run_id`. Never raises for an unreachable server (warning + spool instead).
        """
        if not self.active:
            return self._requested_run_id
        if self._started:
            raise RuntimeError("Tracker.start() was already called")
        self._started = True
        begin = time.perf_counter()
        self._pending = self._guarded(self.spool.load) or []  # a previous process may have left records
        self._key = self._requested_run_id or f"{LOCAL_KEY_PREFIX}{uuid.uuid4().hex}"
        run_tags = {"primaps.output_dir": str(self.output_dir.resolve()), "primaps.host": socket.gethostname()}
        run_tags.update({k: str(v) for k, v in (tags or {}).items()})
        record = {
            "kind": "run",
            "run": self._key,
            "experiment": self.cfg.experiment,
            "run_name": run_name or self.cfg.run_name or None,
            "params": config_params(params or {}),
            "tags": run_tags,
            "time": _now_ms(),
            "uri": self.tracking_uri,
        }
        self._submit(record)
        if self.cfg.system_metrics:
            self._start_system_metrics()
        self.log_seconds += time.perf_counter() - begin
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``{name: number}`` at ``step`` as one batch (numbers, 0-dim tensors and numpy scalars)."""
        if not self.active:
            return
        begin = time.perf_counter()
        values = {_check_name(k, "metric"): float(v) for k, v in metrics.items()}
        self._last_step = int(step)
        records = self._system_metric_records()
        if values:
            records.append({"kind": "metrics", "run": self._key, "step": int(step), "time": _now_ms(),
                            "values": values})
        for record in records:
            self._submit(record)
        self.log_seconds += time.perf_counter() - begin

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = config_params(params)
        for name in values:
            _check_name(name, "param")
        for start in range(0, len(values), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = dict(itertools.islice(values.items(), start, start + MAX_PARAMS_TAGS_PER_BATCH))
            self._submit({"kind": "params", "run": self._key, "values": chunk})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {_check_name(k, "tag"): str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in tags.items()}
        if values:
            self._submit({"kind": "tags", "run": self._key, "values": values})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (its contents) under ``artifact_path`` of the run."""
        if not self.active:
            return
        begin = time.perf_counter()
        path = Path(path)
        if not path.exists():
            logger.warning("artifact %s does not exist; not logged", path)
            return
        self._submit({"kind": "artifact", "run": self._key, "path": str(path.resolve()),
                      "artifact_path": artifact_path})
        self.log_seconds += time.perf_counter() - begin

    def log_figure(self, figure: Any, artifact_file: str) -> Path | None:
        """Save a matplotlib figure to ``<output_dir>/figures/<artifact_file>`` and log it."""
        if not self.active:
            return None
        target = self.output_dir / FIGURES_DIR_NAME / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target)
        self.log_artifact(target, str(Path(artifact_file).parent) if Path(artifact_file).parent.parts else None)
        return target

    def log_image(self, image: Any, artifact_file: str) -> Path | None:
        """Save a uint8 ``[H, W, 3]`` (or ``[H, W]``) array as ``<output_dir>/figures/<artifact_file>`` and log it."""
        if not self.active:
            return None
        import numpy as np
        from PIL import Image

        target = self.output_dir / FIGURES_DIR_NAME / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(target)
        self.log_artifact(target, str(Path(artifact_file).parent) if Path(artifact_file).parent.parts else None)
        return target

    def flush(self) -> bool:
        """Try to deliver the spool now (ignoring the backoff). True when nothing is pending."""
        if not self.active:
            return True
        self._guarded(self._drain)
        return not self._pending

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run with ``status`` (FINISHED, FAILED or KILLED) and deliver everything pending.

        Retries an unreachable server for up to ``finish_timeout_s``; what still cannot be sent stays in
        the spool (a warning names the replay command). Returns True when everything was delivered.
        """
        if status not in _RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(_RUN_STATUSES)}, got {status!r}")
        if not self.active or not self._started or self._finished:
            return True
        self._finished = True
        if self._sampler is not None:
            self._sampler.stop()
        for record in self._system_metric_records():
            self._submit(record)
        self._submit({"kind": "end", "run": self._key, "status": status, "time": _now_ms()})
        deadline = time.monotonic() + self._finish_timeout_s
        while self._pending:
            self._guarded(self._drain)
            if not self._pending or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._pending:
            logger.warning(
                "MLflow at %s is unreachable: %d records stay in %s; send them later with: "
                "python -m primaps_dist.tracking replay %s --uri %s",
                self.tracking_uri, len(self._pending), self.spool.path, self.output_dir, self.tracking_uri,
            )
            return False
        return True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # ----------------------------------------------------------------------------------- internals

    def _start_system_metrics(self) -> None:
        try:
            import psutil  # noqa: F401 - MLflow's collectors need it

            self._sampler = _SystemMetricsSampler(self.tracking_uri, self._system_metrics_interval_s)
        except Exception as err:  # noqa: BLE001 - optional feature
            logger.warning("system metrics disabled: %s", _short(err))

    def _system_metric_records(self) -> list[dict]:
        records = []
        if self._sampler is not None:
            while True:
                try:
                    values = self._sampler.samples.get_nowait()
                except queue.Empty:
                    break
                if values:
                    records.append({"kind": "metrics", "run": self._key, "step": self._last_step,
                                    "time": _now_ms(), "values": values})
        return records

    def _submit(self, record: dict) -> None:
        """Journal ``record`` in the spool, then deliver the spool if it is due."""
        if record["kind"] == "artifact" and self._unreachable:  # copy now: the file may change before a retry
            record = self._guarded(lambda: dict(record, path=self.spool.stash_artifact(Path(record["path"])),
                                                stashed=True)) or record
        self._pending.append(record)  # in memory first: a spool that cannot be written must not block delivery
        self._guarded(lambda: self.spool.append([record]))
        if self._due(record):
            self._guarded(self._drain)

    def _guarded(self, action):
        """Run ``action``; report an unexpected error once per kind (e.g. a full disk), never raise."""
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if type(err) not in self._reported_errors:
                self._reported_errors.add(type(err))
                logger.warning("MLflow tracking error (training continues): %s", _short(err))
            return None

    def _due(self, record: dict) -> bool:
        now = time.monotonic()
        if self._unreachable:
            return now >= self._next_retry
        return (record["kind"] != "metrics" or now - self._last_flush >= self._flush_interval_s
                or len(self._pending) >= MAX_METRICS_PER_BATCH)

    def _drain(self) -> None:
        """Send every pending record; on an outage keep the rest in the spool and schedule a retry."""
        if not self._pending:
            return
        self._last_flush = time.monotonic()
        try:
            delivered = self._delivery.deliver(self._pending)
        except _Unreachable as err:
            self._pending = self._pending[err.delivered:]
            # Artifacts may change or vanish before the server is back: keep copies of the waiting ones.
            self._pending = [
                dict(r, path=self.spool.stash_artifact(Path(r["path"])), stashed=True)
                if r["kind"] == "artifact" and not r.get("stashed") and Path(r["path"]).exists() else r
                for r in self._pending
            ]
            self.spool.rewrite(self._pending)
            if not self._unreachable:
                self._unreachable = True
                self._retry_delay_s = self._retry_initial_s
                logger.warning(
                    "MLflow at %s is unreachable (%s); training continues, records are kept in %s and sent "
                    "when it is back", self.tracking_uri, _short(err.cause, 160), self.spool.path,
                )
            else:
                self._retry_delay_s = min(self._retry_delay_s * 2, self._retry_max_s)
            self._next_retry = time.monotonic() + self._retry_delay_s
            return
        self._pending = []
        self.spool.rewrite([])
        self._report_rejections()
        if self._unreachable:
            logger.warning("MLflow at %s is reachable again; sent %d spooled records", self.tracking_uri, delivered)
        self._unreachable = False
        self._retry_delay_s = self._retry_initial_s

    def _report_rejections(self) -> None:
        rejected = self._delivery.rejected
        if len(rejected) > self._reported_rejections:
            path = self.output_dir / "mlflow_rejected.jsonl"
            with open(path, "a") as handle:
                for record, reason in rejected[self._reported_rejections:]:
                    handle.write(json.dumps({"record": record, "reason": reason}) + "\n")
            if self._reported_rejections == 0:
                logger.warning("MLflow refused a record (%s); refused records are kept in %s",
                               rejected[0][1], path)
            self._reported_rejections = len(rejected)


# ----------------------------------------------------------------------------------------------- replay


def replay_spool(path: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, str]:
    """Send a spool left behind by an unreachable server; returns ``{run key: MLflow run id}``.

    ``path`` is the run's output directory or its ``mlflow_spool.jsonl``. ``tracking_uri`` defaults to
    the URI recorded in the spool. Delivered records are removed from the spool (and the file when all
    went through); re-running after a partial failure does not duplicate runs. Raises UserError when
    the spool is missing or MLflow is still unreachable.
    """
    path = Path(path)
    spool_path = path / SPOOL_NAME if path.is_dir() else path
    if not spool_path.is_file():
        raise UserError(f"no MLflow spool at {spool_path}")
    spool = Spool(spool_path.parent)
    spool.path = spool_path
    records = spool.load()
    uri = tracking_uri or next((r.get("uri") for r in records if r.get("kind") == "run" and r.get("uri")), None)
    if not uri:
        raise UserError(f"{spool_path}: no tracking URI recorded; pass --uri")
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = resolve_tracking_uri(uri)
    delivery = _Delivery(uri, spool_path.parent / RUN_MAP_NAME, spool_path.parent)
    try:
        delivery.deliver(records)
    except _Unreachable as err:
        spool.rewrite(records[err.delivered:])
        raise UserError(
            f"MLflow at {uri} is unreachable ({_short(err.cause, 120)}); "
            f"{len(records) - err.delivered} records stay in {spool_path}"
        ) from None
    spool.rewrite([])
    for record, reason in delivery.rejected:
        logger.warning("MLflow refused a %s record: %s", record.get("kind"), reason)
    keys = {r["run"] for r in records if "run" in r}
    return {key: delivery.resolve(key) for key in keys if delivery.resolve(key)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m primaps_dist.tracking", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send an MLflow spool left by an unreachable server")
    replay.add_argument("path", help="run output directory or its mlflow_spool.jsonl")
    replay.add_argument("--uri", default=None, help="tracking URI (default: the one recorded in the spool)")
    replay.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    runs = replay_spool(args.path, args.uri)
    for key, run_id in sorted(runs.items()):
        print(f"{key} -> MLflow run {run_id}" if key != run_id else f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
