"""The one output-folder guard: every command that writes goes through here.

What it promises (README, "Errors and exit codes"):
- No input is ever touched: an ``-o`` that is, contains, or lies inside an input path (resolved,
  symlinks followed) is refused before any work, ``--force`` or not.
- ``--force`` only replaces a folder that actsparse wrote (it holds our marker or our
  ``manifest.json``, and nothing else); anything else is refused, naming a file we did not write.
- Concurrent runs into one ``-o`` do not replace each other: a lock file (``O_EXCL``) is held for the
  whole run, and the final step is an atomic no-replace rename (``renameat2(RENAME_NOREPLACE)``
  where the kernel has it). A run that finds the folder taken at the end keeps its results in a
  named sibling folder it prints, and exits 5.
- Results are written to a temporary sibling and renamed into place, so a crash, Ctrl-C or
  SIGTERM never leaves half a folder. Temporary folders record the PID (and its start time) of the
  process that made them; the next run into the same parent removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from probes.errors import OutputError

MARKER = ".actsparse-output.json"  # written into every finished output folder: what we wrote
RUN_MARKER = ".actsparse-run.json"  # inside a temporary folder: who is writing it
NAME_MAX = 255
# Files a folder written by an older actsparse (no MARKER) may hold for --force to replace it.
_LEGACY_SUFFIXES = (".csv", ".parquet", ".png", ".svg", ".md", ".html", ".json", ".txt")
_LEGACY_DIRS = ("tables", "figures", "inputs")  # a report bundle's


# ------------------------------------------------------------------ processes
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc``), to tell a reused PID apart."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return raw.rsplit(")", 1)[1].split()[19]
    except IndexError:  # pragma: no cover - malformed /proc
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    except OSError:
        return False
    now = _start_time(pid)
    return start is None or now is None or now == start


def _me() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid())}


# ------------------------------------------------------------------ names
def _stem(name: str) -> str:
    """``name`` for our sibling files; long names are cut and hashed so siblings fit NAME_MAX."""
    if len(name.encode()) <= 120:
        return name
    return name.encode()[:80].decode("utf-8", "ignore") + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]


def _lock_path(out: Path) -> Path:
    return out.parent / f".{_stem(out.name)}.lock"


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


# ------------------------------------------------------------------ inputs
def _check_inputs(out: Path, inputs: Iterable) -> None:
    """Refuse an output that is, contains, or lies inside an input (paths that exist; hub ids skip)."""
    ro = _resolved(out)
    for inp in inputs:
        if inp is None or inp == "":
            continue
        s = os.fspath(inp)
        if s.startswith("hf:") or not os.path.lexists(os.path.expanduser(s)):
            continue  # a hub id or dataset name: nothing on disk to protect
        ri = _resolved(s)
        if _within(ri, ro):
            what = "is" if ri == ro else "contains"
            raise OutputError(f"the output folder {out} {what} the input {s}; writing there could replace it",
                              "choose an -o folder outside every input")
        if _within(ro, ri):
            raise OutputError(f"the output folder {out} is inside the input {s}",
                              "choose an -o folder outside every input")


# ------------------------------------------------------------------ ours or not
def _foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing folder that actsparse did not write ([] when --force may replace it)."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            listed = set(json.loads(marker.read_text()).get("files", []))
        except (OSError, ValueError, AttributeError):
            listed = None
        if listed is not None:
            return [n for n in names if n != MARKER and n not in listed]
    manifest = folder / "manifest.json"
    try:
        ours = json.loads(manifest.read_text()).get("tool") == "actsparse"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        return names  # no manifest of ours: nothing here is known to be ours
    return [p.name for p in sorted(folder.iterdir())
            if p.is_symlink() or not ((p.is_file() and p.name.endswith(_LEGACY_SUFFIXES))
                                      or (p.is_dir() and p.name in _LEGACY_DIRS))]


def _check_replaceable(out: Path) -> None:
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"--force only replaces a folder actsparse wrote, and {out} holds {shown}, "
                          "which actsparse did not write", "move those files away, or choose another -o folder")


# ------------------------------------------------------------------ stale temporary folders
def clean_stale(parent: Path) -> list[str]:
    """Remove our temporary folders and locks in ``parent`` whose process is gone. Only entries of
    our own naming whose run marker (or lock) names a dead PID; an interrupted ``--force``
    replacement whose new folder never arrived is moved back into place."""
    removed: list[str] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not name.startswith("."):
            continue
        try:
            if ".tmp-" in name and p.is_dir() and not p.is_symlink():
                info = json.loads((p / RUN_MARKER).read_text())
                if not _alive(int(info["pid"]), info.get("start")):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(name)
            elif ".old-" in name and p.is_dir() and not p.is_symlink():
                info = json.loads((p / RUN_MARKER).read_text())
                if not _alive(int(info["pid"]), info.get("start")):
                    target = parent / info["target"]
                    if not os.path.lexists(target):
                        os.rename(p, target)  # the replacement never arrived: the old results come back
                        (target / RUN_MARKER).unlink(missing_ok=True)
                    else:
                        shutil.rmtree(p, ignore_errors=True)
                    removed.append(name)
            elif name.endswith(".lock") and p.is_file() and not p.is_symlink():
                info = json.loads(p.read_text())
                if not _alive(int(info["pid"]), info.get("start")):
                    p.unlink(missing_ok=True)
                    removed.append(name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not ours, or not readable: leave it
    return removed


# ------------------------------------------------------------------ the lock and the claim
@dataclass
class _Claim:
    out: Path
    force: bool
    inputs: tuple = ()
    lock: Path | None = None
    extra: list = field(default_factory=list)


_CLAIMS: dict[str, _Claim] = {}


def _take_lock(out: Path) -> Path:
    lock = _lock_path(out)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text())
                pid, start = int(info["pid"]), info.get("start")
            except (OSError, ValueError, KeyError, TypeError):
                pid, start = None, None
            if pid is not None and (pid == os.getpid() or not _alive(pid, start)):
                lock.unlink(missing_ok=True)  # stale: its run is gone
                continue
            who = f"(pid {pid})" if pid is not None else f"(lock file {lock.name})"
            raise OutputError(f"another actsparse run {who} is writing {out}",
                              "wait for it to finish, or choose another -o folder")
        with os.fdopen(fd, "w") as f:
            json.dump({**_me(), "target": out.name}, f)
        return lock
    raise OutputError(f"cannot lock {out} ({lock} keeps coming back)", "choose another -o folder")


def release(out: str | os.PathLike | None = None) -> None:
    """Drop the claim (and lock file) on ``out``, or on every output this process claimed."""
    keys = list(_CLAIMS) if out is None else [str(_resolved(out))]
    for k in keys:
        c = _CLAIMS.pop(k, None)
        if c is not None and c.lock is not None:
            with contextlib.suppress(OSError):
                info = json.loads(c.lock.read_text())
                if info.get("pid") == os.getpid():
                    c.lock.unlink()


def check_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable = ()) -> Path:
    """Fail early (before any model work) if ``out`` cannot or must not be written; then hold it.

    ``inputs``: every path the run reads (checkpoint, corpus, config, tokenizer, input folders);
    hub ids and specs that are not paths are skipped. Takes the output's lock until the run ends
    (``atomic_output_dir`` or ``release``)."""
    out = Path(out)
    inputs = tuple(inputs)
    _check_inputs(out, inputs)
    name = Path(os.path.abspath(out)).name
    if len(name.encode()) > NAME_MAX:
        raise OutputError(f"the output folder name is {len(name.encode())} bytes long; "
                          f"file systems allow {NAME_MAX}", "choose a shorter -o name")
    if name in ("", ".", ".."):
        raise OutputError(f"the output path {out} names no folder", "give -o a folder name, e.g. -o results/")
    out = Path(os.path.abspath(out)) if out.name in ("", ".", "..") else out
    if out.is_symlink():  # replacing it would write beside its target, outside the folder named here
        raise OutputError(f"output folder {out} is a symbolic link (to {os.readlink(out)})",
                          "give the folder it points to, or another -o folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is {'a file' if out.is_file() else 'not a folder'}",
                          "choose another -o folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError(f"output folder {out} already exists and is not empty",
                              "pass --force to replace it, or choose another -o folder")
        _check_replaceable(out)
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
        os.rmdir(_mkdtemp(probe_dir, f".{_stem(out.name)}.probe-"))
    except OSError as e:
        raise OutputError(f"cannot write to {probe_dir}: making a folder there fails "
                          f"({e.strerror or e.__class__.__name__})", "choose a writable -o folder") from e
    key = str(_resolved(out))
    claim = _CLAIMS.get(key)
    if claim is None:
        if parent.is_dir():
            clean_stale(parent)
            lock = _take_lock(out.resolve())
        else:
            lock = None  # the parent does not exist yet: nothing else can be writing there
        _CLAIMS[key] = _Claim(out, force, inputs, lock)
    else:
        claim.inputs = tuple({*claim.inputs, *inputs})
        claim.force = claim.force or force
    return out


def _mkdtemp(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        p = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o755)
            return p
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))


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


# ------------------------------------------------------------------ atomic no-replace rename
_libc = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, even when another process
    creates it at the same moment (``renameat2(RENAME_NOREPLACE)``). Where the kernel or file system
    lacks it, an existence check under our lock (every actsparse run takes it) does the same."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - no libc
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is not None:
        at_fdcwd, noreplace = -100, 1
        r = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace)
        if r == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _finish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` into ``out`` without ever replacing what is not to be replaced."""
    parent = out.parent
    files = sorted(p.name for p in tmp.iterdir() if p.name not in (RUN_MARKER, MARKER))
    (tmp / MARKER).write_text(json.dumps({"tool": "actsparse", "files": files}) + "\n")
    (tmp / RUN_MARKER).unlink(missing_ok=True)
    old = None
    if out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()  # an empty folder holds nothing to lose
        elif not force:
            _keep(tmp, out, "was created by someone else while this run was writing; it was not replaced")
        else:
            foreign = _foreign_entries(out)
            if foreign:
                _keep(tmp, out, f"now holds {', '.join(foreign[:3])}, which actsparse did not write; "
                                "it was not replaced")
            old = parent / f".{_stem(out.name)}.old-{os.getpid()}-{secrets.token_hex(4)}"
            rename_noreplace(out, old)
            with contextlib.suppress(OSError):
                (old / RUN_MARKER).write_text(json.dumps({**_me(), "target": out.name}))
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        if old is not None:
            _keep(tmp, out, f"was created by someone else while this run was writing (the folder it replaced is "
                            f"in {old})")
        _keep(tmp, out, "was created by someone else while this run was writing; it was not replaced")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _keep(tmp: Path, out: Path, why: str) -> None:
    """The run lost ``out`` to someone else: keep its results in a named sibling and say where."""
    kept = None
    for i in range(1, 1000):
        cand = out.parent / f"{_stem(out.name)}.{os.getpid()}-{i}"
        try:
            rename_noreplace(tmp, cand)
            kept = cand
            break
        except FileExistsError:
            continue
    where = f"this run's results are in {kept}" if kept else "this run's results were not kept"
    raise OutputError(f"{out} {why}; {where}", "choose another -o folder (or move that one away) and rerun")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out`` (replacing an old one of ours only
    with ``force``); on error or interruption it is removed, and the lock released either way."""
    out = check_output_dir(out, force, inputs)
    claim = _CLAIMS[str(_resolved(out))]
    force = claim.force
    out = out.resolve()
    parent = out.parent
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if claim.lock is None:
                claim.lock = _take_lock(out)
            tmp = _mkdtemp(parent, f".{_stem(out.name)}.tmp-")
            (tmp / RUN_MARKER).write_text(json.dumps({**_me(), "target": out.name}))
        except OSError as e:
            raise (_output_error(out, None, e) or e) from e
        try:
            yield tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and (oe := _output_error(out, tmp, e)) is not None:
                raise oe from e
            raise
        try:
            _check_inputs(out, claim.inputs)  # a symlink may have moved meanwhile
            _finish(tmp, out, force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, FileExistsError):
                raise OutputError(f"cannot move the finished output into {out} ({e.strerror or e})",
                                  "choose another -o folder") from e
            raise
    finally:
        release(out)


@contextlib.contextmanager
def scratch_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A private working folder beside ``out`` for intermediate outputs (``analyze``'s runs before
    they become one report), removed at the end. It is named and marked like our temporary folders,
    so ``clean_stale`` removes it if the process is killed."""
    out = _resolved(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(out.parent, f".{_stem(out.name)}.tmp-work-")
    try:
        (tmp / RUN_MARKER).write_text(json.dumps({**_me(), "target": out.name}))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _regular_or_absent(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path} is a folder, not a file", "give a file name, e.g. report.md")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} is not a regular file", "give a file name in a writable folder")


def check_output_file(path: str | os.PathLike, force: bool, inputs: Iterable = ()) -> Path:
    """The checks of ``check_output_dir`` for a single output file (``compare --markdown``)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{path} names no file", "give a file name, e.g. report.md")
    if len(path.name.encode()) > NAME_MAX:
        raise OutputError(f"the output file name is {len(path.name.encode())} bytes long; file systems allow "
                          f"{NAME_MAX}", "choose a shorter name")
    _check_inputs(path, inputs)
    _regular_or_absent(path)
    if os.path.lexists(path):
        if not force:
            raise OutputError(f"{path} already exists", "pass --force to replace it, or choose another file")
        if path.is_symlink():
            raise OutputError(f"{path} is a symbolic link", "give a plain file name")
    anc = path.resolve().parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot write {path}: {anc} is not a folder", "choose a file in a folder")
    return path


def write_output_file(path: str | os.PathLike, text: str, force: bool, inputs: Iterable = ()) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a temporary sibling, then a no-replace rename
    (``force``: a replacing one). A full disk leaves nothing behind."""
    path = check_output_file(path, force, inputs)
    parent = path.resolve().parent
    tmp = parent / f".{_stem(path.name)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except FileExistsError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{path} was created by someone else meanwhile; not replaced",
                          "pass --force, or choose another file") from e
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        fix = "free some disk space or choose another file" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "choose a writable place for the file"
        raise OutputError(f"cannot write {path} ({e.strerror or e.__class__.__name__})", fix) from e
    return path
