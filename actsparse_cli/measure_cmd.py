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
    stdout_console,
    warn_notes,
)
from actsparse_cli.loading_opts import (
    load,
    resolve_kinds,
    shared_options,
)

PANEL_PROBES = "Probes"


def print_sparsity_table(rows: list[dict], title: str) -> None:
    from rich.table import Table

    from reports.numbers import fixed, fmt, pct

    t = Table(title=title)
    cols = [("site", "canonical_name"), ("module", "module_path"), ("kind", "kind"), ("width", "width"),
            ("tokens", "n_tokens"), ("zero %", "zero_frac"), ("|a|<=1e-2 %", "near_zero_frac@0.01"),
            ("nonzero/token %", "nonzero_pct_per_token"), ("dead", "dead_neurons"), ("always on", "always_on_neurons")]
    chunk = next((k for k in (rows[0] if rows else {}) if k.startswith("chunk_sparsity@")), None)
    if chunk:
        cols.append((chunk.replace("chunk_sparsity", "chunk sparsity") + " %", chunk))
    for head, _ in cols:
        t.add_column(head, justify="left" if head in ("site", "module", "kind") else "right", overflow="fold")
    for r in rows:
        cells = []
        for _, key in cols:
            v = r.get(key)
            if key in ("zero_frac", "near_zero_frac@0.01") or key == chunk:
                cells.append(pct(v))
            elif key == "nonzero_pct_per_token":
                cells.append(fixed(v, 2))
            else:
                cells.append(fmt(v))
        t.add_row(*cells)
    stdout_console().print(t)


def _refuse_data_parallel(world_size: int, *, pplp: bool, massive: bool, device_map: bool) -> None:
    """Options that do not split over torchrun ranks: a clear error instead of a wrong answer."""
    from probes.errors import EXIT_DEVICE, ActsparseError

    why = {"--pplp": "its threshold search makes several passes over all tokens" if pplp else None,
           "--massive": "its per-sequence top entries and sample ids are not split over ranks" if massive else None,
           "--device-map": "it spreads one model over the GPUs that the ranks use" if device_map else None}
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
        *,
        data, text_field, encoding, batch_size, max_length, max_tokens, stride, seed, skip_first, site, kind, config,
        arch, tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output, force, quiet,
        debug,
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
        from reports.measure_report import write_measure_outputs

        from actsparse_cli.common import run_inputs

        guarded = run_inputs(checkpoint, data, config, tokenizer)
        if output is not None and not distributed.launched():
            check_output_dir(output, force, inputs=guarded)  # fail before any model work
        kinds = resolve_kinds(kind)
        if massive:
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
        extras = {}
        try:
            # torchrun: join the process group first; from here on an error on one rank reaches the others
            with distributed.session(resolve_device(device)) as ctx:
                if output is not None and ctx.world_size > 1 and ctx.is_main:
                    check_output_dir(output, force, inputs=guarded)
                if ctx.world_size > 1:
                    _refuse_data_parallel(ctx.world_size, pplp=bool(pplp), massive=massive,
                                          device_map=device_map is not None)
                quiet_here = quiet or not ctx.is_main  # other ranks: no progress bar, no table
                lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                          device_map=device_map)
                ctx.exchange()  # every rank has its model: a rank that failed to load stops them all here
                gopts = None
                if grad:
                    from probes.gradients import GradOptions, check_loss

                    gopts = GradOptions(**shared, sites=tuple(site or ()))
                    check_loss(lm, gopts)  # refuse a model without a loss before any work
                with batch_progress(quiet_here, "measure") as progress:
                    result = run_measure(lm, opts, progress=progress)
                if grad:
                    from probes.gradients import measure_gradients

                    with batch_progress(quiet_here, "grad") as progress:
                        extras["gradients"] = measure_gradients(lm, gopts, progress=progress)
                if pplp:
                    from probes.pplp import PplpOptions
                    from probes.pplp import pplp as run_pplp

                    popts = PplpOptions(**shared, sites=tuple(site or ()), p=tuple(pplp))
                    with batch_progress(quiet_here, "pplp") as progress:
                        extras["pplp"] = run_pplp(lm, popts, progress=progress)
                if massive:
                    from probes.massive import MassiveOptions
                    from probes.massive import massive as run_massive

                    # The preset draws its own sequences (no BOS, the family's length) so the numbers compare
                    # with the papers; the corpus, --max-length (when given), --max-tokens and --skip-first
                    # carry over.
                    mopts = MassiveOptions(preset=massive_preset,  # the preset's own batch size and seed
                                           **opts.data_fields(exclude=("batch_size", "seed", "stride")))
                    with batch_progress(quiet_here, "massive") as progress:
                        extras["massive"] = run_massive(lm, mopts, progress=progress)
        except distributed.ReportedByRankZero as e:
            raise typer.Exit(e.exit_code) from None  # reported by rank 0 or by the failing rank
        if not ctx.is_main:
            return  # rank 0 alone writes and prints
        warn_notes(result.info, quiet)
        options = {"checkpoint": checkpoint, "config": config, "arch": arch, "tokenizer": tokenizer,
                   "device": device, "dtype": dtype.value, "trust_remote_code": trust_remote_code,
                   "unsafe_pickle": unsafe_pickle, "output": str(output) if output else None, "force": force,
                   "device_map": device_map.value if device_map is not None else None,
                   "world_size": ctx.world_size}
        if output is not None:
            write_measure_outputs(output, result, lm, options, force=force, extras=extras)
        if not quiet:
            print_sparsity_table(result.rows, f"activation sparsity: {checkpoint} "
                                              f"({result.info['n_counted_tokens']} tokens, {lm.dtype})")
            if "gradients" in extras:
                from actsparse_cli.grad_cmd import print_grad_table

                print_grad_table(extras["gradients"].rows, extras["gradients"].spike_rows, "gradient sparsity")
            if "pplp" in extras:
                from actsparse_cli.pplp_cmd import print_pplp

                print_pplp(extras["pplp"], "PPL-p% sparsity")
            if "massive" in extras:
                from actsparse_cli.massive_cmd import print_massive_table

                print_massive_table(extras["massive"], f"massive activations ({extras['massive'].info['preset']})")
            if output is not None:
                stderr_console().print(f"wrote {output}/")
