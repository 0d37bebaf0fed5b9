"""What every command prints on stdout, in one place: ``--format table|json|csv|md``.

A command hands ``emit`` the tables it wrote (by file name), a small ``info`` dict and its terminal
*views* (tables described column by column, and lines of text). Then:

- ``table``: rich tables that fit the terminal width (``COLUMNS`` when set, also when piped): short
  site labels (``L0 mlp_post``, full names stay in the files), cells that never wrap; when the columns
  do not fit, the least important ones are left out (the caption names them), and what still does not
  fit is split into several tables that repeat the label column;
- ``json``: ``{"info": {...}, "tables": {name: [row, ...]}}``, the numbers of the files (NaN as
  ``null``, infinities as ``"inf"``/``"-inf"``);
- ``csv``: the command's main table, exactly as its CSV file;
- ``md``: the views as markdown tables (every column; text escaped with ``reports.markdown.md_escape``).

Messages (progress, notes, ``wrote ...``) go to stderr, never through here. Numbers are written by
``reports.numbers`` (``fmt``, ``pct``, ``fixed``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    md = "md"


# ----------------------------------------------------------------------------------------------- the -q rule
def stdout_format(output_format: Optional[OutputFormat], quiet: bool, output: Any = None, *,
                  writes: bool = True) -> Optional[OutputFormat]:
    """What stdout carries: the ``--format`` given; else a table, or nothing under ``-q``.

    ``-q`` without ``-o`` and without ``--format`` would compute and then show and write nothing: refused
    (exit 2) before any work, for commands whose ``-o`` is optional (``writes``)."""
    if output_format is not None:
        return OutputFormat(output_format)
    if not quiet:
        return OutputFormat.table
    if writes and output is None:
        from probes.errors import ActsparseError

        raise ActsparseError("-q without -o would compute and then print and write nothing",
                             "give -o FOLDER to write the results, or drop -q (or add --format json|csv|md|table "
                             "to print them)", exit_code=2)
    return None


# --------------------------------------------------------------------------------------------------- labels
_LAYER_PART = re.compile(r"^(?P<pre>(?:.*\.)?)blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")
_NUMBER_PART = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_KIND_OF_HOOK = {"mlp.hook_post": "mlp_post", "mlp.hook_gate_act": "mlp_gate_act", "mlp.hook_pre": "mlp_pre",
                 "hook_resid_post": "resid_post", "hook_resid_pre": "resid_pre", "hook_attn_out": "attn_out",
                 "hook_mlp_out": "mlp_out"}


def _number(v: Any) -> Optional[int]:
    """``v`` as a whole layer number, None when it is missing (None, NaN, text)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None


def looks_like_path(name: Any) -> bool:
    """Whether ``name`` is a site or weight path with a layer number in it (``blocks.0.mlp.hook_post``)."""
    return isinstance(name, str) and bool(_LAYER_PART.match(name) or _NUMBER_PART.search(name))


def weight_label(name: Any) -> str:
    """A short label for a weight or module path: ``transformer.h.0.attn.c_attn.weight`` -> ``L0 attn.c_attn``
    (the first number in the path is the layer); paths without a number lose only ``.weight``."""
    s = str(name)
    for suffix in (".weight", ".bias"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    m = _NUMBER_PART.search(s)
    if m is None:
        return s
    rest = s[m.end():]
    return f"L{m.group(1)} {rest}" if rest else s


def site_label(row: dict) -> str:
    """A short label for a site row: ``L0 mlp_post`` (layer + kind; ``encoder L0 mlp_post`` for a second
    stack), ``embed``/``final_norm`` for sites outside the blocks; weights and module paths by
    ``weight_label``."""
    canonical = row.get("canonical_name")
    kind = row.get("kind")
    layer = _number(row.get("layer"))
    pre = ""
    if isinstance(canonical, str):
        m = _LAYER_PART.match(canonical)
        if m:
            pre = m.group("pre").rstrip(".")
            if layer is None and kind not in ("embed",):
                layer = int(m.group("layer"))
            if not isinstance(kind, str) or not kind:
                kind = _KIND_OF_HOOK.get(m.group("hook"), m.group("hook"))
    if isinstance(kind, str) and kind and kind != "custom" and not kind.startswith("linear"):
        base = f"L{layer} {kind}" if layer is not None else kind
        return f"{pre} {base}" if pre else base
    for key in ("module_path", "name", "canonical_name"):
        if isinstance(row.get(key), str) and row[key]:
            return weight_label(row[key])
    return str(canonical if canonical is not None else "")


def _full_name(row: dict) -> str:
    for key in ("canonical_name", "name", "module_path"):
        if isinstance(row.get(key), str) and row[key]:
            return row[key]
    return ""


def unique_labels(rows: Sequence[dict], label: Callable[[dict], str] = site_label,
                  ident: Callable[[dict], Any] = _full_name, full: Callable[[dict], str] = _full_name) -> list[str]:
    """``label`` of each row, or its full name where two different rows (by ``ident``) would share a label."""
    labels = [label(r) for r in rows]
    owners: dict[str, set] = {}
    for r, lab in zip(rows, labels):
        owners.setdefault(lab, set()).add(ident(r))
    return [lab if len(owners[lab]) == 1 else (full(r) or lab) for r, lab in zip(rows, labels)]


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------- views
@dataclass
class Col:
    """One column of a terminal table. ``cell(row) -> str``. When the table does not fit, its compact form is
    used: ``short``/``short_head`` instead of ``cell``/``head`` (a short label for a full name), and
    ``wide_only`` columns left out; then columns with ``drop`` > 0 are left out, the highest first."""

    head: str
    cell: Callable[[dict], str]
    left: bool = False
    drop: int = 0
    short: Optional[Callable[[dict], str]] = None
    short_head: Optional[str] = None
    wide_only: bool = False

    def compacted(self) -> "Col":
        return Col(self.short_head or self.head, self.short or self.cell, self.left, self.drop)


def col(head: str, key: str, show: Callable[[Any], str] | None = None, *, left: bool = False, drop: int = 0,
        wide_only: bool = False) -> Col:
    """A column showing ``row[key]`` through ``show`` (default ``reports.numbers.fmt``)."""
    if show is None:
        from reports.numbers import fmt as show
    return Col(head, lambda r, k=key, f=show: f(r.get(k)), left=left, drop=drop, wide_only=wide_only)


def name_col(head: str = "site", key: str = "canonical_name") -> Col:
    """The row's full name (``row[key]``) when the table fits, its short label (``row["_label"]``) when not."""
    return Col(head, lambda r: "" if r.get(key) is None else str(r.get(key)), left=True,
               short=lambda r: str(r.get("_label", r.get(key))))


def labelled(rows: Sequence[dict], labels: Sequence[str]) -> list[dict]:
    """Copies of ``rows`` carrying their short label (``_label``), for ``name_col``."""
    return [dict(r, _label=lab) for r, lab in zip(rows, labels)]


@dataclass
class View:
    """A terminal table: ``rows`` shown through ``cols``; ``compact``: the columns to use when ``cols`` do
    not fit (e.g. short labels for full names); the first ``key`` columns are repeated when split."""

    title: str
    rows: list[dict]
    cols: list[Col]
    compact: Optional[list[Col]] = None  # default: each column's compact form (Col.compacted)
    key: int = 1
    empty: Optional[str] = None  # a line printed instead of an empty table


@dataclass
class Output:
    """Everything a command prints: views and text lines (in order), its tables and a small info dict."""

    items: list = field(default_factory=list)  # View or str
    tables: dict = field(default_factory=dict)  # name -> DataFrame, as written to the files
    main: Optional[str] = None  # the table --format csv prints
    info: dict = field(default_factory=dict)
    markdown: Optional[str] = None  # --format md prints this instead of the views (compare's PR report)

    def add(self, *items: Any) -> "Output":
        self.items.extend(i for i in items if i is not None)
        return self

    def merge(self, other: "Output") -> "Output":
        self.items.extend(other.items)
        for k, v in other.tables.items():
            self.tables.setdefault(k, v)
        for k, v in other.info.items():
            self.info.setdefault(k, v)
        return self


# --------------------------------------------------------------------------------------------- rendering
def stdout_width() -> Optional[int]:
    """The width of stdout tables: ``COLUMNS`` when set (also when piped), the terminal's otherwise, and
    160 for a pipe or file without ``COLUMNS``."""
    import os

    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    return None if sys.stdout.isatty() else 160


def stdout_console():
    from rich.console import Console

    return Console(width=stdout_width())


def _table(cols: Sequence[Col], rows: Sequence[dict], title: Optional[str], frameless: bool):
    """A rich table; ``frameless``: no frame, two spaces between columns and a rule under the header (the style
    used when the framed one does not fit)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    kw = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0)) if frameless else {}
    t = Table(title=escape(title) if title else None, **kw)
    for c in cols:
        t.add_column(escape(c.head), justify="left" if c.left else "right", no_wrap=True, overflow="ellipsis")
    for r in rows:
        t.add_row(*[Text(c.cell(r)) for c in cols])
    return t


def _natural_width(table) -> int:
    import io

    from rich.console import Console

    return Console(width=100_000, file=io.StringIO()).measure(table).maximum


_PLAIN = re.compile(r"[^\x00-\x1f\x7f:\[\]\\]*")  # no control characters, markup or emoji codes


def _plain_width(cols: Sequence[Col], rows: Sequence[dict], frameless: bool) -> Optional[int]:
    """``_natural_width(_table(cols, rows, None, frameless))`` from the cell texts alone (rich's measure of a
    table of ``no_wrap`` text cells: every column as wide as its widest cell, plus the padding, one cell on
    each side framed and one on the right frameless except after the last column, plus the rules, an edge on
    each side framed and one between columns), 10-40 ms cheaper per check; None when a text could render
    differently from its characters (control characters, markup, emoji codes): then rich measures."""
    from rich.cells import cell_len

    if not cols:
        return None
    widths = []
    for c in cols:
        texts = [c.head, *(c.cell(r) for r in rows)]
        if not all(_PLAIN.fullmatch(t) for t in texts):
            return None
        widths.append(max(cell_len(t) for t in texts))
    n = len(widths)
    return sum(widths) + (n - 1) * 2 if frameless else sum(widths) + 2 * n + 2 + (n - 1)


def _fits(cols: Sequence[Col], rows: Sequence[dict], width: int, frameless: bool) -> bool:
    natural = _plain_width(cols, rows, frameless)
    if natural is None:
        natural = _natural_width(_table(cols, rows, None, frameless))
    return natural <= width


def _fit(view: View, width: int) -> tuple[list[list[Col]], list[str]]:
    """Frameless column panels that fit ``width`` and the heads of the columns left out: the compact
    columns (short labels), less the droppable ones, highest ``drop`` first, until they fit; else those
    split into panels that repeat the first ``view.key`` columns."""
    def fits(cols: Sequence[Col]) -> bool:
        return _fits(cols, view.rows, width, True)

    cols = list(view.compact if view.compact is not None else
                [c.compacted() for c in view.cols if not c.wide_only])
    dropped: list[str] = []
    while not fits(cols):
        droppable = [c for c in cols if c.drop > 0]
        if not droppable:
            break
        worst = max(droppable, key=lambda c: c.drop)
        cols.remove(worst)
        dropped.append(worst.head)
    if fits(cols):
        return [cols], dropped
    key, rest = cols[: view.key], cols[view.key:]
    panels: list[list[Col]] = []
    cur: list[Col] = []
    for c in rest:
        if cur and not fits(key + cur + [c]):
            panels.append(key + cur)
            cur = []
        cur.append(c)
    if cur:
        panels.append(key + cur)
    n = len(panels)  # as many panels as needed, filled evenly (5 columns as 3 + 2, not 4 + 1)
    size = -(-len(rest) // n)
    even = [key + rest[i:i + size] for i in range(0, len(rest), size)]
    if len(even) == n and all(fits(p) for p in even):
        panels = even
    return panels, dropped


def render_table(out: Output, console=None) -> None:
    """Every view framed with all its columns when all of them fit the console's width; else every view
    frameless with short labels, less columns where needed (one line names them), split as a last resort."""
    con = console or stdout_console()
    width = con.width
    views = [v for v in out.items if isinstance(v, View) and v.rows]
    wide = all(_fits(v.cols, v.rows, width, False) for v in views)
    for item in out.items:
        if isinstance(item, str):
            con.print(item, markup=False, highlight=False, emoji=False)
            continue
        if not item.rows:
            if item.empty:
                con.print(item.empty, markup=False, highlight=False, emoji=False)
            continue
        panels, dropped = ([list(item.cols)], []) if wide else _fit(item, width)
        for i, cols in enumerate(panels):
            title = item.title if len(panels) == 1 else f"{item.title} ({i + 1}/{len(panels)})"
            con.print(_table(cols, item.rows, title, not wide))
        if dropped:
            import textwrap

            # wrapped at word boundaries, so a narrow terminal never splits a column name
            note = f"(not shown at {width} columns: {', '.join(dropped)}; see --format csv)"
            for line in textwrap.wrap(note, width=max(20, width), break_long_words=False, break_on_hyphens=False):
                con.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


def render_markdown(out: Output) -> str:
    from reports.markdown import md_escape

    lines: list[str] = []
    for item in out.items:
        if lines:
            lines.append("")
        if isinstance(item, str):
            lines.append(md_escape(item))
            continue
        if not item.rows:
            if item.empty:
                lines.append(md_escape(item.empty))
            continue
        if item.title:
            lines += [f"**{md_escape(item.title)}**", ""]
        lines.append("| " + " | ".join(md_escape(c.head) for c in item.cols) + " |")
        lines.append("|" + "|".join("---" if c.left else "---:" for c in item.cols) + "|")
        for r in item.rows:
            lines.append("| " + " | ".join(md_escape(c.cell(r)) for c in item.cols) + " |")
    return "\n".join(lines) + "\n"


def jsonable(v: Any) -> Any:
    """``v`` as strict JSON: NaN and missing -> None, infinities -> ``"inf"``/``"-inf"``, numpy scalars
    and arrays as Python numbers and lists, other objects as text."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [jsonable(x) for x in v]
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(v, np.ndarray):
            return [jsonable(x) for x in v.tolist()]
        if isinstance(v, np.generic):
            v = v.item()
            if v is None or isinstance(v, (bool, str)):
                return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    pd = sys.modules.get("pandas")
    if pd is not None:
        if v is pd.NA or v is pd.NaT:
            return None
        if isinstance(v, pd.Timestamp):
            return v.isoformat()
    return str(v)


def records(df: "pd.DataFrame") -> list[dict]:
    return [jsonable(r) for r in df.reset_index(drop=True).to_dict(orient="records")]


def render_json(out: Output) -> str:
    import json

    doc = {"info": jsonable(out.info), "tables": {name: records(df) for name, df in out.tables.items()}}
    return json.dumps(doc, indent=2, allow_nan=False)


def emit(fmt: Optional[OutputFormat], out: Output) -> None:
    """Print ``out`` on stdout in ``fmt`` (None: nothing)."""
    if fmt is None:
        return
    import typer

    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.table:
        render_table(out)
    elif fmt is OutputFormat.json:
        typer.echo(render_json(out))
    elif fmt is OutputFormat.csv:
        df = out.tables.get(out.main) if out.main else None
        if df is None:
            import pandas as pd

            df = pd.DataFrame()
        typer.echo(df.reset_index(drop=True).to_csv(index=False), nl=False)
    else:
        typer.echo(out.markdown if out.markdown is not None else render_markdown(out), nl=False)


# ---------------------------------------------------------------------------------------- result tables
def result_tables(result: Any) -> dict:
    """The tables of an analysis result by the names they are written under: ``result.tables()`` where
    the result has it (``probes.analysis.Result``), else the same tables the report writers write."""
    import pandas as pd

    tables = getattr(result, "tables", None)
    if callable(tables):
        return dict(tables())
    if isinstance(tables, dict):
        return dict(tables)
    kind = type(result).__name__
    if kind == "MeasureResult":
        return {"sparsity": result.table(), "summary": result.summary()}
    if kind == "GradResult":
        out = {"gradients": result.table(), "gradients_summary": result.summary()}
        spikes = result.spikes_table()
        if len(spikes):
            out["spikes"] = spikes
        return out
    if kind == "MassiveResult":
        out = {"massive_layers": pd.DataFrame(result.layers), "massive_topk": pd.DataFrame(result.topk),
               "massive_channels": pd.DataFrame(result.channels)}
        if result.int8:
            out["massive_int8"] = pd.DataFrame(result.int8)
        return out
    if kind == "PplpResult":
        return {"pplp": result.table(), "pplp_summary": result.summary(), "pplp_trace": result.trace_table(),
                "cett_calibration": pd.DataFrame(result.calibration)}
    if kind == "CurveResult":
        return {"curve": result.table(), "curve_layers": result.layer_table()}
    return {}


def info_of(result_info: dict, keys: Iterable[str]) -> dict:
    """The scalar entries ``keys`` of a result's info (the small ``info`` of ``--format json``)."""
    return {k: result_info[k] for k in keys if k in result_info and not isinstance(result_info[k], (dict, list))}


__all__ = ["Col", "OutputFormat", "Output", "View", "col", "emit", "jsonable", "labelled", "name_col", "result_tables",
           "site_label", "stdout_console", "stdout_format", "unique_labels", "weight_label"]
