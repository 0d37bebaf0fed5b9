#!/usr/bin/env python
"""Build the embedded training and calibration corpora from CPython standard-library docstrings.

Source and license
------------------
The text is the docstrings (module, class and function) of the CPython standard library that
ships with the interpreter running this script. That code and its documentation strings are
Copyright (c) 2001-present Python Software Foundation and distributed under the PSF License
Agreement (https://docs.python.org/3/license.html), which permits redistribution of derived
works provided the copyright notice is retained; this header and
``probes/data/tiny-relu-lm/TRAINING.md`` carry that notice for ``probes/data/corpus_train.txt``
and ``probes/data/calibration.txt``.

How
---
Source files under ``sysconfig.get_paths()["stdlib"]`` are parsed with ``ast``: nothing is
imported or executed, so the result does not depend on which optional C extensions are
built. Only top-level names in ``sys.stdlib_module_names`` count (this keeps
``site-packages`` out); test suites, IDLE, Tk and demo packages are skipped because their
docstrings are mostly terse or GUI-specific noise. Interactive examples (``>>>`` blocks)
and reST tables are dropped so the text is mostly English prose; every paragraph is rewrapped onto one line
and a paragraph seen earlier (in sorted module order) anywhere is dropped, which removes
boilerplate such as "Return self==value." and makes the two outputs share no paragraph.

The held-out split is made per top-level package, not per module, so that sibling submodules
(``email.headerregistry`` / ``email._header_value_parser``) cannot leak near-identical prose
across it. Packages are ordered by a SHA-256 of their name and taken into calibration until
it reaches its target size; everything else is training text.

Output is deterministic for a given CPython version (the docstrings change between
releases); the version used is printed and recorded by ``scripts/train_embedded.py``.
Documents (one docstring each) are separated by blank lines.

Usage: python scripts/build_corpus.py [--out probes/data]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

# Top-level stdlib names whose docstrings are tests, GUI glue or generated boilerplate.
SKIP_TOP = {
    "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "__phello__", "encodings",
    "pydoc_data", "this", "antigravity",
}
# Path components that mark test code inside otherwise useful packages.
SKIP_PARTS = {"test", "tests", "idle_test"}

MIN_DOC_CHARS = 60  # one-liners ("Return self.") teach little and are mostly duplicates
CAL_MIN_BYTES = 180_000
CAL_MAX_BYTES = 230_000


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_source_files(root: Path):
    """(dotted module name, path) for every stdlib source file we use, in sorted name order."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        top = rel.parts[0].removesuffix(".py")
        if top not in sys.stdlib_module_names or top in SKIP_TOP:
            continue
        if SKIP_PARTS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        found.append((module_name(rel), path))
    return sorted(found)


def docstrings_in_source_order(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings, ordered by their position in the file."""
    out = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append((getattr(node, "lineno", 0), doc))
        stack.extend(ast.iter_child_nodes(node))
    return [doc for _, doc in sorted(out, key=lambda t: t[0])]


def clean_docstring(doc: str) -> list[str]:
    """Paragraphs of one docstring, each on one line, with interactive examples removed."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", doc):
        if ">>>" in block:
            continue  # doctest session: code and reprs, not prose
        if "=====" in block:
            continue  # reST table: meaningless once rewrapped onto one line
        text = " ".join(block.split())
        if text:
            paragraphs.append(text)
    return paragraphs


def collect(root: Path) -> dict[str, list[str]]:
    """Top-level package -> its documents (paragraphs joined by newlines), deduplicated."""
    seen: set[str] = set()
    by_top: dict[str, list[str]] = {}
    for name, path in iter_source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are templates or deliberately invalid
        for doc in docstrings_in_source_order(tree):
            kept = []
            for para in clean_docstring(doc):
                key = para.lower()
                if key not in seen:
                    seen.add(key)
                    kept.append(para)
            text = "\n".join(kept)
            if len(text) >= MIN_DOC_CHARS:
                by_top.setdefault(name.split(".")[0], []).append(text)
    return by_top


def size(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) + 2 for d in docs)


def split(by_top: dict[str, list[str]]) -> tuple[list[str], list[str], list[str]]:
    """(calibration packages, train docs, calibration docs); packages in hash order."""
    def h(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()

    cal_tops, cal_bytes = [], 0
    for top in sorted(by_top, key=h):
        if cal_bytes >= CAL_MIN_BYTES:
            break
        s = size(by_top[top])
        if cal_bytes + s <= CAL_MAX_BYTES:  # skip packages that would overshoot the target
            cal_tops.append(top)
            cal_bytes += s
    cal = [d for top in sorted(cal_tops) for d in by_top[top]]
    train = [d for top in sorted(by_top) if top not in cal_tops for d in by_top[top]]
    return sorted(cal_tops), train, cal


def write(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Explicit newline so the bytes (and the corpus hash) are the same on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(docs) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "probes" / "data")
    args = ap.parse_args()

    root = Path(sysconfig.get_paths()["stdlib"])
    by_top = collect(root)
    cal_tops, train, cal = split(by_top)
    write(args.out / "corpus_train.txt", train)
    write(args.out / "calibration.txt", cal)

    print(f"python {sys.version.split()[0]}, stdlib {root}")
    print(f"packages: {len(by_top)} total, {len(cal_tops)} held out: {', '.join(cal_tops)}")
    for name, docs in (("corpus_train.txt", train), ("calibration.txt", cal)):
        p = args.out / name
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        print(f"{p}: {len(docs)} documents, {p.stat().st_size:,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
