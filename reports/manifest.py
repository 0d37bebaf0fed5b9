"""``manifest.json``: resolved options, package versions, git hash, device, dtype, tokens."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("actsparse", "torch", "transformers", "safetensors", "numpy", "scipy", "pandas", "gguf")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_hash() -> str | None:
    """The actsparse source tree's commit (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


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


def build_manifest(command: str, options: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return _jsonable({
        "tool": "actsparse",
        "command": command,
        "argv": sys.argv,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_hash": git_hash(),
        "versions": package_versions(),
        "platform": platform.platform(),
        "options": options,
        **sections,
    })


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> str:
    p = Path(folder) / "manifest.json"
    p.write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=False) + "\n")
    return p.name
