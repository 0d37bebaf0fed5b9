"""`actsparse spectrum`: WeightWatcher's spectral metrics for every weight matrix, streamed."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    PANEL_OUT,
    Checkpoint,
    DeviceArg,
    handle_errors,
    stderr_console,
)
from actsparse_cli.loading_opts import shared_options

PANEL_SPECTRUM = "Spectrum"


class SvdMethod(str, Enum):
    auto = "auto"  # Gram eigenvalues where they are accurate (kappa <= 1e3, N >= 1.2 M), else the SVD
    exact = "exact"  # the SVD of every matrix


class PlotKind(str, Enum):
    esd = "esd"  # one ESD figure per matrix, plus alpha by layer
    alpha = "alpha"  # alpha and sigma_mp by layer only


SplitArg = Annotated[bool, typer.Option("--split-fused", help="Also analyse the parts of fused tensors (QKV, "
                                        "gate_up, per-expert MoE stacks) as extra rows marked non_ww.",
                                        rich_help_panel=PANEL_SPECTRUM)]
RandomizeArg = Annotated[bool, typer.Option("--randomize", help="Add WW's rand_* columns: the ESD of each W "
                                            "with its entries shuffled (correlation traps).",
                                            rich_help_panel=PANEL_SPECTRUM)]
# numpy's RandomState takes 0..2**32-1, and --randomize seeds two streams, seed and seed + 1.
SeedArg = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 2, help="Seed for --randomize, 0 to 2**32-2 "
                                      "(numpy's legacy RandomState, the stream WW uses after np.random.seed).",
                                      rich_help_panel=PANEL_SPECTRUM)]
SvdArg = Annotated[SvdMethod, typer.Option("--svd", help="auto: eigenvalues of W^T W where that is as accurate "
                                          "as the SVD (tall matrices, kappa <= 1e3; 3-5x faster), else the SVD; "
                                          "exact: the SVD everywhere.", rich_help_panel=PANEL_SPECTRUM)]
WorkersArg = Annotated[int, typer.Option("--workers", min=1, help="Processes computing spectra and fits in "
                                         "parallel (CPU only; each with one BLAS thread; at most the CPUs "
                                         "available, more is capped with a note).",
                                         rich_help_panel=PANEL_SPECTRUM)]
BlasThreadsArg = Annotated[int, typer.Option("--blas-threads", min=0, help="BLAS/OpenMP threads of the main "
                                             "process (default 1: robust when other jobs share the cores; "
                                             "0: the library's default). Recorded in the manifest.",
                                             rich_help_panel=PANEL_SPECTRUM)]
PlotArg = Annotated[Optional[list[PlotKind]], typer.Option("--plot", help="Figures to write into -o (PNG + SVG): "
                                                          "esd (per matrix, slower) or alpha.",
                                                          rich_help_panel=PANEL_OUT, show_default=False)]

def spectrum_output(df, summary: dict, n_ww: int, title: str, frame=None):
    """One row per weight matrix (WW's columns that matter most), the WW summary line; and the table written.

    ``df``: the DataFrame, or a ``probes.spectrum.SpectrumTable`` (its rows are the records; ``frame``, the
    DataFrame for ``--format json|csv``, is then given only when those need it: pandas is not imported
    otherwise)."""
    from actsparse_cli.display import Col, Output, View, col, labelled, name_col, unique_labels, weight_label
    from reports.numbers import fmt

    if hasattr(df, "to_dict"):
        recs, frame = df.to_dict(orient="records"), df
    else:
        recs = [{c: r[c] for c in df.columns} for r in df.rows]
    labels = unique_labels(recs, label=lambda r: weight_label(r.get("name")), ident=lambda r: r.get("name"),
                           full=lambda r: str(r.get("name")))

    def status(r: dict) -> str:
        return str(r.get("status")) + (" (not WW)" if r.get("non_ww") else " (WW skips)" if r.get("ww_skipped") else "")

    rows = labelled(recs, labels)
    cols = [name_col("name", "name"), col("shape", "shape", str, drop=6),
            col("alpha", "alpha"), col("D", "D", drop=2), col("sigma_mp", "sigma_mp", drop=3),
            col("spikes", "num_spikes", drop=1), col("stable_rank", "stable_rank", drop=4),
            col("kappa_2309", "kappa_2309", drop=5), col("cond_nz/mp", "cond_nz_over_mp", drop=7),
            Col("status", status, left=True),
            col("warning", "warning", lambda v: "" if v is None or v != v else str(v), left=True)]
    means = ", ".join(f"{k}={fmt(v)}" for k, v in summary.items())
    return Output(items=[View(title, rows, cols), f"WW summary (mean over {n_ww} layers): {means}"],
                  tables={"spectrum": frame} if frame is not None else {}, main="spectrum")


def register(app: typer.Typer) -> None:
    @app.command("spectrum")
    @shared_options
    def spectrum(
        checkpoint: Checkpoint,
        device: DeviceArg = "cpu",
        split_fused: SplitArg = False,
        randomize: RandomizeArg = False,
        seed: SeedArg = 0,
        plot: PlotArg = None,
        svd: SvdArg = SvdMethod.auto,
        workers: WorkersArg = 1,
        blas_threads: BlasThreadsArg = 1,
        *,
        output, force, quiet, debug, unsafe_pickle, output_format,
    ) -> None:
        """WeightWatcher 0.7.7's spectral metrics for every 2-D/4-D weight, one tensor at a time.

        No architecture needed. --device cpu (default) runs float64 SVDs and reproduces WW's numbers; --device cuda runs float32 SVDs (fits stay float64).
        """
        if plot and output is None:
            raise typer.BadParameter("figures are written into the output folder; give -o", param_hint="--plot")
        _run(checkpoint=checkpoint, output=output, device=device, split_fused=split_fused, randomize=randomize,
             seed=seed, plots=set(plot or ()), force=force, quiet=quiet, debug=debug, unsafe_pickle=unsafe_pickle,
             svd=svd.value, workers=workers, output_format=output_format, blas_threads=blas_threads)


def _cap_workers(workers: int) -> tuple[int, str | None]:
    """--workers capped at the CPUs this process may use (affinity mask and cgroup quota): each worker is a
    process with its own queue of matrices, so the option's value must not decide how many processes start."""
    from probes.threads import available_cpus

    cpus = available_cpus()
    if workers <= cpus:
        return workers, None
    return cpus, f"--workers {workers} capped at {cpus}, the CPUs available to this process"


def _prefetch_imports(pandas: bool = False, workers: int = 1):
    """Import pandas in a helper thread where the command needs it (--plot, --format json|csv: 0.25-0.45 s),
    while the main thread reads weights and waits for LAPACK (which releases the GIL); returns the thread, or
    None. (Until 2026-12-03 this thread died at once on an UnboundLocalError and imported nothing.) Failures are
    left to the main thread's own import.

    pyarrow is not imported at all (``spectrum.parquet`` comes from ``reports.parquet_plain``), nor is
    scipy.optimize (the MP fit's minimiser is ``probes.spectrum_fit.nelder_mead_1d``).

    The thread is not a daemon: an early exit (an error, Ctrl-C) waits for the import instead of tearing the
    interpreter down under a half-imported extension module. Not with ``--workers`` > 1: those worker
    processes are forked, and a fork while another thread holds an import lock can leave a child waiting on
    that lock for ever."""
    if not pandas or workers > 1:
        return None
    import threading

    def run() -> None:
        try:
            import pandas  # noqa: F401
        except Exception:  # pragma: no cover - the main thread's import reports it
            pass

    thread = threading.Thread(target=run, name="actsparse-imports")
    thread.start()
    return thread


@handle_errors
def _run(*, checkpoint, output, device, split_fused, randomize, seed, plots, force, quiet, debug, unsafe_pickle,
         svd="auto", workers=1, output_format=None, blas_threads=1) -> None:
    from contextlib import nullcontext

    import numpy  # noqa: F401  (before the helper thread, which would otherwise import it concurrently)

    from actsparse_cli.display import OutputFormat, emit, stdout_format
    from probes.malloc_policy import keep_freed_memory, small_numpy_pages

    # before the buffers: freed ones are reused instead of faulted in again, and no huge page is zeroed at first touch
    malloc = {**keep_freed_memory(), **small_numpy_pages()}

    # pandas only where the command hands a DataFrame on: the figures and --format json|csv (0.25-0.45 s)
    needs_frame = bool(plots) or output_format in (OutputFormat.json, OutputFormat.csv, "json", "csv")
    _prefetch_imports(pandas=needs_frame, workers=workers)

    from probes import spectrum as sp
    from probes.formats import sniff
    from reports.bundle import atomic_output_dir, check_output_dir

    if output is not None:
        check_output_dir(output, force, inputs=[checkpoint])
    workers, workers_note = _cap_workers(workers)  # the note goes to the manifest and the terminal with the rest
    dev = sp.resolve_device(device)
    sn = sniff(checkpoint)
    shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before any SVD

    on_tensor = None
    if quiet:  # no bar: rich.progress is not imported (0.03-0.1 s)
        progress = nullcontext()
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]spectrum"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=stderr_console(), transient=True)
        task = progress.add_task("", total=None)

        def on_tensor(done: int, total: int | None, name: str) -> None:
            progress.update(task, completed=done, total=total, description=name)

    figures: list[str] = []
    with (atomic_output_dir(output, force, inputs=[checkpoint]) if output is not None else nullcontext()) as folder:
        on_layer = None
        if PlotKind.esd in plots:
            from reports.spectrum_plots import plot_esd

            def on_layer(row, evals):
                if row["status"] == "success":
                    figures.extend(plot_esd(row, evals, folder))

        with progress:
            # a SpectrumTable: the files, the summary and the terminal table need no pandas
            df = sp.analyze_checkpoint(sn, device=str(dev), split_fused=split_fused, randomize=randomize,
                                       seed=seed, unsafe_pickle=unsafe_pickle, progress=on_tensor,
                                       on_layer=on_layer, svd=svd, workers=workers,
                                       blas_threads=blas_threads or None, frame=False)
        if workers_note:
            df.attrs["notes"] = [*df.attrs.get("notes", []), workers_note]
        frame = df.to_pandas() if needs_frame else None
        summary = sp.summarize(df)
        if folder is not None:
            from reports.manifest import build_manifest, write_manifest
            from reports.spectrum_table import write_spectrum_table

            if plots:
                from reports.spectrum_plots import plot_alpha_by_layer

                figures.extend(plot_alpha_by_layer(frame, folder))
            counts = sp.table_counts(df)
            (folder / "summary.json").write_text(json.dumps(
                {"means_over_ww_layers": summary, "counts": counts, "notes": df.attrs.get("notes", [])},
                indent=2) + "\n")
            files = write_spectrum_table(df, folder, "spectrum") + ["summary.json"] + figures
            manifest = build_manifest(
                "spectrum",
                {"checkpoint": checkpoint, "device": device, "split_fused": split_fused, "randomize": randomize,
                 "seed": seed, "plot": sorted(p.value for p in plots), "unsafe_pickle": unsafe_pickle,
                 "svd": svd, "workers": workers, "blas_threads": blas_threads},
                thread_policy=df.attrs.get("thread_policy"), memory_policy=malloc,
                checkpoint={"path": sn.path, "format": sn.kind.value, "files": sn.files},
                svd=df.attrs.get("svd"),
                method={"reference": "WeightWatcher 0.7.7 analyze(mp_fit=True)",
                        "power_law": "WWFit, eigenvalues > 1e-5, xmin by minimal KS distance",
                        "mp_fit": "linear KDE bw 0.1 once per layer, grid [0.05, 2) s0 step 0.01 s0 + Nelder-Mead",
                        "conv2d": "per kernel position slices, scaled by sqrt(1/2), eigenvalues pooled",
                        "failed_fits": "NaN (WW writes -1)",
                        "summary": "NaN-aware means over rows with ww_skipped == non_ww == False"},
                counts=counts, notes=df.attrs.get("notes", []), files=files + ["manifest.json"])
            write_manifest(folder, manifest)

    err = stderr_console() if not quiet else None  # rich.console only where something is printed
    if not quiet:
        for note in df.attrs.get("notes", []):
            err.print(f"note: {note}", markup=False, highlight=False)
    from reports.manifest import short_name

    out = spectrum_output(df, summary, len(sp.ww_rows(df)), f"spectrum: {short_name(checkpoint)} ({len(df)} matrices)",
                          frame=frame)
    out.info = {"command": "spectrum", "checkpoint": str(checkpoint), "device": str(dev), "svd": svd,
                "output": str(output) if output is not None else None, "means_over_ww_layers": summary,
                "n_ww_layers": len(sp.ww_rows(df)), "notes": list(df.attrs.get("notes", []))}
    emit(shown, out)
    if output is not None and not quiet:
        err.print(f"wrote {output}/ ({len(files) + 1} files)", markup=False)
