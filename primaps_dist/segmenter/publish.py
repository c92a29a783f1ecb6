"""The end-of-training step that logs the segmenter as an MLflow model (rank 0; called by ``train``).

It never stalls or fails a run: the model folder is written locally (``<output_dir>/segmenter_export`` and
``<output_dir>/mlflow_model``) and handed to the tracker as an ordinary artifact under ``segmenter``, so the
tracker's journal delivers it in the background and keeps it across a server outage (``python -m
primaps_dist.tracking replay`` sends what is left). If writing the folder fails, one warning line says why and
training ends with its usual status. ``tracking.log_model=false`` skips the step (and its few seconds, mostly
``torch.export``).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from primaps_dist.segmenter.core import Segmenter
from primaps_dist.segmenter.export import write_export
from primaps_dist.segmenter.mlflow_model import ARTIFACT_PATH, save_mlflow_model

log = logging.getLogger("primaps_dist.train")

EXPORT_DIR = "segmenter_export"
MODEL_DIR = "mlflow_model"


def log_segmenter_model(tracker: Any, cfg: Any, backbone: torch.nn.Module, prototypes: torch.Tensor, out_dir: Path,
                        *, step: int | None = None, assignment: Sequence[int] | None = None, class_names: Sequence[str] | None = None) -> bool:
    """Write the export and the MLflow model folder under ``out_dir`` and log it (register it when
    ``tracking.register_model`` is set). Returns True when the model was handed to the tracker; False when the
    tracker is off, ``tracking.log_model`` is false, or writing failed (one warning)."""
    if not getattr(tracker, "active", False) or not cfg.tracking.log_model:
        return False
    seconds: dict[str, float] = {}
    try:
        begin = time.perf_counter()
        cpu_backbone = copy.deepcopy(backbone).to("cpu")  # the export runs on CPU; the run's backbone stays put
        segmenter = Segmenter.from_parts(cfg, cpu_backbone, prototypes.detach().cpu(), device="cpu")
        segmenter.config.update(step=step, source=str(out_dir))
        if assignment is not None:
            segmenter.set_assignment(assignment, class_names)
        seconds["copy"], begin = time.perf_counter() - begin, time.perf_counter()
        export = write_export(segmenter, _fresh(out_dir / EXPORT_DIR))
        seconds["export"], begin = time.perf_counter() - begin, time.perf_counter()
        model = save_mlflow_model(export, out_dir / MODEL_DIR, cfg.data.crop_size)
        seconds["mlflow_folder"] = time.perf_counter() - begin
    except Exception as err:  # noqa: BLE001 - an optional end-of-run step must not fail a finished run
        log.warning("segmenter model not logged to MLflow: %s: %s", type(err).__name__, str(err).splitlines()[0][:200])
        return False
    tracker.log_artifact(model, ARTIFACT_PATH)
    if cfg.tracking.register_model:
        tracker.register_model(cfg.tracking.register_model, ARTIFACT_PATH)
    log.info("segmenter model written to %s and logged under the run's '%s' artifacts%s (%s)", model, ARTIFACT_PATH,
             f" (registered as {cfg.tracking.register_model!r})" if cfg.tracking.register_model else "",
             " ".join(f"{name}={value:.1f}s" for name, value in seconds.items()))
    return True


def _fresh(folder: Path) -> Path:
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    return folder
