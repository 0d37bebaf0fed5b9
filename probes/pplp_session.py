"""The passes of PPL-p% and of the sparsity-vs-perplexity curves (``probes.pplp``) over one set of tokens.

A ``PplpSession`` holds the token batches (``probes.data``), the MLP layers (output projection and,
for GLU MLPs, the gate activation) and the dense pass that also calibrates the thresholds
(``probes.cett``). Every pass goes through ``probes.runner.Runner`` over the same batches, so dense
and sparse losses are on the same tokens; a sparse pass replaces the input of each output projection
(a forward hook that returns the masked tensor) and zeroes the entries its threshold family drops.
TEAL passes (``probes.teal``) hook the inputs of every projection instead; CHESS+ adds hooks on the
q and o projections' inputs. With ``calib_fraction`` the first windows are kept apart as
calibration windows (TEAL, CHESS) and every pass runs over the remaining ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from probes.boolcount import count_rows
from probes.cett import (DEFAULT_CETT_GRID, DEFAULT_MAX_PASSES, DEFAULT_TOL, LAYER_HIST, SEARCH_METHODS,
                         CettGrid, LogHistogram, down_column_norms, down_weight_io, neuron_output_norms, ppl_ratio,
                         search_cett)
from probes.corpus import n_counted
from probes.data import DataOptions, token_windows
from probes.errors import DataError, ModelError
from probes.hooks import HookCall
from probes.loading import LoadedModel
from probes.runner import TokenBatches, run
from probes.sites import MLP_GATE_ACT, MLP_POST, Site, find_sites

# Methods whose thresholds come from the calibration windows (disjoint from the evaluated ones).
SPLIT_METHODS = ("teal", "teal_greedy", "chess", "chess_plus", "sparling_posthoc")
DEFAULT_CALIB_FRACTION = 0.25  # the first quarter of the windows calibrates, the rest is evaluated

# Below this many counted tokens a PPL ratio of 1.01 is within noise of the corpus itself:
# the outputs carry a loud warning (stderr, summary table, manifest).
MIN_TOKENS = 4096


# ------------------------------------------------------------------------------------------- layers
@dataclass
class Layer:
    """One MLP: its output projection's input site and, for GLU MLPs, the gate activation site."""

    index: int
    site: Site
    gate_site: Site | None
    col_norms: Any = field(repr=False, default=None)  # float32 [in]

    @property
    def glu(self) -> bool:
        return self.gate_site is not None

    def weight_io(self):
        return down_weight_io(self.site.module).to(self.col_norms.device)

    def row(self) -> dict[str, Any]:
        return {"layer": self.site.layer if self.site.layer is not None else self.index,
                "canonical_name": self.site.canonical_name, "module_path": self.site.module_path,
                "width": self.site.width}


def resolve_layers(loaded: LoadedModel, site_globs: Sequence[str] = ()) -> list[Layer]:
    """The MLP output projections (mlp_post sites) with their gate activations, in layer order."""
    import torch

    model = loaded.model
    if not loaded.is_causal_lm:
        raise ModelError(
            f"{type(model).__name__} has no causal language-model head, so it has no perplexity",
            "PPL-p% needs a causal LM checkpoint (…ForCausalLM / …LMHeadModel); for activation sparsity use "
            "`actsparse measure`")
    if site_globs:
        sites = find_sites(model, loaded.family, globs=site_globs)
        bad = [s.where for s in sites if s.hook != "input"]
        if bad:
            raise ModelError(f"--site {bad[0]} is an output site; PPL-p% zeroes the INPUT of the output projection",
                             "use PATH.TO.down_proj:input")
        posts, gates = sites, []
    else:
        try:
            sites = find_sites(model, loaded.family, kinds=(MLP_POST, MLP_GATE_ACT))
        except ModelError as e:
            raise ModelError(f"no MLP output projection found: {e.problem}", e.fix) from e
        posts = [s for s in sites if s.kind == MLP_POST]
        gates = [s for s in sites if s.kind == MLP_GATE_ACT]
        if not posts:
            raise ModelError(f"no MLP output projection (mlp_post site) found in {type(model).__name__}",
                             "name it with --site \"model.layers.*.mlp.down_proj:input\"")
    gate_by_name = {g.canonical_name.replace("hook_gate_act", "hook_post"): g for g in gates}
    layers = []
    for i, s in enumerate(posts):
        if not isinstance(getattr(s.module, "weight", None), torch.Tensor) or s.module.weight.dim() != 2:
            raise ModelError(f"{s.module_path} has no 2-D weight; PPL-p% needs a linear output projection",
                             "pick the MLP's output projection with --site PATH:input")
        dev = s.module.weight.device
        layers.append(Layer(i, s, gate_by_name.get(s.canonical_name), down_column_norms(s.module).to(dev)))
    return layers


# ----------------------------------------------------------------------------------------- session
@dataclass
class PassStats:
    """One full pass over the tokens: summed token losses and per-layer statistics of x'."""

    ce_sum: float  # float64 sum of per-token cross-entropies
    n_tokens: int
    zeros: list[float]  # per layer: exact zeros of the projection input after masking, counted tokens
    entries: list[float]  # per layer: counted tokens x width
    removed_sum: list[float]  # per layer: sum over tokens of ||(x - x') W|| / ||x W||
    layer_tokens: list[float]  # per layer: counted tokens seen
    seconds: float
    # per window (batch row, in batch order; the same windows in every pass of a session), for error bars:
    # summed token losses and counted tokens [m], zeros and entries of each layer [m, L]; None when a layer's
    # input had no window layout (a 2-D tensor without a matching mask)
    window_ce: Any = field(repr=False, default=None)
    window_tokens: Any = field(repr=False, default=None)
    window_zeros: Any = field(repr=False, default=None)
    window_entries: Any = field(repr=False, default=None)

    @property
    def ce(self) -> float:
        return self.ce_sum / max(self.n_tokens, 1)

    def sparsity(self) -> list[float]:
        return [z / e if e else math.nan for z, e in zip(self.zeros, self.entries)]

    def removed_cett(self) -> list[float]:
        """Per layer: the CETT of the neurons actually zeroed, on the sparse run's own activations."""
        return [r / n if n else math.nan for r, n in zip(self.removed_sum, self.layer_tokens)]


@dataclass
class Evaluation:
    """A sparse pass at one setting, compared with the dense pass on the same tokens."""

    method: str
    value: float
    ratio: float
    ce_sparse: float
    layer_sparsity: list[float]
    layer_removed_cett: list[float]
    thresholds: list[Any]  # per layer: float, or a description for per-channel / per-token rules
    pass_index: int
    seconds: float
    effective_sparsity: float | None = None  # TEAL: parameter-weighted over the sparsified projections
    proj_rows: list[dict[str, Any]] | None = None  # TEAL: one row per (layer, projection)
    stats: PassStats | None = field(repr=False, default=None)  # the pass (per-window values for error bars)

    @property
    def mean_sparsity(self) -> float:
        v = [s for s in self.layer_sparsity if s == s]
        return sum(v) / len(v) if v else math.nan


@dataclass
class PplpTarget:
    p: float
    target_ratio: float
    method: str
    tol: float
    status: str
    reason: str
    c_star: float | None
    evaluation: Evaluation | None
    sparse_passes: int  # new sparse passes this target needed
    evaluations: int
    trace: list[tuple[float, float]]
    bound_ratio: float | None = None


class PplpSession:
    """Tokens, layers and the dense/calibration pass shared by PPL-p% searches and curves.

    Every pass runs over the same batches, so dense and sparse losses are on the same tokens.
    ``passes`` counts full passes over the tokens (the calibration pass included).
    """

    def __init__(self, loaded: LoadedModel, opts: DataOptions | None = None, *,
                 docs_tokens: Sequence[Sequence[int]] | None = None,
                 progress: Callable[[int | None, int], Any] | None = None,
                 log: Callable[[str], Any] | None = None, calib_fraction: float | None = None,
                 teal_eval: str = "last-half"):
        import torch

        self.loaded = loaded
        self.teal_eval = teal_eval
        self.opts = opts or DataOptions()
        self.progress = progress
        self.log = log or (lambda msg: None)
        torch.manual_seed(self.opts.seed)
        self.layers = resolve_layers(loaded, getattr(self.opts, "sites", ()))
        # max length checked (exit 4) before the corpus is read or any batch run
        self.data = td = token_windows(loaded, self.opts, causal=True, docs_tokens=docs_tokens)
        self.max_length, self.stride = td.max_length, td.stride
        self.notes: list[str] = list(td.notes)  # the CLI prints these unless -q
        self.corpus, self.n_documents, self.n_corpus_tokens, self.read_note = (td.corpus, td.n_documents,
                                                                               td.n_corpus_tokens, td.read_note)
        self.windows = td.windows
        self.calib_windows: list = []
        self.calib_batches: list = []
        self.calib_fraction = calib_fraction
        if calib_fraction:
            # the first windows calibrate TEAL / CHESS, the following ones are evaluated (disjoint)
            n = len(td.windows)
            k = max(1, int(round(n * calib_fraction)))
            if n - k < 1:
                raise DataError(f"the corpus gives {n} token window(s): no room for calibration windows AND disjoint "
                                f"evaluation windows",
                                "raise --max-tokens or lower --max-length so the corpus gives at least 2 windows")
            self.calib_windows, self.windows = td.windows[:k], td.windows[k:]
            self.calib_batches = list(td.batches(self.calib_windows))
        self.batches = list(td.batches(self.windows))  # every pass runs over these same batches
        self.n_tokens = n_counted(self.windows)
        self.warnings: list[str] = []
        if self.n_tokens < MIN_TOKENS:
            self.warnings.append(
                f"only {self.n_tokens} counted tokens (< {MIN_TOKENS}): PPL ratios this close to 1 are not stable "
                f"on so few tokens; use a longer corpus (--data) or raise --max-tokens")
        self.passes = 0
        self.dense: PassStats | None = None
        self.cett_grids: list[CettGrid] | None = None
        self.hist_x: list[LogHistogram] | None = None
        self.hist_g: list[LogHistogram] | None = None
        self.teal_family: str | None = None
        self.teal_projs: list | None = None
        self.teal_dists: dict | None = None
        self.teal_greedy_rows: dict[int, list] = {}
        self.teal_greedy_target = 0.0
        self.chess_up_mean: list[Any] | None = None
        self.chess_thr: dict[float, list[float]] = {}
        self.chess_samples = 0
        self.chess_attn_thr: dict[float, list[tuple]] = {}
        self.sparling_cal: Any = None
        self.trace: list[Evaluation] = []
        self._cache: dict[tuple[str, float], Evaluation] = {}

    # ---- one pass over the batches
    def _run(self, masker: Callable | None, calibrate: Callable | None, what: str,
             extra_hooks: Sequence | None = None) -> PassStats:
        """A pass through ``probes.runner``: ``calibrate(layer, x, g, mask, W)`` sees each projection input,
        ``masker(layer, x, g, mask)`` (a sparse pass) returns the entries to zero before the projection."""
        import torch

        layers = {l.site.canonical_name: l for l in self.layers}
        gate_of = {l.gate_site.canonical_name: l.site.canonical_name for l in self.layers if l.gate_site}
        sites = [l.site for l in self.layers] + [l.gate_site for l in self.layers if l.gate_site]
        L = len(self.layers)
        zeros = [0.0] * L
        entries = [0.0] * L
        removed = [0.0] * L
        ltok = [0.0] * L
        gate_store: dict[str, Any] = {}
        # per window (error bars): this batch's per-row zero and entry counts per layer, then the pass's rows
        cur: dict[int, tuple[Any, Any]] = {}
        win = {"ce": [], "tok": [], "zeros": [], "entries": [], "ok": True}

        def count(layer_i: int, xx, m) -> float:
            """Zeros of ``xx`` on counted positions, kept per row; returns the total (an exact integer)."""
            if xx.dim() != 3:
                win["ok"] = False
                return float(torch.count_nonzero(xx == 0))
            z = (xx == 0)
            if m is not None:
                z = z & m.unsqueeze(-1)
                n_pos = m.sum(1)
            else:
                n_pos = torch.full((xx.shape[0],), xx.shape[1], device=xx.device)
            zr = count_rows(z)  # probes.boolcount: a bool .sum() widens every entry to int64 first
            cur[layer_i] = (zr.double().cpu(), (n_pos * xx.shape[-1]).double().cpu())
            return float(zr.sum())
        # float32 [in, out] copies of the projections: kept for the pass when small, else made per call.
        need_w = masker is not None or calibrate is not None
        small = sum(l.col_norms.numel() * (l.site.module.weight.numel() // max(l.col_norms.numel(), 1))
                    for l in self.layers) <= (1 << 26)
        cached = [l.weight_io() for l in self.layers] if need_w and small else None

        def weight(i: int):
            return cached[i] if cached is not None else self.layers[i].weight_io()

        def hook(x, hc: HookCall):
            site = hc.site
            if site.canonical_name in gate_of:  # act(gate) [batch, pos, d_mlp], read by the projection's hook
                gate_store[gate_of[site.canonical_name]] = x
                return None
            layer = layers[site.canonical_name]
            g = gate_store.pop(site.canonical_name, None)
            x3, m = _with_mask(x, hc.mask, site)  # the projection's input [batch, pos, d_mlp]
            g3 = g.reshape(x3.shape) if g is not None and g.numel() == x3.numel() else None
            if calibrate is not None:
                calibrate(layer, x3, g3, m, weight(layer.index))
            if masker is None:
                xc = x3[m] if m is not None else x3.reshape(-1, x3.shape[-1])
                zeros[layer.index] += count(layer.index, x3, m)
                entries[layer.index] += float(xc.numel())
                ltok[layer.index] += float(xc.shape[0])
                return None
            drop = masker(layer, x3, g3, m)
            xs = x3.masked_fill(drop, 0)
            xc = x3[m] if m is not None else x3.reshape(-1, x3.shape[-1])
            xsc = xs[m] if m is not None else xs.reshape(-1, xs.shape[-1])
            zeros[layer.index] += count(layer.index, xs, m)
            entries[layer.index] += float(xsc.numel())
            ltok[layer.index] += float(xsc.shape[0])
            if xc.numel():
                w = weight(layer.index)
                num = torch.linalg.vector_norm((xc - xsc).float() @ w, dim=-1).double()
                den = torch.linalg.vector_norm(xc.float() @ w, dim=-1).double()
                removed[layer.index] += float(torch.where(den > 0, num / den.clamp_min(1e-300),
                                                          torch.zeros_like(num)).sum())
            return xs.reshape(x.shape)  # replaces the projection's input: the sparse run

        totals = {"ce_sum": 0.0, "n_tok": 0}

        def loss(batch, out) -> None:
            gate_store.clear()
            logits = getattr(out, "logits", None)
            if logits is None:
                raise ModelError(f"{type(self.loaded.model).__name__} returned no logits",
                                 "PPL-p% needs a causal LM with a language-model head")
            per_row = token_loss_rows(logits, batch.labels)
            s, n = _add_rows(per_row)
            totals["ce_sum"] += s
            totals["n_tok"] += n
            B = len(per_row)
            win["ce"] += [r[0] for r in per_row]
            win["tok"] += [float(r[1]) for r in per_row]
            append_window_counts(win, cur, B, L)

        t0 = time.perf_counter()
        self.passes += 1
        n_b = len(self.batches)
        if self.progress:
            self.progress(n_b * self.passes, 0)
        run(self.loaded.model, self.batches, fwd_hooks=[(s, hook) for s in sites] + list(extra_hooks or ()),
            adapter=TokenBatches(need_logits=True), step=loss,
            progress=(lambda k: self.progress(n_b * self.passes, k)) if self.progress else None)
        ce_sum, n_tok = totals["ce_sum"], totals["n_tok"]
        if n_tok == 0:
            raise DataError("no counted tokens to compute a perplexity on", "give a longer corpus")
        st = PassStats(ce_sum, n_tok, zeros, entries, removed, ltok, time.perf_counter() - t0)
        if win["ok"] and win["zeros"]:
            import numpy as np

            st.window_ce, st.window_tokens = np.array(win["ce"]), np.array(win["tok"])
            st.window_zeros, st.window_entries = np.concatenate(win["zeros"]), np.concatenate(win["entries"])
        self.log(f"pass {self.passes} ({what}): CE {st.ce:.6f} over {n_tok} tokens, {st.seconds:.1f}s")
        return st

    # ---- calibration (pass 1: dense loss + threshold statistics)
    def calibrate(self, *, cett: bool = True, quantiles: bool = False, chess: bool = False,
                  cett_grid: int = DEFAULT_CETT_GRID) -> PassStats:
        """The dense pass: CE_dense, natural sparsity, and the in-sample calibration statistics asked for
        (CETT grids; per-layer histograms of ``absq_down`` / ``cats``). ``chess`` is accepted for older
        callers and ignored: CHESS calibrates on the calibration windows (``chess_calibrate``)."""
        if self.dense is not None and (not cett or self.cett_grids is not None) \
                and (not quantiles or self.hist_x is not None):
            return self.dense
        dev = self.layers[0].col_norms.device
        L = len(self.layers)
        grids = [CettGrid(cett_grid) for _ in range(L)] if cett else None
        hx = [LogHistogram(*LAYER_HIST, device=dev) for _ in range(L)] if quantiles else None
        hg = [LogHistogram(*LAYER_HIST, device=dev) for _ in range(L)] if quantiles else None

        def calib(layer: Layer, x3, g3, m, w):
            xc = (x3[m] if m is not None else x3.reshape(-1, x3.shape[-1])).float()
            i = layer.index
            if grids is not None:
                grids[i].update(xc, w, layer.col_norms)
            if hx is not None:
                gc = (g3[m] if m is not None else g3.reshape(-1, g3.shape[-1])).float() if g3 is not None else xc
                hx[i].update(xc.abs())
                hg[i].update(gc.abs())

        self.dense = self._run(None, calib if (grids is not None or hx is not None) else None, "dense + calibration")
        if grids is not None:
            self.cett_grids = grids
        if hx is not None:
            self.hist_x, self.hist_g = hx, hg
        self._cache.clear()
        return self.dense

    # ---- TEAL (probes.teal) and CHESS (probes.chess): calibrated on the calibration windows
    def _need_split(self, what: str) -> None:
        if not self.calib_batches:
            raise DataError(f"{what} needs calibration windows disjoint from the evaluation windows",
                            "build the session with calib_fraction (the CLI's --calib-fraction)")

    def teal_calibrate(self) -> None:
        from probes import teal

        if self.teal_dists is not None:
            return
        self._need_split("TEAL")
        self.teal_family, self.teal_projs = teal.find_projections(self.loaded.model)
        self.teal_dists = teal.calibrate(self.loaded, self.calib_batches, self.teal_projs, log=self.log)

    def teal_greedy(self, target: float) -> None:
        """TEAL's greedy block-wise allocation up to ``target`` (rows kept; re-run only for a larger one)."""
        from probes import teal

        self.teal_calibrate()
        if self.teal_greedy_rows and target <= self.teal_greedy_target:
            return
        t0 = time.perf_counter()
        by_layer: dict[int, list] = {}
        for p in self.teal_projs:
            by_layer.setdefault(p.layer, []).append(p)
        self.teal_greedy_rows = {l: teal.greedy_block(self.loaded, self.calib_batches, ps, self.teal_dists, target)
                                 for l, ps in by_layer.items()}
        self.teal_greedy_target = target
        self.log(f"TEAL greedy allocation to {target:g}: {sum(len(r) for r in self.teal_greedy_rows.values())} steps, "
                 f"{time.perf_counter() - t0:.1f}s")

    def teal_sparsities(self, method: str, value: float) -> dict[str, float]:
        """Target sparsity of each projection (``Projection.key``): uniform s, or the greedy row closest to s."""
        from probes import teal

        if method == "teal":
            return {p.key: float(value) for p in self.teal_projs}
        out = {}
        for l, rows in self.teal_greedy_rows.items():
            sp = teal.pick_greedy(rows, float(value))
            for p in self.teal_projs:
                if p.layer == l:
                    out[p.key] = float(sp.get(p.name, 0.0))
        return out

    def _teal_evaluate(self, method: str, value: float) -> Evaluation:
        import torch

        from probes import teal
        from probes.runner import TokenBatches, run

        self.teal_calibrate()
        if method == "teal_greedy":
            self.teal_greedy(max(float(value), self.teal_greedy_target))
        sp = self.teal_sparsities(method, value)
        thr = teal.thresholds_for(self.teal_dists, self.teal_projs, sp)
        tracker = teal.BatchTracker(self.batches)
        stats: dict[str, teal.ProjStats] = {}
        totals = {"ce_sum": 0.0, "n_tok": 0}

        def loss(batch, out) -> None:
            s_, n_ = token_loss_sum(out.logits, batch.labels)
            totals["ce_sum"] += s_
            totals["n_tok"] += n_

        t0 = time.perf_counter()
        self.passes += 1
        n_b = len(self.batches)
        if self.progress:
            self.progress(n_b * self.passes, 0)
        with torch.inference_mode():
            run(self.loaded.model, tracker, adapter=TokenBatches(need_logits=True), step=loss,
                fwd_hooks=teal.mask_hooks(self.teal_projs, thr, self.teal_eval, tracker, stats),
                progress=(lambda k: self.progress(n_b * self.passes, k)) if self.progress else None)
        if totals["n_tok"] == 0:
            raise DataError("no counted tokens to compute a perplexity on", "give a longer corpus")
        ce = totals["ce_sum"] / totals["n_tok"]
        self.log(f"pass {self.passes} ({method}@{value:.6g}, {self.teal_eval}): CE {ce:.6f} over {totals['n_tok']} "
                 f"tokens, {time.perf_counter() - t0:.1f}s")
        per = {k: v.sparsity for k, v in stats.items()}
        rows = [{**p.row(), "target_sparsity": sp[p.key], "threshold": thr[p.key],
                 "sparsity": per.get(p.key, math.nan)} for p in self.teal_projs]
        layers = sorted({p.layer for p in self.teal_projs})
        layer_sp = [teal.effective_sparsity([p for p in self.teal_projs if p.layer == l], per) for l in layers]
        eff = teal.effective_sparsity(self.teal_projs, per)
        return Evaluation(method, float(value), ppl_ratio(ce, self.dense.ce), ce, layer_sp, [math.nan] * len(layers),
                          ["per projection (teal_projections table)"] * len(layers), self.passes,
                          time.perf_counter() - t0, effective_sparsity=eff, proj_rows=rows)

    def chess_calibrate(self, values: Sequence[float]) -> None:
        """CHESS thresholds for every s in ``values`` (``probes.chess``), on the calibration windows."""
        from probes import chess

        self._need_split("CHESS")
        need = [float(v) for v in values if float(v) not in self.chess_thr]
        if not need and self.chess_up_mean is not None:
            return
        res = chess.calibrate(self.loaded, self.calib_batches, self.layers, need, up_mean=self.chess_up_mean)
        self.chess_up_mean = res.up_mean
        self.chess_samples = res.n_samples
        self.chess_thr.update(res.importance_thresholds)

    def chess_plus_calibrate(self, values: Sequence[float]) -> None:
        """CHESS+: the CHESS MLP thresholds and the attention thresholds (``probes.chess``) for every s."""
        from probes import chess

        self.chess_calibrate(values)
        need = [float(v) for v in values if float(v) not in self.chess_attn_thr]
        if need:
            self.chess_attn_thr.update(chess.calibrate_attention(self.loaded, self.calib_batches, need))

    def sparling_calibrate(self) -> None:
        """SPARLING's per-channel k-th-value thresholds, post hoc (``probes.sparling``), from a sample of the
        calibration windows' signed values (act(gate) for GLU MLPs, else the activation)."""
        from probes.chess import _rows
        from probes.runner import TokenBatches, run
        from probes.sparling import SparlingCalibration
        from probes.teal import BatchTracker

        if self.sparling_cal is not None:
            return
        self._need_split("SPARLING post hoc")
        cal = SparlingCalibration(len(self.layers))
        tracker = BatchTracker(self.calib_batches)
        hooks_ = []
        for layer in self.layers:
            def fn(x, hc, i=layer.index):
                for r in _rows(x, getattr(tracker.current, "attention_mask", None)):
                    cal.update(i, r)
                return None

            hooks_.append((layer.gate_site if layer.glu else layer.site, fn))
        run(self.loaded.model, tracker, fwd_hooks=hooks_, adapter=TokenBatches())
        self.sparling_cal = cal

    # ---- thresholds of each family
    def cett_thresholds(self, c: float) -> list[float]:
        if self.cett_grids is None:
            raise RuntimeError("calibrate(cett=True) first")
        return [g.threshold(c) for g in self.cett_grids]

    def _masker(self, method: str, value: float):
        import torch

        if method == "cett":
            ts = self.cett_thresholds(value)

            def m_cett(layer, x3, g3, m):
                return neuron_output_norms(x3, layer.col_norms) < ts[layer.index]

            return m_cett, list(ts)
        if method == "fat":
            eps = float(value)

            def m_fat(layer, x3, g3, m):
                a = (g3 if g3 is not None else x3).float().abs()
                return a < eps if eps > 0 else a == 0

            return m_fat, [eps] * len(self.layers)
        if method in ("topk", "topk_global"):
            r = float(value)

            def m_topk(layer, x3, g3, m):
                a = (g3 if g3 is not None else x3).float().abs()
                C = a.shape[-1]
                if method == "topk":
                    keep = C - int(C * (1 - r))
                    if keep >= C:
                        return torch.zeros_like(a, dtype=torch.bool)
                    drop = torch.ones_like(a, dtype=torch.bool)
                    if keep > 0:
                        drop.scatter_(-1, a.topk(keep, dim=-1).indices, False)
                    return drop
                ac = (a[m] if m is not None else a.reshape(-1, C)).flatten()
                keep = ac.numel() - int(ac.numel() * (1 - r))
                if keep >= ac.numel():
                    return torch.zeros_like(a, dtype=torch.bool)
                if keep <= 0:
                    return torch.ones_like(a, dtype=torch.bool)
                thr = ac.topk(keep).values.min()
                return a < thr

            scope = "per token" if method == "topk" else "per batch (global over counted tokens)"
            return m_topk, [f"top {r:g} kept {scope}"] * len(self.layers)
        if method in ("absq_down", "cats"):
            hs = self.hist_x if method == "absq_down" else self.hist_g
            ts = [h.quantile(float(value)) for h in hs]

            def m_q(layer, x3, g3, m):
                a = (x3 if method == "absq_down" or g3 is None else g3).float().abs()
                return a < ts[layer.index]

            return m_q, list(ts)
        if method in ("chess", "chess_plus"):
            self.chess_calibrate([value])
            layer_thr = list(self.chess_thr[float(value)])
            ch_thr = []
            for layer, t in zip(self.layers, layer_thr):
                um = self.chess_up_mean[layer.index]
                if um is None:  # no up projection: importance = |x| itself
                    ch_thr.append(torch.tensor(t, dtype=torch.float32, device=layer.col_norms.device))
                else:  # CHESS: t_i = T_layer / mean|up_i| (T / 0 = inf, as the reference divides)
                    ch_thr.append((torch.tensor(t, dtype=torch.float64) / um.double()).float()
                                  .to(layer.col_norms.device))

            def m_chess(layer, x3, g3, m):
                a = (g3 if g3 is not None else x3).float().abs()
                return a < ch_thr[layer.index]

            return m_chess, layer_thr
        if method == "sparling_posthoc":
            self.sparling_calibrate()
            masker, per_channel = self.sparling_cal.masker(float(value))
            # one number per layer for the tables: the mean of the finite per-channel thresholds
            return masker, [float(t[torch.isfinite(t)].mean()) if bool(torch.isfinite(t).any()) else math.nan
                            for t in per_channel]
        raise ValueError(f"unknown method {method!r}")

    def evaluate(self, method: str, value: float) -> Evaluation:
        """One sparse pass (cached by setting) and its PPL ratio against the dense pass."""
        key = (method, float(value))
        if key in self._cache:
            return self._cache[key]
        if self.dense is None:
            raise RuntimeError("calibrate() first")
        if method == "cett" and float(value) == 0.0:
            ev = self._c0_evaluation()
        elif method in ("teal", "teal_greedy"):
            ev = self._teal_evaluate(method, float(value))
            self.log(f"  {method}@{value:.6g}: PPL ratio {ev.ratio:.6f}, effective sparsity "
                     f"{100 * ev.effective_sparsity:.2f} %")
        else:
            masker, thr = self._masker(method, value)
            extra = None
            if method == "chess_plus":
                from probes import chess

                self.chess_plus_calibrate([value])
                extra = chess.attention_hooks(self.loaded, self.chess_attn_thr[float(value)])
            st = self._run(masker, None, f"{method}@{value:.6g}", extra_hooks=extra)
            ev = Evaluation(method, float(value), ppl_ratio(st.ce, self.dense.ce), st.ce, st.sparsity(),
                            st.removed_cett(), thr, self.passes, st.seconds, stats=st)
            self.log(f"  {method}@{value:.6g}: PPL ratio {ev.ratio:.6f}, mean sparsity {100 * ev.mean_sparsity:.2f} %")
        self._cache[key] = ev
        self.trace.append(ev)
        return ev

    def forget_evaluations(self) -> None:
        """Drop cached sparse passes (the calibration stays): the next search starts from nothing."""
        self._cache.clear()
        self.trace.clear()

    def _c0_evaluation(self) -> Evaluation:
        # c = 0 removes only neurons whose output is the zero vector: the sparse run IS the dense run.
        d = self.dense
        return Evaluation("cett", 0.0, 1.0, d.ce, d.sparsity(), [0.0] * len(self.layers),
                          self.cett_thresholds(0.0), 0, 0.0, stats=d)

    # ---- PPL-p%
    def search(self, p: float, method: str = "secant", tol: float = DEFAULT_TOL,
               max_passes: int = DEFAULT_MAX_PASSES) -> PplpTarget:
        if method not in SEARCH_METHODS:
            raise ValueError(f"unknown search method {method!r}; use one of {SEARCH_METHODS}")
        if self.cett_grids is None:
            self.calibrate(cett=True)
        target = 1.0 + p / 100.0
        before = self.passes
        known = {k[1]: v.ratio for k, v in self._cache.items() if k[0] == "cett"}
        known.setdefault(0.0, 1.0)
        out = search_cett(lambda c: self.evaluate("cett", c).ratio, target, tol, method, max_passes, known)
        new_passes = self.passes - before
        ev = self.evaluate("cett", out.c) if out.c is not None else None
        return PplpTarget(p=p, target_ratio=target, method=method, tol=tol, status=out.status, reason=out.reason,
                          c_star=out.c, evaluation=ev, sparse_passes=new_passes, evaluations=out.n_evals,
                          trace=out.trace, bound_ratio=out.bound_ratio)


def _with_mask(x, mask, site: Site):
    """``x`` as ``[batch, pos, C]`` with its count mask, or ``[N, C]`` with mask None."""
    if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        return x, mask
    if x.dim() == 2 and mask is not None and x.shape[0] == mask.numel():
        return x.view(*mask.shape, x.shape[-1]), mask
    if x.dim() in (2, 3):
        return x, None
    raise ModelError(f"site {site.where} gives a {x.dim()}-D tensor {tuple(x.shape)}",
                     "pick the MLP output projection's input with --site")


def token_loss_sum(logits, labels) -> tuple[float, int]:
    """Sum (float64) and count of next-token cross-entropies where ``labels != -100``.

    ``labels`` are already the next tokens (probes.corpus windows): no extra shift.
    """
    return _add_rows(token_loss_rows(logits, labels))


def kept_row(logits_row, labels_row, keep):
    """One row's float32 logits and labels at its counted positions (``keep``). When every position counts (the
    common case) the row itself, without the boolean-index copy (50 MB for 256 positions x 49k tokens); the
    cross-entropies are the same numbers either way."""
    if bool(keep.all()):
        return logits_row.float(), labels_row
    return logits_row[keep].float(), labels_row[keep]


def token_loss_rows(logits, labels) -> list[tuple[float, int]]:
    """Per row (window) of the batch: the float64 sum and count of its next-token cross-entropies
    (``(0.0, 0)`` for a row with no target); ``token_loss_sum`` adds them up in row order."""
    import torch.nn.functional as F

    out = []
    for b in range(logits.shape[0]):  # one row at a time bounds the float32 copy of the logits
        lab = labels[b]
        keep = lab != -100
        if not bool(keep.any()):
            out.append((0.0, 0))
            continue
        lg, target = kept_row(logits[b], lab, keep)
        losses = F.cross_entropy(lg, target, reduction="none")
        out.append((float(losses.double().sum()), int(keep.sum())))
    return out


def append_window_counts(win: dict, cur: dict, B: int, L: int) -> None:
    """This batch's per-row zeros and entries of each layer (``cur[layer] = (zeros [B], entries [B])``) as
    ``[B, L]`` rows of ``win``; a layer with no per-row counts marks the pass as without window values."""
    import numpy as np

    zr, er = np.zeros((B, L)), np.zeros((B, L))
    for i in range(L):
        got = cur.get(i)
        if got is None or len(got[0]) != B:
            win["ok"] = False
            continue
        zr[:, i], er[:, i] = got[0].numpy(), got[1].numpy()
    win["zeros"].append(zr)
    win["entries"].append(er)
    cur.clear()


def _add_rows(rows: Sequence[tuple[float, int]]) -> tuple[float, int]:
    total = 0.0
    n = 0
    for s, k in rows:  # the order and the float64 additions of the one-pass sum: the same totals
        if k:
            total += s
            n += k
    return total, n
