"""``actsparse grad``: gradient (derivative) sparsity per activation site and linear-input spikes."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    PANEL_DATA,
    SEED_MAX,
    float_check,
    handle_errors,
    stderr_console,
    warn_notes,
)
from actsparse_cli.loading_opts import run_options, shared_options
from actsparse_cli.common import batch_progress

PANEL_GRAD = "Gradients"


class LossChoice(str, Enum):
    auto = "auto"
    causal_lm = "causal_lm"
    mlm = "mlm"
    classification = "classification"
    none = "none"


class SpikesChoice(str, Enum):
    all = "all"
    down = "down"
    none = "none"


class ReductionChoice(str, Enum):
    sum = "sum"
    mean = "mean"


def _tau(key: str) -> str:
    """``eff_grad_sparsity@1e-09`` -> ``1e-9``."""
    t = key.split("@", 1)[1]
    try:
        v = float(t)
    except ValueError:
        return t
    m, _, e = f"{v:.0e}".partition("e")
    return f"{m}e{int(e)}" if e else t


def grad_output(result, title: str):
    """Gradient sparsity per site, and the down-projection spikes: terminal tables and the tables written."""
    from actsparse_cli.display import Output, View, col, labelled, name_col, result_tables, unique_labels
    from reports.numbers import pct

    rows = labelled(result.rows, unique_labels(result.rows))
    taus = [k for k in (rows[0] if rows else {}) if k.startswith("eff_grad_sparsity@")]
    cols = [name_col(), col("act", "act", str, left=True, drop=1),
            col("tokens", "n_tokens", drop=5), col("act'=0 %", "deriv_sparsity", pct),
            col("E[act'^2]", "deriv_sq_mean", drop=2),
            *[col(f"|eta|<{_tau(k)} %", k, pct) for k in taus],
            col("||eta||_1/tok", "eta_l1_per_token", drop=3), col("||eta||_2^2/tok", "eta_l2sq_per_token", drop=4)]
    out = Output(items=[View(title, rows, cols)], tables=result_tables(result), main="gradients")
    down = [r for r in result.spike_rows if r.get("is_down_proj")]
    if down:
        labels = unique_labels(down, ident=lambda r: r.get("module_path"), full=lambda r: str(r.get("module_path")))
        down = labelled(down, labels)
        scols = [name_col("module", "module_path"), col("spike_max", "spike_max"),
                 col("median |x|", "median_abs_batchmean", drop=1), col("max/median", "spike_ratio_batchmedian"),
                 col("max/median nz", "spike_ratio_nonzero_batchmedian", drop=2), col("zero %", "zero_frac", pct)]
        out.add(View("down-projection inputs (spikes)", down, scols))
    return out


def register(app: typer.Typer) -> None:
    @app.command("grad")
    @shared_options
    @handle_errors
    def grad(
        checkpoint: Annotated[Optional[str], typer.Argument(help="Model folder, hub id or weight file. Default: "
                                                            "the project's bundled ReLU model.",
                                                            show_default=False)] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Corpus (.txt, .jsonl, hf:NAME), imagefolder:DIR "
                                                    "(labels from class folders) or random:CxHxW. Default: the "
                                                    "bundled calibration corpus.", rich_help_panel=PANEL_DATA)] = None,
        labels: Annotated[Optional[str], typer.Option("--labels", help="Label field of a .jsonl corpus, for sequence "
                                                      "classifiers (image folders take labels from folder names).",
                                                      rich_help_panel=PANEL_DATA)] = None,
        text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl / hf: corpora.",
                                                rich_help_panel=PANEL_DATA)] = "text",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows or images per forward+backward.",
                                                rich_help_panel=PANEL_DATA)] = 4,
        max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Window length. Default: the "
                                                          "model's limit, at most 2048.",
                                                          rich_help_panel=PANEL_DATA)] = None,
        max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Stop after this many counted "
                                                          "tokens.", rich_help_panel=PANEL_DATA)] = None,
        n_images: Annotated[Optional[int], typer.Option("--n-images", min=1, help="random: inputs to draw (default "
                                                        "16); imagefolder: at most this many.",
                                                        rich_help_panel=PANEL_DATA)] = None,
        stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="New tokens per window (default: "
                                                      "--max-length, i.e. non-overlapping).",
                                                      rich_help_panel=PANEL_DATA)] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed for random: inputs and "
                                          "masked-LM masking, 0 to 2**32-1.", rich_help_panel=PANEL_DATA)] = 0,
        skip_first: Annotated[int, typer.Option("--skip-first", min=0, help="Do not count the first N positions "
                                                "of each window.", rich_help_panel=PANEL_DATA)] = 0,
        loss: Annotated[LossChoice, typer.Option("--loss", help="auto: causal LM loss for causal LMs, masked-LM for "
                                                 "masked-LM heads, cross-entropy with labels for classifiers; a model "
                                                 "with no loss is refused. none: forward-only act'(h) statistics.",
                                                 rich_help_panel=PANEL_GRAD)] = LossChoice.auto,
        loss_reduction: Annotated[ReductionChoice, typer.Option("--loss-reduction", help="mean: the batch's mean loss "
                                                                "over its targets, the training loss as cdgyp/sparsity "
                                                                "measures it; sum: each target weighs 1 (eta x targets "
                                                                "per batch). eta and eff_grad_sparsity@tau depend on "
                                                                "both the reduction and --batch-size.",
                                                                rich_help_panel=PANEL_GRAD)] = ReductionChoice.mean,
        tau: Annotated[Optional[list[float]], typer.Option("--tau", help="eff_grad_sparsity thresholds, finite and "
                                                           "> 0 (repeatable). Default 1e-9, 1e-6, 1e-3.",
                                                           callback=float_check(0.0, lo_open=True),
                                                           rich_help_panel=PANEL_GRAD)] = None,
        eps_d: Annotated[float, typer.Option("--eps-d", help="|act'(h)| <= eps_d counts as zero for smooth "
                                             "activations (finite, >= 0).", callback=float_check(0.0),
                                             rich_help_panel=PANEL_GRAD)] = 1e-6,
        act: Annotated[Optional[str], typer.Option("--act", help="Override the activation (relu, gelu, gelu_tanh, "
                                                   "silu, relu2, gelu2, jsrelu, ...).",
                                                   rich_help_panel=PANEL_GRAD)] = None,
        spikes: Annotated[SpikesChoice, typer.Option("--spikes", help="Linear-input spike statistics (max |x|, exact "
                                                     "per-batch median, zeros) for every linear, only the MLP down "
                                                     "projections (cheaper), or none.",
                                                     rich_help_panel=PANEL_GRAD)] = SpikesChoice.all,
        arch: Annotated[Optional[str], typer.Option("--arch", help="Model family for a bare state dict (gpt2, nanogpt, "
                                                    "llama, mistral, qwen2), or timm:NAME / torchvision:NAME.",
                                                    rich_help_panel="Loading")] = None,
        *,
        encoding, site, config, tokenizer, device, dtype, trust_remote_code, unsafe_pickle, output, force, quiet,
        debug, output_format,
    ) -> None:
        """Gradient sparsity (act'(h) zeros, |dL/dh| < tau) per activation site, and linear-input spikes."""
        from probes.gradients import (
            DEFAULT_TAUS,
            GradOptions,
            check_loss,
            measure_gradients,
        )
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
        opts = GradOptions(data=data, text_field=text_field, encoding=encoding, labels=labels, batch_size=batch_size,
                           max_length=max_length, max_tokens=max_tokens, n_images=n_images, stride=stride, seed=seed,
                           skip_first=skip_first, taus=tuple(sorted(set(tau))) if tau else DEFAULT_TAUS, eps_d=eps_d,
                           loss=loss.value, loss_reduction=loss_reduction.value, act=act, sites=tuple(site or ()),
                           spikes=spikes.value)
        from probes.corpus import check_corpus_spec
        from probes.vision import is_image_spec

        if not is_image_spec(data):
            check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        shown = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        # the status line while it loads, and the CPU thread policy (probes/threads.py) as every model command
        lm = load_model(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer)
        check_loss(lm, opts)  # a model without a loss fails here, before the progress bar
        with batch_progress(quiet, "grad") as progress:
            result = measure_gradients(lm, opts, progress=progress)
        warn_notes(result.info, quiet)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force)
        if output is not None:
            from reports.grad_report import write_grad_outputs  # after the model work: its imports (pandas, matplotlib) do not delay the status line

            write_grad_outputs(output, result, lm, options, force=force)
        n = result.info.get("n_counted_tokens") or result.info.get("n_items")
        out = grad_output(result, f"gradient sparsity: {short_name(checkpoint)} ({result.info['loss']} loss, {n} "
                                  f"{'tokens' if result.info.get('n_counted_tokens') else 'inputs'}, "
                                  f"{dtype_name(lm.dtype)})")
        out.info = {"command": "grad", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("loss", "loss_reduction", "n_counted_tokens", "n_items"))}
        emit(shown, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/ (gradients, gradients_summary, spikes .parquet/.csv, "
                                   "grad_by_layer.png/.svg, summary.md, manifest.json)", markup=False)
