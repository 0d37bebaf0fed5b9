"""Files of a ``measure`` run: the per-site table, the model-level summary and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.bundle import atomic_output_dir
from reports.figures import sparsity_by_layer
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.numbers import fixed, fmt, pct
from reports.tables import write_tables


def write_measure_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False,
                          extras: dict[str, Any] | None = None) -> Path:
    """One bundle: the sparsity tables, plus the result of each analysis run beside it (``extras``,
    by report-section name: ``gradients``, ``massive``, ``pplp``), each through its registered section."""
    from reports import sections as registry

    extras = extras or {}
    title = short_name(options.get("checkpoint"))
    with atomic_output_dir(output, force) as tmp:
        tables = result.tables()
        files = write_tables(tables, tmp)
        files += sparsity_by_layer(tables["sparsity"], tmp, title, result.info["n_counted_tokens"])
        files.append(write_summary_md(tmp, result, options, extras))
        man_sections: dict[str, Any] = {}
        for name, res in extras.items():
            sec = registry.section(name)
            files += registry.load(sec.write)(tmp, res, title)
            man_sections[sec.manifest_key] = registry.load(sec.manifest)(res)
            if sec.extra_manifest:
                man_sections.update(registry.load(sec.extra_manifest)(res))
        manifest = build_manifest("measure", options, model=model_section(lm), measurement=result.info,
                                  files=files + ["manifest.json"], **man_sections)
        write_manifest(tmp, manifest)
    return Path(output)


def _se_pct(v) -> str:
    """A standard error of a fraction, in % with 2 significant digits (a GELU's se of zero_frac is ~1e-5)."""
    return fmt(100 * v, 2) if isinstance(v, float) else fmt(v)


def write_summary_md(folder: Path, result, options: dict[str, Any], extras: dict[str, Any] | None = None) -> str:
    """A short markdown summary for terminals and pull requests (checkpoint, corpus and module names escaped)."""
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"# actsparse measure: {md_escape(options.get('checkpoint'))}", "",
             f"{info['n_counted_tokens']} counted tokens from {md_code(info['corpus'])} ({info['window_scheme']}, "
             f"max_length {info['max_length']}, model dtype {info['model_dtype']}, device {info['device']}).", "",
             "| site | module | kind | width | zero % | nonzero/token % | dead | always on |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    se = any("zero_frac_se" in r for r in result.rows)  # error bars over windows (probes.uncertainty)
    if se:
        lines[-2:] = ["| site | module | kind | width | zero % | ± se | nonzero/token % | dead | always on |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {md_escape(r['canonical_name'])} | {md_code(r['module_path'])} | {md_escape(r['kind'])} | "
                     f"{r['width']} | "
                     f"{pct(r['zero_frac'])} | " + (f"{_se_pct(r.get('zero_frac_se'))} | " if se else "")
                     + f"{fixed(r['nonzero_pct_per_token'], 2)} | {r['dead_neurons']} | "
                     f"{r['always_on_neurons']} |")
    summ = result.summary()
    if len(summ):
        z = summ[summ.metric == "zero_frac"]
        ses = z["mean_over_layers_se"] if "mean_over_layers_se" in z else [None] * len(z)
        lines += ["", "Mean over layers (unweighted): " + ", ".join(
            f"{k} zero_frac {pct(v, suffix=' %')}" + (f" ± {fmt(100 * e, 2)} %" if e is not None and e == e else "")
            for k, v, e in zip(z.kind, z.mean_over_layers, ses))]
        if se:
            lines += ["", "± se: standard error over the windows (the `_se` columns); `_lo`/`_hi` columns: "
                          f"{fmt(100 * info['uncertainty']['level'])} % bootstrap interval over "
                          f"{info['uncertainty']['n_resamples']} resamples of the windows."
                      if "uncertainty" in info else "± se: standard error over the windows (the `_se` columns)."]
    from reports import sections as registry

    for name, res in (extras or {}).items():  # one section per analysis in the bundle
        sec = registry.section(name)
        if sec.summary:
            lines += ["", f"## {md_escape(name)}", ""] + list(registry.load(sec.summary)(res, options))
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"
