"""Who may import whom between the package, its shared reference data, the tests and the benchmarks.

- ``primaps_dist.testing`` (reference data shared by tests and benchmarks) is never imported by the package
  itself: it is not part of a training run.
- Tests never load a file from ``bench/`` and benchmarks never put ``tests/`` on their path: what both need
  lives in ``primaps_dist.testing``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


from support.env import REPO


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_package_never_imports_its_testing_data():
    offenders = []
    for path in sorted((REPO / "primaps_dist").rglob("*.py")):
        if "testing" in path.relative_to(REPO / "primaps_dist").parts:
            continue
        if any(name == "primaps_dist.testing" or name.startswith("primaps_dist.testing.")
               for name in _imported_modules(path)):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_tests_never_load_benchmark_files():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        loads_by_path = "spec_from_file_location" in text and "bench" in text
        imports = any(name == "bench" or name.startswith(("bench.", "bench_")) for name in _imported_modules(path))
        if loads_by_path or imports:
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_benchmarks_never_import_from_tests():
    offenders = []
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text()
        if re.search(r"""ROOT\s*/\s*["']tests["']|["']tests["']\s*\)""", text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
