"""``actsparse cliff``: the sparsity cliff (Bug or Feature^2) with SPARLING's thresholds post hoc."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from actsparse_cli.common import CheckpointOpt, float_check, handle_errors, stderr_console, warn_notes
from actsparse_cli.loading_opts import choices, load, run_options, shared_options

PANEL_CLIFF = "Cliff"


def _parse_families(family: list[str] | None) -> tuple[str, ...]:
    from probes.cliff import FAMILIES

    return choices(family, FAMILIES, FAMILIES, "family", "--family")


def _parse_grid(grid: list[str] | None) -> tuple[float, ...]:
    from probes.cliff import DEFAULT_GRID

    if not grid:
        return DEFAULT_GRID
    try:
        vals = [float(v) for item in grid for v in item.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{','.join(grid)!r}: target sparsities must be numbers, e.g. 0,0.5,0.9",
                                 param_hint="--grid") from e
    if not vals or any(not math.isfinite(v) or not 0 <= v < 1 for v in vals):
        raise typer.BadParameter("give target sparsities in [0, 1), e.g. 0,0.5,0.9,0.95", param_hint="--grid")
    return tuple(sorted(set(vals)))


def cliff_output(result, title: str):
    """The cliff per family, then the grid points; and the tables."""
    from actsparse_cli.display import Output, View, col, result_tables
    from reports.numbers import fixed, pct

    p = result.info["p"]
    cliffs = [col("family", "family", str, left=True), col("post hoc", "post_hoc", lambda v: "yes" if v else "no"),
              col(f"within {p:g}% %", "sparsity_within_p", pct),
              col("crossing %", "sparsity_within_p_interp", pct, drop=2),
              col("knee %", "knee_sparsity", pct), col("knee ratio", "knee_ratio", lambda v: fixed(v, 4)),
              col("max ratio", "max_ratio", lambda v: fixed(v, 4), drop=1)]
    if "heldout_examples" in result.info:  # a classifier: the loss ratio the rules read, and accuracy
        cliffs += [col("knee acc %", "knee_accuracy", pct), col("dense acc %", "accuracy_dense", pct, drop=1)]
        pts = [col("family", "family", str, left=True), col("target %", "target_sparsity", pct),
               col("sparsity %", "mean_sparsity", pct), col("loss ratio", "loss_ratio", lambda v: fixed(v, 5)),
               col("acc %", "accuracy", pct), col("drop pts", "accuracy_drop", lambda v: fixed(v, 2))]
    else:
        pts = [col("family", "family", str, left=True), col("target %", "target_sparsity", pct),
               col("sparsity %", "mean_sparsity", pct), col("PPL ratio", "ppl_ratio", lambda v: fixed(v, 5))]
    out = Output(items=[View(title, list(result.cliffs), cliffs, key=1),
                        View("grid points", list(result.points), pts, key=1)],
                 tables=result_tables(result), main="cliff")
    if result.learned:
        out.add(f"{len(result.learned)} SPARLING layer(s) in the checkpoint: see cliff_sparling_learned")
    return out


def register(app: typer.Typer) -> None:
    @app.command("cliff")
    @shared_options
    @handle_errors
    def cliff(
        checkpoint: CheckpointOpt = None,
        family: Annotated[Optional[list[str]], typer.Option(
            "--family", help="Ways to enforce sparsity, comma-separated or repeated: topk_sample (Bug or Feature^2's "
            "per-sequence rule), topk_token, magnitude_layer, sparling_posthoc. Default: all four.",
            rich_help_panel=PANEL_CLIFF)] = None,
        grid: Annotated[Optional[list[str]], typer.Option(
            "--grid", help="Target sparsities in [0, 1), comma-separated (default 0 to 0.95, finer above 0.6).",
            rich_help_panel=PANEL_CLIFF)] = None,
        labels: Annotated[Optional[str], typer.Option(
            "--labels", help="Label field of a .jsonl --data: score a sequence classifier "
            "(…ForSequenceClassification) by its loss ratio exp(mean CE_sparse - mean CE_dense) and accuracy on "
            "held-out examples instead of a PPL ratio.", rich_help_panel=PANEL_CLIFF)] = None,
        p: Annotated[float, typer.Option("--p", help="The cliff's quality budget: the largest sparsity whose PPL "
                                         "ratio (loss ratio with --labels) stays within 1 + p/100.",
                                         callback=float_check(0, lo_open=True),
                                         rich_help_panel=PANEL_CLIFF)] = 1.0,
        refine: Annotated[int, typer.Option("--refine", min=0, max=5, help="Rounds adding the targets halfway to "
                                            "the knee's neighbours (finer near the knee).",
                                            rich_help_panel=PANEL_CLIFF)] = 1,
        calib_share: Annotated[float, typer.Option("--calib-share", help="Share of the windows that calibrate the "
                                                   "thresholds of magnitude_layer and sparling_posthoc; the rest "
                                                   "are held out and scored.",
                                                   callback=float_check(0, 1, lo_open=True, hi_open=True),
                                                   rich_help_panel=PANEL_CLIFF)] = 0.25,
        calib_rows: Annotated[int, typer.Option("--calib-rows", min=16, help="Counted positions per layer kept to "
                                                "compute exact k-th-value thresholds (also capped at 1 GiB).",
                                                rich_help_panel=PANEL_CLIFF)] = 16384,
        sparling_detail: Annotated[float, typer.Option("--sparling-detail", help="The target sparsity whose "
                                                       "per-channel thresholds and densities go into "
                                                       "cliff_sparling_channels (a --grid value).",
                                                       callback=float_check(0, 1, hi_open=True),
                                                       rich_help_panel=PANEL_CLIFF)] = 0.9,
        *,
        data, text_field, encoding, batch_size, max_length, max_tokens, stride, seed, skip_first, site, config, arch,
        tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output, force, quiet, debug,
        output_format,
    ) -> None:
        """The sparsity cliff: PPL ratio against enforced activation sparsity (top-k, magnitude, SPARLING post hoc).

        Without --max-tokens, 8192 counted tokens (up to ~70 passes; targets below the natural sparsity reuse dense).

        With --labels FIELD and a .jsonl --data: a sequence classifier, by loss ratio and held-out accuracy."""
        families = _parse_families(family)
        targets = _parse_grid(grid)
        from probes.cliff import CliffOptions, cliff as run_cliff, check_cliff
        from reports.bundle import check_output_dir
        from reports.manifest import short_name
        from reports.sections.cliff import write_cliff_outputs

        from actsparse_cli.common import batch_progress, run_inputs
        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        if output is not None:
            check_output_dir(output, force, inputs=run_inputs(checkpoint, data, config, tokenizer))
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        opts = CliffOptions(data=data, text_field=text_field, encoding=encoding, batch_size=batch_size,
                            max_length=max_length, max_tokens=max_tokens, stride=stride, seed=seed,
                            skip_first=skip_first, sites=tuple(site or ()), families=families, grid=targets, p=p,
                            refine=refine, calib_share=calib_share, calib_rows=calib_rows,
                            sparling_detail=sparling_detail, labels=labels)
        from probes.corpus import check_corpus_spec

        check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                  device_map=device_map)
        check_cliff(lm, opts)
        with batch_progress(quiet, "cliff") as progress:
            result = run_cliff(lm, opts, progress=progress)
        con = stderr_console()
        for w in result.warnings:
            con.print(f"[bold red]WARNING:[/bold red] [red]{w}[/red]", highlight=False)
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force,
                              device_map=getattr(device_map, "value", None))
        if output is not None:
            write_cliff_outputs(output, result, lm, options, force=force)
        held = (f"{result.info['heldout_examples']} held-out examples" if labels else
                f"{result.info['n_counted_tokens']} held-out tokens")
        out = cliff_output(result, f"sparsity cliff: {short_name(checkpoint)} ({held}, {dtype_name(lm.dtype)})")
        out.info = {"command": "cliff", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("n_counted_tokens", "calibration_tokens", "full_passes",
                                             "heldout_examples", "dense_accuracy")),
                    "warnings": list(result.warnings)}
        emit(shown, out)
        if output is not None and not quiet:
            con.print(f"wrote {output}/ (cliff, cliff_points, cliff_layers, cliff_sparling* .parquet/.csv, "
                      "cliff.png/.svg, cliff_sparling.png/.svg, summary.md, manifest.json)", markup=False)
