"""``actsparse drift``: per-weight statistics (mean, % negative, std, extreme fraction) straight from the weights."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse_cli.common import (
    handle_errors,
    stderr_console,
    stdout_console,
)
from actsparse_cli.loading_opts import shared_options


def print_drift_table(rows: list[dict], title: str, multi: bool) -> None:
    from rich.table import Table

    from reports.numbers import fixed, fmt

    t = Table(title=title)
    cols = (["ckpt"] if multi else []) + ["weight", "kind", "role", "shape", "mean", "neg %", "std",
                                          "q99.9 |w|", "extreme frac", "max |w|"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("weight", "kind", "role", "shape") else "right", overflow="fold")
    for r in rows:
        cells = ([str(r["checkpoint_index"])] if multi else []) + [
            r["name"], r["kind"], r["role"], r["shape"], fmt(r["mean"]), fixed(r["neg_pct"], 2), fmt(r["std"]),
            fmt(r["extreme_threshold"]), fmt(r["extreme_frac"]), fmt(r["max_abs"])]
        t.add_row(*cells)
    stdout_console().print(t)


def register(app: typer.Typer) -> None:
    @app.command("drift")
    @shared_options
    @handle_errors
    def drift(
        checkpoints: Annotated[list[str], typer.Argument(help="One or more checkpoints (folder, .safetensors, .bin, "
                                                         ".pt, .gguf, sharded index), e.g. the same run at several "
                                                         "steps, in order.", show_default=False)],
        *,
        unsafe_pickle, output, force, quiet, debug,
    ) -> None:
        """Weight drift per linear layer: mean, % negative, std, fraction with |w| >= its 99.9th percentile."""
        from actsparse_cli.common import batch_progress
        from probes.drift import weight_drift
        from reports.bundle import check_output_dir
        from reports.sections.drift import write_drift_outputs

        if output is not None:
            check_output_dir(output, force, inputs=checkpoints)
        with batch_progress(quiet, "drift") as progress:
            result = weight_drift(checkpoints, unsafe_pickle=unsafe_pickle,
                                  progress=(lambda total, adv: progress(total, adv)) if progress else None)
        options = {"checkpoints": list(checkpoints), "unsafe_pickle": unsafe_pickle,
                   "output": str(output) if output else None, "force": force}
        if output is not None:
            write_drift_outputs(output, result, options, force=force)
        if not quiet:
            print_drift_table(result.rows, f"weight drift: {', '.join(checkpoints)} "
                                           f"({result.info['n_tensors_measured']} weights)", len(checkpoints) > 1)
            if output is not None:
                stderr_console().print(f"wrote {output}/ (drift, drift_summary .parquet/.csv, drift_by_layer.png/.svg, "
                                       "summary.md, manifest.json)")
