"""PPL-p% sparsity (CETT) and sparsity-vs-perplexity curves (METRICS.md section 6).

Definitions (Sparsing Law arXiv 2411.02335; ReLU^2 Wins arXiv 2402.03804; reference code
thunlp/SparsingLaw src/model_utils.py and src/calc_activation.py):

- x = the MLP activation (input of the output projection), W_down the projection with
  y = W_down x. Neuron output norm n_i = |x_i| * ||W_down[:, i]||_2. In a sparse run neuron i
  is inactive (zeroed by a forward pre-hook on the output projection) when n_i < t_layer.
- CETT(t) = mean over counted tokens of ||sum_{i: n_i <= t} x_i W_down[:, i]||_2 /
  ||sum_i x_i W_down[:, i]||_2 (a token whose whole MLP output is 0 contributes 0).
- One CETT value c is shared by every layer; a layer's threshold is the largest t with
  CETT(t) <= c. PPL-p%: the c with exp(CE_sparse - CE_dense) = 1 + p/100, dense and sparse
  cross-entropies summed in float64 over exactly the same counted tokens.

Minimum tokens: below MIN_TOKENS (4096) counted tokens the PPL ratio near 1 is noise-prone;
results still come out, with a loud warning in the output and the manifest.

Calibration (a streaming, exact CETT grid per layer) and the search for c (a safeguarded secant
search on log PPL ratio against log c): ``probes.cett``. The passes over the tokens:
``probes.pplp_session``. This module holds the options, the results and the two entry points,
``pplp`` and ``curve``.

Other threshold families (curve points, each naming the tensor it thresholds):
- ``fat@eps``: |act(gate)| < eps (GLU); the activation x itself for non-GLU MLPs.
- ``topk@r`` / ``topk_global@r``: keep the r fraction of largest |act(gate)| (x for non-GLU)
  per token, or over all counted tokens of a batch (Sparsing Law's global mode).
- ``teal@s`` / ``teal_greedy@s``: TEAL (FasterDecoding/TEAL) as its code does it, ``probes.teal``:
  the inputs of all seven projections of a block (q k v o gate up down; the matching Linear layers
  of GPT-2 / BERT), per-layer per-projection thresholds from TEAL's histogram rule on calibration
  windows disjoint from the evaluated ones, TEAL's last-half-of-prefill evaluation by default
  (``teal_eval="all"``: every position), effective sparsity = parameter-weighted mean of the
  measured per-projection sparsities; ``teal_greedy`` is TEAL's greedy block-wise allocation.
- ``absq_down@s``: NOT TEAL: |x| < the s-quantile of |x| per layer on the MLP output projection's
  input only, calibrated in-sample from a log-spaced histogram (``LAYER_HIST``; what ``teal@s``
  meant before).
- ``cats@s``: |act(gate)| < the s-quantile of |act(gate)| per layer (ScalingIntelligence/CATS),
  in-sample, log-spaced histogram (``LAYER_HIST``).
- ``chess_plus@s``: CHESS+ (the reference's attention thresholds added: the q projection's input
  and the o projection's input, per-layer exact k-th |x|); refused for fused q/k/v projections.
- ``chess@s``: CHESS (junhuihe-hjh/CHESS), ``probes.chess``: |act(gate)_i| < T_layer / mean|up_i|
  with mean|up_i| from the captured up-projection output and T_layer the exact k-th importance
  averaged over calibration windows (disjoint from the evaluated ones).

TEAL and CHESS (and CHESS+) need calibration windows: ``CurveOptions.calib_fraction`` (default 0.25) of the
windows, the first ones of the corpus; when a curve asks for either, EVERY method of that curve is
evaluated on the remaining windows only, so all rows share the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes.cett import (  # noqa: F401  (re-exported: the PPL-p% API in one place)
    C_TOL, DEFAULT_CETT_GRID, DEFAULT_MAX_PASSES, DEFAULT_TOL, LAYER_HIST, SEARCH_METHODS,
    SECANT_START, CettGrid, LogHistogram, SearchOutcome, cett, down_column_norms, down_weight_io,
    neuron_output_norms, ppl_ratio, search_cett, threshold_for_cett)
from probes.data import DataOptions
from probes.loading import LoadedModel
from probes.pplp_session import (  # noqa: F401  (re-exported)
    DEFAULT_CALIB_FRACTION, MIN_TOKENS, SPLIT_METHODS, Evaluation, Layer, PassStats, PplpSession, PplpTarget,
    resolve_layers, token_loss_rows, token_loss_sum)
from probes.teal import DEFAULT_TEAL_EVAL, GREEDY_BASE_STEP, GREEDY_LAST_FRACTION, TEAL_EVAL_MODES, TEAL_NUM_BINS

DEFAULT_P = (1.0,)
CURVE_METHODS = ("cett", "topk", "topk_global", "teal", "teal_greedy", "absq_down", "cats", "chess", "chess_plus",
                 "sparling_posthoc", "fat")
DEFAULT_CURVE_METHODS = ("cett", "topk", "teal", "cats", "fat")
_S_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_CURVE_VALUES: dict[str, tuple[float, ...]] = {
    "cett": (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6),
    "topk": (0.5, 0.3, 0.2, 0.1, 0.05, 0.02),
    "topk_global": (0.5, 0.3, 0.2, 0.1, 0.05, 0.02),
    "teal": (0.25, 0.4, 0.5, 0.65, 0.8),  # around the 25-50 % model-wide levels TEAL's paper reports
    "teal_greedy": (0.25, 0.4, 0.5),
    "absq_down": _S_GRID,
    "cats": _S_GRID,
    "chess": _S_GRID,
    "chess_plus": _S_GRID,
    "sparling_posthoc": (0.5, 0.8, 0.9, 0.95),
    "fat": (0.001, 0.01, 0.03, 0.1, 0.3),
}
CURVE_PARAM = {"cett": "c", "topk": "r_kept", "topk_global": "r_kept", "teal": "s", "teal_greedy": "s",
               "absq_down": "s", "cats": "s", "chess": "s", "chess_plus": "s", "sparling_posthoc": "s", "fat": "eps"}


# ------------------------------------------------------------------------------------------ options
@dataclass
class PplpOptions(DataOptions):
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides (PATH:input of the output projection)
    p: Sequence[float] = DEFAULT_P  # targets in percent: 1 means PPL ratio 1.01
    method: str = "secant"
    tol: float = DEFAULT_TOL  # absolute, on the PPL ratio
    max_passes: int = DEFAULT_MAX_PASSES
    cett_grid: int = DEFAULT_CETT_GRID


@dataclass
class CurveOptions(DataOptions):
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides (PATH:input of the output projection)
    methods: Sequence[str] = DEFAULT_CURVE_METHODS
    values: dict[str, Sequence[float]] = field(default_factory=dict)  # method -> parameter grid override
    cett_grid: int = DEFAULT_CETT_GRID
    calib_fraction: float = DEFAULT_CALIB_FRACTION  # first windows calibrating teal / teal_greedy / chess
    teal_eval: str = DEFAULT_TEAL_EVAL  # last-half (TEAL's default) or all positions


# ------------------------------------------------------------------------------------------ results
@dataclass
class PplpResult:
    targets: list[PplpTarget]
    layers: list[dict[str, Any]]
    dense: dict[str, Any]
    calibration: list[dict[str, Any]]
    info: dict[str, Any]
    warnings: list[str]
    trace: list[dict[str, Any]]
    # error bars over windows per target p (``target_bars``): summary columns, per-layer columns
    bars: dict[float, dict[str, Any]] = field(default_factory=dict)

    def table(self):
        """One row per (p, layer); unreachable targets have no layer rows (see ``summary``)."""
        import pandas as pd

        rows = []
        for t in self.targets:
            ev = t.evaluation
            if ev is None or t.status == "unreachable":
                continue
            for i, lay in enumerate(self.layers):
                s = ev.layer_sparsity[i]
                rows.append({"p_pct": t.p, "target_ratio": t.target_ratio, "status": t.status, "method": t.method,
                             "c_star": t.c_star, **lay, "dtype": self.info["model_dtype"],
                             "threshold": ev.thresholds[i], "thresholded_tensor": "n_i = |x_i| * ||W_down[:, i]||_2",
                             "rule": "zero x_i where n_i < threshold",
                             "sparsity": s, "activation_ratio": 1.0 - s if s == s else math.nan,
                             "dense_zero_frac": self.dense["layer_zero_frac"][i],
                             "cett_in_sparse_run": ev.layer_removed_cett[i],
                             "achieved_ratio": ev.ratio, "ce_dense": self.dense["ce"], "ce_sparse": ev.ce_sparse,
                             "n_tokens": self.dense["n_tokens"], "calibration": self.info["cett_calibration"],
                             **{k: (self.bars.get(t.p, {}).get("layers") or {}).get(k, [math.nan] * (i + 1))[i]
                                for k in LAYER_BAR_COLUMNS}})
        return pd.DataFrame(rows)

    def summary(self):
        """One row per target p: status, c*, achieved ratio, mean sparsity, passes."""
        import pandas as pd

        rows = []
        warn = "; ".join(self.warnings)
        for t in self.targets:
            ev = t.evaluation if t.status != "unreachable" else None
            sp = [s for s in (ev.layer_sparsity if ev else []) if s == s]
            widths = [lay["width"] or 0 for lay in self.layers]
            wmean = (sum(s * w for s, w in zip(ev.layer_sparsity, widths)) / sum(widths)
                     if ev and sum(widths) else math.nan)
            rows.append({"p_pct": t.p, "target_ratio": t.target_ratio, "status": t.status, "method": t.method,
                         "tol": t.tol, "c_star": t.c_star if ev else math.nan,
                         "achieved_ratio": ev.ratio if ev else math.nan,
                         "mean_sparsity": sum(sp) / len(sp) if sp else math.nan,
                         "width_weighted_sparsity": wmean,
                         "mean_activation_ratio": 1 - sum(sp) / len(sp) if sp else math.nan,
                         "ce_dense": self.dense["ce"], "ce_sparse": ev.ce_sparse if ev else math.nan,
                         "dense_ppl": self.dense["ppl"], "sparse_passes": t.sparse_passes,
                         "full_passes_total": self.info["full_passes"], "n_tokens": self.dense["n_tokens"],
                         "reason": t.reason, "bound_ratio": t.bound_ratio if t.bound_ratio is not None else math.nan,
                         "warning": warn})
            # error bars after every measured column; NaN for an unreachable target
            rows[-1].update({c: (self.bars.get(t.p, {}).get("summary") or {}).get(c, math.nan)
                             for c in SUMMARY_BAR_COLUMNS})
        return pd.DataFrame(rows)

    def trace_table(self):
        import pandas as pd

        return pd.DataFrame(self.trace)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``): per p
        and layer, per p, every pass of the search, and the CETT calibration."""
        import pandas as pd

        return {"pplp": self.table(), "pplp_summary": self.summary(), "pplp_trace": self.trace_table(),
                "cett_calibration": pd.DataFrame(self.calibration)}


LAYER_BAR_COLUMNS = ("sparsity_se", "sparsity_lo", "sparsity_hi")
SUMMARY_BAR_COLUMNS = ("n_windows", "achieved_ratio_se", "achieved_ratio_lo", "achieved_ratio_hi", "mean_sparsity_se",
                       "mean_sparsity_lo", "mean_sparsity_hi", "width_weighted_sparsity_se",
                       "width_weighted_sparsity_lo", "width_weighted_sparsity_hi")


def target_bars(dense: PassStats, ev: Evaluation | None, widths: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Error bars over windows of one found threshold (``probes.uncertainty_extra``), the thresholds held fixed
    (their calibration on the same windows is not resampled): ``{"summary": {...}, "layers": {col: [L]}}``.

    - ``achieved_ratio``: R = exp((sum_i CE_sparse,i - sum_i CE_dense,i) / sum_i n_i) over windows i (summed
      token losses of each window in the dense and the sparse pass, n_i its counted tokens): ``_se`` by the
      delta method (R x the linearised ratio-estimator se of the exponent), ``_lo``/``_hi`` the percentile
      bootstrap of exp(resampled exponent);
    - ``mean_sparsity`` / ``width_weighted_sparsity``: weighted sums over layers of sum_i zeros_il / sum_i
      entries_il (``weighted_ratios_se``, layers kept correlated), and per layer ``sparsity_se``/``_lo``/``_hi``.
    All intervals from the same seeded resamples of the windows. Empty when a pass kept no per-window values."""
    import numpy as np

    from probes.uncertainty_extra import exp_ratio_bars, mean_of_ratios_bars

    st = ev.stats if ev is not None else None
    if st is None or st.window_ce is None or dense.window_ce is None or len(st.window_ce) != len(dense.window_ce):
        return {}
    m = int((dense.window_tokens > 0).sum())
    summary: dict[str, Any] = {"n_windows": m}
    summary.update(exp_ratio_bars("achieved_ratio", st.window_ce - dense.window_ce, dense.window_tokens, seed=seed))
    Z, E = st.window_zeros, st.window_entries
    ok = E.sum(0) > 0
    w_mean = np.where(ok, 1.0 / max(1, int(ok.sum())), 0.0)
    wd = np.where(ok, np.asarray(widths, dtype=float), 0.0)
    w_width = wd / wd.sum() if wd.sum() > 0 else wd
    b_mean, (se, lo, hi) = mean_of_ratios_bars("mean_sparsity", Z, E, w_mean, seed=seed)
    b_width, _ = mean_of_ratios_bars("width_weighted_sparsity", Z, E, w_width, seed=seed)
    summary.update(b_mean)
    summary.update(b_width)
    layers = {"sparsity_se": [float(v) for v in se], "sparsity_lo": [float(v) for v in lo],
              "sparsity_hi": [float(v) for v in hi]}
    return {"summary": summary, "layers": layers}


def _session_info(s: PplpSession) -> dict[str, Any]:
    dtype = str(s.loaded.dtype).replace("torch.", "")
    return {
        "corpus": s.corpus,
        "corpus_is_default": s.opts.data is None and s.corpus != "<token ids>",
        "n_documents": s.n_documents,
        "n_corpus_tokens": s.n_corpus_tokens,
        **s.read_note,
        "n_windows": len(s.windows),
        "n_counted_tokens": s.n_tokens,
        "min_tokens": MIN_TOKENS,
        "max_length": s.max_length,
        "stride": s.stride,
        **({"notes": list(s.notes)} if s.notes else {}),
        "window_scheme": "lm-eval rolling (context length 1)",
        "prefix_token": s.data.prefix_token,
        "skip_first": s.opts.skip_first,
        "batch_size": s.opts.batch_size,
        "model_dtype": dtype,
        "device": str(s.loaded.device),
        "loss": "mean next-token cross-entropy over counted tokens, per-token losses summed in float64; "
                "dense and sparse runs on the same batches",
        "sparse_run": "forward pre-hook on each MLP output projection zeroes the inactive entries of its input",
        "sparsity": "fraction of the projection input's entries that are exactly 0 in the sparse run (counted "
                    "tokens; natural zeros included); mean = unweighted over layers",
        "n_layers": len(s.layers),
        "glu": any(l.glu for l in s.layers),
        "warnings": list(s.warnings),
    }


def _dense_section(s: PplpSession) -> dict[str, Any]:
    d = s.dense
    return {"ce": d.ce, "ppl": math.exp(d.ce), "n_tokens": d.n_tokens, "layer_zero_frac": d.sparsity(),
            "seconds": round(d.seconds, 3)}


def pplp(loaded: LoadedModel, opts: PplpOptions | None = None, *,
         progress: Callable[[int | None, int], Any] | None = None, log: Callable[[str], Any] | None = None,
         docs_tokens: Sequence[Sequence[int]] | None = None, session: PplpSession | None = None) -> PplpResult:
    """PPL-p% sparsity of ``loaded`` for every p in ``opts.p`` (the Python API of ``actsparse pplp``)."""
    opts = opts or PplpOptions()
    if opts.method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {opts.method!r}; use one of {SEARCH_METHODS}")
    t0 = time.perf_counter()
    s = session or PplpSession(loaded, opts, docs_tokens=docs_tokens, progress=progress, log=log)
    s.calibrate(cett=True, cett_grid=opts.cett_grid)
    targets = [s.search(float(p), opts.method, opts.tol, opts.max_passes) for p in opts.p]
    layers = [l.row() for l in s.layers]
    calib = []
    for l, g in zip(s.layers, s.cett_grids):
        grid, vals = g.values()
        diffs = [b - a for a, b in zip(vals[:-1], vals[1:])]
        calib.append({**l.row(), "grid_points": len(grid), "grid_t_max": float(grid[-1]),
                      "cett_at_grid_max": float(vals[-1]),
                      "cett_monotone_on_grid": bool(all(d >= -1e-9 for d in diffs)),
                      "n_tokens": g.n_tokens})
    info = {**_session_info(s),
            "method": opts.method, "tol": opts.tol, "max_passes": opts.max_passes,
            "p_pct": list(opts.p),
            "cett_calibration": f"exact per-token CETT on a {opts.cett_grid}-quantile grid (first batch; at most one "
                                f"quantile per positive n_i, grid_points in cett_calibration) + log "
                                f"extensions, float64 sums over all counted tokens; t linearly interpolated",
            "threshold_rule": "largest t with CETT(t) <= c; neuron inactive when n_i < t",
            "full_passes": s.passes,
            "seconds": round(time.perf_counter() - t0, 3),
            "options": {**asdict(opts), "stride": s.stride if opts.stride is not None else None}}
    trace = [{"pass": e.pass_index, "method": e.method, "value": e.value, "ppl_ratio": e.ratio,
              "mean_sparsity": e.mean_sparsity, "seconds": round(e.seconds, 3)} for e in s.trace]
    widths = [l.site.width or int(l.col_norms.numel()) for l in s.layers]
    seed = int(opts.seed) if opts.seed is not None else 0
    bars = {t.p: target_bars(s.dense, t.evaluation if t.status != "unreachable" else None, widths, seed)
            for t in targets}
    if any(bars.values()):
        info["error_bars"] = {
            "unit": "window (a batch row of the rolling windows); n_windows in pplp_summary",
            "threshold": "held fixed at the found c* (its calibration and search are not resampled)",
            "achieved_ratio": "se: delta method, R x se of (sum CE_sparse - sum CE_dense) / tokens over windows "
                              "(linearised ratio estimator); lo/hi: 95 % percentile bootstrap of R over windows",
            "sparsity": "mean_sparsity, width_weighted_sparsity and per-layer sparsity: ratio of window sums "
                        "of zeros over entries; se linearised (layers kept correlated), lo/hi bootstrap",
            "bootstrap": f"1000 resamples of the windows, numpy default_rng({seed}), all columns from the same "
                         "resamples"}
    return PplpResult(targets, layers, _dense_section(s), calib, info, list(s.warnings), trace, bars)


# ------------------------------------------------------------------------------------------- curves
TENSOR_LABEL = {
    "cett": "n_i = |x_i| * ||W_down[:, i]||_2 (x = input of the MLP output projection)",
    "absq_down": "|x| (input of the MLP output projection only; not TEAL)",
    "teal": "|x| of the input of every projection of a block (q k v o gate up down)",
    "teal_greedy": "|x| of the input of every projection of a block (q k v o gate up down)",
}


def _tensor_label(method: str, glu: bool) -> str:
    if method in TENSOR_LABEL:
        return TENSOR_LABEL[method]
    if method == "chess":
        return ("|act(gate)_i| vs T / mean|up_i| (mlp.hook_gate_act; up = the up projection's output)" if glu
                else "|x| (no up projection: importance = |x|)")
    if method == "sparling_posthoc":
        return "act(gate) signed (mlp.hook_gate_act)" if glu else "a signed (activation = input of the MLP output projection)"
    if method == "chess_plus":
        return ("|act(gate)_i| vs T / mean|up_i|, and |x| of the q and o projections' inputs" if glu
                else "|x| of the MLP activation and of the q and o projections' inputs")
    return "|act(gate)| (mlp.hook_gate_act)" if glu else "|x| (activation = input of the MLP output projection)"


def _rule(method: str, value: float, teal_eval: str = DEFAULT_TEAL_EVAL) -> str:
    where = "on the last half of each window's positions" if teal_eval == "last-half" else "on every position"
    return {"cett": f"zero where n_i < t_layer, t_layer = largest t with CETT(t) <= {value:g}",
            "fat": f"zero where |a| < {value:g}",
            "topk": f"keep the top {value:g} fraction of |a| per token",
            "topk_global": f"keep the top {value:g} fraction of |a| over all counted tokens of a batch",
            "teal": f"zero where |x| <= icdf(0.5 + {value:g}/2) of each projection input, {where}",
            "teal_greedy": f"per block the greedy step with effective sparsity closest to {value:g}; zero where "
                           f"|x| <= icdf(0.5 + s_proj/2), {where}",
            "absq_down": f"zero where |x| < q_{value:g}(|x|) per layer",
            "cats": f"zero where |a| < q_{value:g}(|a|) per layer",
            "chess": f"zero where |a_i| < T_layer / mean|up_i|, T_layer = k-th importance, k = int(N * {value:g})",
            "chess_plus": f"chess@{value:g}, and zero the q / o projection inputs where |x| < their k-th |x|, "
                          f"k = int(N * {value:g})",
            "sparling_posthoc": f"zero where a_i <= t_i, t_i = channel i's k-th value, k = int(N * {value:g}) "
                                "(SPARLING EnforceSparsityPerChannel, post hoc)"}[method]


def _calibration_label(method: str) -> str:
    return {"cett": "exact CETT on a per-layer grid, interpolated (in-sample)",
            "teal": f"TEAL histogram ({TEAL_NUM_BINS} bins, 1 % outlier bins) on the calibration windows",
            "teal_greedy": f"TEAL histogram on the calibration windows + greedyopt (step {GREEDY_BASE_STEP}, error on "
                           f"the last {GREEDY_LAST_FRACTION:g} of positions)",
            "absq_down": f"quantile from a {LAYER_HIST[2]}-bin log histogram (in-sample)",
            "cats": f"quantile from a {LAYER_HIST[2]}-bin log histogram (in-sample)",
            "chess": "exact k-th value per calibration window, averaged (CHESS thresholds.py)",
            "chess_plus": "exact k-th values per calibration window, averaged (CHESS thresholds.py)",
            "sparling_posthoc": "exact per-channel k-th values of a sample of the calibration windows (fixed, not "
                                "SPARLING's moving average over training)",
            "fat": "none (absolute eps)", "topk": "none (per token)",
            "topk_global": "none (per batch)"}[method]


@dataclass
class CurveResult:
    points: list[dict[str, Any]]
    layer_rows: list[dict[str, Any]]
    info: dict[str, Any]
    warnings: list[str]
    proj_rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.points)

    def layer_table(self):
        import pandas as pd

        return pd.DataFrame(self.layer_rows)

    def projection_table(self):
        import pandas as pd

        return pd.DataFrame(self.proj_rows)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``);
        ``teal_projections`` only when a TEAL method ran."""
        out = {"curve": self.table(), "curve_layers": self.layer_table()}
        if self.proj_rows:
            out["teal_projections"] = self.projection_table()
        return out


def curve(loaded: LoadedModel, opts: CurveOptions | None = None, *,
          progress: Callable[[int | None, int], Any] | None = None, log: Callable[[str], Any] | None = None,
          docs_tokens: Sequence[Sequence[int]] | None = None, session: PplpSession | None = None) -> CurveResult:
    """Sparsity vs PPL ratio for each threshold family (the Python API of ``actsparse curve``)."""
    opts = opts or CurveOptions()
    bad = [m for m in opts.methods if m not in CURVE_METHODS]
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], CURVE_METHODS, n=1)
        raise ValueError(f"unknown curve method {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f"; valid: {', '.join(CURVE_METHODS)}")
    if opts.teal_eval not in TEAL_EVAL_MODES:
        raise ValueError(f"unknown TEAL evaluation {opts.teal_eval!r}; valid: {', '.join(TEAL_EVAL_MODES)}")
    methods = list(dict.fromkeys(opts.methods))
    split = any(m in SPLIT_METHODS for m in methods)
    t0 = time.perf_counter()
    s = session or PplpSession(loaded, opts, docs_tokens=docs_tokens, progress=progress, log=log,
                               calib_fraction=opts.calib_fraction if split else None, teal_eval=opts.teal_eval)
    s.calibrate(cett="cett" in methods, quantiles=any(m in methods for m in ("absq_down", "cats")),
                cett_grid=opts.cett_grid)
    if "chess" in methods:
        s.chess_calibrate(tuple(opts.values.get("chess") or DEFAULT_CURVE_VALUES["chess"]))
    if "chess_plus" in methods:
        s.chess_plus_calibrate(tuple(opts.values.get("chess_plus") or DEFAULT_CURVE_VALUES["chess_plus"]))
    if "teal_greedy" in methods:
        s.teal_greedy(max(opts.values.get("teal_greedy") or DEFAULT_CURVE_VALUES["teal_greedy"]))
    glu = any(l.glu for l in s.layers)
    widths = [l.site.width or int(l.col_norms.numel()) for l in s.layers]
    dense_sp = s.dense.sparsity()
    points = [{"method": "dense", "param": None, "value": None, "thresholded_tensor": None, "rule": "no masking",
               "threshold_scope": None, "calibration": None, "ppl_ratio": 1.0, "ce_dense": s.dense.ce,
               "ce_sparse": s.dense.ce, "mean_sparsity": sum(dense_sp) / len(dense_sp),
               "width_weighted_sparsity": sum(a * w for a, w in zip(dense_sp, widths)) / sum(widths),
               "effective_sparsity": math.nan, "n_tokens": s.n_tokens, "pass": 1}]
    layer_rows = []
    proj_rows = []
    scopes = {"cett": "per layer", "teal": "per layer and projection", "teal_greedy": "per layer and projection",
              "absq_down": "per layer", "cats": "per layer", "fat": "global constant", "topk": "per token",
              "topk_global": "per batch", "chess": "per channel", "sparling_posthoc": "per channel",
              "chess_plus": "per channel (MLP), per layer (q and o inputs)"}
    for method in methods:
        values = tuple(opts.values.get(method) or DEFAULT_CURVE_VALUES[method])
        for v in values:
            ev = s.evaluate(method, float(v))
            teal_like = ev.proj_rows is not None
            points.append({"method": method, "param": CURVE_PARAM[method], "value": float(v),
                           "thresholded_tensor": _tensor_label(method, glu), "rule": _rule(method, v, opts.teal_eval),
                           "threshold_scope": scopes[method], "calibration": _calibration_label(method),
                           "ppl_ratio": ev.ratio, "ce_dense": s.dense.ce, "ce_sparse": ev.ce_sparse,
                           "mean_sparsity": ev.mean_sparsity,
                           "width_weighted_sparsity": (math.nan if teal_like else
                                                       sum(a * w for a, w in zip(ev.layer_sparsity, widths))
                                                       / sum(widths)),
                           "effective_sparsity": ev.effective_sparsity if teal_like else math.nan,
                           "n_tokens": s.n_tokens, "pass": ev.pass_index})
            if teal_like:
                layers_ = sorted({r["layer"] for r in ev.proj_rows})
                for li, sp, thr in zip(layers_, ev.layer_sparsity, ev.thresholds):
                    block = next(p.block_path for p in s.teal_projs if p.layer == li)
                    layer_rows.append({"method": method, "param": CURVE_PARAM[method], "value": float(v),
                                       "layer": li, "canonical_name": f"blocks.{li}", "module_path": block,
                                       "width": None, "threshold": math.nan, "threshold_note": thr,
                                       "sparsity": sp, "cett_in_sparse_run": math.nan, "ppl_ratio": ev.ratio,
                                       "n_tokens": s.n_tokens})
                for r in ev.proj_rows:
                    proj_rows.append({"method": method, "param": CURVE_PARAM[method], "value": float(v), **r,
                                      "teal_eval": opts.teal_eval, "ppl_ratio": ev.ratio,
                                      "effective_sparsity": ev.effective_sparsity})
                continue
            for l, sp, rc, thr in zip(s.layers, ev.layer_sparsity, ev.layer_removed_cett, ev.thresholds):
                layer_rows.append({"method": method, "param": CURVE_PARAM[method], "value": float(v), **l.row(),
                                   "threshold": thr if isinstance(thr, (int, float)) else math.nan,
                                   "threshold_note": thr if isinstance(thr, str) else None,
                                   "sparsity": sp, "cett_in_sparse_run": rc, "ppl_ratio": ev.ratio,
                                   "n_tokens": s.n_tokens})
    info = {**_session_info(s), "methods": methods,
            "values": {m: list(opts.values.get(m) or DEFAULT_CURVE_VALUES[m]) for m in methods},
            "full_passes": s.passes, "dense_ce": s.dense.ce, "dense_ppl": math.exp(s.dense.ce),
            "seconds": round(time.perf_counter() - t0, 3),
            "quantile_histograms": {"per_layer": {"lo": LAYER_HIST[0], "hi": LAYER_HIST[1], "bins": LAYER_HIST[2]}},
            "options": {**asdict(opts), "stride": s.stride if opts.stride is not None else None}}
    if split:
        info["calibration_split"] = _split_info(s)
    if s.teal_projs is not None:
        info["teal"] = {"projection_set": s.teal_family, "n_projections": len(s.teal_projs),
                        "projections": sorted({p.module_path.split(f".{p.layer}.", 1)[-1] for p in s.teal_projs}),
                        "eval": opts.teal_eval, "histogram_bins": TEAL_NUM_BINS,
                        "threshold_rule": "icdf(0.5 + s/2) of the signed histogram (FasterDecoding/TEAL "
                                          "utils/utils.py SparsifyFn.set_threshold)",
                        "effective_sparsity": "parameter-weighted mean of measured per-projection sparsities "
                                              "(weight.numel()), on the positions the mask applies to",
                        **({"greedy": {"base_step": GREEDY_BASE_STEP, "last_fraction": GREEDY_LAST_FRACTION,
                                       "target": s.teal_greedy_target,
                                       "steps_per_layer": {str(k): len(v) for k, v in s.teal_greedy_rows.items()}}}
                           if s.teal_greedy_rows else {})}
    if s.chess_up_mean is not None:
        info["chess"] = {"samples": s.chess_samples, "up_projection_captured": any(l.glu for l in s.layers),
                         "quantile": "exact k-th value (full sort), k = int(N * s), per calibration window, averaged",
                         "chess_plus_attention": ("chess_plus: q projection input and o projection input, "
                                                  "per-layer exact k-th value" if s.chess_attn_thr
                                                  else "chess_plus not run")}
    return CurveResult(points, layer_rows, info, list(s.warnings), proj_rows)


def _split_info(s: PplpSession) -> dict[str, Any]:
    from probes.corpus import n_counted

    k = len(s.calib_windows)
    return {"fraction": s.calib_fraction,
            "calibration_windows": [0, k], "evaluation_windows": [k, k + len(s.windows)],
            "calibration_counted_tokens": n_counted(s.calib_windows),
            "evaluation_counted_tokens": s.n_tokens,
            "rule": "the first windows of the corpus calibrate teal / teal_greedy / chess, the following ones are "
                    "evaluated (half-open window index ranges); every method of the curve is evaluated on the "
                    "evaluation windows only"}
