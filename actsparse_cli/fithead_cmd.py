"""``actsparse fit-head``: a sequence classifier from a pretrained encoder by linear probing (probes/linear_head.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from actsparse_cli.common import PANEL_DATA, PANEL_OUT, SEED_MAX, float_check, handle_errors, stderr_console
from actsparse_cli.loading_opts import shared_options

PANEL_FIT = "Fit"


def fithead_output(record: dict, title: str):
    """Accuracy and loss on the fit and held-out splits, and the chance rate, as one small table."""
    import pandas as pd

    from actsparse_cli.display import Output, View, col
    from reports.numbers import pct

    n_fit, n_held = record["split"]["n_fit"], record["split"]["n_heldout"]
    rows = [{"split": "fit", "n": n_fit, "accuracy": record["fit_accuracy"], "loss": record["fit_loss"]},
            {"split": "held out", "n": n_held, "accuracy": record["heldout_accuracy"], "loss": record["heldout_loss"]},
            {"split": "chance (1/K)", "n": None, "accuracy": record["chance_accuracy"], "loss": None},
            {"split": "majority class", "n": n_held, "accuracy": record["majority_heldout_accuracy"], "loss": None}]
    cols = [col("split", "split", str, left=True), col("examples", "n", lambda v: "" if v is None else str(v)),
            col("accuracy %", "accuracy", pct), col("loss", "loss", lambda v: "" if v is None else f"{v:.4f}")]
    table = pd.DataFrame(rows).astype({"n": "Int64"})  # counts stay integers beside the empty chance row
    return Output(items=[View(title, rows, cols)], tables={"fit_head": table}, main="fit_head")


def register(app: typer.Typer) -> None:
    @app.command("fit-head")
    @shared_options
    @handle_errors
    def fit_head(
        encoder: Annotated[str, typer.Argument(help="Pretrained encoder: model folder, hub id (offline cache) or "
                                               "weight file with --config.", show_default=False)],
        output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the classifier checkpoint "
                                             "(written atomically).", rich_help_panel=PANEL_OUT,
                                             show_default=False)],
        data: Annotated[str, typer.Option("--data", help="Labeled .jsonl corpus, one {\"text\": ..., LABEL: ...} "
                                          "per line (e.g. probes/data/topics.jsonl).", rich_help_panel=PANEL_DATA,
                                          show_default=False)],
        labels: Annotated[str, typer.Option("--labels", help="Label field of the .jsonl (names, or ids 0..K-1).",
                                            rich_help_panel=PANEL_DATA, show_default=False)],
        fit_share: Annotated[float, typer.Option("--fit-share", help="Share of examples the head is fitted on; the "
                                                 "rest, evenly spaced, is held out (0.5: every second example).",
                                                 callback=float_check(0.0, 1.0, lo_open=True, hi_open=True),
                                                 rich_help_panel=PANEL_FIT)] = 0.5,
        l2: Annotated[float, typer.Option("--l2", help="L2 penalty on the head's weights: mean cross-entropy + "
                                          "l2/2 * ||W||^2.", callback=float_check(0.0), rich_help_panel=PANEL_FIT)
                      ] = 1e-3,
        max_examples: Annotated[Optional[int], typer.Option("--max-examples", min=2, help="Use only the first N "
                                                            "examples of the corpus.", rich_help_panel=PANEL_DATA)
                                ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.",
                                                rich_help_panel=PANEL_DATA)] = 32,
        max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Tokens per example "
                                                          "(truncated). Default: 128, or the model's position "
                                                          "limit when smaller.", rich_help_panel=PANEL_DATA)] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="torch.manual_seed before the "
                                          "classifier is built (the fit itself is deterministic).",
                                          rich_help_panel=PANEL_DATA)] = 0,
        *,
        text_field, encoding, config, arch, tokenizer, device, trust_remote_code, unsafe_pickle, force, quiet, debug,
        output_format,
    ) -> None:
        """Linear probing: load ENCODER as a sequence classifier with the labels of --data, keep the encoder
        frozen, fit its final Linear by multinomial logistic regression on frozen features, and save the
        classifier (with its own head and loss) to -o. Prints fit and held-out accuracy and the chance rate."""
        from actsparse_cli.common import batch_progress, run_inputs
        from actsparse_cli.display import emit, stdout_format
        from probes.corpus import check_corpus_spec
        from probes.linear_head import fit_linear_head
        from reports.bundle import check_output_dir, release
        from reports.head_checkpoint import write_head_checkpoint
        from reports.manifest import short_name

        inputs = run_inputs(encoder, data, config, tokenizer)
        check_output_dir(output, force, inputs=inputs)
        check_corpus_spec(data, encoding)
        shown = stdout_format(output_format, quiet, output)
        from probes.loading import resolve_device

        if resolve_device(device).type == "cpu":
            from probes.threads import apply_cpu_threads

            apply_cpu_threads()  # few threads when other processes hold the cores (as every command's load)
        try:
            with batch_progress(quiet, "features") as progress:
                fit = fit_linear_head(encoder, data, labels, text_field=text_field, encoding=encoding,
                                      fit_share=fit_share, l2=l2, max_length=max_length, batch_size=batch_size,
                                      max_examples=max_examples, seed=seed, device=device, tokenizer=tokenizer,
                                      trust_remote_code=trust_remote_code, config=config, arch=arch,
                                      unsafe_pickle=unsafe_pickle, progress=progress)
        except BaseException:
            release(output)
            raise
        write_head_checkpoint(output, fit, force=force, inputs=inputs)
        rec = fit.record
        out = fithead_output(rec, f"fit-head: {short_name(encoder)} ({fit.head_module}, "
                                  f"{len(fit.label_names)} labels)")
        out.info = {"command": "fit-head", "encoder": str(encoder), "output": str(output),
                    **{k: rec[k] for k in ("fit_accuracy", "heldout_accuracy", "chance_accuracy", "fit_loss",
                                           "heldout_loss", "l2", "converged")}}
        emit(shown, out)
        if not quiet:
            if not rec["converged"]:
                typer.echo(f"warning: L-BFGS stopped with max |gradient| {rec['max_abs_grad']:.2g} after "
                           f"{rec['lbfgs_iterations']} iterations (not converged)", err=True)
            stderr_console().print(f"wrote {output}/ (config.json, model.safetensors, tokenizer, "
                                   f"actsparse_head.json); run analyses with --data {data} --labels {labels}",
                                   markup=False)
