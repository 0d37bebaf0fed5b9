"""CHESS channel-wise thresholds (He et al., EMNLP 2024) as the reference code computes them.

Reference: junhuihe-hjh/CHESS, ``CHESS/notebooks/thresholds.py`` (calibration) and
``CHESS/models/llama.py`` ``llama_mlp_forward_wrapper`` (the sparse forward).

- Pass 1 over the calibration samples: mean|up_i| = the mean over samples of each sample's mean
  over positions of |up_proj(x)_i| (the up projection's OUTPUT, captured directly).
- Pass 2: importance_i = |act(gate)_i| * mean|up_i|; per sample the exact k-th smallest importance
  over all positions and channels, k = int(N * s) (their ``quantile``: ``torch.kthvalue``), averaged
  over samples: T_layer.
- Channel threshold t_i = T_layer / mean|up_i|; the sparse forward zeroes act(gate)_i where
  |act(gate)_i| < t_i (strict), on every position.

Exact: the k-th value is read from a full sort of each sample's importances (no histogram, no
sketch). A sample here is one calibration window (the reference: one C4 document, up to 64k tokens,
until 64 x 1024 tokens are seen); sums are float64 (the reference accumulates in bfloat16).

MLPs without an up projection (GPT-2, the bundled model): importance_i = |x_i| (the activation,
i.e. mean|up| = 1), so the rule becomes CATS' per-layer threshold with CHESS's calibration.

CHESS+ (the reference's ``CHESS+``, "selective sparsification" of attention): the MLP rule above
plus the q projection's input (k and v read the dense hidden state) zeroed where |x| < t_q and the o
projection's input where |x| < t_o, t = per-layer exact k-th value of |x| per sample, averaged
(``calibrate_attention``, ``attention_hooks``). Models with a fused q/k/v projection are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from probes.errors import ModelError

UP_NAMES = ("up_proj", "wi_1", "w3")  # Llama-style, T5 gated, Mixtral-style expert naming
FUSED_GATE_UP = ("gate_up_proj",)  # Phi-3: output = [gate | up]


@dataclass
class ChessCalibration:
    up_mean: list[Any]  # per layer: float64 [d_ff] mean|up_i| (None for MLPs without an up projection)
    importance_thresholds: dict[float, list[float]]  # s -> per layer T_layer
    n_samples: int


def up_module(loaded, layer) -> tuple[Any, str, bool]:
    """The up projection of a GLU MLP next to ``layer``'s output projection: (module, path, fused)."""
    path = layer.site.module_path
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    parent = loaded.model.get_submodule(parent_path) if parent_path else loaded.model
    for n in UP_NAMES:
        m = getattr(parent, n, None)
        if m is not None:
            return m, f"{parent_path}.{n}", False
    for n in FUSED_GATE_UP:
        m = getattr(parent, n, None)
        if m is not None:
            return m, f"{parent_path}.{n}", True
    kids = ", ".join(n for n, _ in parent.named_children())
    raise ModelError(f"CHESS needs the up projection of the GLU MLP {parent_path}; its modules: {kids or 'none'}",
                     f"CHESS knows {', '.join(UP_NAMES + FUSED_GATE_UP)}; use --method cats for a rule on act(gate) "
                     "alone")


def _rows(x, am):
    """The real positions of each row of ``x`` [B, T, C] (``am`` the attention mask), one tensor per row."""
    if x.dim() == 2 and am is not None and x.shape[0] == am.numel():
        x = x.view(*am.shape, x.shape[-1])
    if x.dim() != 3:
        return [x.reshape(-1, x.shape[-1])]
    if am is None or tuple(am.shape) != tuple(x.shape[:2]):
        return [x[b] for b in range(x.shape[0])]
    m = am.bool().to(x.device)
    return [x[b][m[b]] for b in range(x.shape[0])]


def kth_values(imp, values: Sequence[float]) -> list[float]:
    """CHESS's ``quantile``: ``torch.kthvalue(x.view(-1), int(N * q))`` for each q (0 where k < 1)."""
    import torch

    flat = imp.reshape(-1)
    n = flat.numel()
    srt = torch.sort(flat)[0]
    out = []
    for q in values:
        k = int(n * q)
        out.append(float(srt[min(k, n) - 1]) if k >= 1 else 0.0)
    return out


def calibrate(loaded, batches: Sequence[Any], layers: Sequence[Any], values: Sequence[float], *,
              up_mean: list[Any] | None = None) -> ChessCalibration:
    """The two calibration passes of ``thresholds.py`` over ``batches`` (pass 1 skipped when ``up_mean``
    is given), for every sparsity in ``values``."""
    import torch

    from probes.hooks import HookPoint
    from probes.runner import TokenBatches, run
    from probes.teal import BatchTracker

    L = len(layers)
    n_samples = 0
    if up_mean is None:
        sums: list[Any] = [None] * L
        counts = [0] * L
        tracker = BatchTracker(batches)
        hooks_ = []
        for layer in layers:
            if not layer.glu:
                continue
            mod, path, fused = up_module(loaded, layer)

            def fn(x, hc, i=layer.index, fused=fused):
                if fused:
                    x = x[..., x.shape[-1] // 2:]
                am = getattr(tracker.current, "attention_mask", None)
                for r in _rows(x, am):
                    m = r.abs().double().mean(0)
                    sums[i] = m if sums[i] is None else sums[i] + m
                    counts[i] += 1
                return None

            hooks_.append((HookPoint(f"chess.up.{layer.index}", mod, "output"), fn))
        if hooks_:
            run(loaded.model, tracker, fwd_hooks=hooks_, adapter=TokenBatches())
        up_mean = [(sums[i] / counts[i]).cpu() if sums[i] is not None else None for i in range(L)]
    vals = [float(v) for v in values]
    thr_sum = {v: [0.0] * L for v in vals}
    per_layer_samples = [0] * L
    if vals:
        tracker = BatchTracker(batches)
        hooks_ = []
        for layer in layers:
            site = layer.gate_site if layer.glu else layer.site

            def fn2(x, hc, i=layer.index):
                am = getattr(tracker.current, "attention_mask", None)
                um = up_mean[i]
                for r in _rows(x, am):
                    imp = r.float().abs()
                    if um is not None:
                        imp = imp * um.to(imp.device, torch.float32)
                    for v, t in zip(vals, kth_values(imp, vals)):
                        thr_sum[v][i] += t
                    per_layer_samples[i] += 1
                return None

            hooks_.append((site, fn2))
        run(loaded.model, tracker, fwd_hooks=hooks_, adapter=TokenBatches())
        n_samples = max(per_layer_samples) if per_layer_samples else 0
    thr = {v: [thr_sum[v][i] / max(per_layer_samples[i], 1) for i in range(L)] for v in vals}
    return ChessCalibration(up_mean, thr, n_samples)


# ------------------------------------------------------------------------------------------- CHESS+
def attention_modules(loaded) -> tuple[list[Any], list[Any]]:
    """The q projections and the attention output projections (``probes.teal`` projection sets), per layer.

    CHESS+ thresholds the q projection's input alone (k and v stay dense): a fused q/k/v projection
    (GPT-2's ``attn.c_attn``) has no such input, and is refused."""
    from probes.teal import find_projections

    fam, projs = find_projections(loaded.model)
    qs = [p for p in projs if p.name == "q"]
    os_ = [p for p in projs if p.name == "o"]
    if not qs or not os_ or len(qs) != len(os_):
        fused = [p.module_path for p in projs if p.name == "qkv"][:1]
        raise ModelError(f"CHESS+ thresholds the input of the q projection alone; {type(loaded.model).__name__} has "
                         + (f"a fused q/k/v projection ({fused[0]})" if fused else "no separate q and o projections"),
                         "use --method chess (the MLP rule alone) for this model")
    return qs, os_


def calibrate_attention(loaded, batches: Sequence[Any], values: Sequence[float]) -> dict[float, list[tuple]]:
    """CHESS+'s attention thresholds (``thresholds.py`` ``llama_attention_forward``): per layer the exact
    k-th smallest |x| (k = int(N * s)) of the q projection's input and of the o projection's input, per
    sample, averaged over samples. Returns s -> [(t_q_input, t_o_input) per layer]."""
    from probes.hooks import HookPoint
    from probes.runner import TokenBatches, run
    from probes.teal import BatchTracker

    qs, os_ = attention_modules(loaded)
    vals = [float(v) for v in values]
    L = len(qs)
    sums = {v: [[0.0, 0.0] for _ in range(L)] for v in vals}
    counts = [[0, 0] for _ in range(L)]
    tracker = BatchTracker(batches)
    hooks_ = []
    for li, (q, o) in enumerate(zip(qs, os_)):
        for j, p in enumerate((q, o)):
            def fn(x, hc, li=li, j=j):
                am = getattr(tracker.current, "attention_mask", None)
                for r in _rows(x, am):
                    for v, t in zip(vals, kth_values(r.float().abs(), vals)):
                        sums[v][li][j] += t
                    counts[li][j] += 1
                return None

            hooks_.append((HookPoint(f"chess_plus.{li}.{j}", p.module, "input"), fn))
    run(loaded.model, tracker, fwd_hooks=hooks_, adapter=TokenBatches())
    return {v: [(sums[v][i][0] / max(counts[i][0], 1), sums[v][i][1] / max(counts[i][1], 1)) for i in range(L)]
            for v in vals}


def attention_hooks(loaded, thresholds: Sequence[tuple]):
    """Forward pre-hooks (``probes.hooks`` form) zeroing the q projection's input where |x| < t_q and the o
    projection's input where |x| < t_o, on every position (``llama.py`` ``llama_attention_forward_wrapper``)."""
    import torch

    from probes.hooks import HookPoint

    qs, os_ = attention_modules(loaded)
    out = []
    for li, (q, o) in enumerate(zip(qs, os_)):
        for j, p in enumerate((q, o)):
            t = float(thresholds[li][j])

            def fn(x, hc, t=t):
                return torch.where(x.abs() < t, torch.zeros_like(x), x)

            out.append((HookPoint(f"chess_plus.{li}.{p.name}", p.module, "input"), fn))
    return out
