"""The ``index.html`` of a report bundle: one self-contained page (figures embedded as base64 PNG,
no script, no network asset, a Content-Security-Policy that allows neither), every string from a
checkpoint or a corpus HTML-escaped.

``Figure`` is one figure of the bundle with its caption, as listed in the page, ``summary.md`` and
the bundle's manifest (``reports.bundle_report`` collects them).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reports.numbers import fmt
from reports.sources import TOKEN_SECTIONS, Source, checkpoint_label, checkpoint_of, token_counts

MAX_HTML_ROWS = 200  # rows of one table shown in index.html (the full table is beside it)
MAX_EMBEDDED_FIGURES = 400  # past this, figures are linked (beside index.html) instead of embedded


@dataclass
class Figure:
    label: str  # input label ("" for figures across inputs)
    stem: str  # relative to the input's figure folder, without suffix (e.g. "esd/transformer.h.0.attn.c_attn.weight")
    png: str | None  # bundle-relative paths
    svg: str | None
    caption: str
    origin: str  # "copied" (from the input) or "drawn" (by the report)


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
    rows = [("command", src.command), ("checkpoint", checkpoint_of(man)),
            ("made by", src.made_by) if src.made_by else ("input folder", str(src.path))]
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
    if argv and not src.made_by:  # a removed working folder's command line would only mislead
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
        parts.append(f'<li><a href="#input-{i}">{i}. {esc(src.command)}: {esc(checkpoint_label(src.manifest))}'
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
