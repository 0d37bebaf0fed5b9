"""Massive activations (``massive``, ``measure --massive``): Sun et al. 2024, Max_act_llm."""

from __future__ import annotations

from typing import Any

from reports.sections import FigureSpec, ReportSection, TableSpec


def draw_massive_layers(table, folder, title, manifest) -> list[str]:
    from reports.massive_report import plot_layers

    return plot_layers(table("massive_layers"), folder, title)


def draw_massive_intervene(table, folder, title, manifest) -> list[str]:
    from reports.massive_report import plot_intervene

    return plot_intervene(table("massive_intervene"), folder, title)


def draw_massive_attention(table, folder, title, manifest) -> list[str]:
    from reports.massive_report import plot_attention_heads

    return plot_attention_heads(table("massive_attention"), folder, title)


def draw_massive_attention_prompt(table, folder, title, manifest) -> list[str]:
    from reports.massive_report import plot_attention_prompt

    return plot_attention_prompt(table("massive_attention_prompt"), folder, title)


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
        "massive_intervene": TableSpec(("mode",), ("layer", "layer_1based", "n_channels", "n_sequences",
                                                   "n_targets")),
        "massive_intervene_values": TableSpec((), skip="values of channels that differ between runs"),
        "massive_attention": TableSpec(("layer", "head"), ("layer_1based", "n_sequences", "n_queries",
                                                           "n_seq_with_massive")),
        "massive_attention_prompt": TableSpec((), skip="one prompt's (query, key) logits, drawn, not compared"),
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
        FigureSpec("massive_intervene", lambda c: "Perplexity with the massive activations of the reference layer "
                   "(positions 0 and each sequence's largest |h|, the massive channels) set to zero or to their mean "
                   "over the sequences, against the original model on the same sequences (Sun et al. 2024 exp3, "
                   "Table 3); for a sequence classifier (--labels), accuracy and the loss ratio exp(CE - CE original) "
                   "on the labelled examples instead. Whiskers: 95 % bootstrap interval over the sequences (examples); "
                   "the ratios' own paired errors are in the table's _se columns.", ("massive_intervene",),
                   "reports.sections.massive:draw_massive_intervene"),
        FigureSpec("massive_attention", lambda c: "Share of attention probability per layer and head on key position "
                   "0, on Sun's exp3 positions (0 and the largest-|h| position) and on the Sun-massive positions, "
                   "over every query at position >= 1 for causal attention, every query for bidirectional attention "
                   "(encoders; the title says which) (Sun et al. 2024 exp4).", ("massive_attention",),
                   "reports.sections.massive:draw_massive_attention"),
        FigureSpec("massive_attention_prompt", lambda c: "Attention logits of one prompt averaged over heads, one "
                   "panel per layer, lower triangle for causal attention, the full square for bidirectional attention "
                   "(Sun et al. 2024 Fig. 6 style, lib/plot_utils_llm.py plot_attn).",
                   ("massive_attention_prompt",), "reports.sections.massive:draw_massive_attention_prompt"),
    ),
    summary="reports.sections.massive:summary_lines",
    write="reports.sections.massive:write_files",
    manifest="reports.sections.massive:manifest_section",
)
