"""Module structure: threshold.py <- distributed.py <- magnitude.py, with no import cycle."""

from __future__ import annotations

import ast
import pathlib

import gmt_kernels
from gmt_kernels import magnitude

PACKAGE = pathlib.Path(gmt_kernels.__file__).parent


def _imported_modules(path: pathlib.Path) -> set:
    """gmt_kernels modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
    return found


def test_threshold_does_not_import_distributed_or_magnitude():
    """distributed.py builds on threshold.py, so threshold.py must not reach back (the old cycle:
    magnitude_threshold in threshold.py imported distributed.py)."""
    assert "threshold" in _imported_modules(PACKAGE / "distributed.py")
    assert not {"distributed", "magnitude"} & _imported_modules(PACKAGE / "threshold.py")
    assert gmt_kernels.magnitude_threshold is magnitude.magnitude_threshold
