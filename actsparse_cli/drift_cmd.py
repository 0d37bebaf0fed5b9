"""``actsparse drift``: per-weight statistics (mean, % negative, std, extreme fraction) straight from the weights."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse_cli.common import (
    handle_errors,
    stderr_console,
)
from actsparse_cli.loading_opts import shared_options


def drift_output(result, title: str, multi: bool):
    """Weight statistics per tensor (one row per checkpoint and tensor): terminal table and tables written."""
    from actsparse_cli.display import Output, View, col, labelled, name_col, result_tables, unique_labels, \
        weight_label
    from reports.numbers import fixed

    ident = (lambda r: r.get("name"))
    labels = unique_labels(result.rows, label=lambda r: weight_label(r.get("name")), ident=ident,
                           full=lambda r: str(r.get("name")))
    rows = labelled(result.rows, labels)
    cols = ([col("ckpt", "checkpoint_index")] if multi else []) + [
        name_col("weight", "name"), col("kind", "kind", str, left=True, drop=5),
        col("role", "role", str, left=True, drop=6), col("shape", "shape", str, drop=4), col("mean", "mean"),
        col("neg %", "neg_pct", lambda v: fixed(v, 2)), col("std", "std"),
        col("q99.9 |w|", "extreme_threshold", drop=2),
        col("extreme frac", "extreme_frac"), col("max |w|", "max_abs", drop=3)]
    return Output(items=[View(title, rows, cols, key=2 if multi else 1)], tables=result_tables(result), main="drift")


def register(app: typer.Typer) -> None:
    @app.command("drift")
    @shared_options
    @handle_errors
    def drift(
        checkpoints: Annotated[list[str], typer.Argument(help="One or more checkpoints (folder, .safetensors, .bin, "
                                                         ".pt, .gguf, sharded index), e.g. the same run at several "
                                                         "steps, in order.", show_default=False)],
        *,
        unsafe_pickle, output, force, quiet, debug, output_format,
    ) -> None:
        """Weight drift per linear layer: mean, % negative, std, fraction with |w| >= its 99.9th percentile."""
        from actsparse_cli.common import batch_progress
        from probes.drift import weight_drift
        from reports.bundle import check_output_dir
        from reports.manifest import short_name
        from reports.sections.drift import write_drift_outputs

        from actsparse_cli.display import emit, info_of, stdout_format

        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before any read
        if output is not None:
            check_output_dir(output, force, inputs=checkpoints)
        with batch_progress(quiet, "drift") as progress:
            result = weight_drift(checkpoints, unsafe_pickle=unsafe_pickle,
                                  progress=(lambda total, adv: progress(total, adv)) if progress else None)
        options = {"checkpoints": list(checkpoints), "unsafe_pickle": unsafe_pickle,
                   "output": str(output) if output else None, "force": force}
        if output is not None:
            write_drift_outputs(output, result, options, force=force)
        out = drift_output(result, f"weight drift: {', '.join(short_name(c) for c in checkpoints)} "
                                   f"({result.info['n_tensors_measured']} weights)", len(checkpoints) > 1)
        out.info = {"command": "drift", "checkpoints": [str(c) for c in checkpoints],
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("n_tensors_measured", "n_tensors_skipped"))}
        emit(shown, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/ (drift, drift_summary .parquet/.csv, drift_by_layer.png/.svg, "
                                   "summary.md, manifest.json)", markup=False)
