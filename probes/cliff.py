"""The sparsity cliff (Bug or Feature^2, code On-Point-RND/BugOrFeature): quality against enforced
activation sparsity at the MLP activation, and where it breaks.

Sparsity is enforced at the input of each MLP output projection (the MLP activation; ``act(gate)``
decides for GLU MLPs) by a forward pre-hook that zeroes entries (``probes.runner``, the same place
``probes.pplp_session`` masks), over a grid of target sparsities, for four families:

- ``topk_sample``: Bug or Feature^2's rule (modifiers/decorators.py ``topk_sparse_module``, used as
  ``TopKSparseGELU`` in modifiers/activations.py): per sequence, over all its positions x channels,
  zero the entries whose **signed** value is below a k-th value. Their code computes
  ``n_keep = int((1 - sparsity_level) * n)`` and zeroes ``x < torch.kthvalue(x, n_keep)``;
  ``kthvalue`` counts from the smallest, so it zeroes ``n_keep - 1`` entries, a fraction of about
  ``1 - sparsity_level``. We parameterise by the fraction zeroed, s: ``n_drop = int(s * n)`` and zero
  ``x < kthvalue(x, n_drop + 1)`` (their rule at ``n_keep = n_drop + 1``); the k-th value is taken over
  the sequence's counted positions and applied to all its positions;
- ``topk_token``: per token, keep the ``C - int(s * C)`` largest |x| (every token the same count);
- ``magnitude_layer``: per layer, zero |x| <= t_l with t_l the k-th smallest |x| (k = max(1, int(s n)))
  over the calibration sample: a magnitude threshold fixed before the evaluated windows are seen;
- ``sparling_posthoc``: SPARLING's per-channel k-th-value thresholds, post hoc (``probes.sparling``).

The calibrated families (``magnitude_layer``, ``sparling_posthoc``) take their thresholds from
calibration windows (``calib_share`` of the windows, evenly spaced); every family and the dense run
are evaluated on the remaining, held-out windows, so all ratios share one set of tokens. s = 0 is
the dense run. Quality of a causal LM is the perplexity ratio exp(CE_sparse - CE_dense) on those
tokens (``ppl_ratio``).

Sequence classifiers (``labels``: a .jsonl label field, ``…ForSequenceClassification``): the labeled
examples are split like windows (``calib_split``: ``calib_share`` of them, evenly spaced, calibrate;
the rest are held out), one example per batch row; only real (attention-mask) positions enter a
calibration sample, a ``topk_sample`` k-th value or a count (padded positions are masked with their
row but never counted). Bug or Feature^2 has no classifier: its only quality measure is the mean
next-token cross-entropy on a held-out validation split (trainer.py ``Trainer.validate``:
``val_loss`` averaged over validation batches, ``val_ppl = exp(val_loss)``), so the classifier's
quality is the same quantity on held-out examples: ``loss_ratio`` = exp(mean CE_sparse - mean CE_dense)
over the held-out examples (the cliff rules read it where an LM's read ``ppl_ratio``); ``accuracy``
(argmax = label, on the same examples), ``accuracy_dense`` and ``accuracy_drop`` (percentage points)
are reported beside it, with bootstrap error bars over held-out examples. No accuracy-based cliff rule
is given: the paper states its cliff in loss/perplexity, not accuracy.

A grid point whose masks provably zero nothing but exact zeros (a top-k or magnitude target below
the activations' natural sparsity: ``DenseScan``, checked on the dense pass's own activations) IS
the dense run: it reuses the dense pass (``pass`` 0) instead of repeating it, bit for bit the same
numbers.

The cliff of each family is located by two stated rules on (achieved mean sparsity, PPL ratio):
``sparsity_within_p``: the largest achieved sparsity such that it and every grid point below it stay
within 1 + p/100 (``sparsity_within_p_interp``: the crossing of 1 + p, linear in ln ratio between that
point and the next); ``knee_sparsity``: the point of maximum curvature as Kneedle (Satopaa et al. 2011)
finds it: with the achieved sparsity and ln(ratio) min-max normalised over the family's points (equal
sparsities merged, the first kept), the interior point farthest below the chord from the first point
to the last (``knee_distance``, in normalised units). Finite-difference curvature on the non-uniform
grid was tried first and rejected: points a few hundredths of a percent apart next to the dense run
turn noise of 1e-4 in the ratio into the largest curvature. With ``refine`` rounds, the targets
halfway to the knee's neighbours are added and the knee recomputed (finer near the knee).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes.boolcount import count_last, count_rows
from probes.data import DataOptions, token_windows
from probes.errors import DataError, ModelError
from probes.pplp_session import PassStats as Pass
from probes.pplp_session import append_window_counts, kept_row
from probes.selection import kth_smallest_rows
from probes.sparling import (CALIB_BYTES, DEFAULT_CALIB_ROWS, SparlingCalibration, reached_density,
                             sparling_masker, learned_thresholds)

FAMILIES = ("topk_sample", "topk_token", "magnitude_layer", "sparling_posthoc")
CALIBRATED = ("magnitude_layer", "sparling_posthoc")
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95)
DEFAULT_P = 1.0
DEFAULT_MAX_TOKENS = 8192  # counted tokens when --max-tokens is not given (an LM): at most 70 sparse passes
DEFAULT_CALIB_SHARE = 0.25
MIN_TOKENS = 4096
LABELS = {"topk_sample": "top-k per sequence (signed), Bug or Feature^2 rule",
          "topk_token": "top-k |x| per token",
          "magnitude_layer": "|x| threshold per layer (calibrated)",
          "sparling_posthoc": "SPARLING per-channel threshold, post hoc"}
SCOPES = {"topk_sample": "per sequence", "topk_token": "per token", "magnitude_layer": "per layer",
          "sparling_posthoc": "per channel"}


@dataclass
class CliffOptions(DataOptions):
    sites: tuple[str, ...] = ()
    families: tuple[str, ...] = FAMILIES
    grid: tuple[float, ...] = DEFAULT_GRID
    p: float = DEFAULT_P
    refine: int = 1
    calib_share: float = DEFAULT_CALIB_SHARE
    calib_rows: int = DEFAULT_CALIB_ROWS
    sparling_detail: float = 0.9  # the target sparsity whose per-channel densities are tabled
    labels: str | None = None  # .jsonl label field: score a sequence classifier (loss ratio, accuracy)


# ------------------------------------------------------------------------------------------- masks
def topk_token_mask(v, s: float):
    """Drop mask keeping the ``C - int(s C)`` largest |v| of each token (last dim)."""
    import torch

    a = v.float().abs()
    C = a.shape[-1]
    n_drop = int(float(s) * C)
    if n_drop <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if n_drop >= C:
        return torch.ones_like(a, dtype=torch.bool)
    drop = torch.ones_like(a, dtype=torch.bool)
    drop.scatter_(-1, a.topk(C - n_drop, dim=-1).indices, False)
    return drop


def topk_sample_mask(v, mask, s: float):
    """Bug or Feature^2's per-sample rule: per sequence b, over its counted entries (positions x
    channels), ``n_drop = int(s n)`` and drop ``v < kthvalue(v, n_drop + 1)`` (signed).

    Vectorised: uncounted entries are set to +inf (never below a counted k-th value), and one ``kthvalue``
    serves every sequence with the same ``n_drop`` (the same k-th values as one call per sequence over its
    counted entries: a k-th value does not depend on how ties are ordered)."""
    import torch

    vf = v.float()
    if vf.dim() == 2:  # [N, C]: one sample
        vf, mask = vf.unsqueeze(0), None
    B = vf.shape[0]
    flat = vf.reshape(B, -1)
    if mask is None:
        n = [flat.shape[1]] * B
        counted = flat
    else:
        mm = mask.unsqueeze(-1).expand(vf.shape).reshape(B, -1)
        n = mm.sum(1).tolist()
        counted = flat if bool(mm.all()) else flat.masked_fill(~mm, math.inf)
    kth = torch.full((B, 1), -math.inf, dtype=flat.dtype, device=flat.device)  # -inf: nothing is below it
    groups: dict[int, list[int]] = {}
    everything: list[int] = []
    for b, nb in enumerate(n):
        n_drop = int(float(s) * nb)
        if nb == 0 or n_drop <= 0:
            continue
        if n_drop >= nb:
            everything.append(b)
            continue
        groups.setdefault(n_drop, []).append(b)
    # numpy's selection where there is no NaN (probes.selection: the same k-th values, ~10x faster on CPU)
    nan_free = bool(groups) and not bool(torch.isnan(flat).any())
    for n_drop, rows in groups.items():
        if len(rows) == B:
            kth = kth_smallest_rows(counted, n_drop + 1, nan_free).to(flat.device).unsqueeze(1)
        else:
            idx = torch.tensor(rows, device=flat.device)
            kth[idx] = kth_smallest_rows(counted[idx], n_drop + 1, nan_free).to(flat.device).unsqueeze(1)
    drop = flat < kth
    if everything:
        drop[everything] = True
    return drop.reshape(v.shape)


def layer_abs_thresholds(cal: SparlingCalibration, s: float) -> list[float]:
    """Per layer: the k-th smallest |v| of the calibration sample, k = max(1, int(s n)); -inf at s = 0."""
    import torch

    out = []
    for i in range(cal.n_layers):
        a = cal.sample(i).abs().reshape(-1)
        n = a.numel()
        if s <= 0 or n == 0:
            out.append(-math.inf)
            continue
        nan_free = not bool(torch.isnan(a).any())
        out.append(float(kth_smallest_rows(a.reshape(1, -1), max(1, int(float(s) * n)), nan_free)[0]))
    return out


def family_masker(family: str, s: float, cal: SparlingCalibration | None):
    """``(masker(layer, x3, g3, m) -> bool drop mask, thresholds per layer)`` of one family at sparsity s."""
    if family == "topk_token":
        return (lambda layer, x3, g3, m: topk_token_mask(g3 if g3 is not None else x3, s)), \
            [f"keep C - int({s:g} C) largest |x| per token"] * (cal.n_layers if cal else 1)
    if family == "topk_sample":
        return (lambda layer, x3, g3, m: topk_sample_mask(g3 if g3 is not None else x3, m, s)), \
            [f"drop the int({s:g} n) smallest signed entries per sequence"] * (cal.n_layers if cal else 1)
    if cal is None:
        raise ValueError(f"{family} needs a calibration")
    if family == "magnitude_layer":
        ts = layer_abs_thresholds(cal, s)

        def m_mag(layer, x3, g3, m):
            return (g3 if g3 is not None else x3).float().abs() <= ts[layer.index]

        return m_mag, ts
    if family == "sparling_posthoc":
        return sparling_masker(cal.thresholds(s))
    raise ValueError(f"unknown cliff family {family!r}")


# ------------------------------------------------------------------------------------ cliff rules
def cliff_location(points: Sequence[tuple[float, float]], p: float = DEFAULT_P) -> dict[str, Any]:
    """The two cliff rules on ``points`` = (achieved sparsity, PPL ratio); see the module docstring.

    Points with the same sparsity (to 1e-9) keep the first given. Returns ``sparsity_within_p``,
    ``ratio_within_p``, ``sparsity_within_p_interp``, ``p_exceeded`` and ``knee_sparsity``,
    ``knee_ratio``, ``knee_distance`` (NaN where a rule has no answer)."""
    nan = math.nan
    pts: list[tuple[float, float]] = []
    for x, r in sorted(((float(x), float(r)) for x, r in points if x == x and r == r), key=lambda t: t[0]):
        if pts and abs(x - pts[-1][0]) <= 1e-9:
            continue
        pts.append((x, r))
    out = {"sparsity_within_p": nan, "ratio_within_p": nan, "sparsity_within_p_interp": nan, "p_exceeded": False,
           "knee_sparsity": nan, "knee_ratio": nan, "knee_distance": nan}
    limit = 1.0 + float(p) / 100.0
    last = None
    for i, (x, r) in enumerate(pts):
        if r > limit:
            out["p_exceeded"] = True
            if last is not None:
                x0, r0 = pts[last]
                y0, y1, yl = math.log(r0), math.log(r), math.log(limit)
                out["sparsity_within_p_interp"] = x0 + (x - x0) * (yl - y0) / (y1 - y0) if y1 > y0 else x0
            break
        last = i
    if last is not None:
        out["sparsity_within_p"], out["ratio_within_p"] = pts[last]
    if len(pts) >= 3:
        xs = [x for x, _ in pts]
        ys = [math.log(max(r, 1e-300)) for _, r in pts]
        xr, yr = xs[-1] - xs[0], max(ys) - min(ys)
        if xr > 0 and yr > 0:
            xn = [(x - xs[0]) / xr for x in xs]
            yn = [(y - min(ys)) / yr for y in ys]
            slope = (yn[-1] - yn[0]) / (xn[-1] - xn[0])
            best, best_k = 0.0, None
            for i in range(1, len(pts) - 1):
                gap = yn[0] + slope * (xn[i] - xn[0]) - yn[i]  # how far below the chord
                if gap > best:
                    best, best_k = gap, i
            if best_k is not None:
                out["knee_sparsity"], out["knee_ratio"] = pts[best_k]
                out["knee_distance"] = best
    return out


# ------------------------------------------------------------------------------------- error bars
CLIFF_BAR_COLUMNS = ("sparsity_within_p", "sparsity_within_p_interp", "knee_sparsity")


def cliff_intervals(dense: "Pass", passes: Sequence["Pass"], p: float = DEFAULT_P, seed: int = 0,
                    n_resamples: int | None = None, level: float | None = None) -> dict[str, float]:
    """Bootstrap intervals over held-out windows of the cliff rules of one family.

    ``passes``: the family's grid points in target order (the dense pass at s = 0 included), each with its
    per-window summed losses, counted tokens and per-layer zero and entry counts. Each resample draws the
    held-out windows with replacement (``probes.uncertainty``'s seeded count vectors, the same for every
    family), recomputes every point's PPL ratio exp((sum CE_sparse - sum CE_dense) / tokens) and mean
    sparsity (mean over layers of sum zeros / sum entries) from the resampled window sums, and applies
    ``cliff_location`` to them. The grid, the thresholds (calibrated on other windows) and the refined
    targets are held fixed. ``X_lo``/``X_hi``: the percentiles of X over the resamples where the rule has an
    answer (NaN resamples dropped; NaN when fewer than 2 have one)."""
    import numpy as np

    from probes.uncertainty import DEFAULT_LEVEL, DEFAULT_RESAMPLES
    from probes.uncertainty_extra import interval, replicate_counts

    n_resamples = DEFAULT_RESAMPLES if n_resamples is None else n_resamples
    level = DEFAULT_LEVEL if level is None else level
    out = {f"{c}{x}": math.nan for c in CLIFF_BAR_COLUMNS for x in ("_lo", "_hi")}
    wins = [dense, *passes]
    if any(q.window_ce is None for q in wins) or len({len(q.window_ce) for q in wins}) != 1:
        return out
    keep = dense.window_tokens > 0
    m = int(keep.sum())
    C = replicate_counts(m, n_resamples, seed)  # [R, m]
    if not len(C):
        return out
    D, N = C @ dense.window_ce[keep], C @ dense.window_tokens[keep]
    xs, rs = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for q in passes:
            rs.append(np.exp((C @ q.window_ce[keep] - D) / N))
            sp = (C @ q.window_zeros[keep]) / (C @ q.window_entries[keep])  # [R, L]; NaN: a layer with no entry
            ok = ~np.isnan(sp)
            xs.append(np.where(ok, sp, 0.0).sum(1) / ok.sum(1))  # mean over layers with a value, as the point's
    X, R = np.stack(xs, 1), np.stack(rs, 1)  # [R, points]
    reps = {c: np.full(len(C), math.nan) for c in CLIFF_BAR_COLUMNS}
    for i in range(len(C)):
        loc = cliff_location(list(zip(X[i].tolist(), R[i].tolist())), p)
        for c in CLIFF_BAR_COLUMNS:
            reps[c][i] = loc[c]
    for c in CLIFF_BAR_COLUMNS:
        out[f"{c}_lo"], out[f"{c}_hi"] = interval(reps[c], level)
    return out


def point_bars(dense: "Pass", st: "Pass", seed: int = 0, name: str = "ppl_ratio") -> dict[str, float]:
    """Error bars over held-out windows of one grid point (thresholds fixed): ``{name}_se`` (delta method)
    / ``_lo`` / ``_hi`` of the quality ratio (``ppl_ratio``, or a classifier's ``loss_ratio``) and
    ``mean_sparsity_se`` / ``_lo`` / ``_hi`` (mean over layers, layers kept correlated), from the same seeded
    resamples as ``cliff_intervals``; for classifier passes also ``accuracy`` and ``accuracy_drop`` (points)
    ``_se`` / ``_lo`` / ``_hi`` over the held-out examples."""
    import numpy as np

    from probes.uncertainty_extra import exp_ratio_bars, mean_of_ratios_bars, ratio_bars

    cls = getattr(st, "window_correct", None) is not None and getattr(dense, "window_correct", None) is not None
    cols = (name, "mean_sparsity") + (("accuracy", "accuracy_drop") if cls else ())
    out = {f"{c}{x}": math.nan for c in cols for x in ("_se", "_lo", "_hi")}
    if dense.window_ce is None or st.window_ce is None or len(st.window_ce) != len(dense.window_ce):
        return out
    keep = dense.window_tokens > 0
    out.update(exp_ratio_bars(name, (st.window_ce - dense.window_ce)[keep], dense.window_tokens[keep],
                              seed=seed))
    if cls:
        a, d = st.window_correct[keep], dense.window_correct[keep]
        out.update(ratio_bars(("accuracy", "accuracy_drop"), np.stack([a, 100.0 * (d - a)], 1),
                              np.ones((len(a), 2)), seed=seed))
    Z, E = st.window_zeros[keep], st.window_entries[keep]
    ok = E.sum(0) > 0
    w = np.where(ok, 1.0 / max(1, int(ok.sum())), 0.0)
    out.update(mean_of_ratios_bars("mean_sparsity", Z, E, w, seed=seed)[0])
    return out


# ------------------------------------------------------------------------------------------ passes
# One pass: the PPL-p% session's record (its CETT fields stay empty here): ``Pass``, imported above.


def _sites(layers):
    gate_of = {l.gate_site.canonical_name: l.site.canonical_name for l in layers if l.gate_site}
    sites = [l.site for l in layers] + [l.gate_site for l in layers if l.gate_site]
    return sites, gate_of


@dataclass
class ClassifierPass(Pass):
    """A pass over labeled examples: the PPL-p% session's record with one example per "window" (its
    ``window_tokens`` are 1) and, per example, whether the argmax matched the label."""

    window_correct: Any = field(repr=False, default=None)

    @property
    def accuracy(self) -> float:
        return float(self.window_correct.mean()) if self.window_correct is not None and len(self.window_correct) \
            else math.nan


class DenseScan:
    """What the dense pass's activations say about which grid points zero only exact zeros.

    Per layer, over every position of the held-out batches (counted or not: masks apply to all):
    ``max_nnz``, the most nonzero entries of ``v`` (the tensor the rules read) in one token; ``min_abs``,
    the smallest nonzero ``|v|``; per sequence (``rows``) its counted entries n and ``c``, how many counted
    entries are <= the smallest nonzero ``v`` of the whole sequence. The dropped entries are all exact
    zeros (so the sparse pass would reproduce the dense one bit for bit: by induction over layers every
    later input is the dense one) when, in every layer:

    - ``topk_token``: ``max_nnz <= C - int(s C)`` (topk keeps every strictly larger entry before a zero);
    - ``topk_sample``: every sequence has ``int(s n) <= 0``, or ``int(s n) + 1 <= c`` (then the k-th value is
      <= the smallest nonzero entry, and only entries below it are dropped), or ``int(s n) >= n`` with no
      nonzero entry;
    - ``magnitude_layer``: the threshold is below ``min_abs``.

    Zeros are judged on ``v``: the projection input is ``v`` itself, or ``act(gate) * up`` (zero where ``v``
    is). ``ok`` is False when a layer's tensor had no per-sequence layout (then nothing is reused)."""

    def __init__(self, n_layers: int):
        self.ok = True
        self.width = [0] * n_layers
        self.max_nnz = [0] * n_layers
        self.min_abs = [math.inf] * n_layers
        self.rows: list[list[Any]] = [[] for _ in range(n_layers)]

    def update(self, i: int, v, m) -> None:
        import torch

        if v.dim() != 3:
            self.ok = False
            return
        vf = v.float()
        nz = vf != 0
        C = vf.shape[-1]
        self.width[i] = C
        self.max_nnz[i] = max(self.max_nnz[i], int(count_last(nz).max()) if nz.numel() else 0)
        a = vf.abs().masked_fill(~nz, math.inf)
        if a.numel():
            self.min_abs[i] = min(self.min_abs[i], float(a.min()))
        low = vf.masked_fill(~nz, math.inf).amin((1, 2))  # smallest nonzero entry per sequence (+inf: none)
        le = vf <= low.view(-1, 1, 1)
        if m is not None:
            le = le & m.unsqueeze(-1)
            n = m.sum(1) * C
        else:
            n = torch.full((vf.shape[0],), vf.shape[1] * C, device=vf.device)
        c = count_rows(le)  # int64, as a bool .sum(), without widening every entry (probes.boolcount)
        self.rows[i].append(torch.stack([n.cpu(), c.cpu(), torch.isinf(low).cpu().long()], 1))

    def is_dense(self, family: str, s: float, thresholds: Sequence[Any] = ()) -> bool:
        """True when ``family`` at target ``s`` (with its per-layer ``thresholds`` for magnitude_layer) zeroes
        nothing but exact zeros of the dense activations."""
        import torch

        if not self.ok or s <= 0:
            return s <= 0
        if family == "topk_token":
            return all(mx <= C - int(float(s) * C) for mx, C in zip(self.max_nnz, self.width))
        if family == "magnitude_layer":
            return all(isinstance(t, float) and t < lo for t, lo in zip(thresholds, self.min_abs))
        if family == "topk_sample":
            for rows in self.rows:
                if not rows:
                    return False
                r = torch.cat(rows).tolist()
                for n, c, none in r:
                    n_drop = int(float(s) * n)
                    if n == 0 or n_drop <= 0:
                        continue
                    if n_drop >= n:
                        if not none:
                            return False
                        continue
                    if n_drop + 1 > c:
                        return False
            return True
        return False


def sparse_pass(loaded, layers, batches, masker: Callable | None = None,
                observe: Callable | None = None, progress: Callable[[int], Any] | None = None,
                task: str = "causal_lm") -> Pass:
    """One pass over ``batches``: ``observe(layer, v3, mask)`` sees each MLP activation before masking
    (``v`` = act(gate) for GLU MLPs, else the projection input), ``masker(layer, x3, g3, m)`` gives the
    entries zeroed before the output projection. ``task`` ``causal_lm``: sums the next-token cross-entropy of
    counted tokens (a window per batch row); ``classification``: the cross-entropy of each example's logits
    against its label, and whether the argmax is the label (a ``ClassifierPass``, one example per row)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from probes.runner import TokenBatches, run, token_layout

    by_name = {l.site.canonical_name: l for l in layers}
    sites, gate_of = _sites(layers)
    L = len(layers)
    zeros, entries = [0.0] * L, [0.0] * L
    gates: dict[str, Any] = {}
    cur: dict[int, tuple[Any, Any]] = {}  # this batch's per-row zero and entry counts per layer
    win = {"ce": [], "tok": [], "zeros": [], "entries": [], "correct": [], "ok": True}

    def hook(x, hc):
        name = hc.site.canonical_name
        if name in gate_of:
            gates[gate_of[name]] = x
            return None
        layer = by_name[name]
        x3, m = token_layout(hc.site, x, hc.mask)
        g = gates.pop(name, None)
        g3 = g.reshape(x3.shape) if g is not None and g.numel() == x3.numel() else None
        if observe is not None:
            observe(layer, g3 if g3 is not None else x3, m)
        xs = x3 if masker is None else x3.masked_fill(masker(layer, x3, g3, m), 0)
        C = xs.shape[-1]
        if xs.dim() == 3:  # per-row integer counts (their sum is the exact count of the whole batch)
            zp = count_last(xs == 0)  # [B, P] zeros per position
            if m is not None:
                zr, n_pos = (zp * m).sum(1), m.sum(1)
            else:
                zr, n_pos = zp.sum(1), torch.full((xs.shape[0],), xs.shape[1], device=xs.device)
            zr, er = zr.cpu(), (n_pos * C).cpu()
            cur[layer.index] = (zr.double(), er.double())
            zeros[layer.index] += float(zr.sum())
            entries[layer.index] += float(er.sum())
        else:
            win["ok"] = False
            xc = xs[m] if m is not None else xs.reshape(-1, C)
            zeros[layer.index] += float(torch.count_nonzero(xc == 0))
            entries[layer.index] += float(xc.numel())
        return None if masker is None else xs.reshape(x.shape)

    tot = {"ce": 0.0, "n": 0}

    def step_lm(batch, out) -> None:
        gates.clear()
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ModelError(f"{type(loaded.model).__name__} returned no logits",
                             "the cliff needs a causal LM with a language-model head")
        B = logits.shape[0]
        for b in range(B):  # one row at a time bounds the float32 copy of the logits
            lab = batch.labels[b]
            keep = lab != -100
            ce_b, n_b = 0.0, 0
            if bool(keep.any()):
                ce_b = float(F.cross_entropy(*kept_row(logits[b], lab, keep), reduction="sum").double())
                n_b = int(keep.sum())
                tot["ce"] += ce_b
                tot["n"] += n_b
            win["ce"].append(ce_b)
            win["tok"].append(float(n_b))
        append_window_counts(win, cur, B, L)

    def step_cls(batch, out) -> None:
        gates.clear()
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() != 2:
            raise ModelError(f"{type(loaded.model).__name__} gives no [batch, classes] logits",
                             "the cliff with --labels needs a sequence classifier (…ForSequenceClassification)")
        lab = batch.labels.to(logits.device)
        lf = logits.float()
        ce = F.cross_entropy(lf, lab, reduction="none").double().cpu().tolist()
        ok = (lf.argmax(-1) == lab).cpu().tolist()
        for ce_b, ok_b in zip(ce, ok):
            tot["ce"] += ce_b
            tot["n"] += 1
            win["ce"].append(ce_b)
            win["tok"].append(1.0)
            win["correct"].append(1.0 if ok_b else 0.0)
        append_window_counts(win, cur, int(logits.shape[0]), L)

    cls = task == "classification"
    t0 = time.perf_counter()
    with torch.inference_mode():
        run(loaded.model, batches, fwd_hooks=[(s, hook) for s in sites], adapter=TokenBatches(need_logits=True),
            step=step_cls if cls else step_lm, progress=progress)
    if tot["n"] == 0:
        raise DataError("no counted tokens to compute a perplexity on" if not cls else "no labeled examples to score",
                        "give a longer corpus with --data")
    st = (ClassifierPass if cls else Pass)(tot["ce"], tot["n"], zeros, entries, removed_sum=[], layer_tokens=[],
                                           seconds=time.perf_counter() - t0)
    if win["ok"] and win["zeros"]:
        st.window_ce, st.window_tokens = np.array(win["ce"]), np.array(win["tok"])
        st.window_zeros, st.window_entries = np.concatenate(win["zeros"]), np.concatenate(win["entries"])
    if cls:
        st.window_correct = np.array(win["correct"])
    return st


def calib_split(n: int, share: float, unit: str = "token window") -> tuple[list[int], list[int]]:
    """Indices of calibration and held-out windows (or labeled examples): ``round(share n)`` (at least 1)
    evenly spaced ones calibrate, the rest are held out."""
    if n < 2:
        raise DataError(f"only {n} {unit}(s): the cliff needs one to calibrate and one to evaluate",
                        "give a longer corpus with --data or raise --max-tokens")
    k = min(max(1, round(float(share) * n)), n - 1)
    cal = sorted({min(n - 1, int(i * n / k)) for i in range(k)})
    held = [i for i in range(n) if i not in set(cal)]
    return cal, held


# ------------------------------------------------------------------------------------------ result
@dataclass
class CliffResult:
    points: list[dict[str, Any]]
    layer_rows: list[dict[str, Any]]
    cliffs: list[dict[str, Any]]
    sparling_rows: list[dict[str, Any]]
    sparling_channels: list[dict[str, Any]]
    learned: list[dict[str, Any]]
    info: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, Any]:
        import pandas as pd

        out = {"cliff": pd.DataFrame(self.cliffs), "cliff_points": pd.DataFrame(self.points),
               "cliff_layers": pd.DataFrame(self.layer_rows)}
        if self.sparling_rows:
            out["cliff_sparling"] = pd.DataFrame(self.sparling_rows)
            out["cliff_sparling_channels"] = pd.DataFrame(self.sparling_channels)
        if self.learned:
            out["cliff_sparling_learned"] = pd.DataFrame(self.learned)
        return out


def check_cliff(loaded, options: CliffOptions) -> None:
    """Refuse, before any batch, what the cliff cannot measure."""
    from probes.loss import model_head

    name = type(loaded.model).__name__
    head = model_head(loaded.model)
    if options.labels:
        if head != "classification":
            raise ModelError(f"--labels given but {name} has no classification head ({head}): the cliff scores a "
                             "classifier's loss and accuracy on labeled examples",
                             "make a linear-probe classifier from an encoder with `actsparse fit-head`, then run "
                             "`actsparse cliff CLASSIFIER --data FILE.jsonl --labels FIELD`; a causal LM is scored "
                             "by its PPL ratio: drop --labels")
    elif not getattr(loaded, "is_causal_lm", False):
        if head == "classification":
            raise ModelError(f"{name} is a classifier: the cliff scores it on labeled examples, not by perplexity",
                             "give --data FILE.jsonl --labels FIELD (the label field of each line)")
        raise ModelError(f"{name} has neither a causal language-model head nor a classification head: the cliff "
                         "measures a PPL ratio or a classifier's loss and accuracy",
                         "give a causal LM checkpoint (…ForCausalLM / …LMHeadModel), or a sequence classifier with "
                         "--data FILE.jsonl --labels FIELD (`actsparse fit-head` makes one from an encoder); for "
                         "activation sparsity of this model use `actsparse measure`")
    bad = [f for f in options.families if f not in FAMILIES]
    if bad:
        from probes.errors import did_you_mean

        raise DataError(f"unknown cliff family {bad[0]!r}{did_you_mean(bad[0], FAMILIES)}",
                        f"use --family with some of {', '.join(FAMILIES)}")
    bad_s = [s for s in options.grid if not 0.0 <= float(s) < 1.0]
    if bad_s:
        raise DataError(f"target sparsity {bad_s[0]} is outside [0, 1)", "give --grid values like 0,0.5,0.9,0.95")
    if not 0.0 < float(options.calib_share) < 1.0:
        raise DataError(f"calibration share {options.calib_share} is outside (0, 1)", "give --calib-share 0.25")


class _ScoredAsLM:
    """``loaded`` as ``pplp_session.resolve_layers`` reads it, for a classifier: the MLP layers are found the
    same way; only its causal-LM check (a perplexity needs an LM head) does not apply to a loss on labels."""

    def __init__(self, loaded):
        self._loaded = loaded

    is_causal_lm = True

    def __getattr__(self, name):
        return getattr(self._loaded, name)


def labeled_split(loaded, opts: CliffOptions) -> dict[str, Any]:
    """The classifier's data: labeled examples (``probes.loss.labeled_examples``; with ``max_tokens``, the
    first examples whose real tokens fit), split by ``calib_split`` into calibration and held-out examples,
    as batches of ``labeled_text_batches`` (one truncated example per row, padded; count mask = attention
    mask)."""
    from probes.data import resolve_corpus, resolve_max_length
    from probes.loss import drop_head_fit_examples, first_examples_within, labeled_examples, labeled_text_batches

    max_length = resolve_max_length(loaded, opts.max_length)
    ex, fit_note = drop_head_fit_examples(loaded, opts, labeled_examples(opts, loaded))
    ex, cut_note = first_examples_within(ex, loaded.tokenizer, max_length, opts.max_tokens)
    notes: list[str] = [n for n in (fit_note, cut_note) if n]
    cal_idx, held_idx = calib_split(len(ex), opts.calib_share, unit="labeled example")
    cal_ex, held_ex = [ex[i] for i in cal_idx], [ex[i] for i in held_idx]
    cal_b = list(labeled_text_batches(cal_ex, opts, loaded, max_length))
    held_b = list(labeled_text_batches(held_ex, opts, loaded, max_length))
    return {"cal_batches": cal_b, "held_batches": held_b, "cal_idx": cal_idx, "held_idx": held_idx,
            "n_examples": len(ex), "max_length": max_length, "corpus": resolve_corpus(opts.data), "notes": notes,
            "cal_tokens": sum(int(b.count_mask.sum()) for b in cal_b),
            "held_tokens": sum(int(b.count_mask.sum()) for b in held_b)}


MIN_EXAMPLES = 200  # below this many held-out examples, accuracy moves in steps of more than 0.5 points


def cliff(loaded, options: CliffOptions | None = None, progress: Callable[[int | None, int], Any] | None = None,
          log: Callable[[str], Any] | None = None) -> CliffResult:
    """The sparsity cliff of ``loaded`` (the registered analysis and the library of ``actsparse cliff``)."""
    import torch

    from probes import corpus as corpus_mod
    from probes.pplp_session import resolve_layers

    opts = options or CliffOptions()
    log = log or (lambda msg: None)
    check_cliff(loaded, opts)
    cls = bool(opts.labels)
    task = "classification" if cls else "causal_lm"
    q = "loss_ratio" if cls else "ppl_ratio"  # the quality ratio the cliff rules read
    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    layers = resolve_layers(_ScoredAsLM(loaded) if cls else loaded, opts.sites)
    warnings: list[str] = []
    data_opts = DataOptions(**{k: getattr(opts, k) for k in DataOptions.__dataclass_fields__})
    capped = data_opts.max_tokens is None and not cls
    if cls:
        lab = labeled_split(loaded, opts)
        cal_batches, held_batches = lab["cal_batches"], lab["held_batches"]
        n_held = lab["held_tokens"]
        if len(lab["held_idx"]) < MIN_EXAMPLES:
            warnings.append(f"only {len(lab['held_idx'])} held-out labeled examples (< {MIN_EXAMPLES}): accuracy "
                            f"moves in steps of {100 / len(lab['held_idx']):.2g} points; give more labeled examples "
                            "(--data) or lower --calib-share")
    else:
        if capped:
            data_opts.max_tokens = DEFAULT_MAX_TOKENS
        td = token_windows(loaded, data_opts, causal=True)
        cal_idx, held_idx = calib_split(len(td.windows), opts.calib_share)
        cal_w = [td.windows[i] for i in cal_idx]
        held_w = [td.windows[i] for i in held_idx]
        cal_batches, held_batches = list(td.batches(cal_w)), list(td.batches(held_w))
        n_held = corpus_mod.n_counted(held_w)
        if n_held < MIN_TOKENS:
            warnings.append(f"only {n_held} held-out counted tokens (< {MIN_TOKENS}): PPL ratios this close to 1 are "
                            f"not stable on so few tokens; use a longer corpus (--data) or raise --max-tokens")
    families = list(dict.fromkeys(opts.families))
    grid = sorted({float(s) for s in opts.grid})
    n_planned = 1 + len(families) * (len([s for s in grid if s > 0]) + 2 * max(opts.refine, 0))
    total = len(cal_batches) + n_planned * len(held_batches)
    if progress:
        progress(total, 0)
    tick = (lambda k: progress(total, k)) if progress else None

    widths = [l.site.width or int(l.col_norms.numel()) for l in layers]
    need_cal = any(f in CALIBRATED for f in families)
    cal = None
    if need_cal:
        rows_cap = max(1, min(int(opts.calib_rows), CALIB_BYTES // (4 * max(sum(widths), 1))))
        cal = SparlingCalibration(len(layers), rows_cap)
        sparse_pass(loaded, layers, cal_batches, observe=lambda l, v, m: cal.update(l.index, v, m), progress=tick,
                    task=task)
        log(f"calibration: {cal.n_rows[0]} rows per layer from {len(cal_batches)} batches")
    scan = DenseScan(len(layers))
    dense = sparse_pass(loaded, layers, held_batches, observe=lambda l, v, m: scan.update(l.index, v, m),
                        progress=tick, task=task)
    log(f"dense: CE {dense.ce:.6f} over {dense.n_tokens} held-out {'examples' if cls else 'tokens'}")
    dense_sp = dense.sparsity()
    points: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    sp_rows: list[dict[str, Any]] = []
    sp_channels: list[dict[str, Any]] = []
    cliffs: list[dict[str, Any]] = []
    n_pass = [1 + (1 if need_cal else 0)]
    reused = [0]
    pass_of: dict[tuple[str, float], Pass] = {}  # per-window values of every point (error bars)
    seed = int(opts.seed) if opts.seed is not None else 0

    def mean(v):
        v = [a for a in v if a == a]
        return sum(v) / len(v) if v else math.nan

    def evaluate(family: str, s: float, refined: bool) -> dict[str, Any]:
        kept = [None] * len(layers)
        rows = [0] * len(layers)
        if s <= 0:
            st, thr = dense, [math.nan] * len(layers)
            pass_no = 0
        else:
            masker, thr = family_masker(family, s, cal if cal is not None else _NoCal(len(layers)))
            if scan.is_dense(family, s, thr):  # zeroes only exact zeros: the dense pass, bit for bit
                st, pass_no = dense, 0
                reused[0] += 1
                if tick:
                    tick(len(held_batches))
            else:
                observe = None
                if family == "sparling_posthoc":
                    def observe(l, v, m):
                        k, n = reached_density(v, thr[l.index], m)
                        kept[l.index] = k if kept[l.index] is None else kept[l.index] + k
                        rows[l.index] += n
                st = sparse_pass(loaded, layers, held_batches, masker=masker, observe=observe, progress=tick,
                                 task=task)
                n_pass[0] += 1
                pass_no = n_pass[0]
        ratio = math.exp(st.ce - dense.ce)
        sp = st.sparsity()
        pass_of[(family, s)] = st
        pt = {"family": family, "label": LABELS[family], "post_hoc": family == "sparling_posthoc",
              "threshold_scope": SCOPES[family], "target_sparsity": s, "refined": refined,
              "mean_sparsity": mean(sp),
              "width_weighted_sparsity": sum(a * w for a, w in zip(sp, widths)) / sum(widths),
              q: ratio, "ce_dense": dense.ce, "ce_sparse": st.ce}
        if cls:
            pt.update({"accuracy": st.accuracy, "accuracy_dense": dense.accuracy,
                       "accuracy_drop": 100.0 * (dense.accuracy - st.accuracy), "n_examples": st.n_tokens})
        else:
            pt["n_tokens"] = st.n_tokens
        pt["pass"] = pass_no
        points.append(pt)
        log(f"  {family}@{s:g}: {q} {ratio:.6f}, mean sparsity {100 * pt['mean_sparsity']:.2f} %")
        for l, a, t in zip(layers, sp, thr):
            layer_rows.append({"family": family, "target_sparsity": s, **l.row(), "sparsity": a,
                               "dense_sparsity": dense_sp[l.index],
                               "threshold": float(t) if isinstance(t, (int, float)) else math.nan,
                               "threshold_note": t if isinstance(t, str) else (
                                   "per channel: see cliff_sparling" if not isinstance(t, (int, float)) else None),
                               q: ratio})
        if family == "sparling_posthoc" and s > 0:
            target = 1.0 - s
            for l in layers:
                d = (kept[l.index] / max(rows[l.index], 1)).float()
                t = thr[l.index].float().cpu()
                fin = t[t.isfinite()]
                sp_rows.append({"target_sparsity": s, "target_density": target, **l.row(),
                                "calib_rows": cal.n_rows[l.index], "heldout_rows": rows[l.index],
                                "density_mean": float(d.mean()),
                                "density_std": float(d.std()) if d.numel() > 1 else 0.0,
                                "density_min": float(d.min()), "density_p05": float(d.quantile(0.05)),
                                "density_p95": float(d.quantile(0.95)), "density_max": float(d.max()),
                                "density_abs_err_mean": float((d - target).abs().mean()),
                                "threshold_mean": float(fin.mean()) if fin.numel() else math.nan,
                                "threshold_min": float(fin.min()) if fin.numel() else math.nan,
                                "threshold_max": float(fin.max()) if fin.numel() else math.nan})
                if abs(s - opts.sparling_detail) < 1e-9:
                    dc = d.cpu().tolist()
                    for c, (dv, tv) in enumerate(zip(dc, t.tolist())):
                        sp_channels.append({"target_sparsity": s, "layer": l.row()["layer"],
                                            "canonical_name": l.site.canonical_name, "channel": c, "threshold": tv,
                                            "density": dv, "target_density": target})
        return pt

    for family in families:
        done: dict[float, dict[str, Any]] = {}
        for s in grid:
            done[s] = evaluate(family, s, False)
        for _ in range(max(int(opts.refine), 0)):
            loc = cliff_location([(d["mean_sparsity"], d[q]) for _, d in sorted(done.items())], opts.p)
            if loc["knee_sparsity"] != loc["knee_sparsity"]:
                break
            ts = sorted(done)
            ki = next(i for i, s in enumerate(ts) if done[s]["mean_sparsity"] == loc["knee_sparsity"])
            new = [round((ts[ki] + ts[j]) / 2, 6) for j in (ki - 1, ki + 1) if 0 <= j < len(ts)]
            new = [s for s in new if s not in done]
            if not new:
                break
            for s in new:
                done[s] = evaluate(family, s, True)
        loc = cliff_location([(d["mean_sparsity"], d[q]) for _, d in sorted(done.items())], opts.p)
        knee_t = next((s for s, d in sorted(done.items()) if d["mean_sparsity"] == loc["knee_sparsity"]), math.nan)
        row = {"family": family, "label": LABELS[family], "post_hoc": family == "sparling_posthoc",
               "p": float(opts.p), "dense_sparsity": mean(dense_sp), **loc, "knee_target": knee_t,
               "n_points": len(done), "max_ratio": max(d[q] for d in done.values())}
        if cls:
            def acc_at(x):  # the accuracy of the point whose achieved sparsity a rule picked (the first such)
                return next((d["accuracy"] for _, d in sorted(done.items()) if d["mean_sparsity"] == x), math.nan)

            row.update({"accuracy_dense": dense.accuracy, "accuracy_within_p": acc_at(loc["sparsity_within_p"]),
                        "knee_accuracy": acc_at(loc["knee_sparsity"]),
                        "min_accuracy": min(d["accuracy"] for d in done.values()), "n_examples": dense.n_tokens})
        else:
            row["n_tokens"] = dense.n_tokens
        cliffs.append(row)
        # error bars over the held-out windows, after every measured column (thresholds and grid fixed)
        cliffs[-1]["n_windows"] = int((dense.window_tokens > 0).sum()) if dense.window_tokens is not None else 0
        cliffs[-1].update(cliff_intervals(dense, [pass_of[(family, s)] for s in sorted(done)], opts.p, seed))
        for s, d in done.items():
            d.update(point_bars(dense, pass_of[(family, s)], seed, name=q))
    points.sort(key=lambda r: (families.index(r["family"]), r["target_sparsity"]))
    layer_rows.sort(key=lambda r: (families.index(r["family"]), r["target_sparsity"], r["layer"]))
    sp_rows.sort(key=lambda r: (r["target_sparsity"], r["layer"]))
    learned = learned_thresholds(loaded.model)
    if cls:
        data_info = {"corpus": lab["corpus"], "corpus_is_default": False, "labels_field": opts.labels,
                     "n_examples": lab["n_examples"], "calibration_examples": len(lab["cal_idx"]),
                     "heldout_examples": len(lab["held_idx"]), "n_counted_tokens": n_held,
                     "calibration_tokens": lab["cal_tokens"],
                     "calibration_rows_per_layer": cal.n_rows if cal is not None else None,
                     "max_tokens": opts.max_tokens, "max_length": lab["max_length"],
                     "window_scheme": "one truncated, padded example per batch row (padding never counted)"}
        notes = lab["notes"]
        quality = {"quality": "loss ratio exp(mean CE_sparse - mean CE_dense) over the held-out labeled examples "
                              "(Bug or Feature^2's validation loss, trainer.py Trainer.validate), and accuracy",
                   "task": "sequence classification"}
        unit = "held-out labeled example; n_windows in the cliff table counts examples"
    else:
        data_info = {"corpus": td.corpus, "corpus_is_default": td.corpus_is_default, "n_windows": len(td.windows),
                     "calibration_windows": len(cal_w), "heldout_windows": len(held_w),
                     "n_counted_tokens": n_held, "calibration_tokens": corpus_mod.n_counted(cal_w),
                     "calibration_rows_per_layer": cal.n_rows if cal is not None else None,
                     "max_tokens": data_opts.max_tokens, "max_tokens_default_applied": capped,
                     "max_length": td.max_length, "stride": td.stride, "window_scheme": td.window_scheme}
        notes = list(td.notes)
        quality = {"quality": "PPL ratio exp(CE_sparse - CE_dense) on the held-out windows"}
        unit = "held-out window (a batch row); n_windows in the cliff table"
    qname = "loss ratio" if cls else "PPL ratio"
    options_info = {**asdict(opts), "grid": grid}
    if options_info.get("labels") is None:
        options_info.pop("labels", None)
    info = {**data_info,
            "families": families, "grid": grid, "p": float(opts.p), "refine": int(opts.refine),
            "dense_ce": dense.ce, "dense_ppl": math.exp(dense.ce), "full_passes": n_pass[0],
            "site": "input of each MLP output projection (act(gate) decides for GLU MLPs)",
            **quality,
            "rules": {"sparsity_within_p": "largest achieved mean sparsity whose point and every lower one have "
                                           f"{qname} <= 1 + p/100",
                      "knee_sparsity": f"Kneedle: the point farthest below the chord of ln({qname}) vs achieved "
                                       "sparsity, both min-max normalised"},
            "error_bars": {
                "unit": unit,
                "cliff": "sparsity_within_p, sparsity_within_p_interp, knee_sparsity _lo/_hi: 95 % percentile "
                         f"bootstrap over held-out windows; each resample recomputes every grid point's {qname} and "
                         "mean sparsity from the resampled per-window loss and zero counts and reapplies both rules "
                         "(grid, refined targets and calibrated thresholds held fixed; resamples where a rule has "
                         "no answer dropped)",
                "points": f"{q}_se (delta method) / _lo / _hi and mean_sparsity_se / _lo / _hi per grid point"
                          + ("; accuracy and accuracy_drop _se / _lo / _hi" if cls else ""),
                "bootstrap": f"1000 resamples, numpy default_rng({seed}), the same resamples for every family"},
            "sparling_learned_layers": len(learned), "notes": notes,
            "seconds": round(time.perf_counter() - t0, 3),
            "options": options_info}
    if cls:
        info["dense_accuracy"] = dense.accuracy
    return CliffResult(points, layer_rows, cliffs, sp_rows, sp_channels, learned, info, warnings)


class _NoCal:
    """Stands in for a calibration where a family needs none (top-k): only the layer count is read."""

    def __init__(self, n: int):
        self.n_layers = n
