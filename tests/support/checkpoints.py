"""Reading a run's checkpoints the way a user would (folders with a COMPLETE marker, ``weights_only=True``),
without the package's own reader, and comparing two payloads exactly.

Layout under ``<train.output_dir>/checkpoints``: ``step_000000120/{checkpoint.pt, COMPLETE}`` and a
``latest`` pointer (``latest.txt`` where symlinks fail).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(output_dir: str | os.PathLike) -> dict[int, Path]:
    """``{step: folder}`` of every checkpoint folder of the run in ``output_dir`` with a ``COMPLETE`` marker."""
    found = {}
    folder = Path(output_dir) / "checkpoints"
    if folder.is_dir():
        for entry in folder.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / "COMPLETE").is_file():
                found[int(match.group(1))] = entry
    return found


def complete_steps(output_dir: str | os.PathLike) -> list[int]:
    """Sorted steps of the complete checkpoints."""
    return sorted(complete_checkpoints(output_dir))


def read_payload(folder: str | os.PathLike) -> dict:
    """The payload in one checkpoint folder, loaded the safe way."""
    path = Path(folder) / "checkpoint.pt"
    assert path.is_file(), f"no checkpoint.pt in {folder}: {sorted(p.name for p in Path(folder).iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_payload(output_dir: str | os.PathLike) -> dict:
    """The payload of the newest complete checkpoint of the run in ``output_dir``."""
    found = complete_checkpoints(output_dir)
    assert found, f"no complete checkpoint under {Path(output_dir) / 'checkpoints'}"
    return read_payload(found[max(found)])


def final_payload(output_dir: str | os.PathLike, expected_step: int) -> dict:
    """:func:`newest_payload`, which must be at ``expected_step`` with the ``latest`` pointer in place."""
    found = complete_checkpoints(output_dir)
    assert found, f"no complete checkpoint under {Path(output_dir) / 'checkpoints'}"
    step = max(found)
    assert step == expected_step, f"newest complete checkpoint is step {step}, expected {expected_step}"
    pointer = Path(output_dir) / "checkpoints"
    assert (pointer / "latest").exists() or (pointer / "latest.txt").exists(), "checkpoints/latest pointer missing"
    payload = read_payload(found[step])
    assert int(payload["step"]) == expected_step
    return payload


def payload_differences(expected: Any, actual: Any, ignore: frozenset[str] | set[str] = frozenset(),
                        path: str = "") -> list[str]:
    """Every dotted key path where ``actual`` differs from ``expected``; ``[]`` means identical.

    Tensors must agree in dtype, shape and every bit (NaN equals NaN with the same bits, -0.0 differs from
    0.0); mappings in their keys; sequences in their length. Paths in ``ignore`` are skipped.
    """
    if path in ignore:
        return []
    where = path or "<payload>"
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return [f"{where}: {type(expected).__name__} vs {type(actual).__name__}"]
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [f"{where}: {expected.dtype}{list(expected.shape)} vs {actual.dtype}{list(actual.shape)}"]
        if _bits(expected).equal(_bits(actual)):
            return []
        gap = (expected.double() - actual.double()).abs().nan_to_num(float("inf")).max().item()
        return [f"{where}: tensors differ (max |difference| {gap:.3g})"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = [f"{where}: key {key!r} only in {'expected' if key in expected else 'actual'}"
                    for key in sorted(set(expected) ^ set(actual), key=str)]
        for key in expected:
            if key in actual:
                inner = f"{path}.{key}" if path else str(key)
                problems += payload_differences(expected[key], actual[key], ignore, inner)
        return problems
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where}: length {len(expected)} vs {len(actual)}"]
        problems = []
        for index, (left, right) in enumerate(zip(expected, actual)):
            problems += payload_differences(left, right, ignore, f"{path}[{index}]")
        return problems
    if isinstance(expected, float) and isinstance(actual, float) and math.isnan(expected) and math.isnan(actual):
        return []
    if type(expected) is not type(actual) or expected != actual:
        return [f"{where}: {expected!r} vs {actual!r}"[:300]]
    return []


def count_tensors(value: Any) -> int:
    """Tensors anywhere in a payload (nested mappings and sequences)."""
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(count_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(count_tensors(item) for item in value)
    return 0


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, flat: equal bits means equal values, NaN payloads and signed zeros included."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
