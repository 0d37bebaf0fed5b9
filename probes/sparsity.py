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

Cost (issue 16 goal 3, ``benchmarks/bench_probes.py``): every count (zero, the near-zero grid, negative,
per channel, chunk unions, per window) comes from 0/1 float32 planes, one comparison and one sum over
channels each, summed per token once; per-window values are sums of those per-token counts (no second
pass). The counts are exact integers (see ``update``), so the numbers are those of boolean counting. On
the CPU the work buffers are reused between updates; on a GPU no step waits for the host except the
mask's layout, once per batch. On the CPU, where a C compiler is found, all of it is one pass of a fused
kernel instead (``probes.fastcount``): the same counts, the float sums to float rounding.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

DEFAULT_EPS_GRID = (1e-6, 1e-3, 1e-2)
DEFAULT_CHUNK_K = 8
HIST_BINS = 1000
# The state entries the kernel's merge writes (probes.fastcount.accumulate), in the order of its C function's
# ``st`` argument.
_STATE_ORDER = ("n_tokens", "zero", "near_zero", "neg", "sum", "sum_abs", "sum_sq", "max_abs", "channel_active",
                "token_hist", "token_nz_sum", "chunk_sum", "n_chunks")
MAX_PENDING = 8  # passes whose window rows an ActivationSparsityProbe holds before adding them (``flush``)


def eps_label(eps: float) -> str:
    return f"{eps:g}"


def window_fields(eps_grid: Sequence[float]) -> tuple[str, ...]:
    """The per-window values the probe keeps (``probes.uncertainty.WindowValues`` fields)."""
    key = tuple(eps_grid)
    fields = _FIELDS.get(key)
    if fields is None:  # (asked after every forward: made once per grid)
        fields = _FIELDS[key] = ("n_tokens", "zero", "neg", *(f"near_zero@{eps_label(e)}" for e in key),
                                 "chunk_sum", "n_chunks")
    return fields


_FIELDS: dict[tuple, tuple[str, ...]] = {}


def uncertain_columns(eps_grid: Sequence[float], chunk_k: int) -> list[str]:
    """The ``to_row`` columns that are ratios of per-window sums, so carry ``_se``/``_lo``/``_hi``."""
    return (["zero_frac", *(f"near_zero_frac@{eps_label(e)}" for e in eps_grid), "nonzero_pct_per_token"]
            + ([f"chunk_sparsity@{chunk_k}"] if chunk_k > 0 else []) + ["neg_frac"])


class _Flushed:
    """An attribute of a probe with a ``flush`` method: reading or replacing it first adds what is pending when the
    probe's attribute ``pending`` (a list or a count) says something is. The value lives in the instance's
    ``__dict__`` under ``_`` + its name."""

    def __init__(self, pending: str = "_pending"):
        self.pending = pending

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        if obj.__dict__.get(self.pending):
            obj.flush()
        return obj.__dict__[self.slot]

    def __set__(self, obj, value) -> None:
        if obj.__dict__.get(self.pending):
            obj.flush()
        obj.__dict__[self.slot] = value


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

        self._pending: list = []  # window rows not yet in ``windows`` (``update``, ``flush``)
        self._addresses = None  # the state tensors' addresses for the kernel (``_state_addresses``)
        self._ticket = None  # a ReLU pass's counts waiting for ``update`` to see its tensor (``relu_counted``)
        self._relu_pending = 0  # ReLU passes in ``_pending`` not yet added to ``state`` (``flush``)
        self.relu_updates = 0  # updates whose counts came from a ReLU pass
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
        if torch.device(device).type == "cpu":  # where the kernel's merge writes (``_state_addresses``), worked out
            from probes import fastcount  # here: inside the first forward it cost that forward ~0.06 ms a probe

            now = tuple(map(self.state.get, _STATE_ORDER))
            self._addresses = (now, fastcount.addresses(now))
        # per-window rows (probes.uncertainty.WindowValues state): O(windows), a dict of lists so that
        # probes.distributed.probe_to_cpu moves it with the probe
        self.tags = tags
        self.windows = {**new_state(), "global": tags is not None}

    # ------------------------------------------------------------------ state
    # ``windows`` holds every update's window rows: reading (or replacing) it first adds the rows that ``update``
    # left pending (``flush``). ``state`` likewise adds the ReLU passes that wait to be added (``relu_counted``).
    windows = _Flushed()
    state = _Flushed("_relu_pending")

    def flush(self) -> None:
        """Add the window rows that ``update`` left pending (in update order). ``run_probes`` calls it after each
        forward, so this bookkeeping runs outside the model's forward: inside it, it had cost that forward ~3 %
        more on the bundled model (``benchmarks/README.md``, 2026-12-04 late). Reading ``windows`` calls it too."""
        pending, self._pending = self._pending, []
        self._relu_pending = 0
        self._drop_ticket()  # a ReLU pass is taken by the update of the same forward, or never
        for rows, lens, ids, *relu in pending:
            if rows is None:  # a ReLU pass: its counts into the state now, in update order
                rows = self._merge_relu(*relu, lens)
            self._add_windows(rows, lens, ids)

    def __getstate__(self) -> dict[str, Any]:  # copies (probes.distributed) carry no pending rows, no addresses
        self.flush()
        return {**self.__dict__, "_pending": [], "_addresses": None, "_ticket": None, "_relu_pending": 0}

    def _state_addresses(self):
        """The state tensors' addresses for ``fastcount.accumulate`` (None when the state does not suit it), kept
        while the state holds the same tensor objects (the kept tuple holds them, so no id is reused meanwhile)."""
        now = tuple(map(self.state.get, _STATE_ORDER))
        kept = self._addresses
        if kept is not None and all(map(operator.is_, kept[0], now)):
            return kept[1]
        from probes import fastcount

        addr = fastcount.state_addresses(now, self.width, len(self.eps_grid), HIST_BINS)
        self._addresses = (now, addr) if addr is not None else None
        return addr

    # ------------------------------------------------------------------ the ReLU pass
    def relu_counted(self, x, mask=None):
        """``torch.relu(x)`` (the same bits) made by the count kernel, which counts the result on the way
        (``probes.relu_pass``: for a site that takes a ReLU's output): one pass over memory instead of a ReLU and a
        count that reads its output again. The counts wait on the probe (holding the output) until ``update`` gets
        that very tensor under the same batch layout, and are added then, instead of counting it again; ``flush``
        (after each forward) or the next ``relu_counted`` drops them unseen. ``mask``: the batch's count mask; the
        positions it leaves out are written, not counted.

        Returns None where it cannot (the caller runs the ReLU itself): no OpenMP kernel, autograd on ``x``, not a
        contiguous float32 CPU tensor of this width laid out as a site gives it, a count mask whose counted
        positions are not one run in every window (``_relu_layout``)."""
        import torch

        from probes import fastcount

        if self._ticket is not None:
            self._drop_ticket()
        if not fastcount._STATE["tried"]:
            fastcount.kernel()
        if (fastcount._STATE["relu_fn"] is None or not isinstance(x, torch.Tensor) or x.shape[-1] != self.width
                or x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous()
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        layout = _relu_layout(x, mask)
        if layout is None:
            return None
        lens, at = layout
        rows = x.numel() // self.width
        n = rows if at is None else sum(lens)
        threads = torch.get_num_threads()
        key = (n, self.width, tuple(lens), self.chunk_k, threads, self.eps_grid, HIST_BINS, fastcount.MIN_SPLIT_OMP,
               None if at is None else (tuple(at), rows))
        job = fastcount.relu_job(key, lens, self.chunk_k, threads, HIST_BINS, self.eps_grid, at, rows)  # its own
        out = torch.empty_like(x)
        mbits = fastcount.relu_pass(job, x, out)
        self._ticket = (out, mask, layout, mbits, job, n)  # out held: no other tensor can take its memory meanwhile
        return out

    def _drop_ticket(self) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            from probes import fastcount

            fastcount.relu_job_back(ticket[4])

    def take_relu_pass(self, x, mask=None) -> bool:
        """Whether ``x`` is the output of this probe's waiting ReLU pass (``relu_counted``: the same tensor, or one
        with its memory, shape and layout; the output is held, so only a view of it can have them) under the same
        batch layout; then the pass's counts are this update (added to the state by ``flush``). Otherwise the pass
        is dropped (False: the caller counts ``x``)."""
        import torch

        from probes import fastcount

        if self._ticket is None:
            return False
        out, was, layout, mbits, job, n = self._ticket
        if x is not out and not (isinstance(x, torch.Tensor) and x.data_ptr() == out.data_ptr()
                                 and x.shape == out.shape and x.dtype is torch.float32 and x.is_contiguous()):
            self._drop_ticket()
            return False
        if mask is not was and (x.shape != out.shape or _relu_layout(x, mask) != layout):
            self._drop_ticket()
            return False
        self._ticket = None
        lens, at = layout
        if mbits >= fastcount.INF_BITS:  # an inf or a NaN where it counts: count them (an integer: any order)
            flat = x.reshape(-1, self.width)
            bad = ((~torch.isfinite(flat)).sum() if at is None else
                   sum((~torch.isfinite(flat[a:a + L])).sum() for a, L in zip(at, lens)))
            self.__dict__["_state"]["nonfinite"] += int(bad)
        self.relu_updates += 1
        # Added to the state by ``flush`` (after the forward), with the job's buffers held until then.
        self._pending.append((None, lens, self._window_ids(lens), job, mbits, n))
        self._relu_pending += 1
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        return True

    def _merge_relu(self, job, mbits: int, n: int, lens: list[int]):
        """A ReLU pass's counts (in ``job``'s buffers) added to the state; returns its window rows. The job goes
        back to ``probes.fastcount``'s pool."""
        from probes import fastcount

        try:
            addr = self._state_addresses()
            if addr is not None:
                return fastcount.relu_merge(job, mbits, addr)
            return self._update_from_kernel(fastcount.job_results(job, mbits, len(self.eps_grid)), n, lens, 0)
        finally:
            fastcount.relu_job_back(job)

    # ------------------------------------------------------------------ update
    def update(self, x, mask=None) -> None:
        """``x``: ``[batch, pos, channels]`` (or ``[tokens, channels]``); ``mask``: ``[batch, pos]``, True = counted.

        All counts come from one family of 0/1 float32 "planes" (``_planes``): ``|a| <= t`` for the sorted
        thresholds ``t`` in ``(0, *eps_grid)`` (one broadcast comparison), ``a < 0``, and on a GPU
        ``|a| <= FLT_MAX`` (finite). One sum over channels gives every per-token count; the zero plane gives
        the per-channel activity and, by a minimum over k tokens, the chunk unions. Exactness: a plane holds
        0s and 1s, and every partial sum of a reduction over at most 2^24 of them is an integer below 2^24,
        exact in float32 whatever the summation order (wider tensors are summed in float64). So every count
        equals the boolean count it replaces, and NaN/inf fall on the same side of each comparison as before
        (NaN: not zero, not near zero, not negative). The float sums (``sum``, ``sum_abs``, ``sum_sq``) use the
        same float32-per-token, float64-across-tokens operations as always. On the CPU with a C compiler
        (``probes.fastcount``) one fused pass makes every statistic and adds it to the state instead
        (``fastcount.accumulate``; ``_update_from_kernel`` where the state does not suit the C merge).
        """
        import torch

        x = x.detach()  # statistics only; work buffers are written with out=
        if self._ticket is not None and self.take_relu_pass(x, mask):
            return
        if self._relu_pending:  # ReLU passes before this update go into the state first (the same order of sums)
            self.flush()
        if x.dim() == 2:
            x = x.unsqueeze(1)  # [batch, 1, channels]
        if x.shape[-1] != self.width:
            raise ValueError(f"probe built for width {self.width}, got {x.shape[-1]}")
        c = self.width
        full_rows, mask, lens = _mask_layout(mask, x)
        if full_rows:
            valid = x.reshape(-1, c)  # no gather copy in the common case of full windows
        else:
            valid = x[mask]  # [n_valid, channels], kept in (batch, pos) order
        if valid.dtype != torch.float32:
            valid = valid.float()  # statistics in float32 whatever the model dtype
        n = valid.shape[0]
        if n == 0:
            return
        G = len(self.eps_grid)
        if _native_ok(valid, G):  # one fused pass (probes.fastcount): the same counts, no per-token tensors
            import probes.fastcount as fastcount

            # The pass and its adding to the state now, in C; the window rows wait for ``flush`` (after the forward).
            ids = self._window_ids(lens)
            threads = torch.get_num_threads()
            addr = self._state_addresses()
            if addr is not None:
                rows, mbits = fastcount.accumulate(valid, self.eps_grid, lens, self.chunk_k, threads, HIST_BINS, addr)
                if mbits >= fastcount.INF_BITS:  # an inf or a NaN: count them
                    self.state["nonfinite"] += int((~torch.isfinite(valid)).sum())
            else:  # a state of other tensors (replaced or moved by a caller): the results added in numpy
                raw = fastcount.launch(valid, self.eps_grid, lens, self.chunk_k, threads, HIST_BINS)
                nonfinite = 0 if raw.mbits < fastcount.INF_BITS else int((~torch.isfinite(valid)).sum())
                rows = self._update_from_kernel(fastcount.finish(raw), n, lens, nonfinite)
            self._pending.append((rows, lens, ids))
            if len(self._pending) >= MAX_PENDING:
                self.flush()
            return
        s = self.state
        a = torch.abs(valid, out=_scratch("abs", (n, c), valid.device))
        amax = a.max()
        per_token, zero_planes = self._planes(valid, a)  # [P, n] per-token counts (float32, exact)
        chunk_w, nchunk_w = self._update_chunks(zero_planes, lens)
        acc = torch.float32 if n < _EXACT_F32 else torch.float64
        zero_channel = zero_planes.sum(0, dtype=acc)  # [c]: tokens on which each channel is exactly 0
        del zero_planes
        per_window = _window_sums(per_token, lens, full_rows)  # [batch, P] float64
        zero_w, near_w, neg_w = per_window[:, 0], per_window[:, 1:G + 1], per_window[:, G + 1]
        s["n_tokens"] += n
        s["zero"] += zero_w.sum().long()
        s["near_zero"] += near_w.sum(0).long()
        s["neg"] += neg_w.sum().long()
        # float32 within a token (c entries), float64 across tokens (METRICS.md conventions):
        # no float64 copy of the whole tensor.
        s["sum"] += valid.sum(1).double().sum()
        s["sum_abs"] += a.sum(1).double().sum()
        sq = (torch.mul(valid, valid, out=_scratch("sq", (n, c), valid.device)) if n * c * 4 <= SCRATCH_MAX
              else valid * valid)
        s["sum_sq"] += sq.sum(1).double().sum()  # = vecdot(valid, valid), bit for bit, without a fresh buffer
        if per_token.shape[0] > G + 2:  # the finite plane (no host sync on a GPU)
            s["nonfinite"] += n * c - per_token[G + 2].sum(dtype=torch.float64).long()
        elif not bool(torch.isfinite(amax)):
            s["nonfinite"] += (~torch.isfinite(valid)).sum()
        s["max_abs"] = torch.maximum(s["max_abs"], amax.double())
        s["channel_active"] += n - zero_channel.long()
        per_token_nz = c - per_token[0]  # the same float32 integers as a sum of a non-zero indicator
        frac = per_token_nz.double() / c
        s["token_nz_sum"] += frac.sum()
        bins = (frac * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        s["token_hist"].index_add_(0, bins, torch.ones_like(bins))  # bincount would wait for its max on a GPU
        f64 = dict(dtype=torch.float64, device=per_window.device)
        rows = torch.cat([_lens_tensor(lens, per_window.device)[:, None], zero_w[:, None], neg_w[:, None], near_w,
                          chunk_w.to(**f64)[:, None], nchunk_w.to(**f64)[:, None]], dim=1)  # [batch, window_fields]
        self._add_windows(rows, lens)

    def _update_from_kernel(self, r: dict, n: int, lens: list[int], nonfinite: int):
        """Add ``probes.fastcount.count``'s results (``r``) to the state and return the pass's window rows: a few
        scalar adds instead of the torch path's per-token tensors. Counts are the same integers; the float sums
        (``sum``, ``sum_abs``, ``sum_sq``, ``token_nz_sum``, ``chunk_sum``) agree with the torch path to
        float rounding (another summation order). ``fastcount.accumulate`` does the same in C, bit for bit."""
        import numpy as np

        G = len(self.eps_grid)
        # The kernel runs on CPU tensors only, so the state is on the CPU: it is added to through numpy views of
        # its tensors (the same memory), without a torch operation and its temporaries per statistic.
        s = {k: t.numpy() for k, t in self.state.items()}
        w = r["windows"]  # [batch, zero, neg, eps..., chunk_sum, n_chunks]
        tot = w.sum(0)
        s["n_tokens"] += n
        s["zero"] += int(tot[0])
        s["neg"] += int(tot[1])
        if G:
            s["near_zero"] += tot[2:2 + G].astype(np.int64)
        s["chunk_sum"] += float(tot[2 + G])
        s["n_chunks"] += int(tot[3 + G])
        sums = r["sums"]
        s["sum"] += float(sums[0])
        s["sum_abs"] += float(sums[1])
        s["sum_sq"] += float(sums[2])
        s["token_nz_sum"] += float(sums[3])
        m = r["max_abs"]
        if nonfinite:
            s["nonfinite"] += nonfinite
        if m != m or m > float(s["max_abs"]):  # torch.maximum's rule: a NaN stays
            s["max_abs"][...] = m
        s["channel_active"] += n - r["zero_channel"]
        s["token_hist"] += r["hist"]
        return np.concatenate([np.asarray(lens, dtype=np.float64)[:, None], w], axis=1)  # [batch, window_fields]

    def _planes(self, valid, a):
        """Per-token counts ``[P, n]`` (float32 exact integers; float64 past 2^24 channels) of the planes
        ``a <= 0``, ``a <= eps`` (grid order), ``valid < 0`` and, on a GPU, ``a <= FLT_MAX``; and the zero
        plane ``[n, c]`` (1.0 where the entry is 0, -0 included), valid until the next ``update``.

        Each plane is one comparison written as float32 into a work buffer and one sum over channels (measured
        on a 2-core CPU: faster than boolean planes, than one broadcast comparison into a buffer of all planes,
        and than ``bucketize``). The zero plane has a buffer of its own (chunks and channel activity read it
        afterwards); the others share one. On the CPU the buffers are reused across updates (``_scratch``)."""
        import torch

        n, c = valid.shape
        dev = valid.device
        thr = self._thresholds(dev)  # float32 [T]: 0, eps grid, (FLT_MAX)
        G = len(self.eps_grid)
        acc = torch.float32 if c < _EXACT_F32 else torch.float64
        out = torch.empty((thr.shape[0] + 1, n), dtype=acc, device=dev)
        zero = torch.le(a, thr[0], out=_scratch("zero", (n, c), dev))
        torch.sum(zero, -1, dtype=acc, out=out[0])
        plane = _scratch("plane", (n, c), dev)
        for j in range(1, thr.shape[0]):  # near-zero planes 1..G, then the finite plane (stored at G + 2)
            torch.le(a, thr[j], out=plane)
            torch.sum(plane, -1, dtype=acc, out=out[j if j <= G else j + 1])
        torch.lt(valid, 0, out=plane)
        torch.sum(plane, -1, dtype=acc, out=out[G + 1])
        return out, zero

    def _thresholds(self, device):
        import torch

        key = str(device)
        cache = self.__dict__.setdefault("_thr_cache", {})
        if key not in cache or cache[key].device != torch.device(device):  # e.g. after probe_to_cpu
            vals = [0.0, *self.eps_grid]
            if torch.device(device).type != "cpu":
                vals.append(float(torch.finfo(torch.float32).max))  # finite plane: no host sync per batch
            cache[key] = torch.tensor(vals, dtype=torch.float32, device=device)  # as the float32 eps compared
        return cache[key]

    def _window_ids(self, lens: list[int]):
        """The global window indices of the batch being run (``tags``), one per row of ``lens``; None untagged."""
        if self.tags is None:
            return None
        ids = getattr(self.tags, "ids", None)
        if ids is None or len(ids) != len(lens):
            raise ValueError(f"window tags give {0 if ids is None else len(ids)} ids for a batch of {len(lens)} "
                             "windows")
        return ids

    def _add_windows(self, rows, lens: list[int], ids=None) -> None:
        if ids is None:
            ids = self._window_ids(lens)
        keep = [i for i, L in enumerate(lens) if L > 0]  # a window with no counted token tells nothing
        if len(keep) != len(lens):
            rows = rows[keep]
            ids = [ids[i] for i in keep] if ids is not None else None
        if keep:
            self._window_values().add(ids, rows)

    def _window_values(self):
        from probes.uncertainty import WindowValues

        return WindowValues(window_fields(self.eps_grid), self.windows)

    def _update_chunks(self, zero, lens: list[int]):
        """Union of non-zero channels over each run of k consecutive counted tokens of a sequence.

        ``zero``: the zero plane ``[n_valid, channels]`` (1.0 where the entry is 0). A channel is in a chunk's
        union unless it is 0 on all k tokens (minimum of the plane over the chunk = 1), so the union size is
        ``c - sum_channels(min_k zero)``: an exact integer, equal to the non-zero count of the chunk's sum of
        ``|a|`` used before. Returns the chunk-sparsity sum and the number of full chunks per window (float64
        ``[batch]`` each)."""
        import torch

        k, c = self.chunk_k, zero.shape[1]
        B = len(lens)
        f64 = dict(dtype=torch.float64, device=zero.device)
        acc = torch.float32 if c < _EXACT_F32 else torch.float64
        if k <= 0:
            return torch.zeros(B, **f64), torch.zeros(B, **f64)
        if len(set(lens)) == 1:  # equal lengths: one reshape, no loop
            L, full = lens[0], lens[0] // k
            if not full:
                return torch.zeros(B, **f64), torch.zeros(B, **f64)
            blocks = zero.view(B, L, c)[:, :full * k].reshape(-1, k, c)
            u = c - blocks.amin(1).sum(1, dtype=acc)  # union sizes, exact integers
        else:
            parts, off = [], 0
            for L in lens:
                full = L // k
                if full:
                    parts.append(c - zero[off:off + full * k].view(full, k, c).amin(1).sum(1, dtype=acc))
                off += L
            if not parts:
                return torch.zeros(B, **f64), torch.zeros(B, **f64)
            u = torch.cat(parts)
        return self._chunk_rows(u, lens)

    def _chunk_rows(self, u, lens: list[int]):
        """From the union sizes ``u`` of every full chunk (window order): add to the chunk state and return the
        chunk-sparsity sum and the number of full chunks per window (float64 ``[batch]`` each)."""
        import torch

        k, c, B = self.chunk_k, self.width, len(lens)
        f64 = dict(dtype=torch.float64, device=u.device)
        if k <= 0 or u.numel() == 0:
            return torch.zeros(B, **f64), torch.zeros(B, **f64)
        per = 1.0 - u.double() / c
        if len(set(lens)) == 1:
            full = lens[0] // k
            chunk_w = per.view(B, full).sum(1)
            nchunk_w = torch.full((B,), float(full), **f64)
        else:
            counts = [L // k for L in lens]
            nchunk_w = torch.tensor(counts, **f64)
            row = torch.repeat_interleave(torch.arange(B, device=u.device), torch.tensor(counts, device=u.device))
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
        self.relu_updates += getattr(other, "relu_updates", 0)
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


def _native_ok(valid, n_eps: int) -> bool:
    """Whether this update's counts come from the fused CPU kernel (``probes.fastcount``); ``valid`` is the
    float32 matrix ``update`` made (so only what ``fastcount.supports`` checks besides is checked here)."""
    import probes.fastcount as fastcount

    return (valid.is_cpu and n_eps <= fastcount.MAX_EPS and valid.shape[1] < (1 << 24)
            and (fastcount._STATE["fn"] is not None or fastcount.kernel() is not None))


_EXACT_F32 = 1 << 24  # float32 holds every integer up to 2^24 exactly
SCRATCH_MAX = 64 << 20  # CPU work buffers up to this size are kept between updates (``_scratch``)
_SCRATCH: dict = {}


def _scratch(name: str, shape: tuple, device):
    """A float32 work buffer of ``shape``, contents undefined. On the CPU, buffers up to ``SCRATCH_MAX`` bytes
    are kept by name and reused (at most 3 x SCRATCH_MAX in all): a fresh multi-megabyte buffer per update
    costs a page fault per 4 KiB, often more than the pass that fills it. Elsewhere (a GPU's caching
    allocator reuses memory already) and for bigger buffers: a new tensor."""
    import math

    import torch

    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel * 4 > SCRATCH_MAX:
        return torch.empty(shape, dtype=torch.float32, device=device)
    buf = _SCRATCH.get(name)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = _SCRATCH[name] = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


def _window_sums(per_token, lens: list[int], full_rows: bool):
    """Per-window sums ``[batch, P]`` (float64, exact for integers) of per-token values ``[P, n_valid]`` (in
    (batch, pos) order)."""
    import torch

    B = len(lens)
    t = per_token.double()
    if full_rows:
        return t.view(t.shape[0], B, -1).sum(-1).T
    row = torch.repeat_interleave(torch.arange(B, device=t.device), torch.tensor(lens, device=t.device))
    return torch.zeros(B, t.shape[0], dtype=torch.float64, device=t.device).index_add_(0, row, t.T)


_LAST_MASK: list = [None, None]  # (mask seen last, its layout): every site of one batch gets the same mask


def _mask_layout(mask, x):
    """``(full_rows, bool mask on x's device or None, counted tokens per row)`` of a batch, worked out once
    per batch: the sites of one forward share the mask object, so the host syncs (``all``, ``tolist``) run
    once per batch, not once per site."""
    import torch

    if mask is None:
        return True, None, [x.shape[1]] * x.shape[0]
    last, layout = _LAST_MASK
    if last is mask and layout[0] == _version(mask) and layout[2].device == x.device:
        return layout[1:]
    m = mask.to(device=x.device, dtype=torch.bool)  # a 0/1 attention mask must not index rows
    full = bool(m.all())
    layout = (full, m, [x.shape[1]] * x.shape[0] if full else m.sum(1).tolist())
    _LAST_MASK[0], _LAST_MASK[1] = mask, (_version(mask), *layout)  # the version: changed in place since?
    return layout


def _relu_layout(x, mask):
    """``(lens, at)`` of a ReLU's output ``x`` as a site hook would see it with the batch's count mask ``mask``
    (``probes.runner.token_layout``, then ``update``): ``[batch, pos, channels]`` with a mask of its
    ``[batch, pos]``, ``[batch * pos, channels]`` with a mask of that many positions, else every position
    (``[tokens, channels]``: one per window). ``lens``: the counted tokens per window; ``at``: None where every
    position counts, else the row (of ``x`` as ``[rows, channels]``) where each window's counted run starts. None
    where a window's counted positions are not one run (then the pass cannot count them as ``update`` would)."""
    if x.dim() == 3:
        if mask is not None and tuple(x.shape[:2]) != tuple(mask.shape):
            mask = None
        v = x
    elif x.dim() == 2:
        if mask is not None and x.shape[0] == mask.numel():
            v = x.view(*mask.shape, x.shape[-1])
        else:
            v, mask = x.unsqueeze(1), None
    else:
        return None
    if v.shape[0] * v.shape[1] == 0:
        return None
    full_rows, _, lens = _mask_layout(mask, v)
    if full_rows:
        return lens, None
    first = _run_starts(mask)
    if first is None:
        return None
    T = v.shape[1]
    return lens, [b * T + f for b, f in enumerate(first)]


def _run_starts(mask):
    """Per row of a ``[batch, pos]`` count mask whose counted positions form one run in every row (padding after
    it, uncounted context before it), the run's first position (its length: ``_mask_layout``'s ``lens``); None
    otherwise. Worked out once per mask (the sites of a forward share it)."""
    import torch

    last = _LAST_RUNS
    if last[0] is mask and last[1] == _version(mask):
        return last[2]
    m = mask.to(device="cpu", dtype=torch.bool)
    starts = m[:, 0].long() + (m[:, 1:] & ~m[:, :-1]).sum(1)  # runs of counted positions per row
    out = None
    if bool((starts <= 1).all()):
        out = m.long().argmax(1).tolist()
    _LAST_RUNS[0], _LAST_RUNS[1], _LAST_RUNS[2] = mask, _version(mask), out
    return out


_LAST_RUNS: list = [None, None, None]


def _lens_tensor(lens: list[int], device):
    """``lens`` as a float64 tensor on ``device``, made once per batch (a host-to-GPU copy waits for the GPU)."""
    import torch

    key = (tuple(lens), str(device))
    if _LENS[0] != key:
        _LENS[0], _LENS[1] = key, torch.tensor(lens, dtype=torch.float64, device=device)
    return _LENS[1]


_LENS: list = [None, None]


def _version(t):
    """The tensor's in-place version counter; None for an inference tensor (it has none: a mask made in
    ``torch.inference_mode`` is then recognised by identity alone)."""
    try:
        return t._version
    except RuntimeError:
        return None


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
