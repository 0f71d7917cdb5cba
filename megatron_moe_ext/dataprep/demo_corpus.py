"""The demo text corpus: the docstrings of the Python standard library on this machine, read
with :mod:`ast` (nothing imported, executed or downloaded), deterministic for a Python version.
Front end: scripts/build_demo_corpus.py (its docstring describes the corpus).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

logger = logging.getLogger("build_demo_corpus")

# Folders under the stdlib that hold no useful prose (tests, third-party packages, bytecode,
# IDLE's and lib2to3's test fixtures) are skipped.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
             "lib2to3", "__phello__", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Path) -> Iterator[Path]:
    """Every .py file under root, in sorted (deterministic) order, minus SKIP_DIRS."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def iter_docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order (not imported)."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old modules
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError) as exc:
        logger.debug("skip %s: %s", path, exc)
        return
    nodes = [tree] + [
        n for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    # ast.walk is breadth-first; sort by position so docstrings come in source order.
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)  # clean=True: inspect.cleandoc (dedent)
        if doc:
            yield doc.strip()


def build(out: Path, max_docs: Optional[int], min_chars: int, root: Optional[Path] = None) -> dict:
    root = root or stdlib_root()
    if not root.is_dir():
        raise SystemExit(f"error: standard library folder not found: {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    n_docs = n_chars = n_files = 0
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for path in iter_source_files(root):
            n_files += 1
            for doc in iter_docstrings(path):
                if len(doc) < min_chars or doc in seen:
                    continue
                seen.add(doc)
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc)
                if max_docs is not None and n_docs >= max_docs:
                    break
            if max_docs is not None and n_docs >= max_docs:
                break
    tmp.replace(out)
    stats = {
        "documents": n_docs,
        "characters": n_chars,
        "files_scanned": n_files,
        "bytes": out.stat().st_size,
        "seconds": round(time.time() - t0, 2),
    }
    logger.info(
        "wrote %s: %d documents, %.2f M characters, %.2f MB, from %d files under %s in %.1f s",
        out, n_docs, n_chars / 1e6, stats["bytes"] / 1e6, n_files, root, stats["seconds"],
    )
    if n_docs == 0:
        raise SystemExit(f"error: no docstrings of at least {min_chars} characters found under {root}")
    return stats
