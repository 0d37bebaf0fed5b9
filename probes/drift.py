"""Weight drift per linear layer, straight from the weights (METRICS.md section 4; the library of ``actsparse drift``).

Bug-or-Feature^2 (On-Point-RND/BugOrFeature custom_layers/custom_linear.py ``compute_statistics``)
tracks, for each linear weight W: the mean, the share of negative entries, the standard deviation
and the fraction of entries with |w| >= the 99.9th percentile of |W|. Across checkpoints of one
run this shows the negative drift the paper describes. Here:
- ``mean``: mean of W (float64 accumulation);
- ``neg_pct``: 100 x fraction of entries < 0;
- ``std``: standard deviation with Bessel's correction (``torch.std``'s default, as the reference);
- ``extreme_threshold``: the 99.9th percentile of |W| with linear interpolation (``torch.quantile``'s
  definition), computed exactly from the top ``n - floor(0.999 (n - 1))`` values of |W| (``topk``), so
  it works on tensors beyond ``torch.quantile``'s 16M-element limit;
- ``extreme_frac`` / ``extreme_count``: entries with |w| >= that threshold.
Tensors stream one at a time through ``probes.formats.iter_tensors`` (no model is built, any format
works without an architecture). Every floating tensor with 2+ dims is a row; ``kind`` says
``linear``, ``embedding``, ``lm_head`` or ``conv`` (4-D kernels), ``role`` guesses mlp_up / mlp_down /
attn from the name. Biases and norms (1-D) are skipped and counted, but ``bias_mean`` gives the mean
of the bias that belongs to a weight (``<prefix>.bias`` beside ``<prefix>.weight``; float64; NaN
without one): the reference's ``stats['bias_mean'] = self.bias.mean()``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from probes.errors import CheckpointError

QUANTILE = 0.999
CHUNK = 1 << 24  # elements per float64 chunk (128 MB)

_EMBED = ("embed", "wte.", "wpe.", "word_embeddings", "position_embeddings", "token_type_embeddings",
          "tok_embeddings", "token_embd", "shared.weight", "pos_embed", "cls_token", "mask_token")
_LM_HEAD = ("lm_head", "embed_out")
_DOWN = ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", ".wo.", "output.dense", "ffn_down", "lin2", "fc_out",
         "w2.")
_UP = ("up_proj", "gate_proj", "mlp.c_fc", "fc1", "dense_h_to_4h", ".wi.", ".wi_0", ".wi_1", "intermediate.dense",
       "ffn_up", "ffn_gate", "lin1", "fc_in", "w1.", "w3.", "gate_up_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.", "attn_", ".query", ".key", ".value",
         "attention.", "self_attn", "qkv", "out_proj")


def tensor_kind(name: str, ndim: int) -> str:
    n = name.lower()
    if any(k in n for k in _LM_HEAD) or n in ("output.weight",):
        return "lm_head"
    if any(k in n for k in _EMBED):
        return "embedding"
    if ndim > 2:
        return "conv"
    return "linear"


def tensor_role(name: str) -> str:
    n = "." + name.lower()
    if any(k in n for k in _ATTN):  # first: BERT's attention.output.dense is not the MLP's output.dense
        return "attn"
    if any(k in n for k in _DOWN):
        return "mlp_down"
    if any(k in n for k in _UP):
        return "mlp_up"
    return "other"


def layer_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(m.group(1)) if m else None


def bias_name(weight_name: str) -> str:
    """The bias beside a weight: ``x.weight`` -> ``x.bias`` (any other name: ``name + ".bias"``)."""
    return weight_name[: -len("weight")] + "bias" if weight_name.endswith("weight") else weight_name + ".bias"


def extreme_threshold(a, q: float = QUANTILE) -> float:
    """The ``q`` quantile of the 1-D tensor ``a`` with linear interpolation, exactly, via topk."""
    import torch

    n = a.numel()
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    k = n - lo  # the values at sorted positions lo .. n-1
    top = torch.topk(a, k, largest=True, sorted=True).values
    v_lo = float(top[-1])
    v_hi = float(top[-2]) if k >= 2 else v_lo
    return v_lo + frac * (v_hi - v_lo)


def weight_stats(w, q: float = QUANTILE) -> dict[str, Any]:
    """Drift statistics of one weight tensor (any shape), float64 accumulation, exact quantile."""
    import torch

    flat = w.detach().reshape(-1)
    if not flat.is_floating_point():
        raise ValueError("weight_stats needs a floating tensor")
    flat = flat.float() if flat.dtype != torch.float64 else flat
    n = flat.numel()
    total = 0.0
    neg = zeros = 0
    for i in range(0, n, CHUNK):
        c = flat[i:i + CHUNK]
        total += float(c.double().sum())
        neg += int(torch.count_nonzero(c < 0))
        zeros += int(torch.count_nonzero(c == 0))
    mean = total / n if n else float("nan")
    ss = 0.0
    for i in range(0, n, CHUNK):
        c = flat[i:i + CHUNK].double()
        ss += float((c - mean).square().sum())
    std = math.sqrt(ss / (n - 1)) if n > 1 else float("nan")
    a = flat.abs()
    thr = extreme_threshold(a, q)
    count = int(torch.count_nonzero(a.double() >= thr)) if n <= CHUNK else sum(
        int(torch.count_nonzero(a[i:i + CHUNK].double() >= thr)) for i in range(0, n, CHUNK))
    return {"n": n, "mean": mean, "neg_pct": 100.0 * neg / n if n else float("nan"), "std": std,
            "extreme_threshold": thr, "extreme_count": count, "extreme_frac": count / n if n else float("nan"),
            "max_abs": float(a.max()) if n else float("nan"), "min": float(flat.min()) if n else float("nan"),
            "max": float(flat.max()) if n else float("nan"), "zero_frac": zeros / n if n else float("nan"),
            "nonfinite": int((~torch.isfinite(flat)).sum())}


def _nth_smallest(a, k: int) -> float:
    import numpy as np

    return float(np.partition(a, k)[k])


def weight_stats_np(w, q: float = QUANTILE) -> dict[str, Any]:
    """``weight_stats`` of a numpy array (safetensors read without torch): the same steps in the same
    precisions (float32 for every dtype but float64, float64 chunk sums, Bessel std, the exact
    linear-interpolation quantile from the order statistics at floor(q (n - 1)) and the next), so the
    values equal the torch path's up to float64 summation order (``tests/unit/test_drift.py``)."""
    import numpy as np

    flat = np.asarray(w).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        raise ValueError("weight_stats needs a floating tensor")
    if flat.dtype != np.float64:
        flat = flat.astype(np.float32, copy=False)
    n = flat.size
    total = 0.0
    neg = zeros = 0
    for i in range(0, n, CHUNK):
        c = flat[i:i + CHUNK]
        total += float(c.sum(dtype=np.float64))
        neg += int(np.count_nonzero(c < 0))
        zeros += int(np.count_nonzero(c == 0))
    mean = total / n if n else float("nan")
    ss = 0.0
    for i in range(0, n, CHUNK):
        c = flat[i:i + CHUNK].astype(np.float64)
        ss += float(np.square(c - mean).sum())
    std = math.sqrt(ss / (n - 1)) if n > 1 else float("nan")
    a = np.abs(flat)
    if n:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        v_lo = _nth_smallest(a, lo)
        v_hi = _nth_smallest(a, lo + 1) if lo + 1 < n else v_lo
        thr = v_lo + (pos - lo) * (v_hi - v_lo)
    else:
        thr = float("nan")
    count = sum(int(np.count_nonzero(a[i:i + CHUNK].astype(np.float64) >= thr)) for i in range(0, n, CHUNK))
    return {"n": n, "mean": mean, "neg_pct": 100.0 * neg / n if n else float("nan"), "std": std,
            "extreme_threshold": thr, "extreme_count": count, "extreme_frac": count / n if n else float("nan"),
            "max_abs": float(a.max()) if n else float("nan"), "min": float(flat.min()) if n else float("nan"),
            "max": float(flat.max()) if n else float("nan"), "zero_frac": zeros / n if n else float("nan"),
            "nonfinite": int(np.count_nonzero(~np.isfinite(flat)))}


@dataclass
class DriftResult:
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self):
        return summarize(self.rows)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``)."""
        return {"drift": self.table(), "drift_summary": self.summary()}


def summarize(rows: list[dict[str, Any]]):
    """Per checkpoint and kind: unweighted means over tensors, and element-weighted mean weight / % negative."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return pd.DataFrame(out)
    for (ci, ck, kind), g in df.groupby(["checkpoint_index", "checkpoint", "kind"], sort=True):
        n = g["n"].astype(float)
        out.append({"checkpoint_index": ci, "checkpoint": ck, "kind": kind, "n_tensors": len(g),
                    "n_weights": int(n.sum()),
                    "mean_of_means": float(g["mean"].mean()), "mean_weighted": float((g["mean"] * n).sum() / n.sum()),
                    "neg_pct_mean": float(g["neg_pct"].mean()),
                    "neg_pct_weighted": float((g["neg_pct"] * n).sum() / n.sum()),
                    "std_mean": float(g["std"].mean()), "extreme_frac_mean": float(g["extreme_frac"].mean()),
                    "bias_mean_of_means": float(g["bias_mean"].mean()) if "bias_mean" in g else math.nan,
                    "max_abs": float(g["max_abs"].max())})
    return pd.DataFrame(out)


@dataclass
class DriftOptions:
    checkpoints: Sequence[str] = ()  # one or more checkpoints, in training order
    unsafe_pickle: bool = False


def run_drift(loaded: Any, options: DriftOptions, progress: Callable[[int, int], Any] | None = None) -> DriftResult:
    """The registered analysis (``probes.analysis``): ``loaded`` is unused, drift reads the weights itself."""
    return weight_drift(list(options.checkpoints), unsafe_pickle=options.unsafe_pickle, progress=progress)


def weight_drift(checkpoints: str | Sequence[str], unsafe_pickle: bool = False,
                 progress: Callable[[int | None, int], Any] | None = None, q: float = QUANTILE,
                 kinds: Iterable[str] | None = None) -> DriftResult:
    """Per-weight drift statistics of one or more checkpoints (same run at different steps).

    Runs with one torch thread: the statistics are reductions over one tensor at a time, memory-
    bound, and torch's thread pool on cores that other processes keep busy turns 0.06 s into 4 s
    (the bundled model on a loaded 2-core machine). Checkpoints stored as safetensors are read as numpy
    arrays and reduced with numpy (``weight_stats_np``): no torch import, a second or more of start-up."""
    from probes.formats import is_safetensors, sniff

    cks = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    sniffed = [sniff(ck) for ck in cks]
    if cks and all(sn.files and all(is_safetensors(f) for f in sn.files) for sn in sniffed):
        return _weight_drift(cks, sniffed, unsafe_pickle, progress, q, kinds, numpy_path=True)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _weight_drift(cks, sniffed, unsafe_pickle, progress, q, kinds)
    finally:
        torch.set_num_threads(threads)


def _weight_drift(cks, sniffed, unsafe_pickle, progress, q, kinds, numpy_path: bool = False) -> DriftResult:
    """``weight_drift`` of the checkpoints ``cks``, already sniffed (``sniffed``, same order)."""
    from probes.formats import count_tensors, iter_tensors

    if numpy_path:
        import numpy as np

        from probes.arrays import iter_arrays

        def tensors(sn):
            for name, a, stored in iter_arrays(sn, unsafe_pickle):
                yield name, a, stored

        def floating(a):
            return np.issubdtype(a.dtype, np.floating)

        def bias_mean(a):
            return float(a.astype(np.float64).mean())

        stats = weight_stats_np
    else:
        def tensors(sn):
            for name, t in iter_tensors(sn, unsafe_pickle=unsafe_pickle):
                yield name, t, str(t.dtype).replace("torch.", "")

        def floating(t):
            return t.is_floating_point()

        def bias_mean(t):
            return float(t.detach().double().mean())

        stats = weight_stats

    if not cks:
        raise CheckpointError("no checkpoint given", "give one or more checkpoint paths")
    counts = [count_tensors(sn) for sn in sniffed]  # one bar over every checkpoint's tensors; None: unknown
    total = None if any(c is None for c in counts) else sum(counts)
    if progress:
        progress(total, 0)
    keep = set(kinds) if kinds else None
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    sources = []
    for ci, (ck, sn) in enumerate(zip(cks, sniffed)):
        sources.append({"checkpoint": str(ck), "kind": sn.kind.value, "files": sn.files})
        n_seen = 0
        first_row = len(rows)
        bias_means: dict[str, float] = {}
        for name, t, stored_dtype in tensors(sn):
            n_seen += 1
            if progress:
                progress(total, 1)
            ndim, is_float = len(t.shape), floating(t)
            if is_float and ndim == 1 and name.endswith("bias") and math.prod(t.shape):
                bias_means[name] = bias_mean(t)
            if not is_float or ndim < 2:
                skipped.append({"checkpoint_index": ci, "name": name, "shape": list(t.shape),
                                "reason": "not floating" if not is_float else f"{ndim}-D"})
                continue
            kind = tensor_kind(name, ndim)
            if keep is not None and kind not in keep:
                continue
            st = stats(t, q)
            rows.append({"checkpoint_index": ci, "checkpoint": str(ck), "name": name, "kind": kind,
                         "role": tensor_role(name) if kind == "linear" else kind, "layer": layer_of(name),
                         "shape": "x".join(str(s) for s in t.shape), "dtype": stored_dtype,
                         **st})
            del t
        for r in rows[first_row:]:  # biases may come before or after their weight in the file
            r["bias_mean"] = bias_means.get(bias_name(r["name"]), math.nan)
        if n_seen == 0:
            raise CheckpointError(f"no tensors found in {ck}", "check that this is a model checkpoint")
    info = {"checkpoints": sources, "n_tensors_measured": len(rows), "n_tensors_skipped": len(skipped),
            "quantile": q, "quantile_method": "exact: linear interpolation (torch.quantile's definition) from topk",
            "std": "unbiased (Bessel), float64 accumulation", "neg_pct": "100 x fraction of entries < 0",
            "streaming": "one tensor at a time via " + ("probes.arrays.iter_arrays (numpy, safetensors)" if numpy_path
                                                          else "probes.formats.iter_tensors"),
            "seconds": round(time.perf_counter() - t0, 3)}
    return DriftResult(rows, info, skipped)
