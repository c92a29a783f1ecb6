"""What every part of the tracking package shares: file names, MLflow's limits, the tracking URI, names.

Also the small helpers that classify MLflow errors and shorten them for a one-line warning, and
:class:`ErrorReporter`, which makes sure a tracking failure is reported once and never reaches training.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from primaps_dist.config import flatten
from primaps_dist.errors import ConfigError

# One logger for the whole package: users (and tests) filter on this name.
logger = logging.getLogger("primaps_dist.tracking")

SPOOL_NAME = "mlflow_spool.jsonl"
SPOOL_ARTIFACTS_NAME = "mlflow_spool_artifacts"
RUN_MAP_NAME = "mlflow_runs.json"
REJECTED_NAME = "mlflow_rejected.jsonl"
LOCAL_KEY_PREFIX = "local-"

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

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

_KNOWN_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")
_NAME_PATTERN = re.compile(r"^[/\w.\- :]+$")
# Error codes meaning "MLflow answered and refused this record": retrying cannot help.
_REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE"}

T = TypeVar("T")


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


def use_short_http_timeouts() -> None:
    """Set MLflow's HTTP retry/timeout variables to :data:`HTTP_ENV_DEFAULTS` unless the user set them."""
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def config_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a (nested) config dict into MLflow params: dotted keys, string values cut to MLflow's limit."""
    params = {}
    for key, value in flatten(dict(values)).items():
        text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        params[key] = text
    return params


def check_name(name: str, what: str) -> str:
    """Return ``name`` if MLflow accepts it as a metric/param/tag name; raise ValueError otherwise."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or name.startswith("/") or ".." in name:
        raise ValueError(
            f"invalid MLflow {what} name {name!r}: use letters, digits, '_', '-', '.', ' ', ':' and '/'"
        )
    return name


def now_ms() -> int:
    return int(time.time() * 1000)


def is_rejection(err: BaseException) -> bool:
    """True when MLflow answered and refused the request (bad value, unknown run), i.e. not an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and str(getattr(err, "error_code", "")) in _REJECTION_CODES


def short(err: BaseException, limit: int = 200) -> str:
    """``err`` as one line of at most ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ErrorReporter:
    """Runs tracking actions so that they never raise: each unexpected kind of error is logged once.

    Shared by the training thread and the delivery thread (e.g. a full disk is reported once in all).
    """

    def __init__(self) -> None:
        self._reported: set[type] = set()
        self._lock = threading.Lock()

    def run(self, action: Callable[[], T]) -> T | None:
        """``action()``, or None after reporting its error (tracking must never stop training)."""
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            with self._lock:
                first = type(err) not in self._reported
                self._reported.add(type(err))
            if first:
                logger.warning("MLflow tracking error (training continues): %s", short(err))
            return None
