"""The on-disk journal (the "spool") of records that MLflow has not received yet.

Every record is appended here on the training thread before anything is sent, so a crash, an outage or
a slow server loses nothing. Files in the run's output directory:

- ``mlflow_spool.jsonl``: one JSON record per line, in logging order (absent when all is delivered).
- ``mlflow_spool_artifacts/<uuid>/<name>``: copies of artifacts logged while MLflow was unreachable
  (the originals may change before they can be sent).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from primaps_dist.tracking.common import SPOOL_ARTIFACTS_NAME, SPOOL_NAME, atomic_write_text, logger


class Spool:
    """The journal of one output directory (JSON lines, in logging order)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / SPOOL_NAME
        self.artifacts_dir = self.directory / SPOOL_ARTIFACTS_NAME

    def load(self) -> list[dict]:
        """The records in the journal; a damaged line (torn by a crash mid-append) is skipped with a warning."""
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
        """Replace the journal by ``records`` (atomically); remove it and unused artifact copies when empty."""
        if records:
            atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in records))
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
        """Copy ``path`` (file or folder) into the journal so later changes to the original do not matter.

        Returns the copy's path relative to the journal's directory (the folder may be moved before a replay).
        """
        relative = Path(SPOOL_ARTIFACTS_NAME) / uuid.uuid4().hex / path.name
        target = self.directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return str(relative)

    def stashed(self, record: dict) -> dict:
        """``record`` with its artifact copied into the journal (other records are returned as they are)."""
        if record["kind"] != "artifact" or record.get("stashed") or not Path(record["path"]).exists():
            return record
        return dict(record, path=self.stash_artifact(Path(record["path"])), stashed=True)
