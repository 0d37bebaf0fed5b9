"""``actsparse flatness``: arXiv 2309.03004's flatness, gradient density and diagonality per MLP layer."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from actsparse_cli.common import PANEL_DATA, SEED_MAX, batch_progress, float_check, handle_errors, stderr_console, \
    warn_notes
from actsparse_cli.loading_opts import run_options, shared_options

PANEL_FLAT = "Flatness"


class LossChoice(str, Enum):
    auto = "auto"
    causal_lm = "causal_lm"
    mlm = "mlm"
    classification = "classification"


class ReductionChoice(str, Enum):
    mean = "mean"
    sum = "sum"


def flatness_output(result, title: str):
    """One row per MLP layer (the chain flatness -> gradient -> activation sparsity) and the tables written."""
    from actsparse_cli.display import Output, View, col, labelled, name_col, result_tables, unique_labels
    from reports.numbers import pct

    rows = labelled(result.rows, unique_labels(result.rows))
    taus = [k for k in (rows[0] if rows else {}) if k.startswith("eff_grad_sparsity@")]
    tau = taus[1] if len(taus) > 1 else (taus[0] if taus else None)
    cols = [name_col(), col("flat %", "aug_flatness_share", pct), col("dens g2", "grad_density_g2"),
            col("diag gg %", "gg_diag_share_p1", pct, drop=3), col("diag KK %", "kkT_diag_share_p1", pct, drop=4),
            *([col(f"|eta|<{tau.split('@')[1]} %", tau, pct)] if tau else []),
            col("benef %", "beneficial_frac", pct, drop=2), col("detr %", "detrimental_frac", pct, drop=2),
            col("a=0 %", "act_zero_frac", pct), col("kappa_2309", "kappa_2309", drop=1)]
    return Output(items=[View(title, rows, cols)], tables=result_tables(result), main="flatness")


def register(app: typer.Typer) -> None:
    @app.command("flatness")
    @shared_options
    @handle_errors
    def flatness(
        checkpoint: Annotated[Optional[str], typer.Argument(help="Model folder, hub id or weight file. Default: "
                                                            "the project's bundled ReLU model.",
                                                            show_default=False)] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Corpus (.txt, .jsonl, hf:NAME). Default: the "
                                                    "bundled calibration corpus.", rich_help_panel=PANEL_DATA)] = None,
        labels: Annotated[Optional[str], typer.Option("--labels", help="Label field of a .jsonl corpus, for sequence "
                                                      "classifiers.", rich_help_panel=PANEL_DATA)] = None,
        text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl / hf: corpora.",
                                                rich_help_panel=PANEL_DATA)] = "text",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward+backward (the mean "
                                                "loss divides by this batch's targets).",
                                                rich_help_panel=PANEL_DATA)] = 4,
        max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Window length. Default: the "
                                                          "model's limit, at most 2048.",
                                                          rich_help_panel=PANEL_DATA)] = None,
        max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Stop after this many counted "
                                                          "tokens.", rich_help_panel=PANEL_DATA)] = None,
        stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="New tokens per window (default: "
                                                      "--max-length, i.e. non-overlapping).",
                                                      rich_help_panel=PANEL_DATA)] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for masked-LM masking, 0 to "
                                          "2**32-1.", rich_help_panel=PANEL_DATA)] = 0,
        skip_first: Annotated[int, typer.Option("--skip-first", min=0, help="Do not count the first N positions "
                                                "of each window.", rich_help_panel=PANEL_DATA)] = 0,
        loss: Annotated[LossChoice, typer.Option("--loss", help="auto: causal LM loss for causal LMs, masked-LM for "
                                                 "masked-LM heads, cross-entropy with --labels for classifiers.",
                                                 rich_help_panel=PANEL_FLAT)] = LossChoice.auto,
        loss_reduction: Annotated[ReductionChoice, typer.Option("--loss-reduction", help="mean: the batch's mean loss "
                                                                "(cdgyp/sparsity's training loss); sum: each target "
                                                                "weighs 1. Absolute columns scale with it; ratios "
                                                                "and shares do not.",
                                                                rich_help_panel=PANEL_FLAT)] = ReductionChoice.mean,
        tau: Annotated[Optional[list[float]], typer.Option("--tau", help="eff_grad_sparsity thresholds, finite and "
                                                           "> 0 (repeatable). Default 1e-9, 1e-6, 1e-3.",
                                                           callback=float_check(0.0, lo_open=True),
                                                           rich_help_panel=PANEL_FLAT)] = None,
        act: Annotated[Optional[str], typer.Option("--act", help="Override the activation (relu, gelu, silu, ...).",
                                                   rich_help_panel=PANEL_FLAT)] = None,
        arch: Annotated[Optional[str], typer.Option("--arch", help="Model family for a bare state dict (gpt2, nanogpt, "
                                                    "llama, mistral, qwen2).", rich_help_panel="Loading")] = None,
        *,
        encoding, site, config, tokenizer, device, dtype, trust_remote_code, unsafe_pickle, output, force, quiet,
        debug, output_format,
    ) -> None:
        """Why sparsity appears (arXiv 2309.03004): augmented flatness, gradient density, diagonality of
        g g^T and K K^T, beneficial/detrimental activations, per MLP layer, from one backward pass."""
        from probes.flatness import FlatnessOptions, check_flatness
        from probes.flatness import flatness as run_flatness
        from probes.gradients import DEFAULT_TAUS
        from actsparse_cli.loading_opts import load as load_model
        from reports.bundle import check_output_dir
        from reports.manifest import short_name

        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        if output is not None:
            from actsparse_cli.common import run_inputs

            check_output_dir(output, force, inputs=run_inputs(checkpoint, data, config, tokenizer))
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        opts = FlatnessOptions(data=data, text_field=text_field, encoding=encoding, labels=labels,
                               batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, stride=stride,
                               seed=seed, skip_first=skip_first, taus=tuple(sorted(set(tau))) if tau else DEFAULT_TAUS,
                               loss=loss.value, loss_reduction=loss_reduction.value, act=act, sites=tuple(site or ()))
        from probes.corpus import check_corpus_spec

        check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        # the status line while it loads, and the CPU thread policy (probes/threads.py) as every model command
        lm = load_model(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer)
        check_flatness(lm, opts)  # a model without a loss or without MLPs fails here, before the progress bar
        with batch_progress(quiet, "flatness") as progress:
            result = run_flatness(lm, opts, progress=progress)
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force)
        if output is not None:
            from reports.sections.flatness import write_flatness_outputs  # imported late: not before the status line

            write_flatness_outputs(output, result, lm, options, force=force)
        n = result.info.get("n_counted_tokens") or result.info.get("n_items")
        out = flatness_output(result, f"flatness (arXiv 2309.03004): {short_name(checkpoint)} ({result.info['loss']} "
                                      f"loss, {result.info['loss_reduction']}, {n} "
                                      f"{'tokens' if result.info.get('n_counted_tokens') else 'examples'}, "
                                      f"{dtype_name(lm.dtype)})")
        out.info = {"command": "flatness", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("loss", "loss_reduction", "n_counted_tokens", "n_items"))}
        emit(shown, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/ (flatness, flatness_hist .parquet/.csv, "
                                   "flatness_by_layer.png/.svg, summary.md, manifest.json)", markup=False)
