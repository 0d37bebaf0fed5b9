"""Trends over a training run's checkpoints (``track``), with the emergence fit."""

from __future__ import annotations

from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_trends(table, folder, title, manifest, present=frozenset()) -> list[str]:
    """Every trend figure at once (one reading of the trend tables); figures in ``present`` are skipped."""
    from reports.track import plot_trends

    names = ("trends", "trend_sparsity", "trend_drift", "trend_massive", "trend_spectrum", "trend_weights")
    tables = {n: table(n) for n in names if table(n) is not None}
    return plot_trends(tables | {"emergence_fit": table("emergence_fit")}, folder, title, skip=present)


SECTION = ReportSection(
    name="track",
    manifest_key="track",
    prefixes=(("trend_sparsity", "track"), ("trend_massive", "track:massive"), ("trend_", None), ("trends", "track"),
              ("emergence", "track:massive")),
    tables={
        "trends": TableSpec(("step",), ("checkpoint_index",)),
        "trend_sparsity": TableSpec(("step", "canonical_name", "kind", "layer"), ("width", "checkpoint_index")),
        "trend_drift": TableSpec(("step", "role"), ("n_tensors", "n_weights", "checkpoint_index"), kind_col="role"),
        "trend_massive": TableSpec(("step", "canonical_name", "kind", "layer"), ("checkpoint_index", "layer_1based")),
        "trend_spectrum": TableSpec(("step", "name"), ("checkpoint_index",), kind_col="role"),
        "emergence_fit": TableSpec(("series",), ("n_points",)),
    },
    figures=(
        # one drawing call makes all four (stem "trend_*"); each keeps its own caption and place
        FigureSpec("trend_*", lambda c: "", draw="reports.sections.track:draw_trends", needs_any=("trends",
                   "trend_sparsity", "trend_drift", "trend_massive", "trend_spectrum")),
        FigureSpec("trend_sparsity", lambda c: "Activation sparsity (zero_frac, % of entries exactly 0) of each "
                   "layer against the training step, one panel per site kind."),
        FigureSpec("trend_drift", lambda c: "Weight drift against the training step (Bug-or-Feature^2): "
                   "element-weighted mean weight and % negative weights of the linear layers, one line per role."),
        FigureSpec("trend_massive", lambda c: "Massive-activation emergence: top-1 / median of |h| on the residual "
                   "stream of each layer against the training step (log y), with the fit f(t) = A exp(-lambda x) "
                   "log x + K, x = gamma t + t0 (Hidden Dynamics of Massive Activations) where it converged."),
        FigureSpec("trend_alpha", lambda c: "WeightWatcher alpha against the training step: mean over the analysed "
                   "matrices of each role, with the min-max range over all matrices shaded."),
    ),
)
