"""A cache of ``actsparse sites`` listings, so that a repeated ``sites`` call does not load the model.

Why: a cold ``sites`` spends most of its time importing torch, transformers and the model's modeling
module (``transformers.models.gpt2.modeling_gpt2`` pulls ``torch.distributed.tensor``,
``torch._dynamo`` and sympy), none of which can be skipped while the module tree is built from the
real classes. A hit needs none of them: it reads one small JSON file.

What a listing depends on, all of it in the key (``key_material``):

- the inputs, by content signature: every entry of the folder of each local path the loader may read
  (the checkpoint, ``--config``, ``--tokenizer``; for a file, its folder) and each weight file the
  checkpoint's index names, as (real path, size, mtime_ns, ctime_ns, inode, device), plus the bytes
  of ``config.json`` and every safetensors header (tensor names, dtypes, shapes, offsets);
- the code: ``actsparse`` version, a hash of every source file of ``probes`` and ``actsparse_cli``
  (what loads, finds and lists, whatever it imports), and the versions of python, torch, transformers,
  tokenizers, safetensors, huggingface_hub and accelerate;
- the options that change the rows or the errors: ``--kind`` (resolved), ``--site``,
  ``--all-modules``, ``--dtype``, and a hash of the ``HF_*``/``TRANSFORMERS_*``/``USE_*`` environment
  (values never stored). The output format is not in it: a hit is rendered like a fresh run.

Only successful, silent runs are stored: a run that raised, or whose load logged a warning or issued a
Python warning (the fresh run's stderr would then differ from a hit's), stores nothing; an error is
therefore never replayed from the cache, it is recomputed. Not cached at all: hub ids (their files can
change remotely), ``--arch`` (shape-inferred configs print a note), ``--trust-remote-code`` and
``--unsafe-pickle`` (code outside the folder: a pickled module's classes live in the importing
program), ``--device-map`` and any ``--device`` other than ``cpu`` (the answer depends on the machine's
GPUs). Never stale: an entry is written only when the key computed after the load equals the
one computed before it, and only when no input changed within ``RACY_S`` seconds before the key was
taken (a change in the same timestamp tick as an earlier one could leave size and times equal; git's
"racily clean" rule). A corrupt or foreign entry is ignored and replaced.

Where: ``$ACTSPARSE_CACHE_DIR/sites`` when that is set, else the user cache folder (``$XDG_CACHE_HOME``
or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) under
``actsparse/sites``. At most ``MAX_ENTRIES`` entries (a few kB each); the oldest go first. A cache
folder that cannot be written is skipped silently. ``actsparse sites --no-cache`` neither reads nor
writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

SCHEMA = 1
ENV_DIR = "ACTSPARSE_CACHE_DIR"
MAX_ENTRIES = 512
RACY_S = 2.0  # inputs changed less than this long before the key was taken are not trusted to a key
_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate")
_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "USE_")
_SOURCE_PACKAGES = ("probes", "actsparse_cli")  # every .py file of both: whatever the loader imports today
_SCALARS = (str, int, float, bool, type(None))


def cache_dir() -> Path:
    """The folder of ``sites`` entries (not created here)."""
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser() / "sites"
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "actsparse" / "sites"


# ------------------------------------------------------------------------------------------- the key
def _versions() -> dict[str, Optional[str]]:
    from reports.manifest import package_versions

    return {**package_versions(_PACKAGES), "python": sys.version}  # the full build string, not only 3.x.y


def _code_hash() -> str:
    """A hash of every source file of ``probes`` and ``actsparse_cli`` (about 1 MB, a few ms to read): a
    listing made by other code, after an edit or an upgrade, never answers."""
    import actsparse_cli
    import probes

    h = hashlib.sha256()
    for pkg, mod in zip(_SOURCE_PACKAGES, (probes, actsparse_cli)):
        root = Path(mod.__file__).parent
        for f in sorted(root.glob("*.py")):
            h.update(f"{pkg}/{f.name}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _env_hash() -> str:
    items = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _signature(path: Path) -> list:
    """(real path, size, mtime_ns, ctime_ns, inode, device) of ``path``, symbolic links followed."""
    st = path.stat()
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _folder(path: Path) -> list:
    """The signature of every entry of the folder ``path`` (a dangling link as its name only)."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            try:
                out.append(_signature(Path(e.path)))
            except OSError:
                out.append([os.path.abspath(e.path), None])
    return sorted(out, key=lambda s: s[0])


def _local(value: Optional[str]) -> Optional[Path]:
    """``value`` as an existing local path; None when it is none (a hub id, or missing)."""
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    return p if p.exists() else None


def _regular(path: str) -> str:
    """``path`` when it is a regular file (symbolic links followed); a FIFO or device is never opened here."""
    import stat

    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")
    return path


def _safetensors_header(path: str) -> str:
    import struct

    with open(_regular(path), "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header too long")
        return hashlib.sha256(head + f.read(n)).hexdigest()


def key_material(checkpoint: str, *, config: Optional[str], tokenizer: Optional[str], arch: Optional[str],
                 device: str, dtype: str, trust_remote_code: bool, unsafe_pickle: bool, device_map: Optional[str],
                 kinds: tuple[str, ...], site: Optional[list[str]], all_modules: bool) -> Optional[dict]:
    """Everything the listing depends on, or None when this call is not cacheable (see the module doc).

    Any failure here (a missing path, an unreadable file, a header that does not parse) is None too: the
    uncached run then meets the same input and reports it as it always does."""
    if arch is not None or trust_remote_code or unsafe_pickle or device_map is not None \
            or str(device).lower() != "cpu":
        return None
    try:
        from probes.formats import Kind, sniff

        ckpt = _local(checkpoint)
        if ckpt is None:
            return None
        sn = sniff(checkpoint)
        if sn.kind is Kind.HUB_ID:
            return None
        folders, files, headers = [], [], {}
        for value, path in ((checkpoint, ckpt), (config, _local(config)), (tokenizer, _local(tokenizer))):
            if value is None:
                continue
            if path is None:  # a --config or --tokenizer that is no local path: a hub id
                return None
            folder = path if path.is_dir() else path.parent
            folders.append([os.path.realpath(folder), _folder(folder)])
        for f in sn.files:
            files.append(_signature(Path(f)))
            if f.endswith(".safetensors"):
                headers[os.path.realpath(f)] = _safetensors_header(f)
        config_bytes = None
        if sn.config_path:
            config_bytes = hashlib.sha256(Path(_regular(sn.config_path)).read_bytes()).hexdigest()
        from probes import __version__

        return {
            "schema": SCHEMA, "actsparse": __version__, "code": _code_hash(), "versions": _versions(),
            "env": _env_hash(),
            "options": {"checkpoint": os.path.realpath(ckpt), "kind": sn.kind.value,
                        "config": os.path.realpath(config) if config is not None else None,
                        "tokenizer": os.path.realpath(tokenizer) if tokenizer is not None else None,
                        "device": str(device).lower(), "dtype": str(dtype), "unsafe_pickle": bool(unsafe_pickle),
                        "kinds": list(kinds), "site": list(site) if site else None, "all_modules": bool(all_modules)},
            "folders": folders, "files": files, "safetensors_headers": headers, "config_json": config_bytes,
        }
    except Exception:  # noqa: BLE001 - not cacheable; the fresh run reports whatever is wrong
        return None


def _digest(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _newest_change(material: dict) -> int:
    """The latest mtime/ctime (ns) over every input signature in ``material``."""
    sigs = [s for _, entries in material["folders"] for s in entries] + list(material["files"])
    return max((max(s[2], s[3]) for s in sigs if len(s) == 6), default=0)


# ----------------------------------------------------------------------------------------- get / put
def get(material: Optional[dict]) -> Optional[tuple[str, list[dict]]]:
    """``(family, rows)`` stored under ``material``; None on a miss or an entry that is not sound."""
    if material is None:
        return None
    try:
        doc = json.loads((cache_dir() / f"{_digest(material)}.json").read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("key") != material:
            return None
        family, rows = doc["family"], doc["rows"]
        if not isinstance(family, str) or not isinstance(rows, list) or not all(
                isinstance(r, dict) and all(isinstance(v, _SCALARS) for v in r.values()) for r in rows):
            return None
        return family, rows
    except Exception:  # noqa: BLE001 - missing, unreadable or corrupt: a miss
        return None


def put(material: Optional[dict], after: Optional[dict], family: Any, rows: list[dict],
        taken_at: float) -> bool:
    """Store ``(family, rows)`` under ``material`` when it is safe to: ``after`` (the key taken again
    after the load) is the same, no input changed within ``RACY_S`` of ``taken_at`` (the time the key
    was taken), and every value is a plain JSON scalar. Returns whether it stored."""
    if material is None or after != material or not isinstance(family, str):
        return False
    if _newest_change(material) > (taken_at - RACY_S) * 1e9:
        return False
    if not all(isinstance(r, dict) and all(type(v) in _SCALARS for v in r.values()) for r in rows):
        return False
    folder = cache_dir()
    name = _digest(material)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"schema": SCHEMA, "key": material, "family": family, "rows": rows}),
                       encoding="utf-8")
        os.replace(tmp, folder / f"{name}.json")
        _prune(folder)
        return True
    except OSError:  # an unwritable cache is no error of the command
        with contextlib.suppress(OSError, UnboundLocalError):
            tmp.unlink()
        return False


def _prune(folder: Path) -> None:
    entries = [p for p in folder.glob("*.json")]
    if len(entries) <= MAX_ENTRIES:
        return
    def age(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    for p in sorted(entries, key=age)[: len(entries) - MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            p.unlink()


# --------------------------------------------------------------------------------- a silent load
class Watch:
    """Whether a block stayed silent: no log record reached a handler (any logger; the check sits in
    ``logging.Logger.callHandlers``, so which handlers print is left as it was), no load report was held
    back (``actsparse_cli.common`` holds transformers' LOAD REPORT until the command ends), and no Python
    warning was shown."""

    HELD = ("transformers.modeling_utils", "transformers.modeling_layers")  # actsparse_cli.common holds these

    def __init__(self) -> None:
        self.records = 0
        self.warnings = 0

    @property
    def silent(self) -> bool:
        return self.records == 0 and self.warnings == 0

    def filter(self, record: logging.LogRecord) -> bool:  # first filter of a held logger: count, never block
        self.records += 1
        return True


@contextlib.contextmanager
def watch() -> Iterator[Watch]:
    import warnings

    w = Watch()
    call_handlers = logging.Logger.callHandlers
    shown = warnings.showwarning

    def counting_handlers(self, record):
        w.records += 1
        return call_handlers(self, record)

    def counting_warning(*args, **kwargs):
        w.warnings += 1
        return shown(*args, **kwargs)

    held = [logging.getLogger(n) for n in Watch.HELD]
    for lg in held:  # before the filter that holds the load report back
        lg.filters.insert(0, w)
    logging.Logger.callHandlers = counting_handlers
    warnings.showwarning = counting_warning
    try:
        yield w
    finally:
        warnings.showwarning = shown
        logging.Logger.callHandlers = call_handlers
        for lg in held:
            with contextlib.suppress(ValueError):
                lg.filters.remove(w)
