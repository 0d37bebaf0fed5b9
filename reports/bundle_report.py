"""Report bundles: one folder with manifest, tables, figures, ``summary.md`` and an offline ``index.html``.

``build_report`` takes any actsparse output folders (measure, spectrum, massive, pplp, curve, grad,
drift, track, ...), recognised by their ``manifest.json`` (``"tool": "actsparse"`` and a
``"command"``), and writes::

    OUT/manifest.json               inputs (path, label, their manifests), figures with captions, tables
    OUT/index.html                  self-contained: figures as base64 PNG, no network asset, no script
    OUT/summary.md                  for terminals, pull requests and CI job summaries
    OUT/tables/<label>/<name>.parquet + .csv
    OUT/figures/<label>/<stem>.png + .svg   (copied from the input, plus the standard ones drawn here)
    OUT/inputs/<label>/...          the input's manifest.json, summary.md and other small files

Every string that comes from a checkpoint or a corpus (paths, module names, token strings) is
HTML-escaped in ``index.html``; the page also carries a Content-Security-Policy that allows no
script and no network fetch. The bundle is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from probes.errors import EXIT_CHECKPOINT, ActsparseError, OutputError
from reports import sections
from reports.sections.sparsity import eps_list
from reports.bundle import atomic_output_dir, check_output_dir
from reports.figures import site_kinds
from reports.markdown import md_code, md_escape, md_text
from reports.figures import pyplot
from reports.manifest import build_manifest, write_manifest
from reports.numbers import fmt
from reports.tables import write_table

MAX_HTML_ROWS = 200  # rows of one table shown in index.html (the full table is beside it)
MAX_EMBEDDED_FIGURES = 400  # past this, figures are linked (beside index.html) instead of embedded
_EXTRA_SUFFIXES = (".json", ".md", ".txt")  # small files copied to inputs/<label>/


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


def short_name(checkpoint: str) -> str:
    p = Path(str(checkpoint))
    return p.name if p.name not in ("model", "") else f"{p.parent.name}/{p.name}"


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


# ------------------------------------------------------------------------------------------- captions
_SPARSITY_COMPARE = ("Exact-zero activation fraction (zero_frac) per layer of every measured input side by side, "
                     "one line per input and site kind.")
# Every registered figure's caption, and the display order of figures: the sections' order, then theirs.
_CAPTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    f.stem: f.caption for _, f in sections.figure_specs() if "*" not in f.stem}
_CAPTIONS["sparsity_compare"] = lambda c: _SPARSITY_COMPARE


def caption_for(stem: str, manifest: dict[str, Any], context: dict[str, Any] | None = None) -> str:
    """What a figure shows and on which tokens."""
    context = context or {}
    base = stem.split("/")[-1]
    if stem.startswith("esd/"):
        what = (f"Empirical spectral density of W^T W for {base}: the log-log ESD with the power-law fit from xmin "
                "(left) and the rescaled ESD with the fitted Marchenko-Pastur density and bulk edge (right).")
    elif base in _CAPTIONS:
        what = _CAPTIONS[base](context)
    else:
        what = f"Figure {base} as written by actsparse {manifest.get('command')}."
    return f"{what} {tokens_phrase(manifest, section_for(stem, manifest))}"


_FIGURE_ORDER = tuple(f.stem for _, f in sections.figure_specs() if "*" not in f.stem)


def _figure_rank(stem: str) -> tuple[int, str]:
    if stem.startswith("esd/"):
        return (len(_FIGURE_ORDER) + 2, stem)
    if stem in _FIGURE_ORDER:
        return (_FIGURE_ORDER.index(stem), stem)
    return (len(_FIGURE_ORDER) + 1, stem)


# -------------------------------------------------------------------------------------- drawn figures

def _save(fig, folder: Path, stem: str) -> list[str]:
    from reports.figures import save_into

    return save_into(fig, folder, stem)


def plot_sparsity_compare(items: list[tuple[str, pd.DataFrame]], folder: Path) -> list[str]:
    """zero_frac per layer of several measure inputs on shared axes."""
    plt = pyplot()
    kinds = list(dict.fromkeys(k for _, df in items for k in site_kinds(df)))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds) + 2.0, 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for j, (label, df) in enumerate(items):
            g = df if kind == "all" else df[df["kind"].astype(str) == kind]
            if g.empty or "zero_frac" not in g:
                continue
            x = g["layer"].astype(float).to_list() if "layer" in g and g["layer"].notna().all() else list(range(len(g)))
            ax.plot(x, 100 * g["zero_frac"].astype(float), "o-", ms=4, label=label, color=f"C{j % 10}")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("% of entries exactly 0")
        ax.set_ylim(0, 100)
        ax.set_title(kind, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labs = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labs, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("zero_frac per layer, all inputs", fontsize=10)
    fig.tight_layout()
    return _save(fig, folder, "sparsity_compare")


def standard_figures(src: Source, folder: Path, present: set[str], warnings: list[str]) -> list[str]:
    """Draw the registered figures of ``src``'s tables that its folder does not already hold.

    A figure that cannot be drawn (a broken table, or a broken section) costs only itself, and the
    report says so in its warnings: nothing is dropped silently."""
    title = short_name(checkpoint_of(src.manifest))
    tables = set(src.tables)
    drawn: list[str] = []
    cache: dict[str, pd.DataFrame] = {}

    def t(name: str) -> pd.DataFrame | None:
        if name not in tables:
            return None
        if name not in cache:
            cache[name] = src.table(name)
        return cache[name]

    folder.mkdir(parents=True, exist_ok=True)
    for _, spec in sections.figure_specs():
        if spec.draw is None or spec.stem in present or not all(n in tables for n in spec.needs):
            continue
        if spec.needs_any and not any(n in tables for n in spec.needs_any):
            continue
        try:
            draw = sections.load(spec.draw)
            kw = {"present": present} if "*" in spec.stem else {}
            drawn.extend(draw(t, folder, title, src.manifest, **kw) or [])
        except Exception as e:  # one bad table must not cost the whole bundle: say so in the report
            warnings.append(f"{src.label}: figure {spec.stem} could not be drawn ({e.__class__.__name__}: {e})")
    return drawn


# ------------------------------------------------------------------------------------------ the bundle
@dataclass
class Figure:
    label: str  # input label ("" for figures across inputs)
    stem: str  # relative to the input's figure folder, without suffix (e.g. "esd/transformer.h.0.attn.c_attn.weight")
    png: str | None  # bundle-relative paths
    svg: str | None
    caption: str
    origin: str  # "copied" (from the input) or "drawn" (by the report)


def _collect_figures(folder: Path) -> dict[str, dict[str, Path]]:
    """``{stem: {"png": path, "svg": path}}`` of the figures under ``folder`` (recursively)."""
    out: dict[str, dict[str, Path]] = {}
    # another actsparse output inside this one (e.g. `report out/ -o out/report`) is not part of it
    nested = [m.parent for m in folder.rglob("manifest.json") if m.parent != folder]
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in (".png", ".svg") and p.is_file() and not p.is_symlink() and not any(
                part.startswith(".") for part in p.relative_to(folder).parts) and not any(
                n in p.parents for n in nested):
            stem = p.relative_to(folder).with_suffix("").as_posix()
            out.setdefault(stem, {})[p.suffix.lower()[1:]] = p
    return out


def _check_inputs(inputs: Sequence[str | Path], out: Path) -> list[Source]:
    if not inputs:
        raise NotAnOutputError("no input folder given", "pass one or more actsparse output folders")
    sources: list[Source] = []
    out_r = out.resolve()
    for p in inputs:
        p = Path(p)
        man = read_manifest(p)
        if man["command"] == "report":
            raise NotAnOutputError(f"{p} is already a report bundle",
                                   "pass the output folders it was built from (listed in its manifest.json)")
        if p.resolve() == out_r or out_r in p.resolve().parents:
            raise OutputError(f"the output folder {out} is also an input", "choose another -o folder")
        found = read_sources(p)
        if not any(s.tables for s in found):  # a report of it would hold nothing
            raise NotAnOutputError(f"{p} has no tables (no .parquet or .csv beside its manifest.json)",
                                   "re-run the command that wrote it with -o, or leave this folder out")
        sources.extend(found)
    seen: dict[str, int] = {}
    for s in sources:  # unique labels: m1, m1-2, ...
        base = s.label
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            s.label = f"{base}-{seen[base]}"
    return sources


def build_report(inputs: Sequence[str | Path], out: str | Path, force: bool = False,
                 title: str | None = None) -> Path:
    """Write a report bundle for ``inputs`` (actsparse output folders) into ``out``, atomically."""
    out = Path(out)
    sources = _check_inputs(inputs, out)  # every input is checked before anything is written
    check_output_dir(out, force, inputs=inputs)
    warnings: list[str] = []
    figures: list[Figure] = []
    table_records: list[dict[str, Any]] = []
    files: list[str] = []
    with atomic_output_dir(out, force) as tmp:
        for src in sources:
            tdir, fdir, idir = tmp / "tables" / src.label, tmp / "figures" / src.label, tmp / "inputs" / src.label
            tdir.mkdir(parents=True)
            fdir.mkdir(parents=True)
            idir.mkdir(parents=True)
            for name in src.tables:
                pq, csv = src.table_dir / f"{name}.parquet", src.table_dir / f"{name}.csv"
                df = src.table(name)
                if pq.exists() and csv.exists():
                    shutil.copy2(pq, tdir / pq.name)
                    shutil.copy2(csv, tdir / csv.name)
                else:  # one of the two is missing: write both
                    write_table(df, tdir, name)
                table_records.append({"input": src.label, "name": name, "rows": int(len(df)),
                                      "columns": [str(c) for c in df.columns],
                                      "parquet": f"tables/{src.label}/{name}.parquet",
                                      "csv": f"tables/{src.label}/{name}.csv"})
                files += [f"tables/{src.label}/{name}.parquet", f"tables/{src.label}/{name}.csv"]
            for p in sorted(src.table_dir.iterdir()):
                # regular files only: a symbolic link in an input would copy whatever it points to
                if p.is_file() and not p.is_symlink() and p.suffix in _EXTRA_SUFFIXES:
                    shutil.copy2(p, idir / p.name)
                    files.append(f"inputs/{src.label}/{p.name}")
            copied = _collect_figures(src.figure_dir) if src.figure_dir is not None else {}
            for stem, kinds in copied.items():
                for ext, p in kinds.items():
                    dest = fdir / f"{stem}.{ext}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dest)
            standard_figures(src, fdir, set(copied), warnings)
            ctx = {"eps": eps_list(src.table("sparsity")) if "sparsity" in src.tables else "the eps grid"}
            for stem, kinds in _collect_figures(fdir).items():
                figures.append(Figure(src.label, stem,
                                      f"figures/{src.label}/{stem}.png" if "png" in kinds else None,
                                      f"figures/{src.label}/{stem}.svg" if "svg" in kinds else None,
                                      caption_for(stem, src.manifest, ctx),
                                      "copied" if stem in copied else "drawn"))
        measured = [(s.label, s.table("sparsity")) for s in sources if "sparsity" in s.tables]
        if len(measured) > 1:
            try:
                if plot_sparsity_compare(measured, tmp / "figures" / "_all"):
                    figures.append(Figure("", "sparsity_compare", "figures/_all/sparsity_compare.png",
                                          "figures/_all/sparsity_compare.svg",
                                          _SPARSITY_COMPARE + " Each input on its own tokens "
                                          "(see its section).", "drawn"))
            except Exception as e:
                warnings.append(f"figure sparsity_compare could not be drawn ({e.__class__.__name__}: {e})")
        figures.sort(key=lambda f: ([s.label for s in sources].index(f.label) if f.label else -1,
                                    _figure_rank(f.stem)))
        files += [p for f in figures for p in (f.png, f.svg) if p]
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        title = title or "actsparse report"
        (tmp / "summary.md").write_text(render_summary_md(sources, figures, warnings, title, created),
                                        encoding="utf-8")
        (tmp / "index.html").write_text(render_html(sources, figures, table_records, warnings, title, created, tmp),
                                        encoding="utf-8")
        files += ["summary.md", "index.html", "manifest.json"]
        manifest = build_manifest(
            "report", {"inputs": [str(p) for p in inputs], "output": str(out), "force": force, "title": title},
            inputs=[{"label": s.label, "path": str(s.path), "command": s.command, "checkpoint": checkpoint_of(
                s.manifest), "token_counts": token_counts(s.manifest), "tables": s.tables, "manifest": s.manifest}
                    for s in sources],
            figures=[{"input": f.label, "stem": f.stem, "png": f.png, "svg": f.svg, "caption": f.caption,
                      "origin": f.origin} for f in figures],
            tables=table_records, warnings=warnings, files=files)
        write_manifest(tmp, manifest)
    return out


# ------------------------------------------------------------------------------------------ summary.md
def _escape_md_outside_code(text: str) -> str:
    """Neutralise raw HTML in a markdown text (angle brackets outside `code`), keep the rest as written."""
    out = []
    for line in text.splitlines():
        parts = line.split("`")
        for i in range(0, len(parts), 2):  # even parts are outside code spans
            parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
        out.append("`".join(parts))
    return "\n".join(out)


def _demote(md: str, levels: int = 2) -> str:
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in md.splitlines())


def _brief_spectrum_md(src: Source) -> list[str]:
    if "spectrum" not in src.tables:
        return []
    df = src.table("spectrum")
    ww = df
    if "ww_skipped" in df and "non_ww" in df:
        ww = df[~df["ww_skipped"].astype(bool) & ~df["non_ww"].astype(bool)]
    cols = [c for c in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
                        "num_spikes") if c in ww]
    if not cols:
        return []
    lines = [f"Means over the {len(ww)} matrices WeightWatcher analyses (NaN fits skipped):", "",
             "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols),
             "| " + " | ".join(fmt(pd.to_numeric(ww[c], errors="coerce").mean()) for c in cols) + " |"]
    return lines


def render_summary_md(sources: list[Source], figures: list[Figure], warnings: list[str], title: str,
                      created: str) -> str:
    from probes import __version__

    lines = [f"# {md_escape(title)}", "",
             f"{len(sources)} input(s), written {created} by actsparse {__version__}. Open `index.html` for the "
             "figures; tables are in `tables/<input>/` (Parquet and CSV).", ""]
    for w in warnings:
        lines += [f"> **WARNING:** {md_escape(w)}", ""]
    for i, src in enumerate(sources, 1):
        man = src.manifest
        lines += [f"## {i}. {md_escape(src.command)}: {md_escape(checkpoint_of(man))}", "",
                  f"Input {md_code(src.label)} ({md_escape(src.path)}); git {md_escape(man.get('git_hash'))}; "
                  f"created {md_escape(man.get('created_utc'))}.", ""]
        counts = token_counts(man)
        if counts:
            lines += ["Tokens: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", ""]
        elif man.get("command") in _WEIGHT_COMMANDS:
            lines += ["Weights only (no tokens).", ""]
        sm = src.table_dir / "summary.md"
        if sm.is_file():
            body = sm.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            if body and body[0].startswith("# "):
                body = body[1:]  # its title repeats the heading above
            lines += [_escape_md_outside_code(_demote("\n".join(body).strip())), ""]
        else:
            brief = _brief_spectrum_md(src)
            if brief:
                lines += brief + [""]
        figs = [f for f in figures if f.label == src.label]
        if figs:
            lines += ["Figures:", ""]
            for f in figs:
                lines.append(f"- {md_code(f.png or f.svg)}: {md_text(f.caption)}")
            lines.append("")
    across = [f for f in figures if not f.label]
    if across:
        lines += ["## Across inputs", ""]
        lines += [f"- {md_code(f.png or f.svg)}: {md_text(f.caption)}" for f in across] + [""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ index.html
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ul{columns:2;padding-left:1.2em}code{background:#f4f4f4;padding:0 .2em;border-radius:3px;word-break:break-all}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;font-size:.9em}
dl.meta dt{font-weight:600;color:#555}dl.meta dd{margin:0;word-break:break-all}
figure{margin:1.5em 0;border:1px solid #e4e4e4;border-radius:4px;padding:.6em;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.9em;color:#333;margin-top:.5em}
.tablewrap{overflow-x:auto;max-height:32em;overflow-y:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.8em}th,td{border:1px solid #e2e2e2;padding:.15em .45em;white-space:nowrap}
th{background:#f6f6f6;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.5em 0}
details{margin:.5em 0}summary{cursor:pointer}pre{background:#f8f8f8;padding:.6em;overflow-x:auto;font-size:.8em}
.muted{color:#777;font-size:.85em}
"""

# No script, no network: images only from data: URIs, styles only inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def esc_text(s: Any) -> str:
    """Escaped text in which markdown `code` spans (as in captions) become <code> elements."""
    parts = esc(s).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: leave it as it is
        return esc(s)
    return "".join(p if i % 2 == 0 else f"<code>{p}</code>" for i, p in enumerate(parts))


def _cell(v: Any) -> tuple[str, bool]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return fmt(v), True
    if isinstance(v, bool):
        return str(v), False
    if isinstance(v, (int,)) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return str(v), True
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f"):
        return fmt(float(v), 5), True
    try:
        if pd.isna(v):
            return fmt(None), True
    except (TypeError, ValueError):
        pass
    return str(v), False


def html_table(df: pd.DataFrame, max_rows: int = MAX_HTML_ROWS) -> str:
    """An escaped HTML table of the first ``max_rows`` rows."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for row in df.head(max_rows).itertuples(index=False, name=None):
        cells = []
        for v in row:
            text, numeric = _cell(v)
            cells.append(f'<td class="n">{esc(text)}</td>' if numeric else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure_html(f: Figure, n: int, root: Path, embed: bool) -> str:
    src_path = f.png or f.svg
    mime = "image/png" if f.png else "image/svg+xml"
    links = " ".join(f'<a href="{esc(p)}">{p.rsplit(".", 1)[1].upper()}</a>' for p in (f.png, f.svg) if p)
    cap = f"<figcaption><b>Figure {n}.</b> {esc_text(f.caption)} <span class=\"muted\">[{links}]</span></figcaption>"
    if embed:
        img = f'<img src="{_data_uri(root / src_path, mime)}" alt="{esc(f.stem)}" loading="eager">'
    else:
        img = f'<p class="muted">Not embedded (too many figures): <a href="{esc(src_path)}">{esc(src_path)}</a></p>'
    return f'<figure id="fig-{n}">{img}{cap}</figure>'


def _meta_rows(src: Source) -> list[tuple[str, str]]:
    man = src.manifest
    model = man.get("model") or {}
    rows = [("command", src.command), ("checkpoint", checkpoint_of(man)), ("input folder", str(src.path))]
    if model:
        rows.append(("model", f"{model.get('class')} ({model.get('family')}), "
                              f"{model.get('n_parameters')} parameters, {model.get('dtype')} on {model.get('device')}"))
    counts = token_counts(man)
    if counts:
        rows.append(("tokens", ", ".join(f"{k}: {v}" for k, v in counts.items())))
    for sec in TOKEN_SECTIONS:
        s = man.get(sec)
        if isinstance(s, dict) and s.get("corpus"):
            rows.append((f"corpus ({sec})", str(s["corpus"])))
    rows += [("created (UTC)", str(man.get("created_utc"))), ("git", str(man.get("git_hash"))),
             ("versions", ", ".join(f"{k} {v}" for k, v in (man.get("versions") or {}).items() if v))]
    argv = man.get("argv")
    if argv:
        rows.append(("command line", " ".join(str(a) for a in argv)))
    return rows


def render_html(sources: list[Source], figures: list[Figure], tables: list[dict[str, Any]], warnings: list[str],
                title: str, created: str, root: Path) -> str:
    from probes import __version__

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f'<p class="muted">{len(sources)} input(s); written {esc(created)} by actsparse {esc(__version__)}. '
             "This page is self-contained (figures embedded, no network access); tables, figures (PNG and SVG) "
             "and manifests are in the folders beside it.</p>"]
    for w in warnings:
        parts.append(f'<p class="warn">{esc(w)}</p>')
    parts.append("<nav><ul>")
    for i, src in enumerate(sources, 1):
        parts.append(f'<li><a href="#input-{i}">{i}. {esc(src.command)}: {esc(short_name(checkpoint_of(src.manifest)))}'
                     "</a></li>")
    if any(not f.label for f in figures):
        parts.append('<li><a href="#across">Across inputs</a></li>')
    parts.append("</ul></nav>")
    n = 0
    for i, src in enumerate(sources, 1):
        parts.append(f'<section id="input-{i}"><h2>{i}. {esc(src.command)}: {esc(checkpoint_of(src.manifest))}</h2>')
        parts.append('<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _meta_rows(src))
                     + "</dl>")
        figs = [f for f in figures if f.label == src.label]
        main = [f for f in figs if not f.stem.startswith("esd/")]
        esd = [f for f in figs if f.stem.startswith("esd/")]
        for f in main:
            n += 1
            parts.append(_figure_html(f, n, root, n <= MAX_EMBEDDED_FIGURES))
        if esd:
            parts.append(f"<details><summary>Per-matrix spectra: {len(esd)} ESD figures</summary>")
            for f in esd:
                n += 1
                parts.append(_figure_html(f, n, root, n <= MAX_EMBEDDED_FIGURES))
            parts.append("</details>")
        if src.command == "spectrum" and not esd:
            parts.append('<p class="muted">Per-matrix ESD figures with the Marchenko-Pastur fit need the '
                         "eigenvalues: run <code>actsparse spectrum --plot esd</code> and report that folder.</p>")
        if not figs:
            parts.append('<p class="muted">No figures for this input.</p>')
        recs = [t for t in tables if t["input"] == src.label]
        if recs:
            parts.append("<h3>Tables</h3>")
        for j, rec in enumerate(recs):
            df = src.table(rec["name"])
            more = f" (first {MAX_HTML_ROWS} shown)" if len(df) > MAX_HTML_ROWS else ""
            parts.append(f"<details{' open' if j == 0 and len(df) <= 60 else ''}><summary><b>{esc(rec['name'])}</b>: "
                         f"{len(df)} rows x {len(df.columns)} columns{more} "
                         f'<span class="muted">[<a href="{esc(rec["csv"])}">CSV</a> '
                         f'<a href="{esc(rec["parquet"])}">Parquet</a>]</span></summary>{html_table(df)}</details>')
        sm = src.table_dir / "summary.md"
        if sm.is_file():
            parts.append("<details><summary>summary.md of this output</summary><pre>"
                         f"{esc(sm.read_text(encoding='utf-8', errors='replace'))}</pre></details>")
        parts.append("</section>")
    across = [f for f in figures if not f.label]
    if across:
        parts.append('<section id="across"><h2>Across inputs</h2>')
        for f in across:
            n += 1
            parts.append(_figure_html(f, n, root, n <= MAX_EMBEDDED_FIGURES))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
