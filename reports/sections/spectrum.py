"""Weight spectra (``spectrum``): WeightWatcher 0.7.7 columns and the Marchenko-Pastur fit."""

from __future__ import annotations

from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_alpha_by_layer(table, folder, title, manifest) -> list[str]:
    from reports.spectrum_plots import plot_alpha_by_layer

    return plot_alpha_by_layer(table("spectrum"), folder)


SECTION = ReportSection(
    name="spectrum",
    manifest_key=None,
    prefixes=(("alpha", None), ("esd", None), ("spectrum", None)),
    tables={"spectrum": TableSpec(("name", "part"), ("num_evals",), kind_col="layer_type")},
    figures=(
        FigureSpec("alpha_by_layer", lambda c: "WeightWatcher power-law exponent alpha (top) and Marchenko-Pastur "
                   "sigma_mp (bottom) of every weight matrix in checkpoint order; dotted lines at alpha = 2 and 6 "
                   "(WW's over-/under-trained marks).", ("spectrum",),
                   "reports.sections.spectrum:draw_alpha_by_layer"),
    ),
)
