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

Reading the inputs back is ``reports.sources``, the page ``reports.html``; what each analysis
contributes (captions, figure order, drawing) comes from the registered sections (``reports.sections``).
This module builds the bundle and its ``summary.md``.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from probes.errors import OutputError
from reports import sections
from reports.sections.sparsity import eps_list
from reports.bundle import atomic_output_dir, check_output_dir
from reports.figures import site_kinds
from reports.html import Figure, render_html
from reports.markdown import md_code, md_escape, md_text  # noqa: F401  (md_code, md_escape re-exported)
from reports.figures import pyplot
from reports.manifest import build_manifest, write_manifest
from reports.numbers import fmt
from reports.sources import (  # noqa: F401  (re-exported: the names tests and older callers import from here)
    _WEIGHT_COMMANDS, TOKEN_SECTIONS, NotAnOutputError, Source, checkpoint_label, checkpoint_of, read_manifest, read_sources, section_for,
    token_counts, tokens_phrase)
from reports.tables import write_table

_EXTRA_SUFFIXES = (".json", ".md", ".txt")  # small files copied to inputs/<label>/


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
    title = checkpoint_label(src.manifest)
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
                 title: str | None = None, run: dict[str, Any] | None = None) -> Path:
    """Write a report bundle for ``inputs`` (actsparse output folders) into ``out``, atomically.
    ``run``: how the inputs were made, when one command made them all (``analyze``: profile, the
    steps' command lines, what was left out and why), kept in the manifest's options."""
    out = Path(out)
    sources = _check_inputs(inputs, out)  # every input is checked before anything is written
    if run:
        for src in sources:
            src.made_by = f"actsparse {run.get('command', 'analyze')}, step {src.label} (command lines in manifest.json)"
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
            "report", {"inputs": [str(p) for p in inputs], "output": str(out), "force": force, "title": title,
                       **({"run": run} if run else {})},
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
                  f"Input {md_code(src.label)} ({md_escape(src.made_by or src.path)}); "
                  f"git {md_escape(man.get('git_hash'))}; "
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
