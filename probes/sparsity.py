"""Activation sparsity probe (METRICS.md section 2): a streaming, mergeable accumulator.

State is O(channels): counts, float64 sums, a running max, a per-channel activity count and a
fixed 1000-bin histogram of the per-token non-zero fraction. ``merge`` adds two states, so a
run split over shards or ranks gives the same numbers as one pass (exactly, for counts).

Definitions (Lazy Neuron arXiv 2210.06313; BlockFFN for chunk sparsity):
- zero_frac: fraction of entries exactly 0 (-0 counts as 0).
- near_zero_frac@eps: fraction with |a| <= eps.
- nonzero_pct_per_token: per token, % of non-zero entries; mean over tokens (equal to
  100 * (1 - zero_frac) for a fixed width; the histogram keeps its spread).
- dead_neurons / always_on_neurons: channels zero on every token / non-zero on every token.
- chunk_sparsity@k: mean over chunks of k consecutive valid tokens of a sequence of
  1 - |union of non-zero channels| / width. Only full chunks count. Neuron-level: BlockFFN's
  chunk-level sparsity (thunlp/BlockFFN activation_context.py ``stat_window_activation``) applies
  the same union to experts (non-zero router scores), not to neurons.

Error bars (``probes.uncertainty``): beside the O(channels) state the probe keeps one float64 row
per window (batch row) with ``window_fields``: counted tokens, zero / negative / near-zero counts
and the chunk sums, O(windows x (5 + len(eps grid))) in all, keyed by the window's global index
when ``tags`` (a ``probes.uncertainty.WindowTags``) gives it, else by arrival order. ``se_row()``
gives the analytic standard errors over windows of the window-ratio columns (``uncertain_columns``);
``window_ratios()`` the per-window numerators and denominators for a bootstrap. ``to_row()`` does
not change with them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

DEFAULT_EPS_GRID = (1e-6, 1e-3, 1e-2)
DEFAULT_CHUNK_K = 8
HIST_BINS = 1000


def eps_label(eps: float) -> str:
    return f"{eps:g}"


def window_fields(eps_grid: Sequence[float]) -> tuple[str, ...]:
    """The per-window values the probe keeps (``probes.uncertainty.WindowValues`` fields)."""
    return ("n_tokens", "zero", "neg", *(f"near_zero@{eps_label(e)}" for e in eps_grid), "chunk_sum", "n_chunks")


def uncertain_columns(eps_grid: Sequence[float], chunk_k: int) -> list[str]:
    """The ``to_row`` columns that are ratios of per-window sums, so carry ``_se``/``_lo``/``_hi``."""
    return (["zero_frac", *(f"near_zero_frac@{eps_label(e)}" for e in eps_grid), "nonzero_pct_per_token"]
            + ([f"chunk_sparsity@{chunk_k}"] if chunk_k > 0 else []) + ["neg_frac"])


class ActivationSparsityProbe:
    """Accumulates sparsity statistics of one site's activations ``[batch, pos, channels]``."""

    name = "sparsity"
    # How each state entry combines across shards/ranks.
    REDUCE = {"n_tokens": "sum", "zero": "sum", "near_zero": "sum", "neg": "sum", "sum": "sum", "sum_abs": "sum",
              "sum_sq": "sum", "max_abs": "max", "channel_active": "sum", "token_hist": "sum", "token_nz_sum": "sum",
              "chunk_sum": "sum", "n_chunks": "sum", "nonfinite": "sum"}

    def __init__(self, width: int, eps_grid: Sequence[float] = DEFAULT_EPS_GRID, chunk_k: int = DEFAULT_CHUNK_K,
                 device: Any = "cpu", tags: Any = None):
        import torch

        from probes.uncertainty import new_state

        self.width = int(width)
        self.eps_grid = tuple(float(e) for e in eps_grid)
        self.chunk_k = int(chunk_k)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        self.state = {
            "n_tokens": torch.zeros((), **i64),
            "zero": torch.zeros((), **i64),
            "near_zero": torch.zeros(len(self.eps_grid), **i64),
            "neg": torch.zeros((), **i64),
            "sum": torch.zeros((), **f64),
            "sum_abs": torch.zeros((), **f64),
            "sum_sq": torch.zeros((), **f64),
            "max_abs": torch.zeros((), **f64),
            "channel_active": torch.zeros(self.width, **i64),
            "token_hist": torch.zeros(HIST_BINS, **i64),
            "token_nz_sum": torch.zeros((), **f64),
            "chunk_sum": torch.zeros((), **f64),
            "n_chunks": torch.zeros((), **i64),
            "nonfinite": torch.zeros((), **i64),
        }
        self._eps = torch.tensor(self.eps_grid, dtype=torch.float32, device=device)
        # per-window rows (probes.uncertainty.WindowValues state): O(windows), a dict of lists so that
        # probes.distributed.probe_to_cpu moves it with the probe
        self.tags = tags
        self.windows = {**new_state(), "global": tags is not None}

    # ------------------------------------------------------------------ update
    def update(self, x, mask=None) -> None:
        """``x``: ``[batch, pos, channels]`` (or ``[tokens, channels]``); ``mask``: ``[batch, pos]``, True = counted."""
        import torch

        if x.dim() == 2:
            x = x.unsqueeze(1)  # [batch, 1, channels]
        if x.shape[-1] != self.width:
            raise ValueError(f"probe built for width {self.width}, got {x.shape[-1]}")
        c = self.width
        full_rows = mask is None or bool(mask.all())
        if full_rows:
            valid = x.reshape(-1, c)  # no gather copy in the common case of full windows
            lens = [x.shape[1]] * x.shape[0]
        else:
            mask = mask.to(device=x.device, dtype=torch.bool)  # a 0/1 attention mask must not index rows
            valid = x[mask]  # [n_valid, channels], kept in (batch, pos) order
            lens = mask.sum(1).tolist()
        if valid.dtype != torch.float32:
            valid = valid.float()  # statistics in float32 whatever the model dtype
        n = valid.shape[0]
        if n == 0:
            return
        s = self.state
        a = valid.abs()
        per_window = _RowSums(lens, full_rows, x.device)
        # Non-zero indicator as float32: its row/column sums are exact integers (< 2^24 per batch)
        # and run several times faster than count_nonzero along a dimension. -0.0 counts as zero.
        # Per-token counts (<= channels: exact in float32) are added up per window in float64 (exact).
        nzf = (valid != 0).to(torch.float32)
        per_token_nz = nzf.sum(1)  # [n]
        zero_w = per_window(c - per_token_nz)
        neg_w = per_window((valid < 0).to(torch.float32).sum(1))
        near_w = [per_window((a <= self._eps[j]).to(torch.float32).sum(1)) for j in range(len(self.eps_grid))]
        s["n_tokens"] += n
        s["zero"] += zero_w.sum().long()
        for j in range(len(self.eps_grid)):
            s["near_zero"][j] += near_w[j].sum().long()
        s["neg"] += neg_w.sum().long()
        # float32 within a token (c entries), float64 across tokens (METRICS.md conventions):
        # no float64 copy of the whole tensor.
        s["sum"] += valid.sum(1).double().sum()
        s["sum_abs"] += a.sum(1).double().sum()
        s["sum_sq"] += torch.linalg.vecdot(valid, valid).double().sum()
        amax = a.max()
        if not bool(torch.isfinite(amax)):
            s["nonfinite"] += (~torch.isfinite(valid)).sum()
        s["max_abs"] = torch.maximum(s["max_abs"], amax.double())
        s["channel_active"] += nzf.sum(0).long()
        frac = per_token_nz.double() / c
        s["token_nz_sum"] += frac.sum()
        bins = (frac * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        s["token_hist"] += torch.bincount(bins, minlength=HIST_BINS)
        chunk_w, nchunk_w = self._update_chunks(a, lens)
        f64 = dict(dtype=torch.float64, device=zero_w.device)
        rows = torch.stack([torch.tensor(lens, **f64), zero_w, neg_w, *near_w, chunk_w.to(**f64),
                            nchunk_w.to(**f64)], dim=1)  # [batch, window_fields]
        self._add_windows(rows, lens)

    def _add_windows(self, rows, lens: list[int]) -> None:
        ids = None
        if self.tags is not None:
            ids = getattr(self.tags, "ids", None)
            if ids is None or len(ids) != len(lens):
                raise ValueError(f"window tags give {0 if ids is None else len(ids)} ids for a batch of {len(lens)} "
                                 "windows")
        keep = [i for i, L in enumerate(lens) if L > 0]  # a window with no counted token tells nothing
        if len(keep) != len(lens):
            rows = rows[keep]
            ids = [ids[i] for i in keep] if ids is not None else None
        if keep:
            self._window_values().add(ids, rows)

    def _window_values(self):
        from probes.uncertainty import WindowValues

        return WindowValues(window_fields(self.eps_grid), self.windows)

    def _update_chunks(self, a, lens: list[int]):
        """Union of non-zero channels over each run of k consecutive counted tokens of a sequence.

        Returns the chunk-sparsity sum and the number of full chunks per window (float64 ``[batch]`` each)."""
        import torch

        k, c = self.chunk_k, a.shape[1]
        B = len(lens)
        f64 = dict(dtype=torch.float64, device=a.device)
        if k <= 0:
            return torch.zeros(B, **f64), torch.zeros(B, **f64)
        if len(set(lens)) == 1:  # equal lengths: one reshape, no loop
            L, full = lens[0], lens[0] // k
            if not full:
                return torch.zeros(B, **f64), torch.zeros(B, **f64)
            blocks = a.view(len(lens), L, c)[:, :full * k].reshape(-1, k, c)
            u = torch.count_nonzero(blocks.sum(1), dim=1)  # |a| >= 0: a chunk's sum is 0 iff all are 0
            per = 1.0 - u.double() / c
            chunk_w = per.view(B, full).sum(1)
            nchunk_w = torch.full((B,), float(full), **f64)
        else:
            parts, off, counts = [], 0, []
            for L in lens:
                full = L // k
                if full:
                    parts.append(torch.count_nonzero(a[off:off + full * k].view(full, k, c).sum(1), dim=1))
                counts.append(full)
                off += L
            if not parts:
                return torch.zeros(B, **f64), torch.zeros(B, **f64)
            u = torch.cat(parts)
            per = 1.0 - u.double() / c
            nchunk_w = torch.tensor(counts, **f64)
            row = torch.repeat_interleave(torch.arange(B, device=a.device), torch.tensor(counts, device=a.device))
            chunk_w = torch.zeros(B, **f64).index_add_(0, row, per)
        self.state["chunk_sum"] += per.sum()
        self.state["n_chunks"] += u.numel()
        return chunk_w, nchunk_w

    # ------------------------------------------------------------------ merge / results
    def merge(self, other: "ActivationSparsityProbe") -> "ActivationSparsityProbe":
        import torch

        if (other.width, other.eps_grid, other.chunk_k) != (self.width, self.eps_grid, self.chunk_k):
            raise ValueError("cannot merge probes with different width, eps grid or chunk size")
        if other.windows.get("global") != self.windows.get("global"):
            raise ValueError("cannot merge a probe whose windows carry global indices with one numbered by arrival")
        for k, op in self.REDUCE.items():
            b = other.state[k].to(self.state[k].device)
            self.state[k] = self.state[k] + b if op == "sum" else torch.maximum(self.state[k], b)
        self._window_values().merge(other._window_values(), offset_arrival=not self.windows.get("global"))
        return self

    # ------------------------------------------------------------------ error bars (probes.uncertainty)
    def window_ratios(self) -> tuple[Any, dict[str, tuple[Any, Any]]]:
        """``(window ids [m], {column: (numerator [m], denominator [m])})`` for the ``uncertain_columns``:
        each column is sum(numerator) / sum(denominator) over windows (``nonzero_pct_per_token`` scaled
        by 100: for a fixed width it is 100 * (1 - zero_frac))."""
        ids, v = self._window_values().arrays()
        f = {name: v[:, i] for i, name in enumerate(window_fields(self.eps_grid))}
        ent = f["n_tokens"] * self.width
        out = {"zero_frac": (f["zero"], ent)}
        for e in self.eps_grid:
            out[f"near_zero_frac@{eps_label(e)}"] = (f[f"near_zero@{eps_label(e)}"], ent)
        out["nonzero_pct_per_token"] = (100.0 * (ent - f["zero"]), ent)
        if self.chunk_k > 0:
            out[f"chunk_sparsity@{self.chunk_k}"] = (f["chunk_sum"], f["n_chunks"])
        out["neg_frac"] = (f["neg"], ent)
        return ids, out

    def se_row(self) -> dict[str, Any]:
        """``n_windows`` (windows with a counted token) and ``X_se`` (``bar_column``), the analytic standard error
        over windows (``probes.uncertainty.ratio_se``) of each ``uncertain_columns`` column."""
        from probes.uncertainty import bar_column, ratio_se

        ids, ratios = self.window_ratios()
        row: dict[str, Any] = {"n_windows": int(len(ids))}
        for col, (num, den) in ratios.items():
            row[bar_column(col, "_se")] = ratio_se(num, den)
        return row

    def to_row(self) -> dict[str, Any]:
        s = {k: v.detach().cpu() for k, v in self.state.items()}
        n = int(s["n_tokens"])
        c = self.width
        ent = n * c
        nan = float("nan")
        row: dict[str, Any] = {"n_tokens": n, "width": c}
        row["zero_frac"] = int(s["zero"]) / ent if ent else nan
        for e, cnt in zip(self.eps_grid, s["near_zero"].tolist()):
            row[f"near_zero_frac@{eps_label(e)}"] = cnt / ent if ent else nan
        row["nonzero_pct_per_token"] = 100.0 * float(s["token_nz_sum"]) / n if n else nan
        for q in (5, 50, 95):
            row[f"nonzero_pct_per_token_p{q:02d}_hist"] = _hist_quantile(s["token_hist"].tolist(), q / 100) * 100
        active = s["channel_active"]
        row["dead_neurons"] = int((active == 0).sum()) if n else 0
        row["dead_frac"] = row["dead_neurons"] / c if n else nan
        row["always_on_neurons"] = int((active == n).sum()) if n else 0
        row["always_on_frac"] = row["always_on_neurons"] / c if n else nan
        nch = int(s["n_chunks"])
        row[f"chunk_sparsity@{self.chunk_k}"] = float(s["chunk_sum"]) / nch if nch else nan
        row["n_chunks"] = nch
        row["neg_frac"] = int(s["neg"]) / ent if ent else nan
        row["mean"] = float(s["sum"]) / ent if ent else nan
        row["mean_abs"] = float(s["sum_abs"]) / ent if ent else nan
        row["rms"] = math.sqrt(float(s["sum_sq"]) / ent) if ent else nan
        row["max_abs"] = float(s["max_abs"]) if n else nan
        row["nonfinite"] = int(s["nonfinite"])
        return row


class _RowSums:
    """Per-window sums of per-token values ``[n_valid]`` (in (batch, pos) order) as float64 ``[batch]``."""

    def __init__(self, lens: list[int], full_rows: bool, device: Any):
        import torch

        self.B = len(lens)
        self.full = full_rows
        if not full_rows:
            self.row = torch.repeat_interleave(torch.arange(self.B, device=device),
                                               torch.tensor(lens, device=device))

    def __call__(self, t):
        import torch

        if self.full:
            return t.view(self.B, -1).double().sum(1)
        return torch.zeros(self.B, dtype=torch.float64, device=t.device).index_add_(0, self.row, t.double())


def _hist_quantile(counts: list[int], q: float) -> float:
    """Quantile from a fixed-bin histogram on [0, 1], linear within the bin (a bounded approximation)."""
    total = sum(counts)
    if total == 0:
        return float("nan")
    target = q * total
    run = 0
    for i, cnt in enumerate(counts):
        if cnt and run + cnt >= target:
            return (i + (target - run) / cnt) / len(counts)
        run += cnt
    return 1.0
