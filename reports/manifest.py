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


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """``{"python": "3.x.y", package: version or None}`` for ``packages`` (default: the manifest's)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in packages:
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
