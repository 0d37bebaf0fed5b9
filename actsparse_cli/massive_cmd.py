"""``actsparse massive``: massive activations on the residual stream (Sun et al. 2024; Max_act_llm)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    PANEL_DATA,
    PANEL_OUT,
    SEED_MAX,
    batch_progress,
    float_check,
    handle_errors,
    stderr_console,
)
from actsparse_cli.loading_opts import (
    load,
    resolve_kinds,
    run_options,
    shared_options,
)

PANEL_MASSIVE = "Massive activations"
# Every site keeps its own top-K with 8 coordinates per entry, and the massive_topk table gets K rows a site.
MAX_TOP_K = 10_000


class PresetChoice(str, Enum):
    sun2024 = "sun2024"
    maxact2026 = "maxact2026"


class Int8CalibrationChoice(str, Enum):
    held_out = "held-out"
    in_sample = "in-sample"


class PlotChoice(str, Enum):
    layers = "layers"
    three_d = "3d"
    heatmap = "heatmap"


def massive_output(result, title: str, kinds=None):
    """The per-site table of the kinds the user asked for (``kinds``; None: the default kinds, see
    ``reports.massive_report.shown_kinds``), the global max and the INT8 check; and the tables written."""
    from actsparse_cli.display import Output, View, col, name_col, result_tables, site_label, unique_labels
    from reports.massive_report import shown_kinds
    from reports.numbers import fmt

    show = shown_kinds((r["kind"] for r in result.layers), kinds)
    every = {r.get("canonical_name"): lab for r, lab in zip(result.layers, unique_labels(result.layers))}
    rows = [dict(r, _label=every.get(r.get("canonical_name")) or site_label(r)) for r in result.layers
            if r["kind"] in show]
    cols = [name_col(), col("top1", "top1_mean"), col("top2", "top2_mean", drop=3), col("top3", "top3_mean", drop=4),
            col("median", "median_mean"), col("top1/med", "ratio_top1_median"), col("massive", "n_massive"),
            col("channels", "massive_channels", lambda v: fmt(v) if v not in (None, "") else "-", left=True,
                drop=2),
            col("positions", "massive_positions", lambda v: fmt(v) if v not in (None, "") else "-", left=True,
                drop=7),
            col("tok ratio max", "token_ratio_max", drop=5), col("massive tok", "n_massive_tokens", drop=6)]
    out = Output(items=[View(title, rows, cols)], tables=result_tables(result), main="massive_layers")
    g = result.global_max
    if g:
        out.add(f"global max {fmt(g['value'], 6)} at {g.get('canonical_name')} ({g.get('module_path')})",
                f"  sample {g.get('sample')}, position {g.get('position')}, channel {g.get('channel')}, "
                f"token {g.get('token')!r}")
    if result.intervene:
        first = result.intervene[0]

        def se(v):  # error bars (paired over sequences); absent in results written before them
            return fmt(v, 2) if v is not None and v == v else "-"

        if "accuracy" in first:  # a sequence classifier with --labels
            iv = [col("mode", "mode", str, left=True), col("CE", "ce_mean"),
                  col("loss ratio", "loss_ratio", lambda v: fmt(v, 6)), col("± se", "loss_ratio_se", se, drop=3),
                  col("accuracy", "accuracy", lambda v: fmt(v, 4)),
                  col("acc drop", "accuracy_drop", lambda v: fmt(v, 4)), col("± se", "accuracy_drop_se", se, drop=4),
                  col("examples", "n_sequences", drop=2)]
        else:
            iv = [col("mode", "mode", str, left=True), col("PPL", "ppl"),
                  col("x original", "ppl_ratio", lambda v: fmt(v, 6)), col("± se", "ppl_ratio_se", se, drop=3),
                  col("targets", "n_targets", drop=2)]
        out.add(View(f"intervention at layer {first['layer']} ({first['canonical_name']}), channels "
                     f"{first['channels']}", list(result.intervene), iv))
    if result.attention:
        from reports.massive_report import attention_by_layer

        at = [col("layer", "layer"), col("share pos 0", "attn_share_first"), col("share peak", "attn_share_peak"),
              col("share massive", "attn_share_massive", drop=3), col("uniform pos 0", "uniform_share_first", drop=2),
              col("max head pos 0", "max_head_share_first", drop=4)]
        kind = result.attention[0].get("attention_kind", "causal")
        out.add(View(f"attention share per layer (mean over heads; {kind} attention)",
                     attention_by_layer(result.attention), at))
    if result.int8:
        first = result.int8[0]
        site = first.get("canonical_name")
        t8 = [col("policy", "policy", str, left=True), col("threshold", "threshold"), col("rel_rmse", "rel_rmse"),
              col("SQNR dB", "sqnr_db"), col("clip rate", "clip_rate")]
        out.add(View("INT8, per-tensor symmetric", list(result.int8), t8),
                f"INT8 at {site}: {first.get('calibration', 'in-sample')} calibration; errors on the evaluated "
                "sequences")
    return out


def preset_dtype(preset: str, dtype, device) -> str:
    """``--dtype auto`` on a CUDA device: the preset's reference dtype (sun2024 float16, maxact2026 bfloat16, as
    their code loads models on GPU); on CPU, and for any other --dtype, what the user gave (auto: float32 on CPU)."""
    value = getattr(dtype, "value", dtype)
    if value != "auto":
        return value
    from probes.loading import resolve_device
    from probes.massive_presets import resolve_preset

    try:
        dev = resolve_device(device or "auto")
    except Exception:
        return value  # load() reports a bad --device
    return resolve_preset(preset).reference_dtype if getattr(dev, "type", str(dev)) == "cuda" else value


def register(app: typer.Typer) -> None:
    @app.command("massive")
    @shared_options
    @handle_errors
    def massive_cmd(
        checkpoint: Annotated[Optional[str], typer.Argument(
            help="Model folder, hub id or weight file. Default: the project's bundled ReLU model.",
            show_default=False)] = None,
        preset: Annotated[PresetChoice, typer.Option(
            "--preset", help="sun2024: Sun et al.'s protocol (no BOS, 10 contiguous corpus chunks at the family's "
            "length, seed 1). maxact2026: Max_act_llm's (no special tokens, one sample per document).",
            rich_help_panel=PANEL_MASSIVE)] = PresetChoice.sun2024,
        prompt: Annotated[Optional[str], typer.Option("--prompt", help="Analyse this one text instead of a corpus "
                                                      "(and draw it with --plot 3d).",
                                                      rich_help_panel=PANEL_MASSIVE)] = None,
        plot: Annotated[Optional[list[PlotChoice]], typer.Option(
            "--plot", help="Figures to write into -o (repeatable): layers, 3d, heatmap. Default: layers and heatmap, "
            "plus 3d with --prompt.", rich_help_panel=PANEL_OUT)] = None,
        layer: Annotated[Optional[int], typer.Option(
            "--layer", min=0, help="0-based layer for --plot 3d (default: the layer with the largest |h|).",
            rich_help_panel=PANEL_MASSIVE)] = None,
        int8: Annotated[bool, typer.Option("--int8", help="INT8 sanity check at the peak site: per-tensor symmetric "
                                           "scale from max|x| and from the --clip-quantile (two extra passes).",
                                           rich_help_panel=PANEL_MASSIVE)] = False,
        clip_quantile: Annotated[float, typer.Option("--clip-quantile", callback=float_check(0.5, 0.999999),
                                                     help="Quantile of |x| for the clipped INT8 scale.",
                                                     rich_help_panel=PANEL_MASSIVE)] = 0.999,
        int8_calibration: Annotated[Int8CalibrationChoice, typer.Option(
            "--int8-calibration", help="held-out: scales from the first third of the sequences (by sample id), "
            "errors and clip rates on the others, as Max_act_llm's quant_sanity_check; in-sample: both on every "
            "sequence (the max scale then clips nothing).",
            rich_help_panel=PANEL_MASSIVE)] = Int8CalibrationChoice.held_out,
        top_k: Annotated[int, typer.Option("--top-k", min=1, max=MAX_TOP_K, help="Largest entries kept per site, with "
                                           "coordinates, 1 to 10000 (held per site: at most what was measured).",
                                           rich_help_panel=PANEL_MASSIVE)] = 100,
        bos: Annotated[bool, typer.Option("--bos", help="Prepend BOS (or the prefix token) to every sequence; both "
                                          "reference protocols add none.", rich_help_panel=PANEL_DATA)] = False,
        data: Annotated[Optional[str], typer.Option("--data", help="Corpus: .txt, .jsonl, or hf:NAME[:CONFIG][:SPLIT]. "
                                                    "Default: the bundled calibration corpus.",
                                                    rich_help_panel=PANEL_DATA)] = None,
        text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl / hf: corpora.",
                                                rich_help_panel=PANEL_DATA)] = "text",
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Default: the preset's (1 for "
                                                          "sun2024, 8 for maxact2026).",
                                                          rich_help_panel=PANEL_DATA)] = None,
        max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Sequence length. Default: "
                                                          "the preset's (sun2024: the family's length, capped at the "
                                                          "model's limit).", rich_help_panel=PANEL_DATA)] = None,
        n_samples: Annotated[Optional[int], typer.Option("--n-samples", min=1, help="Sequences to measure. Default: "
                                                         "the preset's (10 for sun2024, 2000 for maxact2026).",
                                                         rich_help_panel=PANEL_DATA)] = None,
        max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Stop after this many tokens.",
                                                          rich_help_panel=PANEL_DATA)] = None,
        seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=SEED_MAX, help="Document sampling seed, "
                                                    "0 to 2**32-1 (default: the preset's).",
                                                    rich_help_panel=PANEL_DATA)] = None,
        skip_first: Annotated[int, typer.Option("--skip-first", min=0, help="Do not count the first N positions of "
                                                "each sequence (where massive activations usually sit).",
                                                rich_help_panel=PANEL_DATA)] = 0,
        intervene: Annotated[Optional[str], typer.Option(
            "--intervene", help="Sun et al.'s exp3: PPL with the massive activations of the first layer that has "
            "them (positions 0 and the largest |h|, the massive channels) set to zero and/or to their mean over "
            "the sequences, e.g. zero,mean; one extra pass each plus the original. A sequence classifier: "
            "cross-entropy and accuracy on --data FILE.jsonl with --labels.",
            rich_help_panel=PANEL_MASSIVE)] = None,
        labels: Annotated[Optional[str], typer.Option(
            "--labels", help="Label field of the --data .jsonl: --intervene on a sequence classifier measures "
            "cross-entropy and accuracy against it.", rich_help_panel=PANEL_DATA)] = None,
        intervene_layer: Annotated[Optional[int], typer.Option(
            "--intervene-layer", min=0, help="0-based layer for --intervene / --attention (default: the first "
            "layer with massive activations, else the largest top1/median).", rich_help_panel=PANEL_MASSIVE)] = None,
        attention: Annotated[bool, typer.Option(
            "--attention", help="Sun et al.'s exp4: per layer and head, the attention share on position 0 and on "
            "the massive positions, mean logits, and per-layer logit heat maps of one prompt (eager attention; causal "
            "decoders and bidirectional encoders, where --bos puts [CLS] at position 0).",
            rich_help_panel=PANEL_MASSIVE)] = False,
        attention_prompt: Annotated[Optional[str], typer.Option(
            "--attention-prompt", help="Text of the --attention heat maps (default: Sun et al.'s exp4 prompt).",
            rich_help_panel=PANEL_MASSIVE)] = None,
        kind: Annotated[Optional[list[str]], typer.Option("--kind", help="Residual site kinds: embed, attn_out, "
                                                          "mlp_pre, mlp_out, resid_post, final_norm. Repeatable.",
                                                          rich_help_panel="Sites")] = None,
        *,
        encoding, site, config, arch, tokenizer, device, device_map, dtype, trust_remote_code, unsafe_pickle, output,
        force, quiet, debug, output_format,
    ) -> None:
        """Massive activations: per-layer top-1/2/3 and median of |h|, massive channels and where they sit."""
        from probes.errors import ActsparseError
        from probes.massive import SUN_DEFAULT_PROMPT, MassiveOptions
        from probes.massive import massive as run_massive
        from reports.bundle import check_output_dir
        from reports.manifest import short_name

        from actsparse_cli.display import dtype_name, emit, info_of, stdout_format

        plots = [p.value for p in plot] if plot else None
        if plots and output is None:
            raise ActsparseError("--plot writes figures into the output folder, but no -o was given",
                                 "pass -o FOLDER", exit_code=2)
        if layer is not None and not (prompt or (plots and "3d" in plots)):
            raise ActsparseError("--layer picks the layer of the 3D plot", "use it with --prompt or --plot 3d",
                                 exit_code=2)
        from probes.massive_intervene import parse_modes

        modes = parse_modes(intervene) if intervene is not None else ()
        if intervene is not None and not modes:
            raise ActsparseError("--intervene was given no intervention", "use --intervene zero,mean (or zero, or "
                                 "mean)", exit_code=2)
        if (modes or attention) and prompt is not None:
            raise ActsparseError("--intervene and --attention measure the corpus sequences, not one --prompt",
                                 "drop --prompt (use --attention-prompt for the heat maps' text)", exit_code=2)
        if intervene_layer is not None and not (modes or attention):
            raise ActsparseError("--intervene-layer picks the layer of --intervene / --attention",
                                 "use it with --intervene zero,mean or --attention", exit_code=2)
        if labels is not None and not modes:
            raise ActsparseError("--labels gives the labels of --intervene on a sequence classifier",
                                 "add --intervene zero,mean, or drop --labels", exit_code=2)
        if attention_prompt is not None and not attention:
            raise ActsparseError("--attention-prompt is the text of the --attention heat maps",
                                 "add --attention", exit_code=2)
        if output is not None:
            from actsparse_cli.common import run_inputs

            check_output_dir(output, force, inputs=run_inputs(checkpoint, data, config, tokenizer))
        from probes.residual import RESIDUAL_KINDS

        kinds = resolve_kinds(kind, RESIDUAL_KINDS, RESIDUAL_KINDS)
        shown = kinds if kind else None  # what the table, summary and figures show: every kind asked for
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        want_3d = output is not None and (prompt is not None or (plots is not None and "3d" in plots))
        opts = MassiveOptions(preset=preset.value, data=data, text_field=text_field, encoding=encoding, prompt=prompt,
                              batch_size=batch_size, max_length=max_length, n_samples=n_samples, max_tokens=max_tokens,
                              seed=seed, bos=bos, skip_first=skip_first, top_k=top_k, kinds=kinds,
                              sites=tuple(site or ()), int8=int8, clip_quantile=clip_quantile,
                              int8_calibration=int8_calibration.value,
                              capture_prompt=(prompt or SUN_DEFAULT_PROMPT) if want_3d else None,
                              intervene=modes, intervene_layer=intervene_layer, attention=attention,
                              attention_prompt=attention_prompt, labels=labels)
        if prompt is None:
            from probes.corpus import check_corpus_spec

            check_corpus_spec(data, encoding)  # a FIFO, device or bad --encoding fails before the model loads
        fmt_out = stdout_format(output_format, quiet, output)  # -q without -o: refused before the model loads
        load_dtype = preset_dtype(preset.value, dtype, device)
        lm = load(checkpoint, config, arch, device, load_dtype, trust_remote_code, unsafe_pickle, tokenizer,
                  device_map=device_map)
        if layer is not None and want_3d:  # a --layer the model does not have would draw no 3D plot, silently
            from probes.residual import find_residual_sites

            found = find_residual_sites(lm.model, lm.family, kinds, tuple(site or ()))
            drawn = [s for s in found if s.kind == "resid_post"] or found  # what the 3D capture keeps
            have = sorted({s.layer for s in drawn if s.layer is not None})
            if have and layer not in have:
                raise ActsparseError(f"--layer {layer} is not a layer of this model (its layers are {have[0]} to "
                                     f"{have[-1]})", f"use --layer {have[0]} to {have[-1]}, or leave it out "
                                     "(the layer with the largest |h|)", exit_code=2)
        with batch_progress(quiet, "massive") as progress:
            result = run_massive(lm, opts, progress=progress)
        options = run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle,
                              output, force,
                              load_dtype=load_dtype, plot=plots, layer=layer,
                              device_map=getattr(device_map, "value", None))
        if output is not None:
            from reports.massive_report import write_massive_outputs

            write_massive_outputs(output, result, lm, options, force=force, plots=plots, layer=layer, kinds=shown)
        if result.info.get("overflow"):
            stderr_console().print(f"[yellow]warning:[/] {result.info['overflow']}: "
                                   f"{', '.join(result.info['nonfinite_sites'][:6])}")
        out = massive_output(result, f"massive activations: {short_name(checkpoint)} ({result.info['preset']}, "
                                     f"{result.info['n_sequences']} sequences, {result.info['n_counted_tokens']} "
                                     f"tokens, {dtype_name(lm.dtype)})", kinds=shown)
        out.info = {"command": "massive", "checkpoint": str(checkpoint), "model_dtype": dtype_name(lm.dtype),
                    "output": str(output) if output is not None else None,
                    **info_of(result.info, ("preset", "n_sequences", "n_counted_tokens")),
                    "global_max": result.global_max or None}
        emit(fmt_out, out)
        if output is not None and not quiet:
            stderr_console().print(f"wrote {output}/ (massive_layers, massive_topk, massive_channels"
                                   f"{', massive_int8' if result.int8 else ''}"
                                   f"{', massive_intervene' if result.intervene else ''}"
                                   f"{', massive_attention' if result.attention else ''} .parquet/.csv, figures, "
                                   "summary.md, "
                                   "manifest.json)", markup=False)
