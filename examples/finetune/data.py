"""Code-search pairs from the Python standard library: (docstring -> function source without it).

Every function and method of the running interpreter's stdlib with a docstring of at least 5 words
and a body of at least 3 non-blank lines once the docstring is removed gives one pair (decorators
kept, nested functions and methods included, duplicate code dropped). Tests (test/ and tests/
folders, test_*.py), idlelib, site-packages, turtledemo (demo scripts) and __main__.py files are
skipped. Pairs are split by a stable hash of their module's dotted
name, so no test module is ever seen in training. Deterministic for a given interpreter: the files
are walked in sorted order and the hash is SHA-1, not Python's salted hash().
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

MIN_DOC_WORDS = 5
MIN_CODE_LINES = 3
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
# Hash buckets (of 1000) per split, chosen to give about 3,600 / 235 / 500 pairs: 3,589 / 252 / 507
# on CPython 3.11.7 (other versions ship other stdlibs and give somewhat other counts).
SPLIT_BUCKETS = {"test": range(0, 80), "val": range(80, 153), "train": range(153, 1000)}


@dataclass(frozen=True)
class Pair:
    module: str  # dotted module name, e.g. "email.message"
    name: str  # qualified name inside the module, e.g. "Message.get_payload"
    query: str  # the docstring (cleaned as inspect.cleandoc does)
    code: str  # the function's source, dedented, without its docstring


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _skipped(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p in SKIP_DIRS for p in parts[:-1]) or parts[-1].startswith("test_") or parts[-1] == "__main__.py"


def module_files(root: Optional[Path] = None) -> list[Path]:
    root = root or stdlib_dir()
    return [p for p in sorted(root.rglob("*.py")) if not _skipped(p, root)]


def pairs_from_source(source: str, module: str) -> list[Pair]:
    """Every (docstring, code) pair of one module's source that passes the size filters."""
    tree = ast.parse(source)
    lines = source.splitlines()
    pairs = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    pair = _pair(child, lines, module, qual)
                    if pair is not None:
                        pairs.append(pair)
                visit(child, qual + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return pairs


def _pair(fn, lines, module, qual) -> Optional[Pair]:
    doc = ast.get_docstring(fn)
    if doc is None or len(doc.split()) < MIN_DOC_WORDS:
        return None
    doc_node = fn.body[0]
    if doc_node.lineno == fn.lineno:  # "def f(): '''doc'''" on one line: nothing left to pair
        return None
    start = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
    kept = [
        lines[i - 1]
        for i in range(start, fn.end_lineno + 1)
        if not doc_node.lineno <= i <= doc_node.end_lineno
    ]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    if sum(1 for line in code.splitlines() if line.strip()) < MIN_CODE_LINES:
        return None
    return Pair(module, qual, doc, code)


def build_pairs(files: Optional[Iterable[Path]] = None, root: Optional[Path] = None) -> list[Pair]:
    """Pairs of the given stdlib files (default: all of them), duplicates (same code) dropped."""
    root = root or stdlib_dir()
    files = module_files(root) if files is None else files
    seen, out = set(), []
    for path in files:
        try:
            with tokenize.open(path) as f:  # honours the file's encoding declaration
                source = f.read()
            found = pairs_from_source(source, module_name(path, root))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid Python 3 (lib2to3 fixtures)
        for pair in found:
            if pair.code not in seen:
                seen.add(pair.code)
                out.append(pair)
    return out


def split_of(module: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(module.encode()).digest()[:8], "big") % 1000
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def split_pairs(pairs: list[Pair]) -> dict[str, list[Pair]]:
    splits = {name: [] for name in SPLIT_BUCKETS}
    for pair in pairs:
        splits[split_of(pair.module)].append(pair)
    return splits


def load_splits() -> dict[str, list[Pair]]:
    return split_pairs(build_pairs())


if __name__ == "__main__":
    import sys

    splits = load_splits()
    print(sys.version.split()[0], {k: len(v) for k, v in splits.items()})
