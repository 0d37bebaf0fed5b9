"""Files of a ``measure`` run: the per-site table, the model-level summary and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.bundle import atomic_output_dir
from reports.figures import sparsity_by_layer
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.tables import write_table


def write_measure_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False,
                          extras: dict[str, Any] | None = None) -> Path:
    """One bundle: the sparsity tables, plus the ``grad`` and ``massive`` results when measured too."""
    extras = extras or {}
    title = short_name(options.get("checkpoint"))
    with atomic_output_dir(output, force) as tmp:
        files = write_table(result.table(), tmp, "sparsity")
        files += write_table(result.summary(), tmp, "summary")
        files += sparsity_by_layer(result.table(), tmp, title, result.info["n_counted_tokens"])
        files.append(write_summary_md(tmp, result, options, extras))
        sections: dict[str, Any] = {}
        if "grad" in extras:
            from reports.grad_report import write_grad_files

            files += write_grad_files(tmp, extras["grad"], title)
            sections["gradients"] = extras["grad"].info
        if "pplp" in extras:
            from reports.pplp_report import pplp_manifest_section, write_pplp_tables

            files += write_pplp_tables(tmp, extras["pplp"])
            sections["pplp"] = pplp_manifest_section(extras["pplp"])
            sections["warnings"] = list(extras["pplp"].warnings)
        if "massive" in extras:
            from reports.massive_report import massive_manifest_section, write_massive_files

            files += write_massive_files(tmp, extras["massive"], title)
            sections["massive"] = massive_manifest_section(extras["massive"])
        manifest = build_manifest("measure", options, model=model_section(lm), measurement=result.info,
                                  files=files + ["manifest.json"], **sections)
        write_manifest(tmp, manifest)
    return Path(output)


def write_summary_md(folder: Path, result, options: dict[str, Any], extras: dict[str, Any] | None = None) -> str:
    """A short markdown summary for terminals and pull requests (checkpoint, corpus and module names escaped)."""
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"# actsparse measure: {md_escape(options.get('checkpoint'))}", "",
             f"{info['n_counted_tokens']} counted tokens from {md_code(info['corpus'])} ({info['window_scheme']}, "
             f"max_length {info['max_length']}, model dtype {info['model_dtype']}, device {info['device']}).", "",
             "| site | module | kind | width | zero % | nonzero/token % | dead | always on |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {md_escape(r['canonical_name'])} | {md_code(r['module_path'])} | {md_escape(r['kind'])} | "
                     f"{r['width']} | "
                     f"{100 * r['zero_frac']:.2f} | {r['nonzero_pct_per_token']:.2f} | {r['dead_neurons']} | "
                     f"{r['always_on_neurons']} |")
    summ = result.summary()
    if len(summ):
        z = summ[summ.metric == "zero_frac"]
        lines += ["", "Mean over layers (unweighted): " + ", ".join(
            f"{k} zero_frac {100 * v:.2f} %" for k, v in zip(z.kind, z.mean_over_layers))]
    if extras and "pplp" in extras:
        from reports.pplp_report import pplp_summary_lines

        lines += [""] + list(pplp_summary_lines(extras["pplp"]))
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"
