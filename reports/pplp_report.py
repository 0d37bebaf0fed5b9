"""Files of ``pplp`` and ``curve`` runs: tables, manifest sections, summary.md, the sparsity-vs-PPL plot.

``write_pplp_tables`` / ``pplp_manifest_section`` are also what another command (``measure
--pplp``) calls to add a PPL-p% section to its own bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.bundle import atomic_output_dir
from reports.figures import pyplot, save
from reports.manifest import build_manifest, model_section, short_name, write_manifest
from reports.numbers import fixed, fmt, pct
from reports.tables import write_tables


# ----------------------------------------------------------------------------------------------- pplp
def write_pplp_tables(folder: str | Path, result) -> list[str]:
    """pplp (per p and layer), pplp_summary (per p), pplp_trace (every pass), cett_calibration."""
    return write_tables(result.tables(), folder)


def pplp_manifest_section(result) -> dict[str, Any]:
    """What the manifest records about a PPL-p% run: how it was measured, and each target's outcome."""
    targets = []
    for t in result.targets:
        ev = t.evaluation if t.status != "unreachable" else None
        targets.append({"p_pct": t.p, "target_ratio": t.target_ratio, "status": t.status, "reason": t.reason,
                        "c_star": t.c_star if ev else None, "achieved_ratio": ev.ratio if ev else None,
                        "mean_sparsity": ev.mean_sparsity if ev else None,
                        "thresholds": list(ev.thresholds) if ev else None,
                        "sparse_passes": t.sparse_passes, "trace": [list(x) for x in t.trace],
                        "bound_ratio": t.bound_ratio})
    return {**result.info, "dense": {k: v for k, v in result.dense.items()}, "targets": targets,
            "warnings": list(result.warnings)}


def write_pplp_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_pplp_tables(tmp, result)
        files.append(write_pplp_summary_md(tmp, result, options))
        manifest = build_manifest("pplp", options, model=model_section(lm), pplp=pplp_manifest_section(result),
                                  warnings=list(result.warnings), files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def pplp_summary_lines(result) -> list[str]:
    """Markdown lines for a PPL-p% section (shared with other bundles' summary.md)."""
    from reports.markdown import md_code, md_escape

    info, dense = result.info, result.dense
    lines = []
    for w in result.warnings:
        lines += [f"> **WARNING:** {md_escape(w)}", ""]
    lines += [f"{dense['n_tokens']} counted tokens from {md_code(info['corpus'])}; dense PPL {fixed(dense['ppl'], 4)} "
              f"(CE {fixed(dense['ce'], 6)}); search `{info['method']}`, tol {info['tol']:g} on the PPL ratio; "
              f"{info['full_passes']} full passes in all (calibration included).", "",
              "| p % | status | c* | achieved PPL ratio | mean sparsity % | activation ratio % | sparse passes |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    summ = result.summary()
    for _, r in summ.iterrows():
        if r["status"] == "unreachable":
            lines.append(f"| {r['p_pct']:g} | unreachable | - | - | - | - | {r['sparse_passes']} |")
            continue
        lines.append(f"| {r['p_pct']:g} | {r['status']} | {fixed(r['c_star'], 5)} | {fixed(r['achieved_ratio'], 5)}"
                     f" | {pct(r['mean_sparsity'])} | {pct(r['mean_activation_ratio'])} | "
                     f"{r['sparse_passes']} |")
    notes = [f"- p = {r['p_pct']:g} %: {md_escape(r['reason'])}" for _, r in summ.iterrows() if r["reason"]]
    if notes:
        lines += [""] + notes
    table = result.table()
    if len(table):
        lines += ["", "| p % | layer | module | threshold | sparsity % | CETT in sparse run |", "|---:|---:|---|---:|---:|---:|"]
        for _, r in table.iterrows():
            lines.append(f"| {r['p_pct']:g} | {r['layer']} | {md_code(r['module_path'])} | "
                         f"{fmt(r['threshold'], 6)} | "
                         f"{pct(r['sparsity'])} | {fixed(r['cett_in_sparse_run'], 4)} |")
    return lines


def write_pplp_summary_md(folder: Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_escape

    lines = [f"# actsparse pplp: {md_escape(options.get('checkpoint'))}", ""] + pplp_summary_lines(result)
    lines += ["", "Sparsity = fraction of the MLP output projection's input entries that are exactly 0 in the sparse run "
              "(natural zeros included), mean over layers (unweighted). Neuron i is inactive when "
              "|x_i| * ||W_down[:, i]||_2 < threshold; thresholds come from one CETT value c* shared by all layers."]
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"


# ---------------------------------------------------------------------------------------------- curve
def write_curve_tables(folder: str | Path, result) -> list[str]:
    return write_tables(result.tables(), folder)


def curve_manifest_section(result) -> dict[str, Any]:
    return {**result.info, "warnings": list(result.warnings)}


_MARKERS = {"cett": "o", "topk": "s", "topk_global": "D", "teal": "^", "teal_greedy": "<", "absq_down": ">",
            "cats": "v", "chess": "P", "chess_plus": "*", "fat": "X"}
_EFFECTIVE = ("teal", "teal_greedy")  # x = parameter-weighted effective sparsity over all projection inputs
# Per method: (line style, line width, marker size, hollow marker). absq_down and CATS threshold the same |x| and
# coincide on a ReLU model: absq_down is drawn wide, dashed and with large hollow markers under a thin dotted CATS
# with small filled ones, so both stay visible.
_LINES = {"cett": ("-", 1.4, 4, False), "topk": ("-.", 1.4, 4, False), "topk_global": ((0, (5, 1, 1, 1)), 1.4, 4, True),
          "teal": ("-", 2.0, 6, False), "teal_greedy": ((0, (4, 2)), 2.0, 6, True),
          "absq_down": ("--", 2.4, 8, True), "cats": (":", 1.4, 4, False), "chess": ((0, (3, 1)), 1.4, 5, True),
          "chess_plus": ((0, (3, 1, 1, 1)), 1.4, 5, False), "fat": ((0, (1, 1)), 1.4, 5, False)}


def plot_curve(df, folder: str | Path, title: str, n_tokens: int, stem: str = "curve") -> list[str]:
    """Sparsity (mean over layers) against the PPL increase, one labelled curve per method (PNG + SVG).

    y is 100 * (PPL ratio - 1) on a symmetric log scale, linear within +-0.5 %, so that the
    1-10 % region PPL-p% is about stays readable next to ratios of 2 or more.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.8))
    dense = df[df.method == "dense"]
    for method, g in df[df.method != "dense"].groupby("method", sort=False):
        eff = method in _EFFECTIVE and "effective_sparsity" in g
        xcol = "effective_sparsity" if eff else "mean_sparsity"
        g = g.sort_values(xcol)
        tensor = str(g.thresholded_tensor.iloc[0]).split(" (")[0]
        label = (f"{method}: all projection inputs (x = effective sparsity)" if eff else f"{method} on {tensor}")
        ls, lw, ms, hollow = _LINES.get(method, ("-", 1.4, 4, False))
        line, = ax.plot(100 * g[xcol], 100 * (g.ppl_ratio - 1), marker=_MARKERS.get(method, "o"), ms=ms,
                        lw=lw, ls=ls, label=label, zorder=2 if hollow else 3)
        if hollow:
            line.set_markerfacecolor("none")
            line.set_markeredgewidth(1.3)
    if len(dense):
        ax.plot(100 * dense.mean_sparsity, 100 * (dense.ppl_ratio - 1), marker="*", ms=11, ls="none", color="k",
                label="dense (natural zeros)")
    ax.set_yscale("symlog", linthresh=0.5)
    xs = [df.mean_sparsity] + ([df[df.method.isin(_EFFECTIVE)].effective_sparsity] if "effective_sparsity" in df
                               else [])
    xmin = float(100 * min(x.min() for x in xs if len(x.dropna()))) if len(df) else 0.0
    ax.set_xlim(max(0.0, xmin - 5), 100)
    for p, ls in ((1, "--"), (5, ":"), (10, "-.")):
        ax.axhline(p, color="grey", lw=0.8, ls=ls)
        ax.text(ax.get_xlim()[0], p, f" PPL +{p}%", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("activation sparsity of the sparse run, % (MLP activation, mean over layers;\n"
                  "teal: parameter-weighted over all projection inputs)" if df.method.isin(_EFFECTIVE).any()
                  else "activation sparsity of the sparse run, % (mean over layers)")
    ax.set_ylabel("PPL increase, % (sparse / dense - 1)")
    ax.set_title(f"{title}: sparsity vs PPL over {n_tokens} tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: never on data
    fig.tight_layout()
    return save(fig, folder, stem)


def write_curve_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False,
                        plot: bool = True) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_curve_tables(tmp, result)
        if plot:
            files += plot_curve(result.table(), tmp, short_name(options.get("checkpoint")), result.info["n_counted_tokens"])
        files.append(write_curve_summary_md(tmp, result, options))
        manifest = build_manifest("curve", options, model=model_section(lm), curve=curve_manifest_section(result),
                                  warnings=list(result.warnings), files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)


def write_curve_summary_md(folder: Path, result, options: dict[str, Any]) -> str:
    from reports.markdown import md_code, md_escape

    info = result.info
    lines = [f"# actsparse curve: {md_escape(options.get('checkpoint'))}", ""]
    for w in result.warnings:
        lines += [f"> **WARNING:** {md_escape(w)}", ""]
    lines += [f"{info['n_counted_tokens']} counted tokens from {md_code(info['corpus'])}; dense PPL "
              f"{fixed(info['dense_ppl'], 4)}; "
              f"{info['full_passes']} full passes.", ""]
    split = info.get("calibration_split")
    if split:
        cw, ew = split["calibration_windows"], split["evaluation_windows"]
        lines += [f"Calibration (teal, teal_greedy, chess): windows {cw[0]}-{cw[1] - 1} "
                  f"({split['calibration_counted_tokens']} tokens); every method evaluated on windows "
                  f"{ew[0]}-{ew[1] - 1} ({split['evaluation_counted_tokens']} tokens).", ""]
    lines += ["| method | value | thresholded tensor | PPL ratio | mean sparsity % | effective sparsity % |",
              "|---|---:|---|---:|---:|---:|"]
    for r in result.points:
        tensor = md_escape(r["thresholded_tensor"]) if isinstance(r["thresholded_tensor"], str) else "-"
        eff = r.get("effective_sparsity")
        lines.append(f"| {r['method']} | {fmt(r['value'], 6)} | {tensor} | "
                     f"{fixed(r['ppl_ratio'], 5)} | {pct(r['mean_sparsity'])} | "
                     f"{pct(eff) if eff is not None and eff == eff else '-'} |")
    if "teal" in info:
        lines += ["", f"TEAL ({md_escape(info['teal']['eval'])} positions): effective sparsity = parameter-weighted "
                  "mean of the measured per-projection input sparsities (teal_projections table)."]
    (Path(folder) / "summary.md").write_text("\n".join(lines) + "\n")
    return "summary.md"
