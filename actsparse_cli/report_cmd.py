"""``actsparse report``, ``actsparse compare`` and ``actsparse track``: bundles, CI gates and training trends.

Exit codes of ``compare``: 0 when every ``--fail-on`` rule holds (or none is given), 7 when a rule
is broken (with ``--strict`` also when the two sides measured different things: other tables,
columns, rows, token counts or method options), 2 for a bad input folder or an unreadable rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from actsparse_cli.common import (
    PANEL_DATA,
    PANEL_OUT,
    SEED_MAX,
    handle_errors,
    stderr_console,
)
from actsparse_cli.loading_opts import shared_options
from probes.errors import EXIT_RULE_BROKEN

PANEL_GATE = "Gate"
PANEL_TRACK = "Track"

RequiredOut = Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).",
                                           rich_help_panel=PANEL_OUT, show_default=False)]


_MISMATCH_KINDS = ("schema", "missing", "tokens", "method")


def compare_counts(res) -> dict:
    """The numbers of compare's verdict: values on both sides, changed values, rules broken, mismatches."""
    return {"values_compared": int((res.diff.status == "both").sum()), "changed": len(res.changed()),
            "rules": len(res.rules), "rules_broken": sum(not r.passed for r in res.rules),
            "mismatches": sum(i.kind in _MISMATCH_KINDS for i in res.issues)}


def verdict_line(res) -> str:
    """``PASS: 686 values compared, 0 changed, 0 of 2 rules broken`` (FAIL when the gate fails)."""
    n = compare_counts(res)
    line = (f"{'FAIL' if res.failed else 'PASS'}: {n['values_compared']} values compared, {n['changed']} changed, "
            f"{n['rules_broken']} of {n['rules']} rules broken")
    if res.noise_clause():  # both sides carry *_se columns: how many changes are beyond noise
        line += f", {res.noise_clause()}"
    if n["mismatches"]:
        line += (f", {n['mismatches']} difference{'s' if n['mismatches'] != 1 else ''} in what was measured"
                 + (" (--strict)" if res.strict else ""))
    return line


def compare_output(res, top: int):
    """The largest changes (labels per site), the tables behind them, and the markdown report for --format md."""
    import pandas as pd

    from actsparse_cli.display import Col, Output, View, col, looks_like_path, site_label, unique_labels
    from reports.compare import _layer
    from reports.numbers import fmt, pct

    n = compare_counts(res)
    ch = res.changed()

    def kind_of(r: dict):
        k = r.get("kind")
        return None if k is None or str(k) in ("", "nan", "None", "<NA>") else str(k)

    def label(r: dict) -> str:
        name = str(r.get("name"))
        if looks_like_path(name):  # a site or weight: L0 mlp_post, L0 attn.c_attn
            return site_label({"canonical_name": name, "name": name, "kind": kind_of(r), "layer": r.get("layer")})
        return name  # summary rows (mean_over_layers), steps, ...

    every = ch.to_dict(orient="records")
    labels = unique_labels(every, label=label, ident=lambda r: (r.get("table"), r.get("name"), kind_of(r)),
                           full=lambda r: str(r.get("name")) + (f" ({kind_of(r)})" if kind_of(r) else ""))
    rows = [dict(r, _label=lab) for r, lab in zip(every[:top], labels[:top])]
    cols = [col("table", "table", str, left=True, drop=3),
            Col("site", lambda r: str(r.get("name")), left=True, short=lambda r: r["_label"]),
            Col("layer", lambda r: _layer(r.get("layer")), wide_only=True),
            Col("kind", lambda r: kind_of(r) or "", left=True, wide_only=True),
            col("metric", "metric", str, left=True), col("baseline", "baseline", lambda v: fmt(v, 6), drop=2),
            col("candidate", "candidate", lambda v: fmt(v, 6)), col("delta", "delta", lambda v: fmt(v, 6), drop=4),
            col("delta %", "rel_delta", lambda v: pct(v, signed=True, suffix=" %"))]
    if res.has_error_bars:  # both sides carry *_se columns: within z sigma of the difference or not
        cols.append(col("noise", "within_noise", lambda v: "" if v is None or pd.isna(v) else
                        ("within" if v else "beyond"), drop=1))
    if not len(ch):
        empty = f"no value changed ({n['values_compared']} values compared)"
    else:
        empty = f"{len(ch)} of {n['values_compared']} values changed (--top 0 lists none)"
    view = View(f"largest changes ({len(rows)} of {len(ch)} changed values; {n['values_compared']} values compared)",
                rows, cols, empty=empty)
    rules = pd.DataFrame([{"rule": r.rule.text, "passed": r.passed, "meaning": r.rule.describe(),
                           "values_checked": r.n_checked, "values_skipped": r.n_skipped, "broken": len(r.broken)}
                          for r in res.rules], columns=["rule", "passed", "meaning", "values_checked",
                                                        "values_skipped", "broken"])
    issues = pd.DataFrame([{"kind": i.kind, "message": i.message} for i in res.issues], columns=["kind", "message"])
    changes = ch.drop(columns=[c for c in ch.columns if str(c).startswith("_")])
    info = {"command": "compare", "verdict": "FAIL" if res.failed else "PASS", **n, "strict": res.strict,
            "baseline": str(res.baseline.path), "candidate": str(res.candidate.path),
            "tables_compared": list(res.compared_tables)}
    return Output(items=[view], tables={"changes": changes, "rules": rules, "issues": issues}, main="changes",
                  info=info, markdown=res.to_markdown(top=max(top, 1)))


def trends_output(tr, title: str):
    """The trends table turned on its side: one row per metric, one column per checkpoint (its step)."""
    from actsparse_cli.display import Output, View, col

    metrics = [c for c in tr.columns if c not in ("step", "checkpoint_index", "checkpoint", "step_source")]
    steps = list(tr["step"]) if "step" in tr.columns else list(range(len(tr)))
    rows = [{"metric": m, **{f"_{i}": v for i, v in enumerate(tr[m].tolist())}} for m in metrics]
    cols = [col("metric", "metric", str, left=True)] + [col(f"step {s}", f"_{i}") for i, s in enumerate(steps)]
    return Output(items=[View(title, rows, cols)])


def register(app: typer.Typer) -> None:
    @app.command("report")
    @shared_options
    @handle_errors
    def report(
        inputs: Annotated[list[Path], typer.Argument(help="actsparse output folders (measure, spectrum, massive, "
                                                     "pplp, curve, grad, drift, track).", show_default=False)],
        output: RequiredOut,
        title: Annotated[Optional[str], typer.Option("--title", help="Title of index.html and summary.md.",
                                                     rich_help_panel=PANEL_OUT)] = None,
        *,
        force, quiet, debug,
    ) -> None:
        """Bundle outputs into one report folder: tables, figures (PNG + SVG), summary.md and an offline index.html."""
        from reports.bundle_report import build_report

        build_report(inputs, output, force=force, title=title)
        if not quiet:
            import json

            man = json.loads((Path(output) / "manifest.json").read_text())
            stderr_console().print(f"wrote {output}/: {len(man['inputs'])} input(s), {len(man['figures'])} figures, "
                                   f"{len(man['tables'])} tables; open {output}/index.html")
            for w in man.get("warnings", []):
                stderr_console().print(f"warning: {w}", markup=False)

    @app.command("compare")
    @shared_options
    @handle_errors
    def compare(
        baseline: Annotated[Path, typer.Argument(help="Baseline output folder or report bundle.", show_default=False)],
        candidate: Annotated[Path, typer.Argument(help="Candidate output folder or report bundle.",
                                                  show_default=False)],
        fail_on: Annotated[Optional[list[str]], typer.Option(
            "--fail-on", help="METRIC:DELTA, repeatable. zero_frac:-0.02 fails if candidate - baseline < -0.02; "
            "alpha:+0.5 if it grows by more than 0.5; alpha:+10% relative to |baseline|; no sign: either way. "
            "METRIC may be a glob or TABLE/METRIC.", rich_help_panel=PANEL_GATE, show_default=False)] = None,
        strict: Annotated[bool, typer.Option("--strict", help="Also fail (exit 7) when the two sides differ in "
                                             "tables, columns, rows, token counts or method options.",
                                             rich_help_panel=PANEL_GATE)] = False,
        markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write a markdown report (for a "
                                                         "pull-request comment or $GITHUB_STEP_SUMMARY).",
                                                         rich_help_panel=PANEL_OUT, show_default=False)] = None,
        top: Annotated[int, typer.Option("--top", min=0, help="Changed values to list, largest relative change "
                                         "first.", rich_help_panel=PANEL_OUT)] = 20,
        *,
        force, quiet, debug, output_format,
    ) -> None:
        """Line up two result sets by table/site/layer/metric and gate on --fail-on rules.

        Exit code 0: every rule holds; 7: a rule is broken (or, with --strict, the sides measured different things);
        2: an input is not an actsparse output, or a rule cannot be read or matches no metric.
        """
        from reports.compare import _layer, parse_rule
        from reports.compare import compare as run_compare
        from reports.numbers import fmt

        from actsparse_cli.display import emit, stdout_format

        shown = stdout_format(output_format, quiet, writes=False)
        rules = [parse_rule(r) for r in fail_on or []]  # a typo fails before any table is read
        if markdown is not None:
            from reports.bundle import check_output_file

            # an existing empty file (GitHub's $GITHUB_STEP_SUMMARY) holds nothing to lose
            md_force = force or (markdown.is_file() and not markdown.is_symlink() and markdown.stat().st_size == 0)
            check_output_file(markdown, md_force, inputs=[baseline, candidate])  # before any table is read
        res = run_compare(baseline, candidate, rules, strict=strict)
        if markdown is not None:
            from reports.bundle import write_output_file

            markdown.parent.mkdir(parents=True, exist_ok=True)
            write_output_file(markdown, res.to_markdown(top=max(top, 1)), md_force, inputs=[baseline, candidate])
        emit(shown, compare_output(res, top))
        if not quiet:
            for i in res.issues:
                typer.echo(f"{i.kind}: {i.message}", err=True)
        for r in res.rules:
            if r.passed:
                if not quiet:
                    typer.echo(f"rule {r.rule.text}: ok ({r.n_checked} values checked)", err=True)
                continue
            b = r.broken.iloc[0]
            layer = f" layer {_layer(b['layer'])}" if _layer(b["layer"]) else ""
            typer.echo(f"rule {r.rule.text} BROKEN by {len(r.broken)} of {r.n_checked} values ({r.rule.describe()}); "
                       f"e.g. {b['table']} {b['name']}{layer} {b['metric']}: {fmt(b['baseline'], 6)} -> "
                       f"{fmt(b['candidate'], 6)} ({b['why']})", err=True)
        if markdown is not None and not quiet:
            typer.echo(f"wrote {markdown}", err=True)
        if res.failed and res.passed:  # only --strict fails: say what differs, also under -q
            if quiet:
                for i in res.issues:
                    if i.kind in _MISMATCH_KINDS:
                        typer.echo(f"{i.kind}: {i.message}", err=True)
            typer.echo("--strict: the two sides measured different things (listed above)", err=True)
        typer.echo(verdict_line(res), err=True)  # always the last line, in every mode
        if res.failed:
            raise typer.Exit(EXIT_RULE_BROKEN)

    @app.command("track")
    @shared_options
    @handle_errors
    def track(
        output: RequiredOut,
        checkpoints: Annotated[Optional[list[str]], typer.Argument(
            help="Checkpoints of one run: folders/files or globs such as 'runs/ckpt-*/' (quote it). The step comes "
                 "from trainer_state.json or the name (ckpt-1000, step_1000, checkpoint-1000).",
            show_default=False)] = None,
        analyses: Annotated[Optional[list[str]], typer.Option(
            "--analyses", help="Comma-separated or repeated: measure, drift, massive, spectrum. Default: all.",
            rich_help_panel=PANEL_TRACK, show_default=False)] = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Corpus: .txt, .jsonl, or hf:NAME[:CONFIG][:SPLIT]. "
                                                    "Default: the bundled calibration corpus. Read once, used for "
                                                    "every checkpoint.", rich_help_panel=PANEL_DATA)] = None,
        text_field: Annotated[str, typer.Option("--text-field", help="Text field of .jsonl / hf: corpora.",
                                                rich_help_panel=PANEL_DATA)] = "text",
        max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Counted tokens per checkpoint.",
                                                          rich_help_panel=PANEL_DATA)] = None,
        max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Window length (default: the "
                                                          "model's limit, at most 2048).",
                                                          rich_help_panel=PANEL_DATA)] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.",
                                                rich_help_panel=PANEL_DATA)] = 4,
        seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed, 0 to 2**32-1.",
                                          rich_help_panel=PANEL_DATA)] = 0,
        massive_preset: Annotated[str, typer.Option("--massive-preset", help="Protocol of the massive analysis: "
                                                    "sun2024 or maxact2026.", rich_help_panel=PANEL_TRACK)] = "sun2024",
        *,
        encoding, kind, tokenizer, device, dtype, trust_remote_code, unsafe_pickle, force, quiet, debug,
        output_format,
    ) -> None:
        """Trends over a run's checkpoints: sparsity per layer, weight drift, top-1/median (with the emergence fit)
        and alpha against the training step."""
        from actsparse_cli.loading_opts import resolve_kinds
        from probes.errors import CheckpointError
        from probes.track import (
            TrackOptions,
            expand_checkpoints,
            resolve_analyses,
            run_track,
        )
        from reports.bundle import check_output_dir
        from reports.track import write_track_outputs

        from actsparse_cli.display import emit, stdout_format

        shown = stdout_format(output_format, quiet, output, writes=False)
        chosen = resolve_analyses(analyses)
        check_output_dir(output, force, inputs=[*(checkpoints or ()), data, tokenizer])
        if "massive" in chosen:
            from probes.massive import resolve_preset

            resolve_preset(massive_preset)  # a typo fails before any checkpoint is loaded
        kinds = resolve_kinds(kind) if kind else None
        if not checkpoints:
            import probes.embedded as embedded

            series = getattr(embedded, "default_track_checkpoints", None)
            if series is None:
                raise CheckpointError("no checkpoints given", "pass the run's checkpoints, e.g. 'runs/ckpt-*/'")
            checkpoints = [str(p) for p in series()]
        import warnings

        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            cks = expand_checkpoints(checkpoints)
        from actsparse_cli.common import run_inputs

        check_output_dir(output, force, inputs=run_inputs(None, data, None, tokenizer, *(ck.path for ck in cks)))
        err = stderr_console()
        for w in wlist:
            err.print(f"warning: {w.message}", markup=False)
        opts = TrackOptions(analyses=chosen, data=data, text_field=text_field, encoding=encoding, batch_size=batch_size,
                            max_length=max_length, max_tokens=max_tokens, seed=seed, kinds=kinds,
                            massive_preset=massive_preset, device=device, dtype=dtype.value,
                            trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, tokenizer=tokenizer)

        def on_stage(i, n, ck, stage):
            if not quiet:
                err.print(f"track [{i + 1}/{n}] step {ck.step} ({ck.path}): {stage}", markup=False, highlight=False)

        result = run_track(cks, opts, on_stage=on_stage)
        from dataclasses import asdict

        options = {"checkpoints": list(checkpoints), **{k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in asdict(opts).items()},
                   "output": str(output), "force": force}
        write_track_outputs(output, result, options, force=force)
        for w in result.warnings:
            err.print(f"warning: {w}", markup=False, highlight=False)
        out = trends_output(result.tables()["trends"], f"trends over {len(cks)} checkpoints")
        from actsparse_cli.display import result_tables

        out.tables, out.main = result_tables(result), "trends"
        out.info = {"command": "track", "checkpoints": [str(ck.path) for ck in cks], "steps": [ck.step for ck in cks],
                    "analyses": list(chosen), "output": str(output)}
        emit(shown, out)
        if not quiet:
            err.print(f"wrote {output}/", markup=False)
