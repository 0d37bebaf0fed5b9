"""TEAL (Liu et al., arXiv 2408.14690) as its reference code defines it (FasterDecoding/TEAL).

What TEAL sparsifies: the INPUTS of all seven projections of a Llama-style block, q k v o gate up
down (``teal/self_attn.py`` ``_FA2_forward``, ``teal/mlp.py`` ``_mlp_forward``): x' = x * (|x| >
t) (``utils/utils.py`` ``SparsifyFn.apply``: ``x.abs().gt(threshold) * x``), one threshold per layer
and per projection. q, k, v share one input tensor (the post-norm hidden state, TEAL's attention
``h1``) and one histogram; gate and up share the MLP ``h1``; o reads the attention output (``h2``),
down the MLP activation (``h2``).

Calibration (``teal/grab_acts.py``; ``utils/utils.py`` ``ActivationModule.find_histogram``): the
signed activations of every position of the calibration sequences are sorted; lower = a[int(0.01 N)],
upper = a[-int(0.01 N)]; bin edges = [a_min, linspace(lower, upper, 9999), a_max] (10,000 bins);
counts by ``torch.histogram``; bin centres the edge midpoints. Threshold for sparsity s
(``SparsifyFn.set_threshold``, ``Distribution.icdf``): icdf(0.5 + s/2) of that histogram (it assumes
a zero-mean, symmetric distribution), linearly interpolated between bin centres on the cumulative
counts; s = 0 gives threshold 0. Here the calibration windows are the first windows of the corpus
and the evaluation windows the ones after (disjoint); TEAL calibrates on 10 x 2048 tokens of
Alpaca and evaluates on other text.

Evaluation (``SparsifyFn.forward`` with ``apply_prefill=True``, TEAL's default): a forward over
more than one position sparsifies only the LAST HALF of the positions (``x.size(1) // 2``), the
stand-in for decoding; ``all`` sparsifies every position (every token as if decoded sparsely).

Effective sparsity (``teal/greedyopt.py`` ``f``): the mean of the per-projection sparsities
weighted by each projection's parameter count. Ours weights the MEASURED fraction of zeroed
input entries (on the positions the mask applies to) by ``weight.numel()``, over all layers.

Greedy block-wise allocation (``teal/greedyopt.py`` ``process_layer``; ``scripts/greedyopt.bash``:
``--base_step_size 0.025 --last_fraction 0.25``): per block, from all-zero sparsities, step the one
projection whose step (0.025 / its weight relative to a d x d projection) gives the smallest
activation error ``||y_dense - y_sparse||`` over the last 25 % of positions (norm over positions,
mean over batch and channels, ``calculate_activation_error``), the block fed the dense hidden states,
until the weighted sparsity reaches the target; at evaluation each block takes the recorded step
whose effective sparsity is closest to s (``utils/utils.py`` ``get_layer_greedy_sparsities``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from probes.errors import DataError, ModelError

TEAL_NUM_BINS = 10000  # ActivationModule.find_histogram(num_bins=10000, outlier_threshold=0.01)
TEAL_OUTLIER = 0.01
GREEDY_BASE_STEP = 0.025  # scripts/greedyopt.bash (the argparse default of greedyopt.py is 0.05)
GREEDY_LAST_FRACTION = 0.25  # scripts/greedyopt.bash and greedyopt.py's default
TEAL_EVAL_MODES = ("last-half", "all")
DEFAULT_TEAL_EVAL = "last-half"  # SparsifyFn(apply_prefill=True), TEAL's default
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # TEAL: self_attn h1 / h2, mlp h1 / h2
HIST_BUDGET_BYTES = 1 << 30  # calibration activations held at once (more: several passes)

# Projection sets: family -> ((TEAL name, module-name suffix regex, input group), ...), in TEAL's order.
PROJECTION_SETS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "llama": (("q", r"self_attn\.q_proj", "attn_in"), ("k", r"self_attn\.k_proj", "attn_in"),
              ("v", r"self_attn\.v_proj", "attn_in"), ("o", r"self_attn\.o_proj", "attn_out"),
              ("gate", r"mlp\.gate_proj", "mlp_in"), ("up", r"mlp\.up_proj", "mlp_in"),
              ("down", r"mlp\.down_proj", "mlp_out")),
    "gpt2": (("qkv", r"attn\.c_attn", "attn_in"), ("o", r"attn\.c_proj", "attn_out"),
             ("up", r"mlp\.c_fc", "mlp_in"), ("down", r"mlp\.c_proj", "mlp_out")),
    "bert": (("q", r"attention\.self\.query", "attn_in"), ("k", r"attention\.self\.key", "attn_in"),
             ("v", r"attention\.self\.value", "attn_in"), ("o", r"attention\.output\.dense", "attn_out"),
             ("up", r"intermediate\.dense", "mlp_in"), ("down", r"output\.dense", "mlp_out")),
}
PROJECTION_SET_DOC = {
    "llama": "Llama / Mistral / Qwen2 / Qwen3 / Gemma / SmolLM: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj",
    "gpt2": "GPT-2 (and the bundled model): attn.c_attn (q, k, v fused), attn.c_proj (o), mlp.c_fc (up), "
            "mlp.c_proj (down)",
    "bert": "BERT / RoBERTa: attention.self.{query,key,value}, attention.output.dense (o), intermediate.dense "
            "(up), output.dense (down)",
}


# ------------------------------------------------------------------------------------------- projections
@dataclass
class Projection:
    """One linear layer whose input TEAL sparsifies."""

    layer: int
    name: str  # q k v o gate up down (qkv for a fused q/k/v)
    group: str  # the input it reads: attn_in, attn_out, mlp_in, mlp_out
    module_path: str
    block_path: str
    module: Any = field(repr=False)
    params: int = 0
    width: int = 0  # input features

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "projection": self.name, "input_group": self.group,
                "module_path": self.module_path, "params": self.params, "width": self.width}


def _linear_names(model) -> list[str]:
    from probes.sites import _is_linear

    return [n for n, m in model.named_modules() if n and _is_linear(m)]


def find_projections(model) -> tuple[str, list[Projection]]:
    """The projections TEAL sparsifies in ``model`` (the family whose set matches most modules)."""
    from probes.sites import in_width

    named = dict(model.named_modules())
    best: tuple[str, list[Projection]] = ("", [])
    for fam, spec in PROJECTION_SETS.items():
        found = []
        for n, m in named.items():
            w = getattr(m, "weight", None)
            if w is None or getattr(w, "dim", lambda: 0)() != 2:
                continue
            for pname, suffix, group in spec:
                # the block index is the last number before the suffix (model.layers.3.mlp.up_proj)
                mt = re.fullmatch(rf"(?P<block>(?:.*\.)?(?P<layer>\d+))\.{suffix}", n)
                if mt is None:
                    continue
                if fam == "bert" and pname == "down" and n.endswith("attention.output.dense"):
                    continue
                found.append(Projection(int(mt["layer"]), pname, group, n, mt["block"], m, int(w.numel()),
                                        int(in_width(m) or w.shape[-1])))
                break
        if len(found) > len(best[1]):
            best = (fam, found)
    fam, projs = best
    if not projs:
        names = _linear_names(model)
        shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ModelError(
            f"no projection TEAL sparsifies (q/k/v/o/gate/up/down inputs) found in {type(model).__name__}; "
            f"linear modules found: {shown or 'none'}",
            "TEAL knows Llama-style (self_attn.q_proj ... mlp.down_proj), GPT-2 (attn.c_attn, attn.c_proj, mlp.c_fc, "
            "mlp.c_proj) and BERT (attention.self.query ... output.dense) names; for a mask on the MLP output "
            "projection's input only use --method absq_down")
    order = {p[0]: i for i, p in enumerate(PROJECTION_SETS[fam])}
    projs.sort(key=lambda p: (p.layer, order[p.name]))
    return fam, projs


def unit_params(projs: Sequence[Projection]) -> int:
    """The size of a d x d projection (d = the attention input width): TEAL's weight unit (q_proj = 1)."""
    d = next((p.width for p in projs if p.group == "attn_in"), projs[0].width)
    return d * d


# ------------------------------------------------------------------------------------------- histogram
@dataclass
class TealDistribution:
    """TEAL's histogram of one input (``ActivationModule.find_histogram``) and its ``Distribution.icdf``."""

    centers: Any  # float32 [bins]
    counts: Any  # float32 [bins]
    n_values: int

    @classmethod
    def from_values(cls, acts) -> "TealDistribution":
        import torch

        a = torch.sort(acts.flatten().float())[0].cpu()
        n = int(a.numel())
        if n < int(1 / TEAL_OUTLIER):
            raise DataError(f"TEAL calibration has {n} values for one input (needs at least "
                            f"{int(1 / TEAL_OUTLIER)} for its 1 % outlier bins)",
                            "give more calibration tokens (--calib-fraction, --max-tokens)")
        k = int(TEAL_OUTLIER * n)
        lower, upper = a[k], a[-k]
        main = torch.linspace(float(lower), float(upper), TEAL_NUM_BINS - 1)
        bins = torch.cat([a[:1], main, a[-1:]])
        counts, _ = torch.histogram(a, bins=bins)
        centers = (bins[:-1] + bins[1:]) / 2
        return cls(centers.float(), counts.float(), n)

    def icdf(self, q: float) -> float:
        import torch

        total = self.counts.sum()
        cum = torch.cumsum(self.counts, dim=0)
        target = q * total
        idx = int(torch.searchsorted(cum, target))
        if idx == 0:
            return float(self.centers[0])
        if idx == len(self.centers):
            return float(self.centers[-1])
        lo, hi = cum[idx - 1], cum[idx]
        frac = (target - lo) / (hi - lo)
        return float(self.centers[idx - 1] + frac * (self.centers[idx] - self.centers[idx - 1]))

    def threshold(self, s: float) -> float:
        """``SparsifyFn.set_threshold``: icdf(0.5 + s/2), 0 for s = 0."""
        return self.icdf(0.5 + s / 2) if s != 0.0 else 0.0


# ------------------------------------------------------------------------------------------- batches
class BatchTracker:
    """Iterates batches and remembers the one in flight (its attention mask says each row's length)."""

    def __init__(self, batches):
        self.batches = batches
        self.current = None

    def __iter__(self):
        for b in self.batches:
            self.current = b
            yield b
        self.current = None


def region_mask(attn_mask, mode: str, shape):
    """``[batch, pos]`` positions TEAL sparsifies: every real position (``all``) or the last
    ``n // 2`` of each row's ``n`` real positions (``last-half``, ``SparsifyFn.forward``)."""
    import torch

    B, T = shape
    if attn_mask is None or tuple(attn_mask.shape) != (B, T):
        am = torch.ones((B, T), dtype=torch.bool)
    else:
        am = attn_mask.bool().cpu()
    if mode == "all":
        return am
    n = am.sum(1, keepdim=True)
    pos = torch.arange(T).unsqueeze(0)
    if T <= 1:  # one position: a decode step, always sparsified
        return am
    return am & (pos >= n - n // 2) & (pos < n)


def _as_btc(x, shape):
    if x.dim() == 3:
        return x
    if x.dim() == 2 and shape is not None and x.shape[0] == shape[0] * shape[1]:
        return x.view(shape[0], shape[1], x.shape[-1])
    return None


# ------------------------------------------------------------------------------------------- calibration
def calibrate(loaded, batches: Sequence[Any], projs: Sequence[Projection], *,
              budget_bytes: int = HIST_BUDGET_BYTES, log: Callable[[str], Any] | None = None
              ) -> dict[tuple[int, str], TealDistribution]:
    """TEAL's histogram of each (layer, input group) on ``batches`` (dense forwards; every real position).

    The signed inputs are held in memory to sort them; when they would pass ``budget_bytes`` the
    groups are split over several passes."""
    import torch

    from probes.hooks import HookPoint
    from probes.runner import TokenBatches, run

    reps: dict[tuple[int, str], Projection] = {}
    for p in projs:
        reps.setdefault((p.layer, p.group), p)
    n_real = sum(int(b.attention_mask.sum()) for b in batches)
    keys = list(reps)
    chunks: list[list[tuple[int, str]]] = [[]]
    used = 0
    for k in keys:
        need = n_real * reps[k].width * 4
        if chunks[-1] and used + need > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(k)
        used += need
    out: dict[tuple[int, str], TealDistribution] = {}
    for chunk in chunks:
        store: dict[tuple[int, str], list] = {k: [] for k in chunk}
        tracker = BatchTracker(batches)

        def make(k):
            def fn(x, hc):
                b = tracker.current
                am = b.attention_mask if b is not None else None
                x3 = _as_btc(x, tuple(am.shape) if am is not None else None)
                if x3 is None:
                    store[k].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
                    return None
                keep = am.bool().to(x3.device) if am is not None and tuple(am.shape) == tuple(x3.shape[:2]) else None
                v = x3[keep] if keep is not None else x3.reshape(-1, x3.shape[-1])
                store[k].append(v.detach().float().cpu())
                return None
            return fn

        hooks_ = [(HookPoint(f"teal_calib.{k[0]}.{k[1]}", reps[k].module, "input"), make(k)) for k in chunk]
        run(loaded.model, tracker, fwd_hooks=hooks_, adapter=TokenBatches())
        for k in chunk:
            acts = torch.cat(store.pop(k), 0)
            out[k] = TealDistribution.from_values(acts)
            del acts
        if log:
            log(f"TEAL calibration: {len(chunk)} histograms over {n_real} positions")
    return out


def thresholds_for(dists, projs: Sequence[Projection], sparsities: dict[str, float]) -> dict[str, float]:
    """Threshold of each projection (``Projection.key``) for its sparsity level."""
    return {p.key: dists[(p.layer, p.group)].threshold(float(sparsities[p.key])) for p in projs}


# ------------------------------------------------------------------------------------------- masking
@dataclass
class ProjStats:
    zeros: float = 0.0
    entries: float = 0.0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.entries if self.entries else math.nan


def mask_hooks(projs: Sequence[Projection], thresholds: dict[str, float], mode: str, tracker: BatchTracker,
               stats: dict[str, ProjStats] | None = None):
    """Forward pre-hooks (``probes.hooks`` form) that apply ``x.abs().gt(t) * x`` to each projection's
    input on the positions of ``region_mask``; ``stats`` counts zeros on counted positions there."""
    import torch

    from probes.hooks import HookPoint

    def make(p: Projection):
        t = float(thresholds[p.key])

        def fn(x, hc):
            b = tracker.current
            am = getattr(b, "attention_mask", None)
            shape = tuple(am.shape) if am is not None else None
            x3 = _as_btc(x, shape)
            if x3 is None:
                raise ModelError(f"{p.module_path} gets a {x.dim()}-D input {tuple(x.shape)}",
                                 "TEAL needs [batch, pos, features] projection inputs")
            reg = region_mask(am, mode, tuple(x3.shape[:2])).to(x3.device)
            keep = x3.abs().gt(t)
            xs = torch.where(reg.unsqueeze(-1) & ~keep, torch.zeros_like(x3), x3)
            if stats is not None:
                cm = hc.mask
                sel = reg if cm is None or tuple(cm.shape) != tuple(reg.shape) else reg & cm.to(reg.device)
                v = xs[sel]
                st = stats.setdefault(p.key, ProjStats())
                st.zeros += float(torch.count_nonzero(v == 0))
                st.entries += float(v.numel())
            return xs.reshape(x.shape)

        return (HookPoint(f"teal.{p.key}", p.module, "input"), fn)

    return [make(p) for p in projs]


def effective_sparsity(projs: Sequence[Projection], per_proj: dict[str, float]) -> float:
    """Parameter-weighted mean of per-projection sparsities (``greedyopt.py`` ``f``, weights ∝ params)."""
    num = sum(p.params * per_proj[p.key] for p in projs if per_proj.get(p.key) == per_proj.get(p.key))
    den = sum(p.params for p in projs if per_proj.get(p.key) == per_proj.get(p.key))
    return num / den if den else math.nan


# ------------------------------------------------------------------------------------------- greedy
class _Stop(Exception):
    pass


def _block_inputs(loaded, batches, block):
    """(args, kwargs, attention mask) of every call of ``block`` over ``batches`` (dense; the forward is
    cut after the block's input is seen)."""
    import torch

    from probes.runner import forward_batch

    got = []
    cur = {}

    def pre(mod, args, kwargs):
        got.append((args, dict(kwargs), cur["am"]))
        raise _Stop

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in batches:
                cur["am"] = b.attention_mask
                try:
                    forward_batch(loaded.model, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    return got


def _first(out):
    import torch

    if torch.is_tensor(out):
        return out
    return out[0]


def activation_error(target, new, am, last_fraction: float = GREEDY_LAST_FRACTION) -> float:
    """``greedyopt.calculate_activation_error`` on one batch: the norm over positions of the difference
    on the last ``last_fraction`` of positions, averaged over batch and channels (padding zeroed)."""
    import torch

    d = (target - new).float()
    if am is not None and tuple(am.shape) == tuple(d.shape[:2]):
        d = d * am.to(d.device).unsqueeze(-1).to(d.dtype)
    start = int(d.shape[1] * (1 - last_fraction))
    return float(torch.norm(d[:, start:], dim=1).mean())


@dataclass
class GreedyRow:
    effective: float
    error: float
    sparsities: dict[str, float]


def greedy_block(loaded, batches, projs: Sequence[Projection], dists, target: float, *,
                 base_step: float = GREEDY_BASE_STEP, last_fraction: float = GREEDY_LAST_FRACTION
                 ) -> list[GreedyRow]:
    """``greedyopt.process_layer`` for one block (``projs`` all of one layer): the rows it records."""
    import torch

    block = loaded.model.get_submodule(projs[0].block_path)
    inputs = _block_inputs(loaded, batches, block)
    unit = unit_params(projs)
    weights = {p.name: p.params / unit for p in projs}
    total_w = sum(weights.values())
    steps = {p.name: base_step * (1 / weights[p.name]) for p in projs}

    def forward(sp: dict[str, float]) -> float:
        thr = {p.key: dists[(p.layer, p.group)].threshold(sp[p.name]) for p in projs}
        errs = []
        for (args, kwargs, am), tgt in zip(inputs, targets or [None] * len(inputs)):
            tracker = BatchTracker([])
            tracker.current = type("B", (), {"attention_mask": am})()
            from probes.hooks import hooks as attach

            with torch.inference_mode(), attach(mask_hooks(projs, thr, "last-half", tracker)):
                y = _first(block(*args, **kwargs))
            if tgt is None:
                outs.append(y)
            else:
                errs.append(activation_error(tgt, y, am, last_fraction))
        return sum(errs) / len(errs) if errs else 0.0

    def f(sp):
        return sum(sp[n] * weights[n] for n in sp) / total_w

    targets: list = []
    outs: list = []
    forward({p.name: 0.0 for p in projs})
    targets = outs
    sp = {p.name: 0.0 for p in projs}
    rows: list[GreedyRow] = []
    while f(sp) < target:
        best_err, best = float("inf"), None
        for p in projs:
            tmp = dict(sp)
            if tmp[p.name] >= 1:
                continue
            tmp[p.name] += steps[p.name]
            err = forward(tmp)
            if err < best_err:
                best_err, best = err, p.name
        if best is None:
            break
        sp[best] += steps[best]
        rows.append(GreedyRow(f(sp), best_err, dict(sp)))
    return rows


def pick_greedy(rows: Sequence[GreedyRow], s: float) -> dict[str, float]:
    """``get_layer_greedy_sparsities``: the recorded row whose effective sparsity is closest to ``s``."""
    if not rows:
        return {}
    best = min(range(len(rows)), key=lambda i: (abs(rows[i].effective - s), i))
    return dict(rows[best].sparsities)
