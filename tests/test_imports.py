"""Module structure: threshold.py <- distributed.py <- magnitude.py, with no import cycle."""

from __future__ import annotations

import ast
import pathlib

import gmt_kernels
from gmt_kernels import magnitude, threshold

PACKAGE = pathlib.Path(gmt_kernels.__file__).parent


def _imported_modules(path: pathlib.Path, skip_function: str = "") -> set:
    """gmt_kernels modules a file imports anywhere (top level or inside functions), except in
    the function named skip_function."""
    found = set()
    tree = ast.parse(path.read_text())
    skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == skip_function
               for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
    return found


def test_threshold_does_not_import_distributed_or_magnitude():
    """distributed.py builds on threshold.py, so threshold.py must not reach back (the old cycle:
    magnitude_threshold in threshold.py imported distributed.py). Only the compatibility
    __getattr__ for the old import path may name magnitude.py, lazily."""
    assert "threshold" in _imported_modules(PACKAGE / "distributed.py")
    assert not {"distributed", "magnitude"} & _imported_modules(PACKAGE / "threshold.py", "__getattr__")


def test_old_and_new_import_paths():
    from gmt_kernels.threshold import magnitude_threshold as old_path

    assert old_path is gmt_kernels.magnitude_threshold is magnitude.magnitude_threshold
    assert threshold.magnitude_threshold is old_path
