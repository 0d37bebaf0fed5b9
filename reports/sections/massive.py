"""Massive activations (``massive``, ``measure --massive``): Sun et al. 2024, Max_act_llm."""

from __future__ import annotations

from typing import Any

from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_massive_layers(table, folder, title, manifest) -> list[str]:
    from reports.massive_report import plot_layers

    return plot_layers(table("massive_layers"), folder, title)


def summary_lines(result, options: dict[str, Any]) -> list[str]:
    from reports.massive_report import massive_summary_lines

    return massive_summary_lines(result)


def write_files(folder, result, title: str) -> list[str]:
    from reports.massive_report import write_massive_files

    return write_massive_files(folder, result, title)


def manifest_section(result) -> dict[str, Any]:
    from reports.massive_report import massive_manifest_section

    return massive_manifest_section(result)


SECTION = ReportSection(
    name="massive",
    manifest_key="massive",
    prefixes=(("massive", "massive"),),
    tables={
        "massive_layers": TableSpec(("canonical_name", "kind", "layer"),
                                    ("width", "layer_1based", "n_sequences", "peak_sample", "peak_position",
                                     "peak_channel", "peak_token_id")),
        "massive_int8": TableSpec(("canonical_name", "policy")),
        "massive_topk": TableSpec((), skip="top-K entries with coordinates, not per-site metrics"),
        "massive_channels": TableSpec((), skip="per-channel lists whose members differ between runs"),
    },
    figures=(
        FigureSpec("massive_layers", lambda c: "Top-1, top-2, top-3 and median of |h| on the residual stream after "
                   "each block (Sun et al. 2024, Fig. 2 style): per sequence over the whole token x channel tensor, "
                   "then the mean over sequences; log scale, dotted line at 100.", ("massive_layers",),
                   "reports.sections.massive:draw_massive_layers"),
        FigureSpec("massive_heatmap", lambda c: "Max |a| per layer and channel of the residual stream after each "
                   "block over the run (log colour scale); thin lines mark the 5 strongest channels."),
        FigureSpec("massive_3d", lambda c: "|h| of one layer over tokens x channels for one prompt (Sun et al. 2024, "
                   "Fig. 1 style)."),
    ),
    summary="reports.sections.massive:summary_lines",
    write="reports.sections.massive:write_files",
    manifest="reports.sections.massive:manifest_section",
)
