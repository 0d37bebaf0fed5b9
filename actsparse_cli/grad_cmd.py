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
    stdout_console,
    warn_notes,
)
from actsparse_cli.loading_opts import shared_options
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


def print_grad_table(rows: list[dict], spike_rows: list[dict], title: str) -> None:
    from rich.table import Table

    from reports.numbers import fmt, pct

    taus = [k for k in (rows[0] if rows else {}) if k.startswith("eff_grad_sparsity@")]
    t = Table(title=title)
    cols = ["site", "module", "act", "tokens", "deriv sparsity %", "deriv^2 mean",
            *[f"|eta|<{k.split('@')[1]} %" for k in taus], "||eta||_1/tok", "||eta||_2^2/tok"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("site", "module", "act") else "right", overflow="fold")
    for r in rows:
        t.add_row(r["canonical_name"], r["module_path"], r["act"], str(r["n_tokens"]),
                  pct(r["deriv_sparsity"]), fmt(r["deriv_sq_mean"]),
                  *[pct(r[k]) for k in taus], fmt(r["eta_l1_per_token"]), fmt(r["eta_l2sq_per_token"]))
    con = stdout_console()
    con.print(t)
    down = [r for r in spike_rows if r.get("is_down_proj")]
    if down:
        s = Table(title="down-projection inputs (spikes)")
        for c in ("module", "spike_max", "median |x|", "max/median", "max/median(non-zero)", "zero %"):
            s.add_column(c, justify="left" if c == "module" else "right", overflow="fold")
        for r in down:
            s.add_row(r["module_path"], fmt(r["spike_max"]), fmt(r["median_abs_batchmean"]),
                      fmt(r["spike_ratio_batchmedian"]), fmt(r["spike_ratio_nonzero_batchmedian"]),
                      pct(r["zero_frac"]))
        con.print(s)


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
        loss_reduction: Annotated[ReductionChoice, typer.Option("--loss-reduction", help="sum: each target weighs 1 "
                                                                "(batch-size independent); mean: training convention.",
                                                                rich_help_panel=PANEL_GRAD)] = ReductionChoice.sum,
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
        debug,
    ) -> None:
        """Gradient sparsity (act'(h) zeros, |dL/dh| < tau) per activation site, and linear-input spikes."""
        from probes.gradients import (
            DEFAULT_TAUS,
            GradOptions,
            check_loss,
            measure_gradients,
        )
        from probes.loading import load_checkpoint
        from reports.bundle import check_output_dir
        from reports.grad_report import write_grad_outputs

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
        lm = load_checkpoint(checkpoint, config=config, arch=arch, device=device, dtype=dtype.value,
                             trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, tokenizer=tokenizer)
        check_loss(lm, opts)  # a model without a loss fails here, before the progress bar
        with batch_progress(quiet, "grad") as progress:
            result = measure_gradients(lm, opts, progress=progress)
        warn_notes(result.info, quiet)
        options = {"checkpoint": checkpoint, "config": config, "arch": arch, "tokenizer": tokenizer, "device": device,
                   "dtype": dtype.value, "trust_remote_code": trust_remote_code, "unsafe_pickle": unsafe_pickle,
                   "output": str(output) if output else None, "force": force}
        if output is not None:
            write_grad_outputs(output, result, lm, options, force=force)
        if not quiet:
            n = result.info.get("n_counted_tokens") or result.info.get("n_items")
            print_grad_table(result.rows, result.spike_rows,
                             f"gradient sparsity: {checkpoint} ({result.info['loss']} loss, {n} "
                             f"{'tokens' if result.info.get('n_counted_tokens') else 'inputs'}, {lm.dtype})")
            if output is not None:
                stderr_console().print(f"wrote {output}/ (gradients, gradients_summary, spikes .parquet/.csv, "
                                       "grad_by_layer.png/.svg, summary.md, manifest.json)")
