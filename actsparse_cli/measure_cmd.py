"""``actsparse measure``: per-layer activation sparsity over a corpus, as tables and a manifest."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    CheckpointOpt,
    batch_progress,
    float_check,
    handle_errors,
    stderr_console,
    warn_notes,
)
from actsparse_cli.loading_opts import (
    load,
    resolve_kinds,
    run_options,
    shared_options,
)

PANEL_PROBES = "Probes"


def sparsity_output(result, title: str):
    """Activation sparsity per site: the terminal table and the tables written (sparsity, summary)."""
    from actsparse_cli.display import Output, View, col, labelled, name_col, result_tables, unique_labels
    from reports.numbers import fixed, fmt, pct

    rows = labelled(result.rows, unique_labels(result.rows))
    first = rows[0] if rows else {}
    eps = sorted((float(k.split("@", 1)[1]), k) for k in first if k.startswith("near_zero_frac@"))
    chunk = next((k for k in first if k.startswith("chunk_sparsity@")), None)
    cols = [name_col(), col("width", "width", drop=4),
            col("tokens", "n_tokens", drop=5), col("zero %", "zero_frac", pct)]
    if "zero_frac_se" in first:  # the standard error over windows (probes.uncertainty); dropped first when narrow
        cols.append(col("± se", "zero_frac_se", lambda v: fmt(100 * v, 2) if isinstance(v, float) else fmt(v), drop=6))
    if eps:
        e, key = eps[-1]
        cols.append(col(f"|a|<={fmt(e)} %", key, pct))
    cols += [col("nonzero/tok %", "nonzero_pct_per_token", lambda v: fixed(v, 2), drop=1),
             col("dead", "dead_neurons"), col("always on", "always_on_neurons", drop=3)]
    if chunk:
        cols.append(col(f"chunk@{chunk.split('@', 1)[1]} %", chunk, pct, drop=2))
    return Output(items=[View(title, rows, cols)], tables=result_tables(result), main="sparsity")


def _chosen_analyses(also, *, grad: bool, pplp, massive: bool) -> dict:
    """The registered analyses to run beside activation sparsity, in registry order: ``--also`` names
    (comma-separated or repeated) plus the ``--grad``/``--pplp``/``--massive`` shorthands."""
    from probes import analysis

    names = {n.strip() for item in (also or ()) for n in str(item).split(",") if n.strip()}
    names |= {n for n, on in (("grad", grad), ("pplp", bool(pplp)), ("massive", massive)) if on}
    for n in names:
        a = analysis.get(n)
        if not a.with_measure:
            raise typer.BadParameter(f"{n} does not run beside activation sparsity ({a.help}); run "
                                     f"`actsparse {n}` on its own", param_hint="--also")
    return {n: a for n, a in analysis.ANALYSES.items() if n in names}


# What `measure` prints for each analysis it ran beside activation sparsity, by report section.
_OUTPUTS = {
    "gradients": lambda r: _load("actsparse_cli.grad_cmd:grad_output")(r, "gradient sparsity"),
    "pplp": lambda r: _load("actsparse_cli.pplp_cmd:pplp_output")(r, "PPL-p% sparsity"),
    "massive": lambda r: _load("actsparse_cli.massive_cmd:massive_output")(
        r, f"massive activations ({r.info['preset']})"),
}


def _load(ref: str):
    from probes.analysis import load

    return load(ref)


def _extra_output(section: str, result):
    from actsparse_cli.display import Output, result_tables

    if section in _OUTPUTS:
        return _OUTPUTS[section](result)
    # an analysis registered without a view of its own: its tables, and a line saying what they hold
    tables = result_tables(result)
    line = f"{section}: " + ", ".join(f"{n} ({len(df)} rows)" for n, df in tables.items())
    return Output(items=[line], tables=tables)


def _refuse_data_parallel(world_size: int, *, pplp: bool, massive: bool, device_map: bool,
                          others: list[str] | None = None) -> None:
    """Options that do not split over torchrun ranks: a clear error instead of a wrong answer."""
    from probes.errors import EXIT_DEVICE, ActsparseError

    why = {"--pplp": "its threshold search makes several passes over all tokens" if pplp else None,
           "--massive": "its per-sequence top entries and sample ids are not split over ranks" if massive else None,
           "--device-map": "it spreads one model over the GPUs that the ranks use" if device_map else None}
    for name in others or ():
        why[f"--also {name}"] = "its probes do not merge over ranks"
    for opt, reason in why.items():
        if reason:
            raise ActsparseError(f"{opt} does not run under torchrun ({world_size} ranks): {reason}",
                                 f"run {opt} in a single process (python -m actsparse_cli measure ...)",
                                 exit_code=EXIT_DEVICE)


def register(app: typer.Typer) -> None:
    @app.command("measure")
    @shared_options
    @handle_errors
    def measure(
        checkpoint: CheckpointOpt = None,
        eps: Annotated[Optional[list[float]], typer.Option("--eps", help="near_zero_frac thresholds, finite and "
                                                           ">= 0 (repeatable). Default 1e-6, 1e-3, 1e-2.",
                                                           callback=float_check(0.0),
                                                           rich_help_panel=PANEL_PROBES)] = None,
        chunk_k: Annotated[int, typer.Option("--chunk-k", min=1, help="Tokens per chunk for chunk_sparsity.",
                                             rich_help_panel=PANEL_PROBES)] = 8,
        grad: Annotated[bool, typer.Option("--grad", help="Also measure gradient (derivative) sparsity and "
                                           "linear-input spikes with a backward pass on the model's loss "
                                           "(tables grad, spikes; as `actsparse grad`).",
                                           rich_help_panel=PANEL_PROBES)] = False,
        massive: Annotated[bool, typer.Option("--massive", help="Also measure massive activations on the residual "
                                              "stream (tables massive_*; as `actsparse massive`).",
                                              rich_help_panel=PANEL_PROBES)] = False,
        massive_preset: Annotated[str, typer.Option("--massive-preset", help="Protocol for --massive: sun2024 or "
                                                    "maxact2026.", rich_help_panel=PANEL_PROBES)] = "sun2024",
        pplp: Annotated[Optional[list[float]], typer.Option("--pplp", callback=float_check(0.0, lo_open=True),
                                                            help="Also find PPL-p% sparsity "
                                                            "(CETT) for these p in percent, e.g. --pplp 1 "
                                                            "(repeatable; as `actsparse pplp`).",
                                                            rich_help_panel=PANEL_PROBES)] = None,
        also: Annotated[Optional[list[str]], typer.Option("--also", help="Also run these registered analyses into "
                                                          "the same bundle, comma-separated or repeated (grad, pplp, "
                                                          "massive, and any analysis registered in probes.analysis); "
                                                          "--grad, --pplp and --massive are short for them.",
                                                          rich_help_panel=PANEL_PROBES, show_default=False)] = None,
        *,
        data, text_field, encoding, batch_size, max_length, max_tokens, stride, seed, skip_first, site, kind, config,
        arch, tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output, force, quiet,
        debug, output_format,
    ) -> None:
        """Measure per-layer activation sparsity (zero/near-zero fractions, dead neurons, chunk sparsity).

        Under `torchrun --nproc-per-node N -m actsparse_cli measure ...` the windows are split over the
        ranks and the probes merged; rank 0 writes and prints."""
        from probes import distributed
        from probes.loading import resolve_device
        from probes.measure import MeasureOptions
        from probes.measure import measure as run_measure
        from probes.sparsity import DEFAULT_EPS_GRID
        from reports.bundle import check_output_dir
        from reports.manifest import short_name

        from actsparse_cli.common import run_inputs
        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        guarded = run_inputs(checkpoint, data, config, tokenizer)
        if output is not None and not distributed.launched():
            check_output_dir(output, force, inputs=guarded)  # fail before any model work
        kinds = resolve_kinds(kind)
        chosen = _chosen_analyses(also, grad=grad, pplp=pplp, massive=massive)  # a typo fails here
        if "massive" in chosen:
            from probes.massive import resolve_preset

            resolve_preset(massive_preset)  # a typo fails before the model is loaded
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        opts = MeasureOptions(data=data, text_field=text_field, encoding=encoding, batch_size=batch_size,
                              max_length=max_length, max_tokens=max_tokens, stride=stride, seed=seed,
                              skip_first=skip_first, eps_grid=tuple(sorted(set(eps))) if eps else DEFAULT_EPS_GRID,
                              chunk_k=chunk_k, kinds=kinds, sites=tuple(site or ()))
        shared = opts.data_fields()  # the data options every analysis of this bundle reads (probes.data)
        from probes.corpus import check_corpus_spec

        check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        extras = {}
        from actsparse_cli.common import status_line

        with status_line(f"loading {checkpoint}"):  # the device check imports torch (a second or more)
            dev = resolve_device(device)
        try:
            # torchrun: join the process group first; from here on an error on one rank reaches the others
            with distributed.session(dev) as ctx:
                if output is not None and ctx.world_size > 1 and ctx.is_main:
                    check_output_dir(output, force, inputs=guarded)
                if ctx.world_size > 1:
                    _refuse_data_parallel(ctx.world_size, pplp="pplp" in chosen, massive="massive" in chosen,
                                          device_map=device_map is not None,
                                          others=[n for n, a in chosen.items() if not a.data_parallel
                                                  and n not in ("pplp", "massive")])
                quiet_here = quiet or not ctx.is_main  # other ranks: no progress bar, no table
                lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                          device_map=device_map)
                ctx.exchange()  # every rank has its model: a rank that failed to load stops them all here
                # the analyses run beside activation sparsity, from the registry (probes.analysis): each
                # gets the shared data options its class declares plus its own, and is checked before any batch
                own = {"grad": {"sites": tuple(site or ())},
                       "pplp": {"sites": tuple(site or ()), **({"p": tuple(pplp)} if pplp else {})},
                       "massive": {"preset": massive_preset}}
                runs = [(a, a.make_options(shared, **own.get(a.name, {}))) for a in chosen.values()]
                for a, aopts in runs:
                    a.preflight(lm, aopts)  # e.g. a model without a loss is refused before any work
                with batch_progress(quiet_here, "measure") as progress:
                    result = run_measure(lm, opts, progress=progress)
                for a, aopts in runs:
                    with batch_progress(quiet_here, a.name) as progress:
                        extras[a.section] = a.runner()(lm, aopts, progress=progress)
        except distributed.ReportedByRankZero as e:
            raise typer.Exit(e.exit_code) from None  # reported by rank 0 or by the failing rank
        if not ctx.is_main:
            return  # rank 0 alone writes and prints
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force,
                              device_map=getattr(device_map, "value", None), world_size=ctx.world_size)
        if output is not None:
            from reports.measure_report import write_measure_outputs  # imported late: not before the status line

            write_measure_outputs(output, result, lm, options, force=force, extras=extras)
        out = sparsity_output(result, f"activation sparsity: {short_name(checkpoint)} "
                                      f"({result.info['n_counted_tokens']} tokens, {dtype_name(lm.dtype)})")
        for section, res in extras.items():
            out.merge(_extra_output(section, res))
        out.info = {"command": "measure", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("n_counted_tokens", "n_windows", "max_length", "world_size")),
                    "analyses": list(extras)}
        emit(shown, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/", markup=False, highlight=False)
