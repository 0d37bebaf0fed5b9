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
    # kkT_rows is a size (the neurons of K in arXiv 2309.03004's K K^T), not a measurement
    tables={"spectrum": TableSpec(("name", "part"), ("num_evals", "kkT_rows"), kind_col="layer_type")},
    figures=(
        FigureSpec("alpha_by_layer", lambda c: "WeightWatcher power-law exponent alpha (top) and Marchenko-Pastur "
                   "sigma_mp (bottom) of every weight matrix by block (0-based; tensors outside the blocks at "
                   "'other'), one marker and colour per matrix role; shaded: WW's alpha band 2-6.", ("spectrum",),
                   "reports.sections.spectrum:draw_alpha_by_layer"),
    ),
)
