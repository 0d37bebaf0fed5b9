"""Sparsity-vs-PPL curves (``curve``): CETT, top-k, TEAL (uniform and greedy), absq_down, CATS, CHESS, FAT;
per-projection TEAL rows in ``teal_projections``."""

from __future__ import annotations

from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_curve(table, folder, title, manifest) -> list[str]:
    from reports.pplp_report import plot_curve

    n = (manifest.get("curve") or {}).get("n_counted_tokens")
    return plot_curve(table("curve"), folder, title, int(n) if isinstance(n, (int, float)) else 0)


SECTION = ReportSection(
    name="curve",
    manifest_key="curve",
    prefixes=(("curve", "curve"),),
    tables={
        "curve": TableSpec(("method", "param", "value"), ("pass",)),
        "curve_layers": TableSpec(("method", "param", "value", "canonical_name", "layer"), ("width",)),
        "teal_projections": TableSpec(("method", "param", "value", "layer", "projection"), ("params", "width")),
    },
    figures=(
        FigureSpec("curve", lambda c: "Sparsity-vs-PPL curves: mean activation sparsity of the sparse run (x) "
                   "against the PPL increase (y, symmetric log) for each threshold family, labelled with the tensor "
                   "it thresholds (TEAL methods: their parameter-weighted effective sparsity over all projection "
                   "inputs); dense and sparse runs on the same tokens.", ("curve",),
                   "reports.sections.curve:draw_curve"),
    ),
)
