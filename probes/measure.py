"""``measure``: activation sparsity of every site over a corpus (the Python API of ``actsparse measure``)."""

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

# The activation (input of the output projection) and, for GLU models, act(gate). The
# pre-activation (mlp_pre) is opt-in: for ReLU models it repeats mlp_post and doubles the cost.
DEFAULT_KINDS = (MLP_POST, MLP_GATE_ACT)


@dataclass
class MeasureOptions(DataOptions):
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID
    chunk_k: int = DEFAULT_CHUNK_K
    kinds: Sequence[str] = DEFAULT_KINDS
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides


@dataclass
class MeasureResult:
    rows: list[dict[str, Any]]  # one per site
    info: dict[str, Any]  # what was measured and how (goes into the manifest)
    probes: dict[str, Any] = field(repr=False, default_factory=dict)

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self):
        return summarize(self.rows)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``)."""
        return {"sparsity": self.table(), "summary": self.summary()}


SUMMARY_METRICS = ("zero_frac", "near_zero_frac@1e-06", "near_zero_frac@0.001", "near_zero_frac@0.01",
                   "nonzero_pct_per_token", "dead_frac", "always_on_frac", "neg_frac")


def summarize(rows: list[dict[str, Any]]):
    """Model-level means per site kind: unweighted over layers, and weighted by width (TEAL-style)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return pd.DataFrame(out)
    metrics = [m for m in df.columns if m in SUMMARY_METRICS or m.startswith("chunk_sparsity@")
               or m.startswith("near_zero_frac@")]
    for kind, g in df.groupby("kind", sort=False):
        for m in dict.fromkeys(metrics):
            v = g[m].astype(float)
            ok = v.notna()
            w = g["width"].astype(float)[ok]
            out.append({"kind": kind, "metric": m, "n_layers": int(ok.sum()),
                        "mean_over_layers": float(v[ok].mean()) if ok.any() else math.nan,
                        "width_weighted_mean": float((v[ok] * w).sum() / w.sum()) if ok.any() else math.nan})
    return pd.DataFrame(out)


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

    def make_probe(site: Site, width: int, device):
        return ActivationSparsityProbe(width, opts.eps_grid, opts.chunk_k, device=device)

    t0 = time.perf_counter()
    probes = run_probes(model, td.batches(local), sites, make_probe,
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
    rows = []
    for s in sites:
        p = probes.get(s.canonical_name)
        if p is None:
            continue  # site never called (e.g. a decoder stack the forward did not use)
        rows.append({**s.row(), "dtype": dtype, **p.to_row()})
    info = {
        **td.describe(),
        "skip_first": opts.skip_first,
        "padding": "right, masked (never counted)",
        "statistics_dtype": "float32 (float64 sums)",
        "model_dtype": dtype,
        "device": str(loaded.device),
        "n_sites": len(rows),
        "seconds": round(elapsed, 3),
        **parallel,
        "means": "per layer: mean over counted tokens; summary: unweighted mean over layers and width-weighted mean",
        "quantiles": "nonzero_pct_per_token_p*_hist from a fixed 1000-bin histogram",
        "options": {**asdict(opts), "stride": stride if opts.stride is not None else None},
    }
    notes = list(td.notes)
    if opts.chunk_k > max_length:
        notes.append(f"--chunk-k {opts.chunk_k} is longer than a window (--max-length {max_length}): no full "
                     f"chunk fits, so chunk_sparsity@{opts.chunk_k} is NaN")
    if notes:
        info["notes"] = notes  # the CLI prints them unless -q
    return MeasureResult(rows, info, probes)
