"""Reading actsparse outputs back: output folders and report bundles as ``Source``s, their manifests,
and what a manifest says about its checkpoint and tokens (for captions, ``summary.md`` and ``compare``).

Used by ``reports.bundle_report`` (the report bundle), ``reports.html`` (its index.html) and
``reports.compare``; it reads files and writes none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from probes.errors import EXIT_CHECKPOINT, ActsparseError
from reports import sections


class NotAnOutputError(ActsparseError):
    """A report/compare input that is not an actsparse output folder (exit code 2, a bad path)."""

    exit_code = EXIT_CHECKPOINT


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Source:
    """One actsparse output: a folder with ``manifest.json`` and tables (or one input of a report bundle)."""

    path: Path  # the output folder (for a bundle input: the bundle folder)
    manifest: dict[str, Any]
    table_dir: Path
    figure_dir: Path | None
    label: str
    tables: list[str] = field(default_factory=list)  # table names (file stems)
    made_by: str | None = None  # a run that wrote this input in a working folder since removed (``analyze``)

    @property
    def command(self) -> str:
        return str(self.manifest.get("command"))

    def table(self, name: str) -> pd.DataFrame:
        pq, csv = self.table_dir / f"{name}.parquet", self.table_dir / f"{name}.csv"
        try:
            return pd.read_parquet(pq) if pq.exists() else pd.read_csv(csv)
        except Exception as e:  # a truncated or foreign file: say which one
            raise NotAnOutputError(f"cannot read table {name} in {self.table_dir}: {e.__class__.__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}",
                                   "re-run the command that wrote it") from None


def _table_names(folder: Path) -> list[str]:
    names = {p.stem for p in folder.glob("*.parquet")} | {p.stem for p in folder.glob("*.csv")}
    return sorted(names)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an actsparse output folder; NotAnOutputError (a clear one-liner) otherwise."""
    folder = Path(folder)
    fix = ("pass a folder written by an actsparse command with -o (measure, spectrum, massive, pplp, curve, grad, "
           "drift, track) or by actsparse report")
    if not folder.exists():
        raise NotAnOutputError(f"{folder} does not exist", fix)
    if not folder.is_dir():
        raise NotAnOutputError(f"{folder} is a file, not an actsparse output folder", fix)
    mf = folder / "manifest.json"
    if not mf.is_file():
        raise NotAnOutputError(f"{folder} is not an actsparse output folder (it has no manifest.json)", fix)
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAnOutputError(f"{mf} is not readable JSON ({e.__class__.__name__})",
                               "re-run the command that wrote it") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "actsparse" or not isinstance(
            manifest.get("command"), str):
        raise NotAnOutputError(f"{folder} is not an actsparse output folder (its manifest.json was not written by "
                               "actsparse)", fix)
    return manifest


def read_sources(folder: str | Path) -> list[Source]:
    """The result sets in ``folder``: the folder itself, or each input of a report bundle."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["command"] == "report":
        out = []
        for inp in manifest.get("inputs", []):
            label = str(inp.get("label"))
            tdir = folder / "tables" / label
            out.append(Source(folder, inp.get("manifest") or {}, tdir, folder / "figures" / label, label,
                              _table_names(tdir) if tdir.is_dir() else []))
        return out
    label = _safe_label(folder.resolve().name)
    return [Source(folder, manifest, folder, folder, label, _ordered(_table_names(folder), manifest))]


def _ordered(names: list[str], manifest: dict[str, Any]) -> list[str]:
    """Tables in the order the command wrote them (its main table first), the rest by name."""
    listed = [Path(str(f)).stem for f in manifest.get("files") or [] if str(f).endswith((".parquet", ".csv"))]
    order = {n: i for i, n in enumerate(dict.fromkeys(listed))}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _safe_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "output"


# ---------------------------------------------------------------------------------------- manifest info
# Which manifest section describes the tokens behind a figure or table, by name prefix (None: weights
# only), and the sections that measure tokens: both read from the registered report sections.
TOKEN_SECTIONS = sections.token_sections()
_SECTION_BY_PREFIX = sections.stem_prefixes()
_WEIGHT_COMMANDS = ("spectrum", "drift")


def checkpoint_of(manifest: dict[str, Any]) -> str:
    """The checkpoint(s) an output was measured on, as written in its manifest."""
    opts = manifest.get("options") or {}
    if opts.get("checkpoint"):
        return str(opts["checkpoint"])
    if opts.get("checkpoints"):
        cks = [str(c) for c in opts["checkpoints"]]
        return cks[0] if len(cks) == 1 else f"{len(cks)} checkpoints ({cks[0]} ... {cks[-1]})"
    src = (manifest.get("model") or {}).get("source") or manifest.get("checkpoint") or {}
    if isinstance(src, dict) and src.get("path"):
        return str(src["path"])
    return "?"


def checkpoint_label(manifest: dict[str, Any]) -> str:
    """A short label of the checkpoint(s) for titles and the table of contents: the folder name of
    each (``short_name``), never of the joined description (which left a stray ')' before)."""
    from reports.manifest import short_name

    cks = [str(c) for c in (manifest.get("options") or {}).get("checkpoints") or []]
    if len(cks) > 1 and not (manifest.get("options") or {}).get("checkpoint"):
        return f"{len(cks)} checkpoints ({short_name(cks[0])} ... {short_name(cks[-1])})"
    return short_name(checkpoint_of(manifest))


def token_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """``{section: n_counted_tokens}`` for every section of a manifest that measured tokens."""
    out = {}
    for s in TOKEN_SECTIONS:
        sec = manifest.get(s)
        if isinstance(sec, dict) and isinstance(sec.get("n_counted_tokens"), (int, float)):
            out[s] = int(sec["n_counted_tokens"])
    return out


def section_for(stem: str, manifest: dict[str, Any]) -> str | None:
    """The manifest section holding the token description of figure/table ``stem`` (None: weights only)."""
    base = stem.split("/")[-1] if not stem.startswith("esd/") else stem
    for prefix, sec in _SECTION_BY_PREFIX:
        if base.startswith(prefix):
            return sec
    if manifest.get("command") in _WEIGHT_COMMANDS:
        return None
    have = [s for s in TOKEN_SECTIONS if isinstance(manifest.get(s), dict)]
    return have[0] if have else None


def tokens_phrase(manifest: dict[str, Any], section: str | None) -> str:
    """One sentence saying on which tokens something was measured (from the manifest)."""
    if section is None:
        return "Computed from the weights alone (no tokens)."
    section, _, part = section.partition(":")
    sec = manifest.get(section)
    if not isinstance(sec, dict):
        return "The manifest does not record which tokens were used."
    corpus = sec.get("corpus")
    # a code span in captions (rendered by esc_text and markdown); a backtick in the name would end it early
    corpus_txt = f"`{Path(str(corpus)).name.replace('`', chr(39))}`" if corpus else "an unrecorded corpus"
    n = sec.get("n_counted_tokens")
    parts = ["the bundled calibration corpus"] if sec.get("corpus_is_default") else []
    if section == "track" and part == "massive":  # the massive preset draws its own sequences
        per = sec.get("massive_n_counted_tokens_per_checkpoint")
        per = per[0] if isinstance(per, list) and len(per) == 1 else per
        parts.append(f"massive preset {sec.get('massive_preset')}, no BOS")
        lead = f"Measured at each of {sec.get('n_checkpoints')} checkpoints on the same {per} counted tokens"
        return f"{lead} from {corpus_txt} ({', '.join(parts)})."
    if section == "massive":
        if sec.get("n_sequences") is not None:
            parts.append(f"{sec['n_sequences']} sequences")
        if sec.get("preset"):
            parts.append(f"preset {sec['preset']}")
        parts.append("BOS added" if sec.get("bos") else "no BOS")
    else:
        if sec.get("n_windows") is not None:
            parts.append(f"{sec['n_windows']} windows")
        if sec.get("window_scheme"):
            parts.append(str(sec["window_scheme"]))
    if sec.get("max_length") is not None:
        parts.append(f"max_length {sec['max_length']}")
    if sec.get("stride") is not None and sec.get("stride") != sec.get("max_length"):
        parts.append(f"stride {sec['stride']}")
    if sec.get("skip_first"):
        parts.append(f"first {sec['skip_first']} positions of each window not counted")
    if section == "gradients" and sec.get("loss"):
        parts.append(f"{sec['loss']} loss")
    dtype = sec.get("model_dtype") or (manifest.get("model") or {}).get("dtype")
    if dtype:
        parts.append(f"model dtype {dtype}")
    if section == "track":
        steps = sec.get("n_checkpoints")
        per = sec.get("n_counted_tokens_per_checkpoint")
        lead = (f"Measured at each of {steps} checkpoints on the same " if steps else "Measured on the same ")
        tok = f"{per} counted tokens" if per is not None else "tokens"
        return f"{lead}{tok} from {corpus_txt}" + (f" ({', '.join(parts)})." if parts else ".")
    lead = f"On {n} counted tokens" if n is not None else "On tokens"
    return f"{lead} from {corpus_txt}" + (f" ({', '.join(parts)})." if parts else ".")
