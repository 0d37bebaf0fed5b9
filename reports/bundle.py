"""Write an output folder atomically: into a temporary sibling, then rename into place.

A crash or Ctrl-C leaves no half-written folder, and an existing folder is only replaced
with ``force=True``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from probes.errors import OutputError


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail early (before any model work) if ``out`` cannot be written."""
    out = Path(out)
    if out.is_symlink():  # replacing it would write beside its target, outside the folder named here
        raise OutputError(f"output folder {out} is a symbolic link (to {os.readlink(out)})",
                          "give the folder it points to, or another -o folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is a file", "choose another -o folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} already exists and is not empty",
                          "pass --force to replace it, or choose another -o folder")
    parent = out.resolve().parent
    probe_dir = parent
    while not probe_dir.exists() and not probe_dir.is_symlink():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"cannot write to {out}: {probe_dir} is "
                          f"{'a file, not a folder' if probe_dir.is_file() else 'not a folder'}",
                          "choose an -o folder whose parent is a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe_dir} (permission denied)", "choose a writable -o folder")
    # os.access says yes to root everywhere, and knows nothing of read-only mounts or /proc:
    # make (and remove) a real folder where the temporary output folder will go.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=probe_dir))
    except OSError as e:
        raise OutputError(f"cannot write to {probe_dir}: making a folder there fails "
                          f"({e.strerror or e.__class__.__name__})", "choose a writable -o folder") from e
    return out


def _output_error(out: Path, tmp: Path | None, e: OSError) -> OutputError | None:
    """An OSError about the output folder (not, say, about a checkpoint read meanwhile) as an OutputError."""
    names = [str(n) for n in (e.filename, getattr(e, "filename2", None)) if n]
    mine = [str(out.resolve())] + ([str(tmp)] if tmp is not None else [])
    if names and not any(os.path.abspath(n).startswith(m) for n in names for m in mine):
        return None
    if not names and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return None  # a write() on an open file names no file; other nameless errors are not ours
    why = e.strerror or e.__class__.__name__
    fix = "free some disk space or choose another -o folder" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "choose a writable -o folder"
    return OutputError(f"cannot write output folder {out} ({why})", fix)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``; on error it is removed."""
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise (_output_error(out, None, e) or e) from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (oe := _output_error(out, tmp, e)) is not None:
            raise oe from e
        raise
    old = None
    try:
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as e:
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot move the finished output into {out} ({e.strerror or e})",
                              "choose another -o folder") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
