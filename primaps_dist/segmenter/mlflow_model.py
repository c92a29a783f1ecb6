"""The segmenter as an MLflow pyfunc model: an export folder plus a model-from-code file that needs no primaps_dist.

    mlflow models serve -m runs:/<run id>/segmenter --env-manager local --port 5001
    curl -d '{"inputs": [[[[0, 0, 0], ...]]]}' -H 'Content-Type: application/json' 127.0.0.1:5001/invocations

Input: a ``uint8 [B, H, W, 3]`` tensor (RGB images of one size); output: ``int64 [B, H, W]`` ids (class ids when the
export carries a Hungarian assignment, else cluster ids). The model is the export's window program with the
sliding window of ``segment.py``; the CRF is not applied (see :mod:`primaps_dist.segmenter.export`).

At the end of training rank 0 writes the model folder locally (``<output_dir>/mlflow_model``, no server needed)
and hands it to the tracker like any artifact (artifact path ``segmenter``): the journal delivers it in the
background, so a dead server neither stalls nor fails the run; ``tracking.register_model`` adds a registration
record after it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from primaps_dist.errors import UserError
from primaps_dist.segmenter.export import EXPORT_FILES

ARTIFACT_PATH = "segmenter"
EXPORT_ARTIFACT = "export"
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
# What pyfunc_code.py and the export's segment.py import (PIL only in segment.py's command line).
PYFUNC_PACKAGES = ("mlflow", "numpy", "torch")


def pip_requirements() -> list[str]:
    """``package==version`` of the installed packages the pyfunc needs, without local labels (``+cu130``) so
    that pip can install them from PyPI. Given explicitly, MLflow infers nothing."""
    pinned = []
    for package in PYFUNC_PACKAGES:
        try:
            pinned.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(package)
    return pinned


@contextlib.contextmanager
def _without_environment_scan():
    """MLflow compares given requirements with the environment by mapping every installed package to its modules
    (~3 s on a large environment, once per process). Our requirements are the installed versions, so that check
    can only agree; it is switched off for this save only (if MLflow moved the function, it simply runs)."""
    try:
        import mlflow.utils.environment as environment
    except ImportError:
        yield
        return
    original = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if original is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = original


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]))


def save_mlflow_model(export_dir: str | os.PathLike, path: str | os.PathLike, crop_size: int) -> Path:
    """Write an MLflow pyfunc model folder at ``path`` (replaced if present) around ``export_dir``."""
    import mlflow

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    example = np.zeros((1, crop_size, crop_size, 3), dtype=np.uint8)
    with _without_environment_scan():
        mlflow.pyfunc.save_model(
            str(path), python_model=str(CODE_FILE), artifacts={EXPORT_ARTIFACT: str(export_dir)},
            signature=signature(), input_example=example, pip_requirements=pip_requirements(),
        )
    return path


def export_folder_of(uri: str) -> Path:
    """The export folder inside an MLflow model (``runs:/...``, ``models:/...`` or a local model folder)."""
    local = Path(uri)
    if not local.is_dir():
        try:
            import mlflow

            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="primaps-mlflow-")))
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad URI or server
            raise UserError(f"{uri}: cannot download the MLflow model ({str(err).splitlines()[0][:160]})") from None
    candidates = [p.parent for p in local.rglob("config.json") if all((p.parent / n).is_file() for n in EXPORT_FILES)]
    if not candidates:
        raise UserError(f"{uri}: no primaps-dist export folder inside this MLflow model")
    return candidates[0]
