"""Training-run tracking (the library of ``actsparse track``): the same analyses over a series of
checkpoints of one run, as trends against the training step.

Seeds: Bug-or-Feature^2 (activation sparsity and the negative weight drift during training) and
"Hidden Dynamics of Massive Activations in Transformer Training" (the top-1 / median ratio of the
residual stream per layer against the step, fitted with f(t) = A exp(-lambda x) log x + K,
x = gamma t + t0, by scipy's curve_fit).

Analyses (``--analyses``): ``measure`` (probes.measure: activation sparsity per layer), ``drift``
(probes.drift: mean weight, % negative per weight tensor, straight from the files), ``massive``
(probes.massive: top-1/2/3 and median of |h| per layer) and ``spectrum`` (probes.spectrum:
WeightWatcher alpha per matrix). The corpus is read and checked once, before any model is loaded,
and every checkpoint is measured on the same token windows (a ``hf:`` corpus is materialised once
into a local file). Steps come from ``trainer_state.json``'s ``global_step`` when the folder has
one, else from the name (``ckpt-1000``, ``step_1000``, ``checkpoint-1000``, ``iter1000``, a
trailing number).

``run_track`` runs the models and returns tables; ``reports.track.write_track_outputs`` writes
them (tables, figures, summary.md, manifest with ``"command": "track"``) atomically, and
``reports.track.track`` does both.
"""

from __future__ import annotations

import gc
import glob
import json
import math
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from probes.errors import ActsparseError, CheckpointError, DataError, unknown_name

ANALYSES = ("measure", "drift", "massive", "spectrum")
DEFAULT_ANALYSES = ANALYSES
_CKPT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json")
_STEP_RE = re.compile(r"(?:global[_-]?step|checkpoint|ckpt|step|iter(?:ation)?|epoch)[-_=]?(\d+)", re.I)
_TRAILING_RE = re.compile(r"(?:^|[-_.])(\d+)$")


class EmergenceFitWarning(RuntimeWarning):
    """The emergence fit did not converge (or had too few points); its parameters are NaN."""


# -------------------------------------------------------------------------------------------- steps
@dataclass
class CheckpointStep:
    path: str
    step: int
    step_source: str  # trainer_state.json | name | parent name | trailing number | order


def parse_step(path: str | Path) -> tuple[int | None, str | None]:
    """The training step of a checkpoint path, and where it was read from."""
    p = Path(path)
    ts = p / "trainer_state.json" if p.is_dir() else None
    if ts is not None and ts.is_file():
        try:
            gs = json.loads(ts.read_text()).get("global_step")
            if isinstance(gs, (int, float)) and not isinstance(gs, bool):
                return int(gs), "trainer_state.json"
        except (OSError, ValueError, AttributeError):
            pass
    name = p.name if p.is_dir() or not p.suffix else p.stem
    m = _STEP_RE.search(name)
    if m:
        return int(m.group(1)), "name"
    if not p.is_dir() and p.parent.name:
        m = _STEP_RE.search(p.parent.name)
        if m:
            return int(m.group(1)), "parent name"
    m = _TRAILING_RE.search(name)
    if m:
        return int(m.group(1)), "trailing number"
    return None, None


def expand_checkpoints(patterns: Sequence[str | Path]) -> list[CheckpointStep]:
    """Paths and globs (``runs/ckpt-*/``) to checkpoints sorted by step; errors say what to fix."""
    paths: list[str] = []
    for pat in patterns:
        s = str(pat)
        if any(ch in s for ch in "*?["):
            hits = sorted(glob.glob(s))
            hits = [h for h in hits if Path(h).is_dir() or Path(h).suffix in _CKPT_SUFFIXES]
            if not hits:
                raise CheckpointError(f"no checkpoint matches {s!r}",
                                      "check the pattern (quote it so the shell passes it through), e.g. "
                                      "'runs/ckpt-*/'")
            paths += hits
        else:
            if not Path(s).exists():
                raise CheckpointError(f"checkpoint {s} does not exist", "give existing checkpoint folders or files")
            paths.append(s)
    paths = list(dict.fromkeys(str(Path(p)) for p in paths))
    if not paths:
        raise CheckpointError("no checkpoint given", "give a glob such as 'runs/ckpt-*/' or several paths")
    parsed = [(p, *parse_step(p)) for p in paths]
    missing = [p for p, s, _ in parsed if s is None]
    if missing and len(missing) < len(parsed):
        raise CheckpointError(f"no training step in the name of {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                              "name checkpoints like ckpt-1000, step_1000 or checkpoint-1000, or put a "
                              "trainer_state.json with global_step in each folder")
    if missing:
        warnings.warn("no training step found in any checkpoint name; using their order 0, 1, 2, ...",
                      RuntimeWarning, stacklevel=2)
        return [CheckpointStep(p, i, "order") for i, p in enumerate(paths)]
    steps: dict[int, str] = {}
    for p, s, _ in parsed:
        if s in steps:
            raise CheckpointError(f"{steps[s]} and {p} both have step {s}", "track one run at a time")
        steps[s] = p
    return [CheckpointStep(p, int(s), src) for p, s, src in sorted(parsed, key=lambda x: x[1])]


# ------------------------------------------------------------------------------------- architecture
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_FIX_ONE_RUN = ("track one run at a time: give only checkpoints of one architecture (run track once per "
                "architecture)")


def _config_signature(cfg: Any) -> dict[str, Any] | None:
    """model_type, width and depth of a config (a dict or a transformers config), as far as it says."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    sig = {"model_type": get("model_type"),
           "width": next((get(k) for k in _WIDTH_KEYS if isinstance(get(k), int)), None),
           "layers": next((get(k) for k in _LAYER_KEYS if isinstance(get(k), int)), None)}
    return sig if any(v is not None for v in sig.values()) else None


def architecture_of(path: str | Path) -> dict[str, Any]:
    """What can be learnt cheaply about a checkpoint's architecture, without reading weights:
    ``config`` (model_type, width, layers from config.json) and ``shapes`` (tensor name -> shape
    from safetensors headers); either may be None (hub ids, pickles, GGUF)."""
    from probes.formats import is_safetensors, safetensors_header, sniff

    out: dict[str, Any] = {"config": None, "shapes": None}
    try:
        sn = sniff(path)
    except ActsparseError:
        return out  # loading it reports the real problem
    if sn.config_path:
        try:
            cfg = json.loads(Path(sn.config_path).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError, RecursionError):
            cfg = None
        if isinstance(cfg, dict):
            out["config"] = _config_signature(cfg)
    try:
        if sn.files and all(is_safetensors(f) for f in sn.files):
            out["shapes"] = {k: tuple(v.get("shape") or ()) for f in sn.files
                             for k, v in safetensors_header(f).items() if k != "__metadata__"}
    except (ActsparseError, OSError):
        out["shapes"] = None
    return out


def _describe_config(sig: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sig.items() if v is not None)


def _config_difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    if not a or not b:
        return None
    diff = [k for k in a if a[k] is not None and b.get(k) is not None and a[k] != b[k]]
    return f"{_describe_config(a)} vs {_describe_config(b)}" if diff else None


def _shape_difference(a: dict[str, tuple] | None, b: dict[str, tuple] | None) -> str | None:
    if a is None or b is None or a == b:
        return None
    for name in a:
        if name in b and a[name] != b[name]:
            return f"tensor {name} has shape {list(a[name])} vs {list(b[name])}"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return (f"different tensors ({len(a)} vs {len(b)}; e.g. "
                f"{(only_a or only_b)[0]} only in the {'first' if only_a else 'second'})")
    return None


def check_same_architecture(cks: Sequence[CheckpointStep]) -> None:
    """Refuse (exit 2) a series whose checkpoints differ in model_type, width or depth (config.json)
    or in tensor names and shapes (safetensors headers): one trend across two architectures means
    nothing. Checked from headers before any model is loaded; checkpoints with neither (pickles,
    GGUF, hub ids) are compared after loading (``check_loaded_architecture``)."""
    if len(cks) < 2:
        return
    first = cks[0]
    ref = architecture_of(first.path)
    for ck in cks[1:]:
        cur = architecture_of(ck.path)
        why = _config_difference(ref["config"], cur["config"]) or _shape_difference(ref["shapes"], cur["shapes"])
        if why:
            raise CheckpointError(f"checkpoints of different architectures: {first.path} (step {first.step}) and "
                                  f"{ck.path} (step {ck.step}) differ: {why}", _FIX_ONE_RUN)


def check_loaded_architecture(first: tuple[CheckpointStep, Any], ck: CheckpointStep, lm: Any) -> None:
    """The same check on loaded models' configs (for formats without a cheap header)."""
    a = _config_signature(first[1]) if first[1] is not None else None
    b = _config_signature(getattr(lm, "config", None)) if getattr(lm, "config", None) is not None else None
    why = _config_difference(a, b)
    if why:
        raise CheckpointError(f"checkpoints of different architectures: {first[0].path} (step {first[0].step}) and "
                              f"{ck.path} (step {ck.step}) differ: {why}", _FIX_ONE_RUN)


# ------------------------------------------------------------------------------------ emergence fit
def emergence_curve(t, A, lam, gamma, t0, K):
    """f(t) = A exp(-lambda x) log x + K with x = gamma t + t0 (Hidden Dynamics of Massive Activations)."""
    x = gamma * np.asarray(t, dtype=float) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


_NAN_FIT = {"A": math.nan, "lambda": math.nan, "gamma": math.nan, "t0": math.nan, "K": math.nan, "r2": math.nan,
            "max_rel_se": math.nan, "determined": False}
# A converged fit whose largest parameter standard error exceeds this fraction of the parameter
# is reported as not determined: the data fit it, but many parameter sets would fit as well.
MAX_REL_SE = 0.5
MIN_FIT_POINTS = 7  # with 5 points a 5-parameter curve goes through every point and nothing is determined


def fit_emergence(steps: Sequence[float], values: Sequence[float], maxfev: int = 20000) -> dict[str, Any]:
    """Least-squares fit of ``emergence_curve`` to (step, value) points.

    Time is scaled to [0, 1] for the fit (gamma is reported per step). A and K are linear, so the
    start values come from a small grid over (lambda, gamma, t0) with A, K solved exactly; then
    ``curve_fit`` (trf, lambda >= 0, gamma > 0, t0 > 0 so x > 0) refines all five. A fit that cannot
    run or does not converge returns NaN parameters, ``converged=False`` and a message, and warns
    with EmergenceFitWarning. A converged fit also reports the largest relative standard error of
    its parameters (from the Jacobian at the optimum, ``max_rel_se``; infinite with 5 points, i.e.
    no degrees of freedom) and ``determined`` = max_rel_se <= MAX_REL_SE: an exact fit through
    few points, or a near-degenerate one (lambda -> 0 with gamma and A trading off), can converge
    to large, meaningless parameters, and ``determined`` says so instead of hiding it.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    t = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    n = int(len(np.unique(t)))

    def fail(msg: str) -> dict[str, Any]:
        warnings.warn(f"emergence fit: {msg}; parameters set to NaN", EmergenceFitWarning, stacklevel=2)
        nan = {k: v for k, v in _NAN_FIT.items() if k not in ("max_rel_se", "determined")}
        # the columns in the order of a fitted row
        return {**nan, "n_points": int(len(t)), "converged": False, "message": msg,
                "max_rel_se": _NAN_FIT["max_rel_se"], "determined": _NAN_FIT["determined"]}

    if n < MIN_FIT_POINTS:  # 5 parameters, and degrees of freedom left to estimate their errors
        return fail(f"needs at least {MIN_FIT_POINTS} distinct steps for 5 parameters (2 degrees of freedom "
                    f"for their standard errors), got {n}")
    if t.min() < 0:
        return fail("negative steps")
    scale = float(t.max()) or 1.0
    s = t / scale
    best = None
    for lam in (0.0, 0.05, 0.3, 1.0, 3.0):
        for g in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
            for t0 in (1.0, 1.5, 3.0):
                x = g * s + t0
                basis = np.exp(-lam * x) * np.log(x)
                X = np.stack([basis, np.ones_like(s)], axis=1)
                coef, *_ = np.linalg.lstsq(X, y, rcond=None)
                sse = float(np.sum((X @ coef - y) ** 2))
                if np.isfinite(sse) and (best is None or sse < best[0]):
                    best = (sse, [coef[0], lam, g, t0, coef[1]])
    if best is None:
        return fail("no finite start value")
    lo, hi = [-np.inf, 0.0, 1e-9, 1e-9, -np.inf], [np.inf] * 5
    p0 = np.clip(best[1], np.array(lo) + 1e-12, hi)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OptimizeWarning)
            popt, pcov = curve_fit(emergence_curve, s, y, p0=p0, bounds=(lo, hi), method="trf", maxfev=maxfev)
        if any(issubclass(w.category, OptimizeWarning) for w in caught):
            pcov = np.full((5, 5), np.inf)  # converged, but the covariance is not estimable: not determined
    except (RuntimeError, ValueError, FloatingPointError) as e:
        return fail(f"curve_fit did not converge ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})")
    if not np.all(np.isfinite(popt)):
        return fail("non-finite parameters")
    pred = emergence_curve(s, *popt)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((pred - y) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    A, lam, g, t0, K = (float(v) for v in popt)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(np.abs(np.diag(np.asarray(pcov, dtype=float))))
        rel = np.where(popt != 0, se / np.abs(popt), np.where(se == 0, 0.0, np.inf))
    max_rel = float(np.nanmax(rel)) if np.isfinite(rel).any() or np.isinf(rel).any() else math.inf
    if len(t) <= 5:
        max_rel = math.inf  # five parameters through five points: no degrees of freedom left
    determined = bool(max_rel <= MAX_REL_SE)
    msg = "" if determined else (f"parameters not determined by the data (largest relative standard error "
                                 f"{max_rel:.3g}); read the curve, not the parameters")
    return {"A": A, "lambda": lam, "gamma": g / scale, "t0": t0, "K": K, "r2": r2, "n_points": int(len(t)),
            "converged": True, "message": msg, "max_rel_se": max_rel, "determined": determined}


# ------------------------------------------------------------------------------------------ running
@dataclass
class TrackOptions:
    analyses: Sequence[str] = DEFAULT_ANALYSES
    data: str | None = None  # corpus spec; None = the bundled calibration corpus
    text_field: str = "text"
    encoding: str = "utf-8"  # of a local corpus file; a byte-order mark is dropped
    batch_size: int = 4
    max_length: int | None = None
    max_tokens: int | None = None
    seed: int = 0
    kinds: Sequence[str] | None = None  # measure's site kinds (None: its default)
    massive_preset: str = "sun2024"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    unsafe_pickle: bool = False
    tokenizer: str | None = None


class TrendTables(dict):
    """The trend tables by the name each is written under. Calling it returns them as a plain dict, so
    ``result.tables()`` has the shape every result shares (``probes.analysis.Result``) while
    ``result.tables[name]`` (read by ``actsparse_cli/report_cmd.py``) keeps working."""

    def __call__(self) -> dict[str, pd.DataFrame]:
        return dict(self)


@dataclass
class TrackResult:
    checkpoints: list[CheckpointStep]
    tables: TrendTables  # call it (``tables()``) for {name: DataFrame}; a plain dict is converted
    info: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = TrendTables(self.tables)


def resolve_analyses(analyses: Sequence[str] | str | None) -> tuple[str, ...]:
    if analyses is None:
        return DEFAULT_ANALYSES
    items = [analyses] if isinstance(analyses, str) else list(analyses)
    flat = [a.strip().lower() for item in items for a in str(item).split(",") if a.strip()]
    for a in flat:
        if a not in ANALYSES:
            raise unknown_name("analysis", a, ANALYSES)
    if not flat:
        raise ActsparseError("no analysis chosen", f"use any of {', '.join(ANALYSES)}")
    return tuple(dict.fromkeys(flat))


def _prepare_corpus(spec: str | None, text_field: str, workdir: Path,
                    encoding: str = "utf-8") -> tuple[str, dict[str, Any]]:
    """Check the whole corpus once, in constant memory (path, encoding, JSON); a ``hf:`` corpus is streamed
    into a local UTF-8 .jsonl used by every checkpoint."""
    from probes import corpus as corpus_mod
    from probes.data import resolve_corpus

    resolved = resolve_corpus(spec)
    if resolved.startswith("hf:"):
        local = workdir / "corpus.jsonl"
        n_docs = n_chars = 0
        with local.open("w", encoding="utf-8") as f:
            for d in corpus_mod.iter_documents(resolved, text_field):
                f.write(json.dumps({"text": d}) + "\n")
                n_docs, n_chars = n_docs + 1, n_chars + len(d)
        if not n_docs:
            raise DataError(f"corpus {resolved} is empty", "give a corpus with text in it")
        info = {"corpus": resolved, "corpus_is_default": False, "n_documents": n_docs, "n_characters": n_chars,
                "materialised": "read once from the hub dataset into a local .jsonl for all checkpoints"}
        return str(local), info
    counts = corpus_mod.scan_corpus(resolved, text_field, encoding)
    return resolved, {"corpus": resolved, "corpus_is_default": spec is None, **counts}


def _mean(v: pd.Series) -> float:
    v = pd.to_numeric(v, errors="coerce").astype(float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def run_track(checkpoints: Sequence[str | Path] | Sequence[CheckpointStep], opts: TrackOptions | None = None,
              on_stage: Callable[[int, int, CheckpointStep, str], Any] | None = None) -> TrackResult:
    """Run ``opts.analyses`` over ``checkpoints`` (paths/globs, or parsed steps) and return the trend tables."""
    opts = opts or TrackOptions()
    analyses = resolve_analyses(opts.analyses)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        cks = (list(checkpoints) if checkpoints and isinstance(checkpoints[0], CheckpointStep)
               else expand_checkpoints(checkpoints))  # type: ignore[arg-type]
    caught += [str(w.message) for w in wlist]
    check_same_architecture(cks)  # before the corpus is read or any model loaded
    n = len(cks)
    rows: dict[str, list[dict[str, Any]]] = {"sparsity": [], "massive": [], "spectrum": []}
    tokens: dict[int, int] = {}
    massive_tokens: dict[int, int] = {}
    corpus_info: dict[str, Any] = {}
    measure_info: dict[str, Any] = {}
    needs_model = any(a in analyses for a in ("measure", "massive"))
    first_config: tuple[CheckpointStep, Any] | None = None  # the first loaded model's config
    with tempfile.TemporaryDirectory(prefix="actsparse-track-") as work:
        data, text_field, encoding = None, opts.text_field, opts.encoding
        if needs_model:
            data, corpus_info = _prepare_corpus(opts.data, opts.text_field, Path(work), opts.encoding)
            if data != corpus_info["corpus"]:
                text_field, encoding = "text", "utf-8"  # the materialised .jsonl
        for i, ck in enumerate(cks):
            base = {"step": ck.step, "checkpoint_index": i, "checkpoint": ck.path}
            if needs_model:
                from probes.loading import load_checkpoint

                if on_stage:
                    on_stage(i, n, ck, "load")
                lm = load_checkpoint(ck.path, device=opts.device, dtype=opts.dtype,
                                     trust_remote_code=opts.trust_remote_code, unsafe_pickle=opts.unsafe_pickle,
                                     tokenizer=opts.tokenizer)
                if first_config is None:
                    first_config = (ck, getattr(lm, "config", None))
                else:
                    check_loaded_architecture(first_config, ck, lm)
                if "measure" in analyses:
                    from probes.measure import DEFAULT_KINDS, MeasureOptions, measure

                    if on_stage:
                        on_stage(i, n, ck, "measure")
                    res = measure(lm, MeasureOptions(data=data, text_field=text_field, encoding=encoding,
                                                     batch_size=opts.batch_size,
                                                     max_length=opts.max_length, max_tokens=opts.max_tokens,
                                                     seed=opts.seed, kinds=tuple(opts.kinds or DEFAULT_KINDS)))
                    tokens[i] = int(res.info["n_counted_tokens"])
                    measure_info = res.info
                    rows["sparsity"] += [{**base, **r} for r in res.rows]
                if "massive" in analyses:
                    from probes.massive import MassiveOptions, massive

                    if on_stage:
                        on_stage(i, n, ck, "massive")
                    mres = massive(lm, MassiveOptions(preset=opts.massive_preset, data=data, text_field=text_field,
                                                      encoding=encoding,
                                                      max_length=opts.max_length, max_tokens=opts.max_tokens))
                    massive_tokens[i] = int(mres.info.get("n_counted_tokens") or 0)
                    rows["massive"] += [{**base, **r} for r in mres.layers]
                del lm
                gc.collect()
            if "spectrum" in analyses:
                from probes import spectrum as sp
                from probes.drift import layer_of, tensor_kind, tensor_role

                if on_stage:
                    on_stage(i, n, ck, "spectrum")
                dev = "cpu" if opts.device == "auto" else opts.device
                df = sp.analyze_checkpoint(ck.path, device=str(sp.resolve_device(dev)),
                                           unsafe_pickle=opts.unsafe_pickle)
                keep = [c for c in ("name", "layer_type", "alpha", "alpha_weighted", "D", "log_norm",
                                    "log_spectral_norm", "sigma_mp", "num_spikes", "mp_softrank", "stable_rank",
                                    "status", "ww_skipped", "non_ww") if c in df.columns]
                for r in df[keep].to_dict("records"):
                    kind = tensor_kind(str(r["name"]), 2)
                    rows["spectrum"].append({**base, **r, "role": kind if kind != "linear" else tensor_role(
                        str(r["name"])), "layer": layer_of(str(r["name"]))})
    tables: dict[str, pd.DataFrame] = {}
    drift_rows = None
    if "drift" in analyses:
        from probes.drift import weight_drift

        if on_stage:
            on_stage(n - 1, n, cks[-1], "drift (all checkpoints)")
        dres = weight_drift([c.path for c in cks], unsafe_pickle=opts.unsafe_pickle)
        drift_rows = dres.table()
        drift_rows.insert(0, "step", drift_rows["checkpoint_index"].map(lambda j: cks[int(j)].step))
        tables["trend_weights"] = drift_rows
        tables["trend_drift"] = _drift_by_role(drift_rows)
    if rows["sparsity"]:
        sp_df = pd.DataFrame(rows["sparsity"])
        keep = ["step", "checkpoint_index", "checkpoint", "canonical_name", "module_path", "kind", "layer", "width",
                "n_tokens", "zero_frac", *[c for c in sp_df.columns if c.startswith("near_zero_frac@")],
                "nonzero_pct_per_token", "dead_frac", "always_on_frac",
                *[c for c in sp_df.columns if c.startswith("chunk_sparsity@")], "neg_frac", "mean_abs", "max_abs"]
        tables["trend_sparsity"] = sp_df[[c for c in keep if c in sp_df.columns]]
    if rows["massive"]:
        ma = pd.DataFrame(rows["massive"])
        keep = ["step", "checkpoint_index", "checkpoint", "canonical_name", "module_path", "kind", "layer",
                "layer_1based", "n_tokens", "top1_mean", "top2_mean", "top3_mean", "median_mean", "ratio_top1_median",
                "n_massive", "token_ratio_max", "max_abs"]
        tables["trend_massive"] = ma[[c for c in keep if c in ma.columns]]
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always", EmergenceFitWarning)
            fits = _emergence_fits(tables["trend_massive"])
        failed = [str(w.message) for w in wlist if issubclass(w.category, EmergenceFitWarning)]
        if failed:
            caught.append(f"{failed[0]} ({len(failed)} of {len(fits)} series did not fit)")
        tables["emergence_fit"] = pd.DataFrame(fits)
    if rows["spectrum"]:
        tables["trend_spectrum"] = pd.DataFrame(rows["spectrum"])
    tables = {"trends": _trends(cks, tables, tokens), **tables}
    if tokens and len(set(tokens.values())) > 1:
        caught.append("counted tokens differ between checkpoints (different tokenizers?): "
                      + ", ".join(f"step {cks[i].step}: {v}" for i, v in tokens.items()))
    info = {"analyses": list(analyses), "n_checkpoints": n, "steps": [c.step for c in cks],
            "checkpoints": [asdict(c) for c in cks], **corpus_info,
            "corpus_reuse": "corpus read and checked once before loading any model; the same windows for every "
                            "checkpoint",
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
            "emergence_fit": "f(t) = A exp(-lambda x) log x + K, x = gamma t + t0; scipy curve_fit (trf) on "
                             "top1_mean / median_mean of resid_post per layer and on its max over layers; NaN when "
                             "it does not converge or has fewer than 5 steps"}
    if tokens:
        vals = sorted(set(tokens.values()))
        info["n_counted_tokens_per_checkpoint"] = vals[0] if len(vals) == 1 else vals
        info["n_counted_tokens"] = vals[0]
        for k in ("n_windows", "max_length", "stride", "window_scheme", "skip_first", "model_dtype", "device"):
            if k in measure_info:
                info[k] = measure_info[k]
    if massive_tokens:
        info["massive_n_counted_tokens_per_checkpoint"] = sorted(set(massive_tokens.values()))
        info["massive_preset"] = opts.massive_preset
    return TrackResult(cks, tables, info, caught)


def _drift_by_role(d: pd.DataFrame) -> pd.DataFrame:
    lin = d[d["kind"].isin(["linear", "conv"])] if "kind" in d else d
    out = []
    groups = [("all_linear", lin)] + [(r, g) for r, g in lin.groupby("role", sort=True)]
    for role, g in groups:
        for (step, ci), h in g.groupby(["step", "checkpoint_index"], sort=True):
            w = h["n"].astype(float)
            out.append({"step": step, "checkpoint_index": ci, "role": role, "n_tensors": len(h),
                        "n_weights": int(w.sum()),
                        "mean_weighted": float((h["mean"] * w).sum() / w.sum()),
                        "neg_pct_weighted": float((h["neg_pct"] * w).sum() / w.sum()),
                        "std_mean": float(h["std"].mean()), "extreme_frac_mean": float(h["extreme_frac"].mean()),
                        "max_abs": float(h["max_abs"].max())})
    return pd.DataFrame(out).sort_values(["role", "step"]).reset_index(drop=True) if out else pd.DataFrame(out)


def resid_post_rows(ma: pd.DataFrame) -> pd.DataFrame:
    r = ma[ma["kind"] == "resid_post"] if "kind" in ma else ma
    return r if len(r) else ma


def _emergence_fits(ma: pd.DataFrame) -> list[dict[str, Any]]:
    r = resid_post_rows(ma)
    fits = []
    for layer, g in r.groupby("layer", sort=True):
        g = g.sort_values("step")
        fits.append({"series": f"layer {int(layer)}", "layer": int(layer),
                     **fit_emergence(g["step"], g["ratio_top1_median"])})
    mx = r.groupby("step")["ratio_top1_median"].max().sort_index()
    fits.append({"series": "max over layers", "layer": None, **fit_emergence(mx.index, mx.values)})
    return fits


def _trends(cks: list[CheckpointStep], tables: dict[str, pd.DataFrame], tokens: dict[int, int]) -> pd.DataFrame:
    """One row per checkpoint step with the headline numbers of every analysis."""
    out = []
    for i, ck in enumerate(cks):
        row: dict[str, Any] = {"step": ck.step, "checkpoint_index": i, "checkpoint": ck.path,
                               "step_source": ck.step_source}
        if i in tokens:
            row["n_counted_tokens"] = tokens[i]
        sp = tables.get("trend_sparsity")
        if sp is not None:
            g = sp[sp["checkpoint_index"] == i]
            for kind, h in g.groupby("kind", sort=False):
                row[f"zero_frac_mean_{kind}"] = _mean(h["zero_frac"])
                row[f"nonzero_pct_per_token_mean_{kind}"] = _mean(h["nonzero_pct_per_token"])
                if "dead_frac" in h:
                    row[f"dead_frac_mean_{kind}"] = _mean(h["dead_frac"])
        dr = tables.get("trend_drift")
        if dr is not None and len(dr):
            a = dr[(dr["checkpoint_index"] == i) & (dr["role"] == "all_linear")]
            if len(a):
                row["weight_mean_linear"] = float(a["mean_weighted"].iloc[0])
                row["neg_pct_linear"] = float(a["neg_pct_weighted"].iloc[0])
                row["weight_std_linear_mean"] = float(a["std_mean"].iloc[0])
        ma = tables.get("trend_massive")
        if ma is not None:
            r = resid_post_rows(ma[ma["checkpoint_index"] == i]).sort_values("layer")
            if len(r):
                row["top1_median_ratio_max"] = float(r["ratio_top1_median"].max())
                row["top1_median_ratio_last"] = float(r["ratio_top1_median"].iloc[-1])
                row["top1_mean_max"] = float(r["top1_mean"].max())
        spec = tables.get("trend_spectrum")
        if spec is not None:
            s = spec[spec["checkpoint_index"] == i]
            if "ww_skipped" in s and "non_ww" in s:
                s = s[~s["ww_skipped"].astype(bool) & ~s["non_ww"].astype(bool)]
            for c in ("alpha", "alpha_weighted", "log_spectral_norm"):
                if c in s:
                    row[f"{c}_mean"] = _mean(s[c])
        out.append(row)
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------ figures
