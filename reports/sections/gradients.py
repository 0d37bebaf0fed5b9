"""Gradient (derivative) sparsity and spikes (``grad``, ``measure --grad``): arXiv 2309.03004, Bug-or-Feature^2."""

from __future__ import annotations

from typing import Any

import pandas as pd

from reports.sections import FigureSpec, ReportSection, TableSpec
from reports.sections.sparsity import SUMMARY


def draw_grad_by_layer(table, folder, title, manifest) -> list[str]:
    from reports.grad_report import grad_by_layer

    spikes = table("spikes")
    return grad_by_layer(table("gradients"), spikes if spikes is not None else pd.DataFrame(), folder,
                         f"{title}: gradient sparsity")


def summary_lines(result, options: dict[str, Any]) -> list[str]:
    from reports.grad_report import grad_summary_lines

    return grad_summary_lines(result)


def manifest_section(result) -> dict[str, Any]:
    return result.info


SECTION = ReportSection(
    name="gradients",
    manifest_key="gradients",
    prefixes=(("grad", "gradients"), ("spikes", "gradients")),
    tables={
        "gradients_summary": SUMMARY,
        "gradients": TableSpec(("canonical_name", "kind", "layer"), ("width", "call")),
        "spikes": TableSpec(("canonical_name", "module_path", "kind", "layer"), ("in_features", "n_batches")),
    },
    figures=(
        FigureSpec("grad_by_layer", lambda c: "Gradient sparsity per site: derivative sparsity (act'(h) = 0) and "
                   "effective-gradient sparsity |dL/dh| < tau, the mean ||dL/dh||_2^2 per token, and spike_max "
                   "(max |x|) at each down-projection input.", ("gradients",),
                   "reports.sections.gradients:draw_grad_by_layer"),
    ),
    summary="reports.sections.gradients:summary_lines",
    write="reports.grad_report:write_grad_files",
    manifest="reports.sections.gradients:manifest_section",
)
