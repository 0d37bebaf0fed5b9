"""``manifest.json``: resolved options, package versions, git hash, device, dtype, tokens."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_PACKAGES = ("actsparse", "torch", "transformers", "safetensors", "numpy", "scipy", "pandas", "gguf")


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """``{"python": "3.x.y", package: version or None}`` for ``packages`` (default: the manifest's)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = _version(p)
        except ImportError:  # not installed: ours, or importlib.metadata.PackageNotFoundError (a subclass)
            out[p] = None
    return out


def _version(name: str) -> str:
    """``importlib.metadata.version(name)``, without importing ``importlib.metadata`` (11-23 ms with what it
    imports) where the distribution is a plain folder on ``sys.path``, and parsing only the header block of its
    METADATA.

    The folder is found as ``importlib.metadata`` finds it: the first ``sys.path`` entry holding a
    ``<name>-*.dist-info`` (or ``.egg-info``) folder whose name, lower-cased with runs of ``-_.`` as one ``_``,
    is the wanted one (the first in the folder's listing order). ``metadata.version`` parses the whole
    file with ``email`` and takes its ``Version`` header; the long description after the first blank line
    (README-sized: 21 kB for actsparse) is the message body and cannot change a header, so the value is the
    same at a fraction of the cost. A package in no folder, when some ``sys.path`` entry is not a plain folder
    (a zip), or a file without the header, goes to ``metadata.version`` itself. A missing package raises an
    ``ImportError`` (``metadata.version``'s ``PackageNotFoundError`` is one)."""
    found = _dist_folder(name)
    if isinstance(found, Path):
        text = None
        for file in ("METADATA", "PKG-INFO"):
            try:
                text = (found / file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text:
                break
        if text:
            head = text.split("\n\n", 1)[0]
            version = _plain_header(head, "version")
            if version is _ASK_EMAIL:
                import email

                version = email.message_from_string(head)["Version"]
            if version is not None:
                return version
    elif found is _MISSING:
        raise ModuleNotFoundError(f"no distribution named {name!r}")
    from importlib import metadata

    return metadata.version(name)


_MISSING = object()  # _dist_folder: not in any sys.path folder, and every entry is a folder
_ASK_EMAIL = object()  # _plain_header: a header block only the email parser should read


def _plain_header(head: str, key: str):
    """The first ``key`` header (lower-case name) of a header block as ``email.message_from_string(head)[key]``
    gives it (the value after the colon, leading blanks dropped), None when there is none, or ``_ASK_EMAIL``
    when the block has anything else than plain ``Name: value`` lines and folded lines of other headers (a
    folded value, a line without a colon, an empty line): then the email parser, imported only then, reads it."""
    import re

    lines = re.split(r"\r\n|\r|\n", head)
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        if line[:1] in (" ", "\t"):
            continue  # a folded line of an earlier header
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return _ASK_EMAIL
        if name.lower() == key:
            if i + 1 < len(lines) and lines[i + 1][:1] in (" ", "\t"):
                return _ASK_EMAIL
            return value.lstrip(" \t")
    return None


def _normal(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_folder(name: str):
    """The distribution's metadata folder, ``_MISSING``, or None (let ``importlib.metadata`` decide)."""
    import os

    want = _normal(name)
    every_entry_a_folder = True
    for entry in sys.path:
        root = entry or "."
        try:
            children = os.listdir(root)
        except NotADirectoryError:  # a zip file: importlib.metadata reads inside it
            every_entry_a_folder = False
            continue
        except OSError:
            continue
        if os.path.basename(root).lower().endswith(".egg"):  # an egg folder: its EGG-INFO, importlib's rules
            every_entry_a_folder = False
            continue
        for child in children:  # the first match in listing order, as importlib.metadata's Lookup
            low = child.lower()
            if low.endswith((".dist-info", ".egg-info")) and _normal(low.rpartition(".")[0].partition("-")[0]) == want:
                path = Path(root) / child
                return path if path.is_dir() else None  # an egg-info file: importlib.metadata's reading
    return _MISSING if every_entry_a_folder else None


_SOURCE = Path(__file__).resolve().parent  # where git_hash asks git (a test points it elsewhere)


def git_hash() -> str | None:
    """The actsparse source tree's commit (None when installed from a wheel)."""
    here = _SOURCE
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


_EARLY: dict[str, Any] = {}  # prefetch(): its thread and what it found, each value taken once


def prefetch() -> None:
    """Start computing the manifest's ``git_hash`` and ``versions`` in a background thread, for a
    command that will write a manifest (``actsparse_cli.main.run`` calls it when the command line has
    an output folder): the two ``git`` subprocesses and the package metadata reads then overlap the
    command's own work. The next ``build_manifest`` in this process takes the values, computed by the
    same functions as without a prefetch; whatever the thread did not get (an error) is computed there.
    Where ``_version`` will fall back to ``importlib.metadata`` (a zip or egg on ``sys.path``), that module and
    ``email`` are imported here, on the main thread, not by the thread (a ``--workers`` fork while a thread
    holds an import lock can leave the child waiting on it)."""
    import os

    if any(e and (os.path.isfile(e) or e.lower().endswith(".egg")) for e in sys.path):
        import email.parser  # noqa: F401
        from importlib import metadata  # noqa: F401

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["git_hash"] = git_hash()
            box["versions"] = package_versions()
        except Exception:  # pragma: no cover - build_manifest computes it again and reports the error
            pass

    thread = threading.Thread(target=work, name="actsparse-manifest", daemon=True)
    _EARLY.clear()
    _EARLY.update(thread=thread, box=box)
    thread.start()


def _early(key: str, compute):
    thread = _EARLY.get("thread")
    if thread is not None:
        thread.join(timeout=30)
        if key in _EARLY["box"]:
            return _EARLY["box"].pop(key)
    return compute()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "value") and not callable(x.value):  # Enums
        return x.value
    return str(x)


def model_section(lm) -> dict[str, Any]:
    """The manifest's ``model`` section: what was loaded, how, and where it ran."""
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"family": lm.family, "class": type(lm.model).__name__, "n_parameters": n_params,
            "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "is_causal_lm": lm.is_causal_lm, "source": lm.source,
            "tokenizer": type(lm.tokenizer).__name__ if lm.tokenizer is not None else None}


def short_name(checkpoint: Any) -> str:
    """A checkpoint's label for titles: its folder name, with the parent's when the name says nothing."""
    p = Path(str(checkpoint))
    return p.name if p.name not in ("model", "") else f"{p.parent.name}/{p.name}"


def build_manifest(command: str, options: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return _jsonable({
        "tool": "actsparse",
        "command": command,
        "argv": sys.argv,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_hash": _early("git_hash", git_hash),
        "versions": _early("versions", package_versions),
        "platform": platform.platform(),
        "options": options,
        **sections,
    })


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> str:
    p = Path(folder) / "manifest.json"
    p.write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=False) + "\n")
    return p.name
