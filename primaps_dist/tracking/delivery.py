"""Sending journal records to one MLflow tracking URI, in order (used live and by the replay command).

Consecutive metrics/params/tags of one run travel as one ``log_batch``; run creation, artifacts and the
final status one by one. A record MLflow refuses (e.g. a changed param) is set aside so it cannot block the
journal; anything else that fails is an outage (:class:`Unreachable`), and the caller keeps the rest.

Resending is idempotent: MLflow stores a metric (key, step, timestamp, value) once, identical params are
accepted again, artifacts overwrite themselves, run creation is recorded in ``mlflow_runs.json``
(``{local run key: MLflow run id}``) before anything else is sent for the run, and a model version is tagged with
its run and record id and not created again when a version with these tags exists (a registration whose answer
was lost in an outage is resent).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Sequence

from primaps_dist.tracking.common import (
    LOCAL_KEY_PREFIX,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    atomic_write_text,
    is_rejection,
    logger,
    short,
)


REGISTER_RUN_TAG = "primaps.run_id"
REGISTER_RECORD_TAG = "primaps.register_record"


class _QuietRetries(logging.Filter):
    """Drops urllib3's per-retry warnings while a delivery talks to MLflow (outages are reported once, here)."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_QUIET_RETRIES = _QuietRetries()
logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)


class Unreachable(Exception):
    """MLflow did not answer; ``delivered`` records at the front of the batch did get through."""

    def __init__(self, cause: BaseException, delivered: int):
        super().__init__(short(cause))
        self.cause = cause
        self.delivered = delivered


class Delivery:
    """Sends records to ``tracking_uri`` in order and keeps the ``{local run key: MLflow run id}`` map.

    ``run_map_path`` (None: in memory only) persists the map; ``base_dir`` resolves the relative paths of
    artifacts copied into the journal.
    """

    def __init__(self, tracking_uri: str, run_map_path: Path | None, base_dir: Path):
        self.tracking_uri = tracking_uri
        self.run_map_path = run_map_path
        self.base_dir = base_dir
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
        """The MLflow run id of a run key (None for a local key whose run was not created yet)."""
        if not key:
            return None
        if key in self.run_map:
            return self.run_map[key]
        return None if key.startswith(LOCAL_KEY_PREFIX) else key

    def deliver(self, records: Sequence[dict]) -> int:
        """Send ``records`` in order; returns how many went through. Raises Unreachable on an outage.

        A record MLflow refuses is appended to ``self.rejected`` and counted as delivered.
        """
        _QUIET_RETRIES.active.on = True
        try:
            return self._deliver(records)
        finally:
            _QUIET_RETRIES.active.on = False

    def _remember(self, key: str, run_id: str) -> None:
        self.run_map = {**self.run_map, key: run_id}  # a new dict: other threads read the map
        if self.run_map_path is not None:
            # Written before anything else is sent for the run: a re-sent "run" record must not create
            # a second MLflow run.
            self.run_map_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_map_path, json.dumps(self.run_map, indent=1))

    def _deliver(self, records: Sequence[dict]) -> int:
        done = 0
        while done < len(records):
            group = self._next_group(records, done)
            try:
                self._send_group(group)
            except Exception as err:  # noqa: BLE001 - classify every failure: refusal or outage
                if not is_rejection(err):
                    raise Unreachable(err, done) from err
                if len(group) == 1:
                    self.rejected.append((group[0], short(err)))
                else:  # find the culprit record by record
                    for position, record in enumerate(group):
                        try:
                            self._send_group([record])
                        except Exception as single_err:  # noqa: BLE001
                            if not is_rejection(single_err):
                                raise Unreachable(single_err, done + position) from single_err
                            self.rejected.append((record, short(single_err)))
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
        elif kind == "register_model":
            self._register_model(group[0])
        elif kind == "end":
            record = group[0]
            self.client.set_terminated(self._run_id_for(record), record["status"], record["time"])
        else:
            self._log_batch(group)

    def _register_model(self, record: dict) -> None:
        """A new version of registered model ``name`` from the run's ``artifact_path`` (the model created first),
        unless this record already created one (see the module docstring)."""
        from mlflow.exceptions import MlflowException

        run_id = self._run_id_for(record)
        try:
            self.client.create_registered_model(record["name"])
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{record['artifact_path']}"
        # A record from a journal written before records had ids is matched by run and source.
        tags = {REGISTER_RUN_TAG: run_id, REGISTER_RECORD_TAG: record.get("record_id") or f"{run_id}/{source}"}
        name = record["name"].replace("'", "\\'")
        for version in self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if version.tags.get(REGISTER_RECORD_TAG) == tags[REGISTER_RECORD_TAG] or (
                    "record_id" not in record and version.source == source):
                logger.info("model %s version %s already registered from run %s; not registered again",
                            record["name"], version.version, run_id)
                return
        self.client.create_model_version(record["name"], source, run_id=run_id, tags=tags)

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
                if not is_rejection(err):
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
