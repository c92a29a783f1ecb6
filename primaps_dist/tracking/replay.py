"""The replay command: send a journal left behind when MLflow was unreachable until the run ended.

    python -m primaps_dist.tracking replay <output_dir or mlflow_spool.jsonl> [--uri http://host:5000]

Delivered records leave the journal; re-running after a partial failure does not duplicate runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from primaps_dist.errors import UserError
from primaps_dist.tracking.common import (
    RUN_MAP_NAME,
    SPOOL_NAME,
    logger,
    resolve_tracking_uri,
    short,
    use_short_http_timeouts,
)
from primaps_dist.tracking.delivery import Delivery, Unreachable
from primaps_dist.tracking.journal import Spool


def replay_spool(path: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, str]:
    """Send a journal left behind by an unreachable server; returns ``{run key: MLflow run id}``.

    ``path`` is the run's output directory or its ``mlflow_spool.jsonl``. ``tracking_uri`` defaults to
    the URI recorded in the journal. Delivered records are removed from the journal (and the file when all
    went through). Raises UserError when the journal is missing or MLflow is still unreachable.
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
    use_short_http_timeouts()
    uri = resolve_tracking_uri(uri)
    delivery = Delivery(uri, spool_path.parent / RUN_MAP_NAME, spool_path.parent)
    try:
        delivery.deliver(records)
    except Unreachable as err:
        spool.rewrite(records[err.delivered:])
        raise UserError(
            f"MLflow at {uri} is unreachable ({short(err.cause, 120)}); "
            f"{len(records) - err.delivered} records stay in {spool_path}"
        ) from None
    spool.rewrite([])
    for record, reason in delivery.rejected:
        logger.warning("MLflow refused a %s record: %s", record.get("kind"), reason)
    keys = {r["run"] for r in records if "run" in r}
    return {key: delivery.resolve(key) for key in keys if delivery.resolve(key)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m primaps_dist.tracking replay PATH [--uri URI]``: prints one line per delivered run."""
    parser = argparse.ArgumentParser(prog="python -m primaps_dist.tracking",
                                     description="MLflow tracking tools for primaps-dist runs")
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
