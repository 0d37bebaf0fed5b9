"""``measure``: activation sparsity of every site over a corpus (the Python API of ``actsparse measure``).

Error bars (``probes.uncertainty``): each window-ratio column X of the per-site table (zero_frac,
near_zero_frac@eps, nonzero_pct_per_token, chunk_sparsity@k, neg_frac) gets ``X_se`` (analytic
standard error over windows) and ``X_lo`` / ``X_hi`` (percentile bootstrap interval over windows,
``n_resamples`` resamples seeded with ``seed``, level ``ci_level``), named by
``probes.uncertainty.bar_column`` (``zero_frac_se``, ``near_zero_frac_se@0.01``); the summary's means over layers
get the same, from the same resamples, keeping the correlation between layers measured on the same
windows. Windows are tagged with their global index, so a data-parallel run gives the same error
bars as one process.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes import corpus as corpus_mod
from probes import distributed
from probes.data import DEFAULT_MAX_LENGTH_CAP, DataOptions, resolve_corpus, resolve_stride, token_windows  # noqa: F401
from probes.loading import LoadedModel
from probes.runner import TokenBatches, run_probes
from probes.sites import MLP_GATE_ACT, MLP_POST, Site, find_sites
from probes.sparsity import DEFAULT_CHUNK_K, DEFAULT_EPS_GRID, ActivationSparsityProbe
from probes.uncertainty import DEFAULT_LEVEL, DEFAULT_RESAMPLES, WindowTags

# The activation (input of the output projection) and, for GLU models, act(gate). The
# pre-activation (mlp_pre) is opt-in: for ReLU models it repeats mlp_post and doubles the cost.
DEFAULT_KINDS = (MLP_POST, MLP_GATE_ACT)


@dataclass
class MeasureOptions(DataOptions):
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID
    chunk_k: int = DEFAULT_CHUNK_K
    kinds: Sequence[str] = DEFAULT_KINDS
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides
    n_resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples of the windows for *_lo/*_hi (0: no interval)
    ci_level: float = DEFAULT_LEVEL  # level of the bootstrap interval


@dataclass
class MeasureResult:
    rows: list[dict[str, Any]]  # one per site
    info: dict[str, Any]  # what was measured and how (goes into the manifest)
    probes: dict[str, Any] = field(repr=False, default_factory=dict)
    # (kind, metric) -> {mean_over_layers_se, _lo, _hi, width_weighted_mean_se, _lo, _hi}
    summary_uncertainty: dict[tuple[str, str], dict[str, float]] = field(repr=False, default_factory=dict)

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self):
        return summarize(self.rows, self.summary_uncertainty or None)  # none for vision runs (no window tags)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``)."""
        return {"sparsity": self.table(), "summary": self.summary()}


SUMMARY_METRICS = ("zero_frac", "near_zero_frac@1e-06", "near_zero_frac@0.001", "near_zero_frac@0.01",
                   "nonzero_pct_per_token", "dead_frac", "always_on_frac", "neg_frac")


SUMMARY_VALUES = ("mean_over_layers", "width_weighted_mean")


def summarize(rows: list[dict[str, Any]], uncertainty: dict[tuple[str, str], dict[str, float]] | None = None):
    """Model-level means per site kind: unweighted over layers, and weighted by width (TEAL-style).

    ``uncertainty``: per (kind, metric) the ``_se``/``_lo``/``_hi`` columns of both means
    (``add_uncertainty``); when given, every row gets them (NaN for metrics without error bars:
    dead_frac and always_on_frac are properties of all tokens together, not window means)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return pd.DataFrame(out)
    from probes.uncertainty import is_uncertainty_column

    metrics = [m for m in df.columns if (m in SUMMARY_METRICS or m.startswith("chunk_sparsity@")
               or m.startswith("near_zero_frac@")) and not is_uncertainty_column(m, df.columns)]
    for kind, g in df.groupby("kind", sort=False):
        for m in dict.fromkeys(metrics):
            v = g[m].astype(float)
            ok = v.notna()
            w = g["width"].astype(float)[ok]
            row = {"kind": kind, "metric": m, "n_layers": int(ok.sum()),
                   "mean_over_layers": float(v[ok].mean()) if ok.any() else math.nan,
                   "width_weighted_mean": float((v[ok] * w).sum() / w.sum()) if ok.any() else math.nan}
            if uncertainty is not None:
                u = uncertainty.get((str(kind), m), {})
                row.update({f"{c}{sfx}": u.get(f"{c}{sfx}", math.nan) for c in SUMMARY_VALUES
                            for sfx in ("_se", "_lo", "_hi")})
            out.append(row)
    return pd.DataFrame(out)


def add_uncertainty(rows: list[dict[str, Any]], probes: Sequence[Any], n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[tuple[str, str], dict[str, float]]:
    """Error bars over windows for ``rows`` (one per probe, same order), in place: ``n_windows`` and
    ``X_se``, ``X_lo``, ``X_hi`` per window-ratio column X. Returns the summary's error bars by
    (kind, metric). Layers of one kind are bootstrapped together (windows aligned by index), so
    the interval of a mean over layers keeps their correlation."""
    import numpy as np

    from probes import uncertainty as unc

    by_kind: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_kind.setdefault(str(r.get("kind")), []).append(i)
    summary: dict[tuple[str, str], dict[str, float]] = {}
    for i, (r, p) in enumerate(zip(rows, probes)):
        r.update(p.se_row())
    for kind, idx in by_kind.items():
        ratios = [probes[i].window_ratios() for i in idx]
        cols = list(dict.fromkeys(c for _, rr in ratios for c in rr))
        for col in cols:
            have = [j for j, (_, rr) in enumerate(ratios) if col in rr]
            ids, nums = unc.align([ratios[j][0] for j in have], [ratios[j][1][col][0] for j in have])
            _, dens = unc.align([ratios[j][0] for j in have], [ratios[j][1][col][1] for j in have])
            Y, N = np.stack(nums, axis=1), np.stack(dens, axis=1)  # [m, layers]
            vals = np.array([float(rows[idx[j]].get(col, math.nan)) for j in have])
            ok = ~np.isnan(vals)
            width = np.array([float(rows[idx[j]]["width"]) for j in have])
            weights = [np.where(ok, 1.0 / max(1, ok.sum()), 0.0),
                       np.where(ok, width / max(1.0, width[ok].sum()), 0.0)]
            lo, hi, lo_w, hi_w = unc.bootstrap_ratios(Y, N, weights, n_resamples=n_resamples, seed=seed, level=level)
            for j, jj in enumerate(have):
                rows[idx[jj]][unc.bar_column(col, "_lo")] = float(lo[j])
                rows[idx[jj]][unc.bar_column(col, "_hi")] = float(hi[j])
            u = {}
            for name, w, a, b in zip(SUMMARY_VALUES, weights, lo_w, hi_w):
                u[f"{name}_se"] = unc.weighted_ratios_se(Y, N, w) if ok.any() else math.nan
                u[f"{name}_lo"], u[f"{name}_hi"] = float(a), float(b)
            summary[(kind, col)] = u
    for r in rows:  # X_se, X_lo, X_hi side by side, after the measured columns
        tail = {k: r.pop(k) for k in [k for k in r if unc.is_uncertainty_column(k, r) or k == "n_windows"]}
        r["n_windows"] = tail.pop("n_windows")
        for col in [unc.bar_base(k)[0] for k in tail if unc.bar_base(k)[1] == "_se"]:
            r.update({unc.bar_column(col, sfx): tail.get(unc.bar_column(col, sfx), math.nan) for sfx in unc.SUFFIXES})
    return summary



def _kernel_info(device) -> dict:
    """Which code counted (``probes.fastcount``: the fused C kernel on the CPU, else torch reductions)."""
    from probes import fastcount

    if str(device).startswith("cpu"):
        return fastcount.status()
    return {"kernel": "torch", "detail": f"statistics on {device} use torch reductions"}


def _relu_pass_info(probes) -> dict:
    """How many sites and updates were counted in their ReLU's pass (``probes.relu_pass``) instead of at the hook."""
    from probes import relu_pass

    counted = [int(getattr(p, "relu_updates", 0)) for p in probes]
    return {"enabled": relu_pass.enabled_by_env(), "sites": sum(1 for k in counted if k), "updates": sum(counted)}


def measure(loaded: LoadedModel, opts: MeasureOptions | None = None,
            progress: Callable[[int, int], Any] | None = None,
            site_list: Sequence[Site] | None = None,
            dist: distributed.DistContext | None = None) -> MeasureResult:
    """Measure activation sparsity of ``loaded`` over ``opts.data``.

    ``progress(total_batches, advance)`` is called once with ``advance=0`` to announce the
    total (this rank's batches), then once per batch.

    ``dist``: a data-parallel context (default: the ``probes.distributed.session`` in progress,
    if any). Each rank measures its share of the windows and the probes are merged over the
    ranks; every rank returns the merged result.
    """
    import torch

    opts = opts or MeasureOptions()
    if not (0.0 < float(opts.ci_level) < 1.0) or int(opts.n_resamples) < 0:
        from probes.errors import ActsparseError

        raise ActsparseError(f"MeasureOptions(n_resamples={opts.n_resamples!r}, ci_level={opts.ci_level!r}) cannot "
                             "make a bootstrap interval", "use n_resamples >= 0 (0: no interval) and 0 < ci_level < 1",
                             exit_code=2)
    torch.manual_seed(opts.seed)
    model = loaded.model
    sites = list(site_list) if site_list is not None else find_sites(model, loaded.family, opts.kinds, opts.sites)
    # max length checked (exit 4) before the corpus is read or any batch run
    td = token_windows(loaded, opts, causal=loaded.is_causal_lm)
    windows, max_length, stride = td.windows, td.max_length, td.stride
    dist = dist if dist is not None else distributed.current()
    local = td.local(dist)
    n_batches = td.n_batches(local)
    if progress:
        progress(n_batches, 0)

    # every batch row is tagged with its window's index in the whole run (error bars, probes.uncertainty)
    tags = WindowTags()
    index = {id(w): i for i, w in enumerate(windows)}
    batches = tags.follow(td.batches(local), [index[id(w)] for w in local], opts.batch_size)

    def make_probe(site: Site, width: int, device):
        return ActivationSparsityProbe(width, opts.eps_grid, opts.chunk_k, device=device, tags=tags)

    t0 = time.perf_counter()
    probes = run_probes(model, batches, sites, make_probe,
                        adapter=TokenBatches(is_encoder_decoder=loaded.is_encoder_decoder),
                        progress=(lambda k: progress(n_batches, k)) if progress else None)
    elapsed = time.perf_counter() - t0
    parallel: dict[str, Any] = {"world_size": 1}
    if dist is not None and dist.active:
        probes, seconds = dist.merge_probes(probes, extra=elapsed)
        elapsed = max(seconds)
        split = dist.split(windows, opts.batch_size)
        parallel = {"world_size": dist.world_size, "backend": dist.backend, "shard": distributed.SHARD_SCHEME,
                    "windows_per_rank": [len(w) for w in split],
                    "counted_tokens_per_rank": [corpus_mod.n_counted(w) for w in split],
                    "seconds_per_rank": [round(x, 3) for x in seconds]}
    dtype = str(loaded.dtype).replace("torch.", "")
    rows, used = [], []
    for s in sites:
        p = probes.get(s.canonical_name)
        if p is None:
            continue  # site never called (e.g. a decoder stack the forward did not use)
        rows.append({**s.row(), "dtype": dtype, **p.to_row()})
        used.append(p)
    summary_unc = add_uncertainty(rows, used, opts.n_resamples, opts.seed, opts.ci_level)
    info = {
        **td.describe(),
        "skip_first": opts.skip_first,
        "padding": "right, masked (never counted)",
        "statistics_dtype": "float32 (float64 sums)",
        "statistics_kernel": {**_kernel_info(loaded.device), "relu_pass": _relu_pass_info(used)},
        "model_dtype": dtype,
        "device": str(loaded.device),
        "n_sites": len(rows),
        "seconds": round(elapsed, 3),
        **parallel,
        "means": "per layer: mean over counted tokens; summary: unweighted mean over layers and width-weighted mean",
        "quantiles": "nonzero_pct_per_token_p*_hist from a fixed 1000-bin histogram",
        "uncertainty": {"unit": "window (one row of a batch); n_windows per row: windows with a counted token",
                        "se": "*_se: analytic standard error over windows of a ratio of window sums "
                              "(linearisation, m/(m-1) factor; probes.uncertainty.ratio_se)",
                        "interval": f"*_lo/*_hi: {100 * opts.ci_level:g} % percentile bootstrap over windows",
                        "n_resamples": opts.n_resamples, "seed": opts.seed, "level": opts.ci_level,
                        "summary": "means over layers: linearised se and bootstrap of the same resamples, layers "
                                   "aligned by window; none for dead_frac and always_on_frac"},
        "options": {**asdict(opts), "stride": stride if opts.stride is not None else None},
    }
    notes = list(td.notes)
    if opts.chunk_k > max_length:
        notes.append(f"--chunk-k {opts.chunk_k} is longer than a window (--max-length {max_length}): no full "
                     f"chunk fits, so chunk_sparsity@{opts.chunk_k} is NaN")
    if notes:
        info["notes"] = notes  # the CLI prints them unless -q
    return MeasureResult(rows, info, probes, summary_unc)
