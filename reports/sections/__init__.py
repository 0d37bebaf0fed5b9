"""Report sections: what the bundle, ``summary.md``, ``compare`` and captions know of each analysis.

One module per analysis (``reports/sections/<name>.py``) defines a ``SECTION``: the tables it
writes (with how ``compare`` lines them up), the manifest key that says on which tokens it was
measured, the figures drawn from its tables (stem, tables needed, drawing function, caption, in
display order), and the summary lines ``measure --X`` puts in its ``summary.md``. Nothing else in
``reports/`` lists analyses by hand: the bundle, captions, figure order, token sections and the
compare specs are read from this registry.

The registry is lazy (``"module:attr"`` strings, as lm-evaluation-harness' ``api/registry.py``):
drawing functions are imported only when a figure is drawn, so listing sections imports no
matplotlib and no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Display order: the order of sections in a bundle, of their figures, and of token sections.
REGISTRY: dict[str, str] = {
    "sparsity": "reports.sections.sparsity:SECTION",
    "massive": "reports.sections.massive:SECTION",
    "gradients": "reports.sections.gradients:SECTION",
    "flatness": "reports.sections.flatness:SECTION",
    "curve": "reports.sections.curve:SECTION",
    "pplp": "reports.sections.pplp:SECTION",
    "cliff": "reports.sections.cliff:SECTION",
    "spectrum": "reports.sections.spectrum:SECTION",
    "drift": "reports.sections.drift:SECTION",
    "track": "reports.sections.track:SECTION",
}


@dataclass(frozen=True)
class TableSpec:
    """How ``compare`` lines a table up: identity columns, columns not compared, and the kind column."""

    keys: tuple[str, ...]  # identity columns (those present are used)
    meta: tuple[str, ...] = ()  # numeric columns that are not compared (counts, coordinates, sizes)
    kind_col: str = "kind"
    value_cols: tuple[str, ...] = ()  # tables already in long form (a "metric" column): their value columns
    skip: str | None = None  # why the table is not compared


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a section. ``draw`` is ``"module:function"`` called as
    ``fn(table, folder, title, manifest) -> [files]`` where ``table(name)`` gives a table or None;
    None: the figure is only ever written by its command (copied into bundles, never redrawn)."""

    stem: str
    caption: Callable[[dict[str, Any]], str]
    needs: tuple[str, ...] = ()  # tables that must be present to draw it
    draw: str | None = None
    needs_any: tuple[str, ...] = ()  # at least one of these must be present


@dataclass(frozen=True)
class ReportSection:
    name: str
    manifest_key: str | None  # the manifest section describing its tokens; None: weights only
    prefixes: tuple[tuple[str, str | None], ...]  # (table/figure stem prefix, token section)
    tables: dict[str, TableSpec] = field(default_factory=dict)
    figures: tuple[FigureSpec, ...] = ()
    summary: str | None = None  # "module:function(result, options) -> [markdown lines]" for measure bundles
    # For analyses `measure --X` runs beside activation sparsity (one bundle):
    write: str | None = None  # "module:function(folder, result, title) -> [files]": its tables and figures
    manifest: str | None = None  # "module:function(result) -> {...}": the manifest section under manifest_key
    extra_manifest: str | None = None  # "module:function(result) -> {...}": top-level manifest keys it adds


from probes.analysis import load  # noqa: E402  (one "module:attr" loader for both registries)


_LOADED: dict[str, ReportSection] = {}


def section(name: str) -> ReportSection:
    if name not in REGISTRY:
        from probes.errors import unknown_name

        raise unknown_name("report section", name, REGISTRY)
    ref = REGISTRY[name]
    if ref not in _LOADED:  # by reference, so a re-registered name never gets a stale section
        _LOADED[ref] = load(ref)
    return _LOADED[ref]


def sections() -> list[ReportSection]:
    return [section(n) for n in REGISTRY]


def token_sections() -> tuple[str, ...]:
    """Manifest keys that describe measured tokens, in display order."""
    return tuple(dict.fromkeys(s.manifest_key for s in sections() if s.manifest_key))


def stem_prefixes() -> tuple[tuple[str, str | None], ...]:
    """(prefix, token section) of every section, longest prefix first (``trend_sparsity`` before ``trend_``)."""
    pairs = [p for s in sections() for p in s.prefixes]
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def figure_specs() -> list[tuple[ReportSection, FigureSpec]]:
    return [(s, f) for s in sections() for f in s.figures]


def table_specs() -> dict[str, TableSpec]:
    out: dict[str, TableSpec] = {}
    for s in sections():
        out.update(s.tables)
    return out
