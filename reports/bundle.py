"""Write an output folder atomically: into a temporary sibling, then rename into place.

A crash or Ctrl-C leaves no half-written folder, and an existing folder is only replaced
with ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from probes.errors import OutputError


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail early (before any model work) if ``out`` cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file", "choose another -o folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} already exists and is not empty",
                          "pass --force to replace it, or choose another -o folder")
    parent = out.resolve().parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe_dir} (permission denied)", "choose a writable -o folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``; on error it is removed."""
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
