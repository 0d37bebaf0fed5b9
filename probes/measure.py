"""``measure``: activation sparsity of every site over a corpus (the Python API of ``actsparse measure``)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes import corpus as corpus_mod
from probes import distributed
from probes.loading import LoadedModel, check_max_length
from probes.runner import forward_batch, run_probes
from probes.sites import MLP_GATE_ACT, MLP_POST, Site, find_sites
from probes.sparsity import DEFAULT_CHUNK_K, DEFAULT_EPS_GRID, ActivationSparsityProbe

DEFAULT_MAX_LENGTH_CAP = 2048
# The activation (input of the output projection) and, for GLU models, act(gate). The
# pre-activation (mlp_pre) is opt-in: for ReLU models it repeats mlp_post and doubles the cost.
DEFAULT_KINDS = (MLP_POST, MLP_GATE_ACT)


@dataclass
class MeasureOptions:
    data: str | None = None  # corpus spec; None = the bundled calibration corpus
    text_field: str = "text"
    encoding: str = "utf-8"  # of a local corpus file; a byte-order mark is dropped
    batch_size: int = 4
    max_length: int | None = None  # None: the model's limit, capped at 2048
    max_tokens: int | None = None
    stride: int | None = None
    seed: int = 0
    skip_first: int = 0
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


def resolve_stride(stride: int | None, max_length: int) -> tuple[int, str | None]:
    """The stride the windows use (at most ``max_length``), and a note when a larger one was asked for."""
    used = min(stride or max_length, max_length)
    if stride is not None and stride > max_length:
        return used, f"--stride {stride} is above --max-length {max_length}; clamped to {used}"
    return used, None


def resolve_corpus(data: str | None) -> str:
    if data:
        return data
    from probes.embedded import default_corpus

    return default_corpus()


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
    model, tok = loaded.model, loaded.tokenizer
    sites = list(site_list) if site_list is not None else find_sites(model, loaded.family, opts.kinds, opts.sites)
    data = resolve_corpus(opts.data)
    check_max_length(opts.max_length, loaded)  # above the model's position limit: exit 4, before any batch
    model_max = loaded.max_length or DEFAULT_MAX_LENGTH_CAP
    max_length = opts.max_length or min(model_max, DEFAULT_MAX_LENGTH_CAP)
    causal = loaded.is_causal_lm
    stride, stride_note = resolve_stride(opts.stride, max_length)
    corpus = corpus_mod.corpus_windows(data, tok, max_length, stride, causal=causal, max_tokens=opts.max_tokens,
                                       skip_first=opts.skip_first, text_field=opts.text_field, encoding=opts.encoding)
    windows = corpus.windows
    dist = dist if dist is not None else distributed.current()
    local = dist.shard(windows, opts.batch_size) if dist is not None else windows
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
    n_batches = math.ceil(len(local) / opts.batch_size)
    if progress:
        progress(n_batches, 0)

    def make_probe(site: Site, width: int, device):
        return ActivationSparsityProbe(width, opts.eps_grid, opts.chunk_k, device=device)

    t0 = time.perf_counter()
    probes = run_probes(model, corpus_mod.batches(local, opts.batch_size, pad, loaded.device), sites, make_probe,
                        forward=lambda m, b: forward_batch(m, b, is_encoder_decoder=loaded.is_encoder_decoder),
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
        "corpus": data,
        "corpus_is_default": opts.data is None,
        "n_documents": corpus.n_documents,
        "n_corpus_tokens": corpus.n_corpus_tokens,
        **corpus.read_note(),
        "n_windows": len(windows),
        "n_counted_tokens": corpus_mod.n_counted(windows),
        "max_length": max_length,
        "stride": stride,
        "window_scheme": "lm-eval rolling (context length 1)" if causal else "encoder [CLS] chunk [SEP]",
        "prefix_token": corpus_mod.prefix_token(tok) if causal else None,
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
    notes = [stride_note] if stride_note else []
    if opts.chunk_k > max_length:
        notes.append(f"--chunk-k {opts.chunk_k} is longer than a window (--max-length {max_length}): no full "
                     f"chunk fits, so chunk_sparsity@{opts.chunk_k} is NaN")
    if notes:
        info["notes"] = notes  # the CLI prints them unless -q
    return MeasureResult(rows, info, probes)
