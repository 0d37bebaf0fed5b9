"""``actsparse pplp`` (PPL-p% sparsity via CETT) and ``actsparse curve`` (sparsity vs PPL ratio per method)."""

from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    CheckpointOpt,
    float_check,
    handle_errors,
    stderr_console,
    warn_notes,
)
from actsparse_cli.loading_opts import choices, load, run_options, shared_options

PANEL_PPLP = "PPL-p%"
PANEL_CURVE = "Curve"


class SearchChoice(str, Enum):
    secant = "secant"
    bisection = "bisection"


class TealEvalChoice(str, Enum):
    last_half = "last-half"
    all = "all"


# Each CETT chunk holds (grid x d_model) floats per token, so the grid is bounded: 4096 candidates are far finer
# than the search needs (default 128) and keep a chunk near 130 MB at d_model 8192.
MAX_CETT_GRID = 4096
GridOpt = Annotated[int, typer.Option("--cett-grid", min=8, max=MAX_CETT_GRID, help="Candidate thresholds per layer "
                                      "(quantiles of the first batch's neuron output norms, at most one per value; "
                                      "CETT is exact at each), 8 to 4096.", rich_help_panel=PANEL_PPLP)]


@contextlib.contextmanager
def _progress(quiet: bool, description: str):
    """Yields (progress(total, advance), log(message)) drawing on stderr; both silent with -q."""
    if quiet:
        yield None, None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr_console(), transient=True) as prog:
        task = prog.add_task(description, total=None)

        def update(total, advance: int) -> None:
            prog.update(task, total=total, advance=advance)

        def log(msg: str) -> None:
            prog.console.print(f"[dim]{msg}[/dim]", highlight=False)

        yield update, log


def _warn(warnings: list[str]) -> None:
    con = stderr_console()
    for w in warnings:
        con.print(f"[bold red]WARNING:[/bold red] [red]{w}[/red]", highlight=False)


def pplp_output(result, title: str):
    """Per target p (status, c*, PPL ratio, sparsity), why a target was not reached, per layer; and the tables."""
    from actsparse_cli.display import Col, Output, View, col, labelled, name_col, result_tables, unique_labels
    from reports.numbers import fixed, fmt, pct

    def unless_unreachable(show):
        return lambda r: "-" if r.get("status") == "unreachable" else show(r)

    summary = result.summary().to_dict(orient="records")
    cols = [col("p %", "p_pct", lambda v: f"{v:g}"), col("status", "status", str, left=True),
            Col("c*", unless_unreachable(lambda r: fixed(r.get("c_star"), 5))),
            Col("PPL ratio", unless_unreachable(lambda r: fixed(r.get("achieved_ratio"), 5))),
            Col("sparsity %", unless_unreachable(lambda r: pct(r.get("mean_sparsity")))),
            Col("active %", unless_unreachable(lambda r: pct(r.get("mean_activation_ratio"))), drop=2),
            col("passes", "sparse_passes", drop=1)]
    out = Output(items=[View(title, summary, cols)], tables=result_tables(result), main="pplp_summary")
    out.add(*[f"p = {tg.p:g} %: {tg.status}: {tg.reason}" for tg in result.targets if tg.reason])
    layers = result.table().to_dict(orient="records")
    if layers:
        layers = labelled(layers, unique_labels(layers, ident=lambda r: r.get("canonical_name")
                                                or r.get("module_path")))
        out.add(View("per layer", layers, [
            col("p %", "p_pct", lambda v: f"{v:g}"), name_col(),
            col("threshold", "threshold", lambda v: fmt(v, 6)), col("sparsity %", "sparsity", pct),
            col("CETT in sparse run", "cett_in_sparse_run", lambda v: fixed(v, 4))], key=2))
    out.add(f"dense PPL {fixed(result.dense['ppl'], 4)} over {result.dense['n_tokens']} tokens; "
            f"{result.info['full_passes']} full passes ({result.info['method']})")
    return out


def curve_output(result, title: str):
    """Sparsity vs PPL ratio per method and setting, and which tensor each method thresholds; and the tables."""
    from actsparse_cli.display import Output, View, col, result_tables
    from reports.numbers import fixed, fmt, pct

    cols = [col("method", "method", str, left=True), col("param", "param", lambda v: fmt(v, na=""), left=True),
            col("value", "value", lambda v: fmt(v, 6, na="")), col("PPL ratio", "ppl_ratio", lambda v: fixed(v, 5)),
            col("sparsity %", "mean_sparsity", pct)]
    if any(r.get("effective_sparsity") == r.get("effective_sparsity") for r in result.points
           if r.get("effective_sparsity") is not None):
        cols.append(col("effective %", "effective_sparsity", lambda v: pct(v) if v == v else ""))
    out = Output(items=[View(title, list(result.points), cols, key=1)], tables=result_tables(result), main="curve")
    tensors = {}
    for r in result.points:
        if r.get("thresholded_tensor") and r.get("method") not in tensors:
            tensors[r["method"]] = r["thresholded_tensor"]
    out.add(*[f"{m} thresholds {t}" for m, t in tensors.items()])
    return out


def _parse_methods(method: list[str] | None):
    from probes.pplp import CURVE_METHODS, DEFAULT_CURVE_METHODS

    return choices(method, CURVE_METHODS, DEFAULT_CURVE_METHODS, "method", "--method")


def _parse_values(values: list[str] | None, methods) -> dict[str, tuple[float, ...]]:
    out: dict[str, tuple[float, ...]] = {}
    for item in values or []:
        name, sep, rest = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in methods:
            raise typer.BadParameter(f"{item!r}: expected METHOD=v1,v2,... with METHOD one of {', '.join(methods)}",
                                     param_hint="--values")
        try:
            vals = tuple(float(v) for v in rest.split(",") if v.strip())
        except ValueError as e:
            raise typer.BadParameter(f"{item!r}: values must be numbers", param_hint="--values") from e
        if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
            raise typer.BadParameter(f"{item!r}: give one or more finite values >= 0", param_hint="--values")
        if name != "fat" and any(v > 1 for v in vals):  # c, r_kept and the quantile s are fractions
            raise typer.BadParameter(f"{item!r}: {name} values are fractions; give values in [0, 1]",
                                     param_hint="--values")
        out[name] = vals
    return out


def register(app: typer.Typer) -> None:
    @app.command("pplp")
    @shared_options
    def pplp(
        checkpoint: CheckpointOpt = None,
        p: Annotated[Optional[list[float]], typer.Option("--p", help="Target PPL increase in percent (repeatable): "
                                                         "--p 1 finds the CETT where PPL rises by 1 %. Default 1.",
                                                         rich_help_panel=PANEL_PPLP)] = None,
        method: Annotated[SearchChoice, typer.Option("--method", help="secant (safeguarded, fewer passes) or "
                                                     "bisection (the reference).", rich_help_panel=PANEL_PPLP)]
        = SearchChoice.secant,
        tol: Annotated[float, typer.Option("--tol", callback=float_check(1e-9, 1.0), help="Absolute tolerance on "
                                           "the PPL ratio, 1e-9 to 1.", rich_help_panel=PANEL_PPLP)] = 1e-3,
        max_passes: Annotated[int, typer.Option("--max-passes", min=1, help="Sparse passes per target before giving "
                                                "up (status not_reached).", rich_help_panel=PANEL_PPLP)] = 40,
        cett_grid: GridOpt = 128,
        *,
        data, text_field, encoding, batch_size, max_length, max_tokens, stride, seed, skip_first, site, config, arch,
        tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output, force, quiet, debug,
        output_format,
    ) -> None:
        """PPL-p% sparsity (Sparsing Law): the shared CETT at which PPL rises by p %, per-layer thresholds, sparsity."""
        # Usage errors are raised here, outside handle_errors, so click reports them (exit 2).
        targets = tuple(p) if p else (1.0,)
        bad = [v for v in targets if not (math.isfinite(v) and v > 0)]
        if bad:
            raise typer.BadParameter(f"{bad[0]:g}: p must be a positive percentage, e.g. --p 1", param_hint="--p")
        _pplp(checkpoint=checkpoint, data=data, targets=targets, method=method, tol=tol, max_passes=max_passes,
              cett_grid=cett_grid, text_field=text_field, encoding=encoding, batch_size=batch_size,
              max_length=max_length, max_tokens=max_tokens, stride=stride, seed=seed, skip_first=skip_first,
              site=site, config=config, arch=arch, tokenizer=tokenizer, device=device, device_map=device_map,
              dtype=dtype, trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, output=output,
              force=force, quiet=quiet, debug=debug, output_format=output_format)

    @handle_errors
    def _pplp(*, checkpoint, data, targets, method, tol, max_passes, cett_grid, text_field, encoding, batch_size,
              max_length, max_tokens, stride, seed, skip_first, site, config, arch, tokenizer, device, dtype,
              trust_remote_code, unsafe_pickle, output, force, quiet, debug, device_map=None,
              output_format=None) -> None:
        from probes.pplp import PplpOptions
        from probes.pplp import pplp as run_pplp
        from reports.bundle import check_output_dir
        from reports.manifest import short_name

        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        if output is not None:
            from actsparse_cli.common import run_inputs

            check_output_dir(output, force, inputs=run_inputs(checkpoint, data, config, tokenizer))
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        opts = PplpOptions(data=data, text_field=text_field, encoding=encoding, batch_size=batch_size,
                           max_length=max_length, max_tokens=max_tokens, stride=stride, seed=seed,
                           skip_first=skip_first, sites=tuple(site or ()), p=targets, method=method.value, tol=tol,
                           max_passes=max_passes, cett_grid=cett_grid)
        from probes.corpus import check_corpus_spec

        check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                  device_map=device_map)
        with _progress(quiet, "pplp") as (progress, log):
            result = run_pplp(lm, opts, progress=progress, log=log)
        _warn(result.warnings)
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force,
                              device_map=getattr(device_map, "value", None))
        if output is not None:
            from reports.pplp_report import write_pplp_outputs  # imported late: not before the status line

            write_pplp_outputs(output, result, lm, options, force=force)
        out = pplp_output(result, f"PPL-p% sparsity: {short_name(checkpoint)} ({result.dense['n_tokens']} tokens, "
                                  f"{dtype_name(lm.dtype)})")
        out.info = {"command": "pplp", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    "dense_ppl": result.dense.get("ppl"), "n_tokens": result.dense.get("n_tokens"),
                    **info_of(result.info, ("full_passes", "method")), "warnings": list(result.warnings)}
        emit(shown, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/ (pplp, pplp_summary, pplp_trace, cett_calibration "
                                   ".parquet/.csv, summary.md, manifest.json)", markup=False)

    @app.command("curve")
    @shared_options
    def curve(
        checkpoint: CheckpointOpt = None,
        method: Annotated[Optional[list[str]], typer.Option("--method", help="Threshold families, comma-separated or "
                                                            "repeated: cett, topk, topk_global, teal, teal_greedy, "
                                                            "absq_down, cats, chess, chess_plus, fat. Default "
                                                            "cett,topk,teal,cats,fat.",
                                                            rich_help_panel=PANEL_CURVE)] = None,
        values: Annotated[Optional[list[str]], typer.Option("--values", help="Parameter grid of one method, e.g. "
                                                            "'fat=0.01,0.1' or 'teal=0.5,0.9' (repeatable).",
                                                            rich_help_panel=PANEL_CURVE)] = None,
        plot: Annotated[Optional[bool], typer.Option("--plot/--no-plot", help="Write curve.png/.svg into the -o "
                                                     "folder (default: on with -o).", rich_help_panel=PANEL_CURVE)]
        = None,
        cett_grid: GridOpt = 128,
        teal_eval: Annotated[TealEvalChoice, typer.Option("--teal-eval", help="Positions teal / teal_greedy sparsify: "
                                                          "last-half (TEAL's default: the last half of each window, "
                                                          "its stand-in for decoding) or all.",
                                                          rich_help_panel=PANEL_CURVE)] = TealEvalChoice.last_half,
        calib_fraction: Annotated[float, typer.Option("--calib-fraction", callback=float_check(0.01, 0.9),
                                                      help="Fraction of the windows (the first ones) that calibrate "
                                                      "teal, teal_greedy and chess; every method is then evaluated "
                                                      "on the other windows. 0.01 to 0.9.",
                                                      rich_help_panel=PANEL_CURVE)] = 0.25,
        *,
        data, text_field, encoding, batch_size, max_length, max_tokens, stride, seed, skip_first, site, config, arch,
        tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output, force, quiet, debug,
        output_format,
    ) -> None:
        """Sparsity vs PPL ratio of each threshold family (CETT, top-k, TEAL, CATS, CHESS, FAT) on the same tokens.

        teal / teal_greedy / chess calibrate on the first --calib-fraction of the windows; the curve is then
        evaluated on the other windows (all methods)."""
        methods = _parse_methods(method)
        grid = _parse_values(values, methods)
        if plot and output is None:
            raise typer.BadParameter("--plot writes into the output folder: add -o FOLDER", param_hint="--plot")
        _curve(checkpoint=checkpoint, data=data, methods=methods, grid=grid, plot=plot, cett_grid=cett_grid,
               teal_eval=teal_eval.value, calib_fraction=calib_fraction,
               text_field=text_field, encoding=encoding, batch_size=batch_size, max_length=max_length,
               max_tokens=max_tokens, stride=stride, seed=seed, skip_first=skip_first, site=site, config=config,
               arch=arch, tokenizer=tokenizer, device=device, device_map=device_map, dtype=dtype,
               trust_remote_code=trust_remote_code,
               unsafe_pickle=unsafe_pickle, output=output, force=force, quiet=quiet, debug=debug,
               output_format=output_format)

    @handle_errors
    def _curve(*, checkpoint, data, methods, grid, plot, cett_grid, teal_eval, calib_fraction, text_field, encoding,
               batch_size, max_length,
               max_tokens, stride, seed, skip_first, site, config, arch, tokenizer, device, dtype, trust_remote_code,
               unsafe_pickle, output, force, quiet, debug, device_map=None, output_format=None) -> None:
        from probes.pplp import CurveOptions
        from probes.pplp import curve as run_curve
        from reports.bundle import check_output_dir
        from reports.manifest import short_name

        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        if output is not None:
            from actsparse_cli.common import run_inputs

            check_output_dir(output, force, inputs=run_inputs(checkpoint, data, config, tokenizer))
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        opts = CurveOptions(data=data, text_field=text_field, encoding=encoding, batch_size=batch_size,
                            max_length=max_length, max_tokens=max_tokens, stride=stride, seed=seed,
                            skip_first=skip_first, sites=tuple(site or ()), methods=methods, values=grid,
                            cett_grid=cett_grid, teal_eval=teal_eval, calib_fraction=calib_fraction)
        from probes.corpus import check_corpus_spec

        check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                  device_map=device_map)
        with _progress(quiet, "curve") as (progress, log):
            result = run_curve(lm, opts, progress=progress, log=log)
        _warn(result.warnings)
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force,
                              plot=plot is not False, device_map=getattr(device_map, "value", None))
        if output is not None:
            from reports.pplp_report import write_curve_outputs  # imported late: not before the status line

            write_curve_outputs(output, result, lm, options, force=force, plot=plot is not False)
        out = curve_output(result, f"sparsity vs PPL: {short_name(checkpoint)} ({result.info['n_counted_tokens']} "
                                   f"tokens, {dtype_name(lm.dtype)})")
        out.info = {"command": "curve", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("n_counted_tokens",)), "warnings": list(result.warnings)}
        emit(shown, out)
        if output is not None and not quiet:
            extra = ", teal_projections" if result.proj_rows else ""
            stderr_console().print(f"wrote {output}/ (curve, curve_layers{extra}"
                                   f" .parquet/.csv"
                                   f"{', curve.png/.svg' if plot is not False else ''}, summary.md, manifest.json)",
                                   markup=False)
