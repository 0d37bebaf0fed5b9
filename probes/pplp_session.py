"""The passes of PPL-p% and of the sparsity-vs-perplexity curves (``probes.pplp``) over one set of tokens.

A ``PplpSession`` holds the token batches (``probes.data``), the MLP layers (output projection and,
for GLU MLPs, the gate activation) and the dense pass that also calibrates the thresholds
(``probes.cett``). Every pass goes through ``probes.runner.Runner`` over the same batches, so dense
and sparse losses are on the same tokens; a sparse pass replaces the input of each output projection
(a forward hook that returns the masked tensor) and zeroes the entries its threshold family drops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from probes.cett import (CHANNEL_HIST, DEFAULT_CETT_GRID, DEFAULT_MAX_PASSES, DEFAULT_TOL, LAYER_HIST,
                         SEARCH_METHODS, CettGrid, LogHistogram, _mixture_quantile, down_column_norms,
                         down_weight_io, neuron_output_norms, ppl_ratio, search_cett)
from probes.data import DataOptions, token_windows
from probes.errors import DataError, ModelError
from probes.hooks import HookCall
from probes.loading import LoadedModel
from probes.runner import TokenBatches, run
from probes.sites import MLP_GATE_ACT, MLP_POST, Site, find_sites

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
                 log: Callable[[str], Any] | None = None):
        import torch

        self.loaded = loaded
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
        self.batches = list(td.batches())  # every pass runs over these same batches
        self.n_tokens = td.n_counted
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
        self.hist_gc: list[LogHistogram] | None = None
        self.up_sum: list[Any] | None = None
        self.up_cnt: list[Any] | None = None
        self.trace: list[Evaluation] = []
        self._cache: dict[tuple[str, float], Evaluation] = {}

    # ---- one pass over the batches
    def _run(self, masker: Callable | None, calibrate: Callable | None, what: str) -> PassStats:
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
                zeros[layer.index] += float((xc == 0).sum())
                entries[layer.index] += float(xc.numel())
                ltok[layer.index] += float(xc.shape[0])
                return None
            drop = masker(layer, x3, g3, m)
            xs = x3.masked_fill(drop, 0)
            xc = x3[m] if m is not None else x3.reshape(-1, x3.shape[-1])
            xsc = xs[m] if m is not None else xs.reshape(-1, xs.shape[-1])
            zeros[layer.index] += float((xsc == 0).sum())
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
            s, n = token_loss_sum(logits, batch.labels)
            totals["ce_sum"] += s
            totals["n_tok"] += n

        t0 = time.perf_counter()
        self.passes += 1
        n_b = len(self.batches)
        if self.progress:
            self.progress(n_b * self.passes, 0)
        run(self.loaded.model, self.batches, fwd_hooks=[(s, hook) for s in sites],
            adapter=TokenBatches(need_logits=True), step=loss,
            progress=(lambda k: self.progress(n_b * self.passes, k)) if self.progress else None)
        ce_sum, n_tok = totals["ce_sum"], totals["n_tok"]
        if n_tok == 0:
            raise DataError("no counted tokens to compute a perplexity on", "give a longer corpus")
        st = PassStats(ce_sum, n_tok, zeros, entries, removed, ltok, time.perf_counter() - t0)
        self.log(f"pass {self.passes} ({what}): CE {st.ce:.6f} over {n_tok} tokens, {st.seconds:.1f}s")
        return st

    # ---- calibration (pass 1: dense loss + threshold statistics)
    def calibrate(self, *, cett: bool = True, quantiles: bool = False, chess: bool = False,
                  cett_grid: int = DEFAULT_CETT_GRID) -> PassStats:
        """The dense pass: CE_dense, natural sparsity, and the calibration statistics asked for."""
        if self.dense is not None and (not cett or self.cett_grids is not None) \
                and (not quantiles or self.hist_x is not None) and (not chess or self.hist_gc is not None):
            return self.dense
        import torch

        dev = self.layers[0].col_norms.device
        L = len(self.layers)
        grids = [CettGrid(cett_grid) for _ in range(L)] if cett else None
        hx = [LogHistogram(*LAYER_HIST, device=dev) for _ in range(L)] if quantiles else None
        hg = [LogHistogram(*LAYER_HIST, device=dev) for _ in range(L)] if quantiles else None
        hgc = [LogHistogram(*CHANNEL_HIST, channels=l.site.width or int(l.col_norms.numel()), device=dev)
               for l in self.layers] if chess else None
        up_sum = [torch.zeros(int(l.col_norms.numel()), dtype=torch.float64, device=dev) for l in self.layers] \
            if chess else None
        up_cnt = [torch.zeros(int(l.col_norms.numel()), dtype=torch.float64, device=dev) for l in self.layers] \
            if chess else None

        def calib(layer: Layer, x3, g3, m, w):
            xc = (x3[m] if m is not None else x3.reshape(-1, x3.shape[-1])).float()
            i = layer.index
            if grids is not None:
                grids[i].update(xc, w, layer.col_norms)
            if hx is not None or hgc is not None:
                gc = (g3[m] if m is not None else g3.reshape(-1, g3.shape[-1])).float() if g3 is not None else xc
                if hx is not None:
                    hx[i].update(xc.abs())
                    hg[i].update(gc.abs())
                if hgc is not None:
                    hgc[i].update(gc.abs())
                    if g3 is not None:
                        nz = gc != 0
                        up = torch.where(nz, xc.abs() / gc.abs().clamp_min(1e-30), torch.zeros_like(xc))
                        up_sum[i] += up.double().sum(0)
                        up_cnt[i] += nz.double().sum(0)

        self.dense = self._run(None, calib, "dense + calibration")
        if grids is not None:
            self.cett_grids = grids
        if hx is not None:
            self.hist_x, self.hist_g = hx, hg
        if hgc is not None:
            self.hist_gc, self.up_sum, self.up_cnt = hgc, up_sum, up_cnt
        self._cache.clear()
        return self.dense

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
        if method in ("teal", "cats"):
            hs = self.hist_x if method == "teal" else self.hist_g
            ts = [h.quantile(float(value)) for h in hs]

            def m_q(layer, x3, g3, m):
                a = (x3 if method == "teal" or g3 is None else g3).float().abs()
                return a < ts[layer.index]

            return m_q, list(ts)
        if method == "chess":
            ch_thr = []
            layer_thr = []
            for layer in self.layers:
                i = layer.index
                if not layer.glu:  # no up projection: CHESS's rule is CATS' rule on x
                    t = self.hist_g[i].quantile(float(value))
                    layer_thr.append(t)
                    ch_thr.append(torch.full((int(layer.col_norms.numel()),), t, device=layer.col_norms.device))
                    continue
                up_mean = (self.up_sum[i] / self.up_cnt[i].clamp_min(1)).cpu().numpy()
                t = _mixture_quantile(self.hist_gc[i], up_mean, float(value))
                layer_thr.append(t)
                um = torch.as_tensor(up_mean, dtype=torch.float32, device=layer.col_norms.device)
                ch_thr.append(torch.where(um > 0, t / um.clamp_min(1e-30), torch.full_like(um, math.inf)))

            def m_chess(layer, x3, g3, m):
                a = (g3 if g3 is not None else x3).float().abs()
                return a < ch_thr[layer.index]

            return m_chess, layer_thr
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
        else:
            masker, thr = self._masker(method, value)
            st = self._run(masker, None, f"{method}@{value:.6g}")
            ev = Evaluation(method, float(value), ppl_ratio(st.ce, self.dense.ce), st.ce, st.sparsity(),
                            st.removed_cett(), thr, self.passes, st.seconds)
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
                          self.cett_thresholds(0.0), 0, 0.0)

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
    import torch.nn.functional as F

    total = 0.0
    n = 0
    for b in range(logits.shape[0]):  # one row at a time bounds the float32 copy of the logits
        lab = labels[b]
        keep = lab != -100
        if not bool(keep.any()):
            continue
        lg = logits[b][keep].float()
        losses = F.cross_entropy(lg, lab[keep], reduction="none")
        total += float(losses.double().sum())
        n += int(keep.sum())
    return total, n
