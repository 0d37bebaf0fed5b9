"""Massive activations (METRICS.md section 5): streaming, mergeable probes on the residual stream.

Two anchors, two medians, kept apart in column names:

- Sun et al. 2024 (arXiv 2402.17762; locuslab/massive-activations main_llm.py --exp2): per
  sequence and layer, the top-1/2/3 of |h| and the LOWER median of |h| over the whole
  token x channel tensor (``torch.median``'s convention: ``torch.kthvalue``'s value on that sequence's
  flattened tensor, selected by numpy where there is no NaN, ``probes.selection``), each averaged over sequences
  (``top1_mean`` ... ``median_mean``). An entry is massive when |a| > 100 AND
  |a| >= 1000 x its sequence's whole-tensor median (``n_massive``).
- Max_act_llm (clx1415926/Max_act_llm analyze_model.py): per token, max |h| over channels
  divided by that token's own lower median over channels (``token_ratio_*``,
  ``token_median_mean``); a token is massive when its max > 100 and its ratio > 1000
  (``n_massive_tokens``, the reference's strict inequalities); and its pooled layer-wide |x|
  quantiles ``abs_median`` ... ``abs_q999`` (analyze_model.py ``StatsAccumulator._update_sun`` /
  ``finalize``: a 512-bin log10 histogram over [1e-8, 1e8], zeros apart; ``maxact_abs_quantile``).

Sun et al.'s exp3 (``--intervene``: ``probes.massive_intervene``) and exp4 (``--attention``:
``probes.attention_sinks``) run after the main pass, on the same sequences.

Nothing is stored across sequences: state is O(channels + top_k + max positions), and two
probes of the same site ``merge`` into the state of one run over both inputs.

Layout: the probe, the INT8 check (Max_act_llm quant_sanity_check.py), and the run; the presets
that draw each paper's sequences (its data set-up, on ``probes.data``) are ``probes.massive_presets``
(re-exported here). Size (~890 lines), for now: the INT8 check (``int8_fake_quant``,
``AbsLogHistogram``, ``Int8ErrorProbe``, ``int8_split``, ``_int8_check``) is the part to move out
next, into its own module; it stays here while its calibration is reworked (issue 14).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes.data import CorpusOptions, TokenData, pad_id, sequence_windows
from probes.errors import DataError, ModelError, unknown_name
from probes.massive_presets import (  # noqa: F401  (re-exported: callers import them from here)
    FAMILY_SEQ_LEN, MAX_DOCS_SUN, NO_ORDINARY_TOKENS, PRESETS, SUN_DEFAULT_SEQ_LEN, Preset, Sample, _ordinary,
    _tokenize, build_samples, family_seq_len, resolve_preset)
from probes.selection import column_max_first, kth_smallest_and_top_rows, kth_smallest_rows, largest_entries

SUN_ABS_THRESHOLD = 100.0  # |a| > 100 (Sun et al. 2024, section 2)
SUN_RATIO_THRESHOLD = 1000.0  # |a| >= 1000 x whole-tensor median
TOKEN_ABS_THRESHOLD = 100.0  # Max_act_llm _SUN_T_VAL (strict >)
TOKEN_RATIO_THRESHOLD = 1000.0  # Max_act_llm _SUN_T_RATIO (strict >)
DEFAULT_TOP_K = 100
DEFAULT_CLIP_QUANTILE = 0.999
INT8_QMAX = 127
# INT8 calibration (Max_act_llm quant_sanity_check.py run_model: scales from the first 128 samples, errors on the
# next 256): "held-out" splits the run's sequences the same way, by sample id, the first third (n // 3, at
# least 1: the reference's 128 of 128 + 256) for calibration (``int8_split``)
INT8_CALIBRATIONS = ("held-out", "in-sample")
LOG_HIST_BINS = 8192
LOG_HIST_DECADES = 7.0  # the |x| histogram covers [max * 1e-7, max]
SUN_DEFAULT_PROMPT = "Summer is warm. Winter is cold."  # main_llm.py --exp1
# Max_act_llm analyze_model.py StatsAccumulator._ABSMED_*: layer-wide |x| log histogram, 512 bins over
# log10 |x| in [-8, 8] (~7 % wide), zeros counted apart; quantiles by StatsAccumulator.finalize's rule
MAXACT_ABS_BINS = 512
MAXACT_ABS_LOG_MIN = -8.0
MAXACT_ABS_LOG_MAX = 8.0
MAXACT_ABS_QUANTILES = (("abs_median", 0.5), ("abs_q25", 0.25), ("abs_q75", 0.75), ("abs_q90", 0.90),
                        ("abs_q99", 0.99), ("abs_q999", 0.999))


def maxact_abs_bins(a):
    """Bin index of each |x| > 0 in Max_act_llm's layer-wide histogram (analyze_model.py ``_update_sun``:
    floor((log10 |x| + 8) / 16 x 512), clamped to [0, 511]); |x| = inf or NaN goes to the last bin."""
    import torch

    span = MAXACT_ABS_LOG_MAX - MAXACT_ABS_LOG_MIN
    lg = torch.log10(a.double())
    # The same operations in the same order, in place on the one float64 buffer (each out-of-place step
    # allocated another: 2.7x on 6M values). Clamping to [0, 511] before the conversion to integers instead of
    # after gives the same bins: every value is finite here (tests/unit/test_massive.py checks every edge).
    torch.nan_to_num_(lg, nan=MAXACT_ABS_LOG_MAX, posinf=MAXACT_ABS_LOG_MAX)
    return lg.sub_(MAXACT_ABS_LOG_MIN).div_(span).mul_(MAXACT_ABS_BINS).floor_().clamp_(0, MAXACT_ABS_BINS - 1).long()


_ABS_BIN_TABLES: dict[str, Any] = {}
# MassiveProbe.update's faster routes to the same numbers (numpy's selection, the bin tables, counting the rare
# massive entries by their coordinates); False takes torch's own calls throughout (the tests compare the two)
_FAST_PATHS = True


def _abs_bin_tables(device: Any):
    """``(first, edge)`` for ``maxact_abs_bins_table``: per cell of 2^16 consecutive non-negative float32 bit
    patterns (the top 15 bits), the bin of the cell's smallest value and the smallest value of the cell in the
    next bin (NaN where the whole cell is in one bin). Built with ``maxact_abs_bins`` itself, once per device.
    A cell spans under 1 % of |x| and a bin ~7.5 % (1/32 decade), so a cell meets at most one bin edge
    (checked here; a failed check returns None and the caller keeps ``maxact_abs_bins``). The edge is found by
    bisection, which relies on the bins growing with |x| over float32 values: they do, since two float32
    values' log10 differ by far more than the float64 rounding of log10 (``tests/unit/test_massive.py``
    compares every cell's edges and 2M random patterns with ``maxact_abs_bins``)."""
    import torch

    key = str(device)
    if key not in _ABS_BIN_TABLES:
        cells = torch.arange(1 << 15, dtype=torch.int64)
        lo_bits = cells << 16
        first = maxact_abs_bins(_f32(lo_bits))
        last = maxact_abs_bins(_f32(lo_bits | 0xFFFF))
        if bool(((last - first) > 1).any()):
            _ABS_BIN_TABLES[key] = None
            return None
        step = last > first
        lo = torch.zeros_like(cells)  # bisection on the low 16 bits: bin(lo) == first, bin(hi) > first
        hi = torch.where(step, torch.full_like(cells, 0xFFFF), torch.zeros_like(cells))
        for _ in range(17):
            mid = (lo + hi) // 2
            up = maxact_abs_bins(_f32(lo_bits | mid)) > first
            hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
        edge = torch.where(step, _f32(lo_bits | hi), torch.full((1 << 15,), math.nan))
        _ABS_BIN_TABLES[key] = (first.to(device, torch.int16), edge.to(device))
    return _ABS_BIN_TABLES[key]


def _f32(bits):
    """float32 values of int64 bit patterns below 2^31."""
    import torch

    return bits.to(torch.int32).view(torch.float32)


def maxact_abs_bins_table(a):
    """``maxact_abs_bins(a)`` for a float32 tensor of |x| (sign bits clear), zeros included (bin 0), from two
    table look-ups by the top 15 bits and one comparison instead of a float64 log10 (~5x on 6M values); None
    where the tables cannot be built (``_abs_bin_tables``). int16 bins."""
    import torch

    tables = _abs_bin_tables(a.device) if a.dtype == torch.float32 else None
    if tables is None:
        return None
    first, edge = tables
    a = a.contiguous()
    cell = a.view(torch.int32) >> 16
    # index_select, not first[cell]: 2.2 ms against 27 ms for 6M look-ups
    return first.index_select(0, cell) + (a >= edge.index_select(0, cell))


_HIST_CHUNK = 1 << 20  # entries per chunk: ~10 MB of temporaries that malloc reuses from chunk to chunk


def _abs_hist_table(flat):
    """``bincount(maxact_abs_bins_table(flat), minlength=512)`` (zeros in bin 0), over chunks of ``_HIST_CHUNK``
    entries: whole-tensor temporaries (25 MB each at 4096 x 1536) were fresh memory at every call inside a
    forward and cost their page faults (65 ms a call there against 9 ms alone); None without the tables."""
    import torch

    hist = None
    for part in flat.split(_HIST_CHUNK):
        bins = maxact_abs_bins_table(part)
        if bins is None:
            return None
        counts = torch.bincount(bins, minlength=MAXACT_ABS_BINS)
        hist = counts if hist is None else hist.add_(counts)
    return hist


def maxact_abs_quantile(hist: Sequence[int], n_zero: int, total: int, q: float) -> float:
    """Max_act_llm analyze_model.py ``StatsAccumulator.finalize`` ``quantile(q)``: target q x total; 0 when it
    falls in the zero bucket; else the first bin whose cumulative count reaches it, log-linear inside it."""
    if total <= 0:
        return math.nan
    target = q * total
    if target <= n_zero:
        return 0.0
    t = target - n_zero
    span = MAXACT_ABS_LOG_MAX - MAXACT_ABS_LOG_MIN
    width = span / MAXACT_ABS_BINS
    run = 0
    last = len(hist) - 1
    for i, c in enumerate(hist):
        prev, run = run, run + int(c)
        if run >= t or i == last:
            frac = ((t - prev) / c) if c > 0 else 0.5
            return float(10.0 ** (MAXACT_ABS_LOG_MIN + i * width + frac * width))
    return math.nan


def lower_median(x):
    """Lower median of all entries of ``x`` (``torch.median``'s convention): the ((n + 1) // 2)-th smallest."""
    flat = x.reshape(-1)
    return flat.kthvalue((flat.numel() + 1) // 2).values


class BatchContext:
    """What the probes need to know about the current batch beyond the tensor: sample ids, token ids
    and the position of each row's first delimiter ('.' or newline; -1 if none). Set by the forward."""

    def __init__(self):
        self.sample_ids = None  # LongTensor [B]
        self.token_ids = None  # LongTensor [B, T]
        self.first_delim = None  # LongTensor [B]

    def set(self, sample_ids, token_ids, first_delim) -> None:
        self.sample_ids, self.token_ids, self.first_delim = sample_ids, token_ids, first_delim


# ---------------------------------------------------------------------------------------------- the probe
_SUM = ("n_seq", "n_tokens", "sum_top1", "sum_top2", "sum_top3", "sum_median", "n_massive", "n_massive_first_token",
        "n_massive_first_delim", "n_seq_with_massive", "n_nonfinite", "n_massive_tokens", "sum_token_ratio",
        "sum_token_median", "chan_massive", "chan_massive_first_token", "chan_massive_first_delim",
        "abs_hist", "abs_hist_zero", "abs_hist_count")


def _wins(new_abs, new_sample, old_abs, old_sample):
    """Where a new per-channel maximum replaces the old: larger |a|, or equal |a| from an earlier
    sample (|a| = -1 marks no counted entry and never wins a tie), so the result does not depend
    on the order in which batches or ranks are merged."""
    tie = (new_abs == old_abs) & (new_abs >= 0) & ((old_sample < 0) | (new_sample < old_sample))
    return (new_abs > old_abs) | tie


# per-sequence values kept for the error bars, and the columns that get them
SEQ_FIELDS = ("top1", "top2", "top3", "median")
BAR_COLUMNS = ("top1_mean", "median_mean", "ratio_top1_median")

_TOPK_FIELDS = ("abs", "value", "sample", "position", "channel", "token_id", "seq_median", "token_median")


class MassiveProbe:
    """Massive-activation statistics of one site's activations ``[batch, pos, channels]``."""

    name = "massive"

    def __init__(self, width: int, device: Any = "cpu", top_k: int = DEFAULT_TOP_K, ctx: BatchContext | None = None,
                 seed: int = 0):
        import torch

        from probes.uncertainty import new_state

        self.width, self.top_k, self.ctx = int(width), int(top_k), ctx
        self.seed = int(seed)  # of the bootstrap over sequences (error bars)
        # per sequence (top1, top2, top3, median), keyed by sample id (probes.uncertainty.WindowValues state):
        # O(sequences), for the error bars of top*_mean / median_mean / ratio_top1_median
        self.windows = {**new_state(), "global": ctx is not None}
        f64 = dict(dtype=torch.float64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        C = self.width
        self.state: dict[str, Any] = {
            "n_seq": torch.zeros((), **i64), "n_tokens": torch.zeros((), **i64),
            "sum_top1": torch.zeros((), **f64), "sum_top2": torch.zeros((), **f64),
            "sum_top3": torch.zeros((), **f64), "sum_median": torch.zeros((), **f64),
            "max_seq_ratio": torch.zeros((), **f64),
            "n_massive": torch.zeros((), **i64), "n_massive_first_token": torch.zeros((), **i64),
            "n_massive_first_delim": torch.zeros((), **i64), "n_seq_with_massive": torch.zeros((), **i64),
            "n_nonfinite": torch.zeros((), **i64),
            "max": torch.full((), -math.inf, **f32), "min": torch.full((), math.inf, **f32),
            # per-token (Max_act_llm)
            "n_massive_tokens": torch.zeros((), **i64), "sum_token_ratio": torch.zeros((), **f64),
            "sum_token_median": torch.zeros((), **f64),
            "max_token_ratio": torch.full((), -1.0, **f32), "max_token_ratio_abs": torch.zeros((), **f32),
            "max_token_ratio_median": torch.zeros((), **f32),
            # per channel
            "chan_max_abs": torch.full((C,), -1.0, **f32), "chan_value": torch.zeros(C, **f32),
            "chan_sample": torch.full((C,), -1, **i64), "chan_position": torch.full((C,), -1, **i64),
            "chan_massive": torch.zeros(C, **i64), "chan_massive_first_token": torch.zeros(C, **i64),
            "chan_massive_first_delim": torch.zeros(C, **i64),
            # per position (bounded by the longest sequence, not by the number of sequences)
            "pos_massive": torch.zeros(0, **i64),
            # Max_act_llm's pooled layer-wide |x| histogram (every counted entry of every sequence)
            "abs_hist": torch.zeros(MAXACT_ABS_BINS, **i64), "abs_hist_zero": torch.zeros((), **i64),
            "abs_hist_count": torch.zeros((), **i64),
            # top-K entries with coordinates; they start empty and grow to min(K, entries seen), so memory
            # follows the data measured, not the --top-k given (abs = -1 would mark an empty slot)
            "topk_abs": torch.zeros(0, **f32), "topk_value": torch.zeros(0, **f32),
            "topk_sample": torch.zeros(0, **i64), "topk_position": torch.zeros(0, **i64),
            "topk_channel": torch.zeros(0, **i64), "topk_token_id": torch.zeros(0, **i64),
            "topk_seq_median": torch.zeros(0, **f32), "topk_token_median": torch.zeros(0, **f32),
        }
        self._n_rows_seen = 0  # fallback sample ids when no BatchContext is given

    # ------------------------------------------------------------------------------------------ update
    def update(self, x, mask=None) -> None:
        """``x``: ``[batch, pos, channels]`` (or ``[batch, channels]``); ``mask``: ``[batch, pos]`` bool."""
        import torch

        if x.dim() == 2:
            x = x.unsqueeze(1)  # [batch, 1, channels]: one token per sample
        if x.shape[-1] != self.width:
            raise ValueError(f"probe built for width {self.width}, got {x.shape[-1]}")
        dev = x.device
        x = x.float()  # statistics in float32 whatever the model dtype (fp16 infs stay inf)
        B, T, C = x.shape
        mask = torch.ones((B, T), dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
        sample_ids, token_ids, first_delim = self._context(B, T, dev)
        s = self.state
        a = x.abs()  # [B, T, C]
        m3 = mask.unsqueeze(-1)  # [B, T, 1]
        lens = mask.sum(1)  # [B]
        rows = lens > 0  # sequences with at least one counted position
        full = bool(mask.all())  # every position counts: no masked copies below
        # Non-finite entries only where the largest |a| is (amax propagates NaN: 0.5 ms against isfinite's 9 ms
        # on 4096 x 1536). The order statistics go through numpy's selection where there is no NaN
        # (probes.selection).
        nonfinite = None if a.numel() == 0 or bool(torch.isfinite(a.amax())) else ~torch.isfinite(x)
        nan_free = _FAST_PATHS and (nonfinite is None or not bool(torch.isnan(x).any()))

        am = a if full else a.masked_fill(~m3, -1.0)  # [B, T, C]; -1 marks positions that do not count
        # The top-K entries of this batch (merged into the running top-K below). Entries tied with the k-th
        # value: the first in (sample, position, channel) order, so the top-K does not depend on how the data
        # was split into batches or ranks.
        vals, idx = largest_entries(am.reshape(-1), self.top_k, nan_free)
        # One sequence, every position counted: its top-3 are the top-K's three largest (one selection fewer)
        known = vals if B == 1 and full and nan_free and vals.numel() >= min(3, a.numel()) else None
        # Sun et al.: per-sequence top-3 and lower median over the whole token x channel tensor.
        top, med = self._per_sequence_top3_median(a, mask, lens, nan_free, known)  # [B, 3], [B]
        nrow = rows.sum()
        s["n_seq"] = s["n_seq"] + nrow
        for j in range(3):
            s[f"sum_top{j + 1}"] = s[f"sum_top{j + 1}"] + torch.where(rows, top[:, j], 0.0).double().sum()
        s["sum_median"] = s["sum_median"] + torch.where(rows, med, 0.0).double().sum()
        seq_ratio = torch.where(rows, top[:, 0] / med.clamp_min(torch.finfo(torch.float32).tiny), -1.0)
        s["max_seq_ratio"] = torch.maximum(s["max_seq_ratio"], seq_ratio.max().double())
        if bool(rows.any()):
            self._seq_values().add(sample_ids[rows], torch.cat([top, med[:, None]], 1)[rows].double())

        # Massive entries: |a| > 100 and |a| >= 1000 x that sequence's median. They are rare, so their coordinates
        # are counted instead of summing [B, T, C] masks (the sums took 78 ms an update at 4096 x 1536), and
        # with no entry above 100 (each sequence's top-1 says so) there is none to look for.
        if nan_free and not bool((top[:, 0] > SUN_ABS_THRESHOLD).any()):
            hit = torch.zeros((0, 3), dtype=torch.long, device=dev)
        else:
            massive = (a > SUN_ABS_THRESHOLD) & (a >= SUN_RATIO_THRESHOLD * med.view(B, 1, 1))  # [B, T, C]
            if not full:
                massive &= m3
            hit = massive.nonzero()  # [n, 3]: (row, position, channel)
        hb, ht, hc = hit.unbind(1)
        n_row = torch.bincount(hb, minlength=B)  # [B]
        s["n_massive"] = s["n_massive"] + n_row.sum()
        s["n_seq_with_massive"] = s["n_seq_with_massive"] + (n_row > 0).sum()
        s["chan_massive"] = s["chan_massive"] + torch.bincount(hc, minlength=C)
        first = ht == 0
        s["n_massive_first_token"] = s["n_massive_first_token"] + first.sum()
        s["chan_massive_first_token"] = s["chan_massive_first_token"] + torch.bincount(hc[first], minlength=C)
        has_delim = first_delim > 0  # position 0 is already counted as the first token
        fd = first_delim.clamp(0, T - 1)
        at_delim = has_delim[hb] & (ht == fd[hb])
        s["n_massive_first_delim"] = s["n_massive_first_delim"] + at_delim.sum()
        s["chan_massive_first_delim"] = s["chan_massive_first_delim"] + torch.bincount(hc[at_delim], minlength=C)
        pm = s["pos_massive"]
        if pm.numel() < T:
            pm = torch.cat([pm, torch.zeros(T - pm.numel(), dtype=pm.dtype, device=pm.device)])
        pm = pm.clone()
        pm[:T] += torch.bincount(ht, minlength=T)
        s["pos_massive"] = pm

        # Max_act_llm: pooled |x| histogram of every counted entry (zeros apart).
        flat = (a if full else a[mask]).reshape(-1)  # every counted entry
        zero = flat <= 0
        n_zero = torch.count_nonzero(zero)  # a bool tensor's .sum() took 19 ms on 6M entries, this 0.9 ms
        s["abs_hist_zero"] = s["abs_hist_zero"] + n_zero
        s["abs_hist_count"] = s["abs_hist_count"] + flat.numel()
        hist = _abs_hist_table(flat) if _FAST_PATHS and flat.numel() else None
        if hist is not None:  # zeros fall in bin 0 there: taken out again
            hist[0] -= n_zero
            s["abs_hist"] = s["abs_hist"] + hist
        else:
            nz = flat[~zero]
            if nz.numel():
                s["abs_hist"] = s["abs_hist"] + torch.bincount(maxact_abs_bins(nz), minlength=MAXACT_ABS_BINS)

        # Signed extremes and overflow (fp16 saturates to inf above 65504).
        s["max"] = torch.maximum(s["max"], (x if full else x.masked_fill(~m3, -math.inf)).amax())
        s["min"] = torch.minimum(s["min"], (x if full else x.masked_fill(~m3, math.inf)).amin())
        if nonfinite is not None:
            s["n_nonfinite"] = s["n_nonfinite"] + torch.count_nonzero(nonfinite if full else nonfinite & m3)

        # Max_act_llm: per-token max over its own lower median across channels.
        tok_max = a.amax(-1)  # [B, T]
        tok_med = kth_smallest_rows(a.reshape(B * T, C), (C + 1) // 2, nan_free).view(B, T)  # lower median
        ratio = tok_max / tok_med.clamp_min(torch.finfo(torch.float32).tiny)
        s["n_tokens"] = s["n_tokens"] + mask.sum()
        s["n_massive_tokens"] = s["n_massive_tokens"] + ((tok_max > TOKEN_ABS_THRESHOLD)
                                                         & (ratio > TOKEN_RATIO_THRESHOLD) & mask).sum()
        s["sum_token_ratio"] = s["sum_token_ratio"] + torch.where(mask, ratio, 0.0).double().sum()
        s["sum_token_median"] = s["sum_token_median"] + torch.where(mask, tok_med, 0.0).double().sum()
        r = ratio.masked_fill(~mask, -1.0).reshape(-1)
        i = r.argmax()
        better = r[i] > s["max_token_ratio"]
        s["max_token_ratio"] = torch.where(better, r[i], s["max_token_ratio"])
        s["max_token_ratio_abs"] = torch.where(better, tok_max.reshape(-1)[i], s["max_token_ratio_abs"])
        s["max_token_ratio_median"] = torch.where(better, tok_med.reshape(-1)[i], s["max_token_ratio_median"])

        # Per channel: max |a| with the signed value and where it was.
        cmax, cidx = column_max_first(am.reshape(B * T, C), nan_free)  # [C]; ties: the first (sample, position)
        cval = x.reshape(B * T, C).gather(0, cidx.unsqueeze(0)).squeeze(0)
        upd = _wins(cmax, sample_ids[cidx // T], s["chan_max_abs"], s["chan_sample"])
        s["chan_max_abs"] = torch.where(upd, cmax, s["chan_max_abs"])
        s["chan_value"] = torch.where(upd, cval, s["chan_value"])
        s["chan_sample"] = torch.where(upd, sample_ids[cidx // T], s["chan_sample"])
        s["chan_position"] = torch.where(upd, cidx % T, s["chan_position"])

        # The batch's top-K (above), merged into the running top-K on the device.
        b, t, c = idx // (T * C), (idx // C) % T, idx % C
        new = {"abs": vals, "value": x.reshape(-1)[idx], "sample": sample_ids[b], "position": t, "channel": c,
               "token_id": token_ids[b, t], "seq_median": med[b], "token_median": tok_med[b, t]}
        self._merge_topk(new)

    def _context(self, B: int, T: int, dev):
        import torch

        ctx = self.ctx
        if ctx is not None and ctx.sample_ids is not None and ctx.sample_ids.numel() == B:
            tok = ctx.token_ids
            if tok is None or tuple(tok.shape) != (B, T):
                tok = torch.full((B, T), -1, dtype=torch.long, device=dev)
            fd = ctx.first_delim if ctx.first_delim is not None else torch.full((B,), -1, dtype=torch.long)
            return ctx.sample_ids.to(dev), tok.to(dev), fd.to(dev)
        ids = torch.arange(self._n_rows_seen, self._n_rows_seen + B, device=dev)
        self._n_rows_seen += B
        return ids, torch.full((B, T), -1, dtype=torch.long, device=dev), torch.full((B,), -1, dtype=torch.long,
                                                                                      device=dev)

    @staticmethod
    def _per_sequence_top3_median(a, mask, lens, nan_free: bool = False, known=None):
        """Per sequence: top-3 (NaN-padded if fewer entries) and lower median of |h| over counted positions
        (``probes.selection``: numpy's selection when ``nan_free``, else torch's ``kthvalue`` and ``topk``).
        ``known``: with one fully counted sequence, values of its largest entries (at least 3 of them, or all)."""
        import torch

        B, T, C = a.shape
        top = torch.full((B, 3), math.nan, dtype=a.dtype, device=a.device)
        med = torch.zeros(B, dtype=a.dtype, device=a.device)
        if B and bool((mask == mask[:1]).all()):  # same counted positions in every row: one batched call
            sel = a if bool(mask[0].all()) else a[:, mask[0]]
            flat = sel.reshape(B, -1)
            n = flat.shape[1]
            if n:
                k = min(3, n)
                if known is not None:
                    med = kth_smallest_rows(flat, (n + 1) // 2, nan_free)
                    top[0, :k] = known.topk(k).values
                else:
                    med, top[:, :k] = kth_smallest_and_top_rows(flat, (n + 1) // 2, k, nan_free)
            return top, med
        for bi in range(B):
            if int(lens[bi]) == 0:
                continue
            flat = a[bi][mask[bi]].reshape(1, -1)
            n = flat.shape[1]
            k = min(3, n)
            m, top[bi, :k] = kth_smallest_and_top_rows(flat, (n + 1) // 2, k, nan_free)
            med[bi] = m[0]
        return top, med

    def _merge_topk(self, new: dict[str, Any]) -> None:
        import torch

        s = self.state
        dev = s["topk_abs"].device
        cand = {f: torch.cat([s[f"topk_{f}"], new[f].to(dev, s[f"topk_{f}"].dtype)]) for f in ("abs", "sample",
                                                                                            "position", "channel")}
        # Largest |a| first; ties by (sample, position, channel): stable sorts, last key first.
        order = torch.arange(cand["abs"].numel(), device=dev)
        for f in ("channel", "position", "sample"):
            order = order[torch.sort(cand[f][order], stable=True).indices]
        order = order[torch.sort(cand["abs"][order], descending=True, stable=True).indices]
        keep = order[: min(self.top_k, order.numel())]
        for f in _TOPK_FIELDS:
            s[f"topk_{f}"] = torch.cat([s[f"topk_{f}"], new[f].to(s[f"topk_{f}"].device, s[f"topk_{f}"].dtype)])[keep]

    # ------------------------------------------------------------------------------------------ merge
    def merge(self, other: "MassiveProbe") -> "MassiveProbe":
        import torch

        if (other.width, other.top_k) != (self.width, self.top_k):
            raise ValueError("cannot merge massive probes with different width or top_k")
        s, o = self.state, {k: v.to(self.state[k].device) for k, v in other.state.items()}
        for k in _SUM:
            s[k] = s[k] + o[k]
        s["max_seq_ratio"] = torch.maximum(s["max_seq_ratio"], o["max_seq_ratio"])
        s["max"] = torch.maximum(s["max"], o["max"])
        s["min"] = torch.minimum(s["min"], o["min"])
        better = o["max_token_ratio"] > s["max_token_ratio"]
        for k in ("max_token_ratio", "max_token_ratio_abs", "max_token_ratio_median"):
            s[k] = torch.where(better, o[k], s[k])
        upd = _wins(o["chan_max_abs"], o["chan_sample"], s["chan_max_abs"], s["chan_sample"])
        for k in ("chan_max_abs", "chan_value", "chan_sample", "chan_position"):
            s[k] = torch.where(upd, o[k], s[k])
        a, b = s["pos_massive"], o["pos_massive"]
        n = max(a.numel(), b.numel())
        pad = torch.nn.functional.pad
        s["pos_massive"] = pad(a, (0, n - a.numel())) + pad(b, (0, n - b.numel()))
        self._merge_topk({f: o[f"topk_{f}"] for f in _TOPK_FIELDS})
        if other.windows.get("global") != self.windows.get("global"):
            raise ValueError("cannot merge a massive probe keyed by sample id with one numbered by arrival")
        self._seq_values().merge(other._seq_values(), offset_arrival=not self.windows.get("global"))
        return self

    # ------------------------------------------------------------------------------------------ error bars
    def _seq_values(self):
        from probes.uncertainty import WindowValues

        return WindowValues(SEQ_FIELDS, self.windows)

    def seq_arrays(self):
        """``(sample ids [m], values [m, 4])``: per sequence top-1, top-2, top-3 and lower median of |h|."""
        return self._seq_values().arrays()

    def bar_row(self, n_resamples: int | None = None) -> dict[str, Any]:
        """Error bars over sequences (the units Sun et al. average over): ``X_se`` (analytic) and ``X_lo`` /
        ``X_hi`` (95 % percentile bootstrap over sequences, seeded by ``seed``, all columns from the same
        resamples) for X in ``BAR_COLUMNS``. top1_mean and median_mean are plain means of per-sequence values
        (se = sd / sqrt(m)); ratio_top1_median = sum top1 / sum median is a ratio of means: its se is the
        linearised (delta-method) ratio estimator's and its interval the bootstrap of the ratio of resampled
        means (``probes.uncertainty_extra.ratio_bars``)."""
        import numpy as np

        from probes.uncertainty import DEFAULT_RESAMPLES
        from probes.uncertainty_extra import ratio_bars

        _, v = self.seq_arrays()
        ones = np.ones(len(v))
        nums = np.stack([v[:, 0], v[:, 3], v[:, 0]], 1) if len(v) else np.zeros((0, 3))
        dens = np.stack([ones, ones, v[:, 3]], 1) if len(v) else np.zeros((0, 3))
        return ratio_bars(BAR_COLUMNS, nums, dens, seed=self.seed,
                          n_resamples=DEFAULT_RESAMPLES if n_resamples is None else n_resamples)

    # ------------------------------------------------------------------------------------------ results
    def to_row(self) -> dict[str, Any]:
        s = {k: v.detach().cpu() for k, v in self.state.items()}
        nan = float("nan")
        n_seq, n_tok = int(s["n_seq"]), int(s["n_tokens"])
        row: dict[str, Any] = {"n_sequences": n_seq, "n_tokens": n_tok, "width": self.width}
        for j in (1, 2, 3):
            row[f"top{j}_mean"] = float(s[f"sum_top{j}"]) / n_seq if n_seq else nan
        row["median_mean"] = float(s["sum_median"]) / n_seq if n_seq else nan
        row["ratio_top1_median"] = row["top1_mean"] / row["median_mean"] if n_seq and row["median_mean"] else nan
        row["seq_ratio_max"] = float(s["max_seq_ratio"]) if n_seq else nan
        n_m, n_ft, n_fd = int(s["n_massive"]), int(s["n_massive_first_token"]), int(s["n_massive_first_delim"])
        row.update(n_massive=n_m, n_massive_first_token=n_ft, n_massive_first_delim=n_fd,
                   n_massive_other=n_m - n_ft - n_fd, n_seq_with_massive=int(s["n_seq_with_massive"]))
        chans = self.massive_channels()
        row["massive_channels"] = ",".join(str(c) for c, _ in chans[:16])
        pos = s["pos_massive"]
        nz = [(int(p), int(pos[p])) for p in pos.nonzero().flatten().tolist()]
        nz.sort(key=lambda pc: (-pc[1], pc[0]))
        row["massive_positions"] = ",".join(f"{p}:{c}" for p, c in nz[:8])
        finite = n_tok > 0
        row["max"] = float(s["max"]) if finite else nan
        row["min"] = float(s["min"]) if finite else nan
        row["max_abs"] = max(abs(row["max"]), abs(row["min"])) if finite else nan
        top = self.topk()
        if top:
            p = top[0]
            row.update(peak_value=p["value"], peak_sample=p["sample"], peak_position=p["position"],
                       peak_channel=p["channel"], peak_token_id=p["token_id"])
            row["peak_seq_ratio"] = p["ratio_to_seq_median"]
            row["token_median_at_peak"] = p["token_median"]
            row["token_ratio_at_peak"] = p["ratio_to_token_median"]
        else:
            row.update(peak_value=nan, peak_sample=-1, peak_position=-1, peak_channel=-1, peak_token_id=-1,
                       peak_seq_ratio=nan, token_median_at_peak=nan, token_ratio_at_peak=nan)
        row["token_median_mean"] = float(s["sum_token_median"]) / n_tok if n_tok else nan
        row["token_ratio_mean"] = float(s["sum_token_ratio"]) / n_tok if n_tok else nan
        row["token_ratio_max"] = float(s["max_token_ratio"]) if n_tok else nan
        row["token_ratio_max_abs"] = float(s["max_token_ratio_abs"]) if n_tok else nan
        row["token_ratio_max_median"] = float(s["max_token_ratio_median"]) if n_tok else nan
        row["n_massive_tokens"] = int(s["n_massive_tokens"])
        row["n_nonfinite"] = int(s["n_nonfinite"])
        hist, n0, tot = s["abs_hist"].tolist(), int(s["abs_hist_zero"]), int(s["abs_hist_count"])
        for name, q in MAXACT_ABS_QUANTILES:
            row[name] = maxact_abs_quantile(hist, n0, tot, q)
        row["abs_hist_count"] = tot
        row["abs_hist_zero_frac"] = n0 / tot if tot else nan
        row.update(self.bar_row())  # after every measured column: X_se, X_lo, X_hi
        return row

    def topk(self) -> list[dict[str, Any]]:
        """Top-K entries by |a|, largest first, with coordinates and both raw ratios."""
        s = {f: self.state[f"topk_{f}"].detach().cpu().tolist() for f in _TOPK_FIELDS}
        out = []
        for r in range(len(s["abs"])):
            if s["abs"][r] < 0:  # empty slot (a NaN entry is kept: it is reported, not hidden)
                continue
            e = {f: s[f][r] for f in _TOPK_FIELDS}
            e["rank"] = len(out) + 1
            e["ratio_to_seq_median"] = _ratio(e["abs"], e["seq_median"])
            e["ratio_to_token_median"] = _ratio(e["abs"], e["token_median"])
            e["massive_sun"] = bool(e["abs"] > SUN_ABS_THRESHOLD and e["abs"] >= SUN_RATIO_THRESHOLD * e["seq_median"])
            out.append(e)
        return out

    def massive_channels(self) -> list[tuple[int, int]]:
        """(channel, number of massive entries), most frequent first."""
        cm = self.state["chan_massive"].detach().cpu()
        idx = cm.nonzero().flatten().tolist()
        return sorted(((int(c), int(cm[c])) for c in idx), key=lambda t: (-t[1], t[0]))

    def channel_arrays(self) -> dict[str, Any]:
        """Per-channel numpy arrays: max |a|, signed value there, sample, position, massive counts."""
        return {k[5:]: v.detach().cpu().numpy() for k, v in self.state.items() if k.startswith("chan_")}


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


# ---------------------------------------------------------------------------------------------- INT8
def int8_fake_quant(x, threshold: float, bits: int = 8):
    """Per-tensor symmetric quantisation with clip ``threshold`` (scale = threshold / qmax), dequantised.

    As Max_act_llm quant_sanity_check.py: clamp to [-T, T], round(x / scale), back to float.
    """
    import torch

    qmax = 2 ** (bits - 1) - 1
    scale = float(threshold) / qmax
    if scale <= 0:
        return torch.zeros_like(x)
    return torch.round(x.clamp(-threshold, threshold) / scale).clamp(-qmax, qmax) * scale


class AbsLogHistogram:
    """Fixed log-spaced histogram of |x| on [upper * 10^-7, upper] (8192 bins, ~0.2 % wide) for a quantile."""

    name = "abs_log_hist"

    def __init__(self, width: int, upper: float, device: Any = "cpu", bins: int = LOG_HIST_BINS,
                 decades: float = LOG_HIST_DECADES):
        import torch

        self.width, self.upper, self.bins, self.decades = int(width), float(upper), int(bins), float(decades)
        self.log_hi = math.log10(self.upper) if self.upper > 0 else 0.0
        self.log_lo = self.log_hi - self.decades
        self.state = {"hist": torch.zeros(self.bins, dtype=torch.int64, device=device),
                      "below": torch.zeros((), dtype=torch.int64, device=device),
                      "above": torch.zeros((), dtype=torch.int64, device=device),
                      "count": torch.zeros((), dtype=torch.int64, device=device),
                      "max": torch.zeros((), dtype=torch.float64, device=device)}  # max |x| seen (not binned)

    def update(self, x, mask=None) -> None:
        import torch

        v = (x[mask.to(x.device)] if mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1]))
        v = v.float().abs().reshape(-1)
        s = self.state
        s["count"] = s["count"] + v.numel()
        if v.numel():
            s["max"] = torch.maximum(s["max"], v.max().double())  # NaN propagates
        lo = 10.0 ** self.log_lo
        below = v < lo
        above = ~(v <= self.upper)  # > upper or NaN
        s["below"] = s["below"] + below.sum()
        s["above"] = s["above"] + above.sum()
        inside = v[~below & ~above]
        if inside.numel():
            idx = ((torch.log10(inside) - self.log_lo) / self.decades * self.bins).long().clamp_(0, self.bins - 1)
            s["hist"] = s["hist"] + torch.bincount(idx, minlength=self.bins)

    def merge(self, other: "AbsLogHistogram") -> "AbsLogHistogram":
        import torch

        for k in self.state:
            b = other.state[k].to(self.state[k].device)
            self.state[k] = torch.maximum(self.state[k], b) if k == "max" else self.state[k] + b
        return self

    @property
    def max_abs(self) -> float:
        return float(self.state["max"])

    def quantile(self, q: float) -> float:
        """Value at rank ceil(q * n) (1-based, ascending), geometric interpolation within the bin."""
        n = int(self.state["count"])
        if n == 0:
            return math.nan
        target = max(1, math.ceil(q * n))
        run = int(self.state["below"])
        if target <= run:
            return 10.0 ** self.log_lo
        hist = self.state["hist"].cpu().tolist()
        width = self.decades / self.bins
        for i, c in enumerate(hist):
            if c and run + c >= target:
                frac = (target - run) / c
                return 10.0 ** (self.log_lo + (i + frac) * width)
            run += c
        return self.upper


class Int8ErrorProbe:
    """Quantisation error of one site under several clip thresholds (float64 sums, mergeable)."""

    name = "int8_error"
    _KEYS = ("count", "sum_sq", "sum_abs", "err_sq", "err_abs", "clipped")

    def __init__(self, width: int, thresholds: dict[str, float], device: Any = "cpu", bits: int = 8):
        import torch

        self.width, self.thresholds, self.bits = int(width), dict(thresholds), int(bits)
        self.state = {p: {k: torch.zeros((), dtype=torch.float64, device=device) for k in self._KEYS}
                      for p in self.thresholds}

    def update(self, x, mask=None) -> None:
        import torch

        v = (x[mask.to(x.device)] if mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1]))
        v = v.float().reshape(-1)
        sq, ab = v.double().square().sum(), v.abs().double().sum()
        for p, t in self.thresholds.items():
            err = (int8_fake_quant(v, t, self.bits) - v).double()
            st = self.state[p]
            st["count"] = st["count"] + v.numel()
            st["sum_sq"] = st["sum_sq"] + sq
            st["sum_abs"] = st["sum_abs"] + ab
            st["err_sq"] = st["err_sq"] + err.square().sum()
            st["err_abs"] = st["err_abs"] + err.abs().sum()
            st["clipped"] = st["clipped"] + torch.count_nonzero(v.abs() > t)

    def merge(self, other: "Int8ErrorProbe") -> "Int8ErrorProbe":
        for p in self.state:
            for k in self._KEYS:
                self.state[p][k] = self.state[p][k] + other.state[p][k].to(self.state[p][k].device)
        return self

    def rows(self) -> list[dict[str, Any]]:
        out = []
        qmax = 2 ** (self.bits - 1) - 1
        for p, t in self.thresholds.items():
            st = {k: float(v) for k, v in self.state[p].items()}
            n = max(1.0, st["count"])
            rms = math.sqrt(st["sum_sq"] / n)
            rmse = math.sqrt(st["err_sq"] / n)
            out.append({"policy": p, "threshold": t, "scale": t / qmax, "bits": self.bits, "count": int(st["count"]),
                        "rmse": rmse, "rel_rmse": rmse / rms if rms > 0 else math.nan,
                        "mae": st["err_abs"] / n,
                        "rel_mae": (st["err_abs"] / st["sum_abs"]) if st["sum_abs"] > 0 else math.nan,
                        "sqnr_db": (10 * math.log10(st["sum_sq"] / st["err_sq"])
                                    if st["err_sq"] > 0 and st["sum_sq"] > 0 else math.inf),
                        "clip_rate": st["clipped"] / n})
        return out


# ------------------------------------------------------------------------------------- options, result


@dataclass
class MassiveOptions(CorpusOptions):
    """``CorpusOptions`` (no stride: a preset cuts its own sequences) plus the massive-activation settings."""

    batch_size: int | None = None  # None: the preset's
    max_length: int | None = None  # None: the preset's rule
    seed: int | None = None  # None: the preset's
    preset: str = "sun2024"
    prompt: str | None = None  # analyse this one text instead of a corpus
    n_samples: int | None = None  # None: the preset's
    bos: bool = False  # prepend BOS (or the prefix token) to every sequence; both anchors add none
    top_k: int = DEFAULT_TOP_K
    kinds: Sequence[str] | None = None  # None: every residual kind
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides
    int8: bool = False
    clip_quantile: float = DEFAULT_CLIP_QUANTILE
    int8_calibration: str = "held-out"  # or "in-sample" (scales and errors on the same sequences)
    int8_calibration_samples: int | None = None  # held-out: sequences for the scales (None: a third, at least 1)
    capture_prompt: str | None = None  # also keep one prompt's full tensors for the 3D plot
    # Sun et al.'s exp3 / exp4 (probes.massive_intervene, probes.attention_sinks)
    intervene: Sequence[str] = field(default_factory=tuple)  # any of "zero", "mean"
    intervene_layer: int | None = None  # None: the first resid_post layer with massive entries
    attention: bool = False  # per-layer, per-head attention shares on the massive positions
    attention_prompt: str | None = None  # None: Sun's exp4 prompt, for the per-layer logit heat maps
    labels: str | None = None  # --intervene on a sequence classifier: the label field of the --data .jsonl


@dataclass
class PromptCapture:
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    tensors: dict[str, Any]  # canonical name -> numpy [T, C] (signed)
    layers: dict[str, int | None]  # canonical name -> layer


@dataclass
class MassiveResult:
    layers: list[dict[str, Any]]  # one row per site
    topk: list[dict[str, Any]]  # top-K entries of every site, with coordinates
    channels: list[dict[str, Any]]  # massive channels and each site's largest channels
    global_max: dict[str, Any]
    int8: list[dict[str, Any]]
    info: dict[str, Any]
    channel_max: dict[str, Any] = field(repr=False, default_factory=dict)  # canonical -> numpy [C] max |a|
    capture: PromptCapture | None = field(repr=False, default=None)
    probes: dict[str, Any] = field(repr=False, default_factory=dict)
    intervene: list[dict[str, Any]] = field(default_factory=list)  # Sun exp3: PPL per mode
    intervene_values: list[dict[str, Any]] = field(default_factory=list)  # the means set_mean uses
    attention: list[dict[str, Any]] = field(default_factory=list)  # Sun exp4: per (layer, head) shares
    attention_prompt: list[dict[str, Any]] = field(default_factory=list)  # head-mean logits of one prompt

    def table(self, name: str = "layers"):
        import pandas as pd

        return pd.DataFrame({"layers": self.layers, "topk": self.topk, "channels": self.channels,
                             "int8": self.int8, "intervene": self.intervene,
                             "intervene_values": self.intervene_values, "attention": self.attention,
                             "attention_prompt": self.attention_prompt}[name])

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``);
        ``massive_int8``, ``massive_intervene*`` and ``massive_attention*`` only when they ran."""
        names = ("layers", "topk", "channels") + tuple(
            n for n in ("int8", "intervene", "intervene_values", "attention", "attention_prompt") if getattr(self, n))
        return {f"massive_{n}": self.table(n) for n in names}


class DelimiterFinder:
    """First delimiter ('.' or newline token, as in Sun et al.) of each row, with a per-token-id cache."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, bool] = {}

    def is_delim(self, tid: int) -> bool:
        v = self.cache.get(tid)
        if v is None:
            try:
                text = self.tok.decode([tid]) if self.tok is not None else ""
            except Exception:
                text = ""
            s = text.strip(" \t")
            v = self.cache[tid] = bool(s) and set(s) <= {".", "\n", "\r"}
        return v

    def first(self, ids: Sequence[int], start: int = 1) -> int:
        for p in range(start, len(ids)):
            if self.is_delim(ids[p]):
                return p
        return -1


def decode_token(tokenizer, tid: int) -> str:
    if tokenizer is None or tid is None or tid < 0:
        return ""
    try:
        return tokenizer.decode([int(tid)])
    except Exception:
        return str(tid)


# ---------------------------------------------------------------------------------------------- the run
def massive(loaded, opts: MassiveOptions | None = None, progress: Callable[[int, int], Any] | None = None,
            site_list: Sequence[Any] | None = None) -> MassiveResult:
    """Massive-activation statistics of ``loaded`` under ``opts.preset`` (the Python API of ``actsparse massive``).

    ``progress(total_batches, advance)`` is called once with ``advance=0``, then once per batch.
    """
    import time

    import torch

    from probes import corpus as corpus_mod
    from probes.residual import RESIDUAL_KINDS, STREAM_KINDS, find_residual_sites
    from probes.runner import forward_batch, run_probes

    opts = opts or MassiveOptions()
    preset = resolve_preset(opts.preset)
    if not 0 < opts.clip_quantile < 1:
        raise DataError(f"--clip-quantile {opts.clip_quantile} is outside (0, 1)", "use e.g. 0.999")
    seed = preset.seed if opts.seed is None else opts.seed
    torch.manual_seed(seed)
    model, tok = loaded.model, loaded.tokenizer
    kinds = tuple(opts.kinds or RESIDUAL_KINDS)
    sites = list(site_list) if site_list is not None else find_residual_sites(model, loaded.family, kinds, opts.sites)
    samples, sinfo = build_samples(loaded, opts, preset)
    if opts.prompt is None and preset.sampling == "per_sample":
        samples.sort(key=lambda s: len(s.input_ids))  # as Max_act_llm: batches of similar length, less padding
    windows = sequence_windows([smp.input_ids for smp in samples], opts.skip_first)
    if not any(any(w.count) for w in windows):
        raise DataError("no token positions left to measure (check --skip-first)", "lower --skip-first")
    bs = opts.batch_size or preset.batch_size
    td = TokenData(windows, bs, pad_id(tok), loaded.device)
    n_batches = td.n_batches()
    split8 = int8_split([smp.sample_id for smp in samples], opts) if opts.int8 else None
    from probes.massive_intervene import parse_modes

    modes = parse_modes(opts.intervene)
    if (modes or opts.attention) and opts.prompt is not None:
        raise DataError("--intervene and --attention measure the preset's corpus sequences, not one --prompt",
                        "drop --prompt (use --attention-prompt for the attention heat maps' text)")
    from probes.massive_intervene import prepare_intervention

    labelled = prepare_intervention(loaded, opts, modes)  # refusals and the labelled examples, before any batch
    total = n_batches + (sum(td.n_batches([windows[i] for i in part]) for part in split8) if split8 else 0)
    total += (labelled.n_batches() if labelled else n_batches) * (1 + len(modes) if modes else 0)
    total += n_batches * (1 if opts.attention else 0)
    if progress:
        progress(total, 0)
    tick = (lambda k: progress(total, k)) if progress else None
    delim = DelimiterFinder(tok)
    ctx = BatchContext()
    sample_ids = [smp.sample_id for smp in samples]
    counter = {"i": 0}

    def forward(m, b):
        i = counter["i"]
        counter["i"] += 1
        ids_cpu = b.input_ids.cpu().tolist()
        lens = b.attention_mask.sum(1).cpu().tolist()
        fd = [delim.first(row[:n]) for row, n in zip(ids_cpu, lens)]
        dev = b.input_ids.device
        ctx.set(torch.tensor(sample_ids[i * bs:(i + 1) * bs], device=dev), b.input_ids, torch.tensor(fd, device=dev))
        return forward_batch(m, b, is_encoder_decoder=loaded.is_encoder_decoder)

    def make_probe(site, width, device):
        return MassiveProbe(width, device=device, top_k=opts.top_k, ctx=ctx, seed=seed)

    t0 = time.perf_counter()
    probes = run_probes(model, td.batches(), sites, make_probe, forward=forward, progress=tick)
    dtype = str(loaded.dtype).replace("torch.", "")
    rows, topk_rows, chan_rows, channel_max = [], [], [], {}
    for s in sites:
        p = probes.get(s.canonical_name)
        if p is None:
            continue  # never called (e.g. a decoder stack the forward did not use)
        base = {**s.row(), "layer_1based": (s.layer + 1) if s.layer is not None else None, "dtype": dtype}
        row = {**base, **p.to_row()}
        row["peak_token"] = decode_token(tok, row.get("peak_token_id", -1))
        rows.append(row)
        for e in p.topk():
            topk_rows.append({"canonical_name": s.canonical_name, "module_path": s.module_path, "kind": s.kind,
                              "layer": s.layer, "layer_1based": base["layer_1based"], "rank": e["rank"],
                              "value": e["value"], "abs": e["abs"], "sample": e["sample"], "position": e["position"],
                              "channel": e["channel"], "token_id": e["token_id"],
                              "token": decode_token(tok, e["token_id"]),
                              "seq_median": e["seq_median"], "ratio_to_seq_median": e["ratio_to_seq_median"],
                              "token_median": e["token_median"], "ratio_to_token_median": e["ratio_to_token_median"],
                              "massive_sun": e["massive_sun"]})
        ch = p.channel_arrays()
        channel_max[s.canonical_name] = ch["max_abs"]
        chan_rows += _channel_rows(s, base["layer_1based"], ch)
    gmax = _global_max(rows, STREAM_KINDS, tok)
    elapsed = time.perf_counter() - t0
    int8_rows: list[dict[str, Any]] = []
    int8_info: dict[str, Any] | None = None
    if opts.int8:
        int8_rows, int8_info = _int8_check(loaded, sites, gmax, rows, td, opts, tick, split8)
    iv_rows: list[dict[str, Any]] = []
    iv_vals: list[dict[str, Any]] = []
    iv_info = at_info = None
    at_rows: list[dict[str, Any]] = []
    at_prompt: list[dict[str, Any]] = []
    if modes or opts.attention:
        from probes.massive_intervene import reference_layer, run_intervention

        ref = reference_layer(sites, rows, probes, opts.intervene_layer)
        if modes:
            iv_rows, iv_vals, iv_info = run_intervention(loaded, sites, rows, probes, td, modes, tick=tick, ref=ref,
                                                         labelled=labelled)
        if opts.attention:
            from probes.attention_sinks import run_attention

            at_rows, at_prompt, at_info = run_attention(loaded, ref, td, tick=tick, prompt=opts.attention_prompt,
                                                        bos=opts.bos)
    capture = None
    cap_prompt = opts.capture_prompt
    if cap_prompt:
        capture = capture_prompt(loaded, sites, cap_prompt, bos=opts.bos)
    nonfinite = [r["canonical_name"] for r in rows if r["n_nonfinite"]]
    info = {
        "preset": preset.name if opts.prompt is None else f"{preset.name} (prompt)",
        "protocol": preset.protocol if opts.prompt is None else "one prompt, no special tokens unless --bos",
        **sinfo,
        "n_sequences": len(windows),
        "n_counted_tokens": corpus_mod.n_counted(windows),
        "batch_size": bs,
        "skip_first": opts.skip_first,
        "padding": "right, masked (never counted)",
        "layers": "0-based; layer_1based = layer + 1 for Sun-style plots",
        "median_kind": {
            "median_mean": "Sun et al.: lower median (torch.median convention, exact via torch.kthvalue) of |h| over "
                           "the whole token x channel tensor of each sequence, averaged over sequences",
            "token_median_mean": "Max_act_llm: lower median of |h| over channels of each token, averaged over tokens",
        },
        "massive_rule": {
            "n_massive": f"entries with |a| > {SUN_ABS_THRESHOLD:g} and |a| >= {SUN_RATIO_THRESHOLD:g} x the "
                         "sequence's whole-tensor median (Sun et al.)",
            "n_massive_tokens": f"tokens with max |a| > {TOKEN_ABS_THRESHOLD:g} and max / own median > "
                                f"{TOKEN_RATIO_THRESHOLD:g} (Max_act_llm)",
            "raw_ratios": "massive_topk: ratio_to_seq_median and ratio_to_token_median per entry; "
                          "massive_layers: seq_ratio_max, token_ratio_max, ratio_top1_median = top1_mean / median_mean",
            "first_delimiter": "first token after position 0 whose text is '.' or a newline (Sun et al.)",
        },
        "top_k": opts.top_k,
        "error_bars": {"columns": [f"{c}_{x}" for c in BAR_COLUMNS for x in ("se", "lo", "hi")],
                       "unit": "sequence (the units Sun et al. average over); n_sequences of them per layer",
                       "se": "top1_mean, median_mean: sd of the per-sequence values / sqrt(m); ratio_top1_median "
                             "(a ratio of means): linearised ratio-estimator se (probes.uncertainty.ratio_se)",
                       "interval": "95 % percentile bootstrap over sequences, 1000 resamples, numpy "
                                   f"default_rng({seed}), the three columns from the same resamples"},
        "global_max_over_kinds": list(STREAM_KINDS),
        "statistics_dtype": "float32 (float64 sums)",
        "model_dtype": dtype,
        "device": str(loaded.device),
        "nonfinite_sites": nonfinite,
        "overflow": (f"{len(nonfinite)} site(s) hold inf/NaN entries (float16 saturates above 65504); they are "
                     "counted in n_nonfinite and propagate into top-1" if nonfinite else None),
        "n_sites": len(rows),
        "seconds": round(elapsed, 3),
        "int8": int8_info,
        "intervene": iv_info,
        "attention": at_info,
        "abs_quantiles": "abs_median ... abs_q999: Max_act_llm analyze_model.py StatsAccumulator (_update_sun, "
                         f"finalize): {MAXACT_ABS_BINS}-bin log10 histogram of |x| over [1e{MAXACT_ABS_LOG_MIN:g}, "
                         f"1e{MAXACT_ABS_LOG_MAX:g}] pooled over every counted entry of the layer, zeros apart, "
                         "log-linear interpolation in the bin",
        "options": asdict(opts),
    }
    return MassiveResult(rows, topk_rows, chan_rows, gmax, int8_rows, info, channel_max, capture, probes,
                         iv_rows, iv_vals, at_rows, at_prompt)


def _channel_rows(site, layer_1based, ch: dict[str, Any], n_top: int = 8) -> list[dict[str, Any]]:
    """Channels that hold massive entries, plus the site's ``n_top`` largest channels by max |a|."""
    import numpy as np

    mx = ch["max_abs"]
    chosen = set(np.nonzero(ch["massive"])[0].tolist())
    chosen |= set(np.argsort(-mx)[:n_top].tolist())
    out = []
    for c in sorted(chosen, key=lambda c: -float(mx[c])):
        if mx[c] < 0:
            continue
        out.append({"canonical_name": site.canonical_name, "module_path": site.module_path, "kind": site.kind,
                    "layer": site.layer, "layer_1based": layer_1based, "channel": int(c),
                    "max_abs": float(mx[c]), "value_at_max": float(ch["value"][c]),
                    "sample_at_max": int(ch["sample"][c]),
                    "position_at_max": int(ch["position"][c]), "n_massive": int(ch["massive"][c]),
                    "n_massive_first_token": int(ch["massive_first_token"][c]),
                    "n_massive_first_delim": int(ch["massive_first_delim"][c])})
    return out


def _global_max(rows: list[dict[str, Any]], kinds: Sequence[str], tok) -> dict[str, Any]:
    cands = [r for r in rows if r["kind"] in kinds or r["kind"] == "custom"]
    cands = [r for r in cands if r.get("peak_value") == r.get("peak_value")]  # drop NaN
    if not cands:
        return {}
    r = max(cands, key=lambda r: abs(r["peak_value"]))
    return {"value": r["peak_value"], "abs": abs(r["peak_value"]), "canonical_name": r["canonical_name"],
            "module_path": r["module_path"], "kind": r["kind"], "layer": r["layer"], "layer_1based": r["layer_1based"],
            "sample": r["peak_sample"], "position": r["peak_position"], "channel": r["peak_channel"],
            "token_id": r["peak_token_id"], "token": decode_token(tok, r["peak_token_id"])}


def int8_split(sample_ids: Sequence[int], opts: MassiveOptions) -> tuple[list[int], list[int]]:
    """Indices (into the run's sequences) of the INT8 calibration and evaluation sequences.

    ``held-out`` (default), as Max_act_llm quant_sanity_check.py ``run_model`` (scales from the first
    ``--calibration_samples`` lines of its data file, errors on the next ``--eval_samples``): the sequences
    in the order the preset drew them (by sample id), the first ``n_cal`` calibrate (default a third, at
    least 1: the reference's 128 of 128 + 256), the others are evaluated. ``in-sample``: all for both.
    """
    n = len(sample_ids)
    mode = opts.int8_calibration
    if mode not in INT8_CALIBRATIONS:
        raise unknown_name("INT8 calibration", mode, INT8_CALIBRATIONS, error=DataError)
    if mode == "in-sample":
        return list(range(n)), list(range(n))
    if n < 2:
        raise DataError(f"held-out INT8 calibration needs at least 2 sequences (scales from some, errors on the "
                        f"others); this run has {n}",
                        "measure a corpus with more samples, or pass --int8-calibration in-sample (scales from the "
                        "evaluated sequences themselves: the max_abs scale then clips nothing)")
    n_cal = opts.int8_calibration_samples if opts.int8_calibration_samples is not None else max(1, n // 3)
    if not 1 <= n_cal < n:
        raise DataError(f"int8_calibration_samples {n_cal} leaves no sequence to calibrate or to evaluate "
                        f"({n} sequences)", f"use 1 to {n - 1}")
    order = sorted(range(n), key=lambda i: (sample_ids[i], i))
    return sorted(order[:n_cal]), sorted(order[n_cal:])


def _int8_check(loaded, sites, gmax, rows, td: TokenData, opts: MassiveOptions, tick,
                split: tuple[list[int], list[int]]):
    """Max_act_llm quant_sanity_check.py at the peak site: scales from max |x| and from the clip quantile of
    the calibration sequences, errors and clip rates on the evaluation sequences (``int8_split``)."""
    from probes.runner import forward_batch, run_probes

    if not gmax:
        return [], {"skipped": "no peak site"}
    site = next(s for s in sites if s.canonical_name == gmax["canonical_name"])
    row = next(r for r in rows if r["canonical_name"] == site.canonical_name)
    upper = float(row["max_abs"])  # over every sequence: the histogram's range (>= the calibration max)
    if not math.isfinite(upper) or upper <= 0:
        return [], {"skipped": f"peak |x| at {site.canonical_name} is {upper} (overflow or all zero)"}
    held_out = opts.int8_calibration == "held-out"
    cal_idx, eval_idx = split
    cal, ev = [td.windows[i] for i in cal_idx], [td.windows[i] for i in eval_idx]

    def fwd(m, b):
        return forward_batch(m, b, is_encoder_decoder=loaded.is_encoder_decoder)

    hist = run_probes(loaded.model, td.batches(cal), [site],
                      lambda s, w, d: AbsLogHistogram(w, upper, device=d), forward=fwd, progress=tick)
    h = hist.get(site.canonical_name)
    # in-sample: the calibration max is the run's max (same sequences), kept as measured by the main pass
    cal_max = (h.max_abs if h is not None else math.nan) if held_out else upper
    if not math.isfinite(cal_max) or cal_max <= 0:
        return [], {"skipped": f"max |x| of the calibration sequences at {site.canonical_name} is {cal_max}"}
    clip = min(h.quantile(opts.clip_quantile), cal_max)  # interpolation inside the top bin stays <= the max
    qname = f"p{100 * opts.clip_quantile:g}"
    thresholds = {"max_abs": cal_max, qname: clip}
    err = run_probes(loaded.model, td.batches(ev), [site],
                     lambda s, w, d: Int8ErrorProbe(w, thresholds, device=d), forward=fwd, progress=tick)
    out = []
    for r in err[site.canonical_name].rows():
        out.append({"canonical_name": site.canonical_name, "module_path": site.module_path, "kind": site.kind,
                    "layer": site.layer, "layer_1based": (site.layer + 1) if site.layer is not None else None,
                    "calibration": opts.int8_calibration, **r})
    info = {"site": site.canonical_name, "module_path": site.module_path, "bits": 8,
            "quantizer": "per-tensor symmetric: scale = T / 127, q = round(clamp(x, -T, T) / scale)",
            "thresholds": thresholds,
            "clip_quantile": opts.clip_quantile,
            "quantile_method": f"rank ceil(q n) of |x| from a {LOG_HIST_BINS}-bin log histogram over "
                               f"[max 1e-{LOG_HIST_DECADES:g}, max] (bins ~0.2 % wide), at most the calibration max",
            "calibration": opts.int8_calibration,
            "calibration_rule": (
                "held-out (Max_act_llm quant_sanity_check.py run_model: scales from the first calibration_samples "
                "of its data, errors on the next eval_samples): sequences ordered by sample id, the first "
                f"{len(cal_idx)} give max |x| and the clip quantile, the other {len(eval_idx)} are quantised and "
                "scored; the peak site is chosen on the full run" if held_out else
                "in-sample (asked for): thresholds and errors from the same sequences, so max_abs clips nothing"),
            "n_calibration_sequences": len(cal_idx),
            "n_evaluation_sequences": len(eval_idx),
            "n_calibration_entries": int(h.state["count"]) if h is not None else 0,
            "run_max_abs": upper,
            "sqnr_db": "10 log10(sum x^2 / sum err^2)", "rel_rmse": "rmse(err) / rms(x)",
            "clip_rate": "fraction of the evaluation entries with |x| > T"}
    return out, info


def capture_prompt(loaded, sites, prompt: str, bos: bool = False, kinds: Sequence[str] = ("resid_post",)):
    """One forward on ``prompt``; keeps the full ``[tokens, channels]`` tensor of each site of ``kinds``."""
    from probes import corpus as corpus_mod
    from probes.runner import TokenBatches, run

    tok = loaded.tokenizer
    ids = _tokenize(tok, prompt)
    if bos:
        pre = corpus_mod.prefix_token(tok)
        ids = ([pre] if pre is not None else []) + ids
    if not ids:
        raise DataError("the prompt has no tokens", "give a non-empty --prompt")
    chosen = [s for s in sites if s.kind in kinds] or [s for s in sites]
    tensors: dict[str, Any] = {}

    def keep(x, hc) -> None:  # x: [1, tokens, channels]
        if x.dim() == 3 and hc.site.canonical_name not in tensors:
            tensors[hc.site.canonical_name] = x[0].detach().float().cpu().numpy()

    batch = next(corpus_mod.batches(sequence_windows([ids]), 1, 0, loaded.device))
    run(loaded.model, [batch], fwd_hooks=[(s, keep) for s in chosen],
        adapter=TokenBatches(is_encoder_decoder=loaded.is_encoder_decoder))
    if not tensors:
        raise ModelError("no residual tensor was seen on the prompt", "check the sites with `actsparse sites`")
    return PromptCapture(prompt, ids, [decode_token(tok, t) for t in ids], tensors,
                         {s.canonical_name: s.layer for s in chosen if s.canonical_name in tensors})
