"""PPL-p% sparsity (CETT) and sparsity-vs-perplexity curves (METRICS.md section 6).

Definitions (Sparsing Law arXiv 2411.02335; ReLU^2 Wins arXiv 2402.03804; reference code
thunlp/SparsingLaw src/model_utils.py and src/calc_activation.py):

- x = the MLP activation (input of the output projection), W_down the projection with
  y = W_down x. Neuron output norm n_i = |x_i| * ||W_down[:, i]||_2. In a sparse run neuron i
  is inactive (zeroed by a forward pre-hook on the output projection) when n_i < t_layer.
- CETT(t) = mean over counted tokens of ||sum_{i: n_i <= t} x_i W_down[:, i]||_2 /
  ||sum_i x_i W_down[:, i]||_2 (a token whose whole MLP output is 0 contributes 0).
- One CETT value c is shared by every layer; a layer's threshold is the largest t with
  CETT(t) <= c. PPL-p%: the c with exp(CE_sparse - CE_dense) = 1 + p/100, dense and sparse
  cross-entropies summed in float64 over exactly the same counted tokens.

Calibration with bounded memory. The reference keeps every token's activations and
binary-searches 65,536 linspace candidates per layer. We stream instead: the first batch fixes
a per-layer grid of candidate thresholds (``cett_grid`` quantiles of the positive n_i of that
batch, plus log-spaced extensions 4 decades below and 3 above, plus t = 0), and the per-token
CETT is evaluated EXACTLY at every grid point for every counted token (per-bucket partial sums
from one sparse-dense product, a cumulative sum over the grid, a norm per grid point: O(grid x
d_model) work per token, a few times a forward pass for a tiny model, a small fraction of one
for a real LLM) and summed in float64. State is O(layers x grid). Between grid points the
threshold is linearly interpolated in t. CETT at grid points is exact; only the placement of
the grid depends on the first batch.

Minimum tokens: below MIN_TOKENS (4096) counted tokens the PPL ratio near 1 is noise-prone;
results still come out, with a loud warning in the output and the manifest.

Search for c (``search_cett``): plain bisection on [0, 1] is the reference. The default is a
safeguarded secant search on log(PPL ratio) against log(c) (the curve is close to a power law),
kept inside a bracket, with a bisection step whenever a proposal leaves the bracket, lands too
close to its ends, or two steps fail to halve it (Brent/Dekker-style safeguards). c = 0 needs
no pass: its thresholds remove no neuron with a non-zero output, so its ratio is exactly 1.
Unreachable targets (even zeroing every MLP neuron stays under 1 + p) are reported as such.

Other threshold families (curve points, each naming the tensor it thresholds, all zeroing
entries of the projection input through the same pre-hook):
- ``fat@eps``: |act(gate)| < eps (GLU); the activation x itself for non-GLU MLPs.
- ``topk@r`` / ``topk_global@r``: keep the r fraction of largest |act(gate)| (x for non-GLU)
  per token, or over all counted tokens of a batch (Sparsing Law's global mode).
- ``teal@s``: |x| < the s-quantile of |x| per layer (FasterDecoding/TEAL; down-proj input only).
- ``cats@s``: |act(gate)| < the s-quantile of |act(gate)| per layer (ScalingIntelligence/CATS).
- ``chess@s``: channel-wise: |act(gate)_i| * mean|up_i| < the s-quantile of that importance per
  layer (junhuihe-hjh/CHESS). Quantiles come from fixed log-spaced histograms (documented
  in the rows); mean|up_i| is estimated as |x_i| / |act(gate)_i| where act(gate)_i != 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes import corpus as corpus_mod
from probes.errors import DataError, ModelError
from probes.hooks import attach_sites
from probes.loading import LoadedModel, check_max_length
from probes.runner import forward_batch
from probes.sites import MLP_GATE_ACT, MLP_POST, Site, find_sites

# Below this many counted tokens a PPL ratio of 1.01 is within noise of the corpus itself:
# the outputs carry a loud warning (stderr, summary table, manifest).
MIN_TOKENS = 4096
DEFAULT_TOL = 1e-3
DEFAULT_P = (1.0,)
DEFAULT_CETT_GRID = 128
DEFAULT_MAX_PASSES = 40  # sparse passes per target before giving up (status not_reached)
SEARCH_METHODS = ("secant", "bisection")
C_TOL = 1e-9  # a bracket narrower than this in c cannot be refined further
SECANT_START = 0.2  # first probe when nothing is known yet: c ~ 0.2 is near PPL-1% for ReLU-like LMs
CURVE_METHODS = ("cett", "topk", "topk_global", "teal", "cats", "chess", "fat")
DEFAULT_CURVE_METHODS = ("cett", "topk", "teal", "cats", "fat")
DEFAULT_CURVE_VALUES: dict[str, tuple[float, ...]] = {
    "cett": (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6),
    "topk": (0.5, 0.3, 0.2, 0.1, 0.05, 0.02),
    "topk_global": (0.5, 0.3, 0.2, 0.1, 0.05, 0.02),
    "teal": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    "cats": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    "chess": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    "fat": (0.001, 0.01, 0.03, 0.1, 0.3),
}
CURVE_PARAM = {"cett": "c", "topk": "r_kept", "topk_global": "r_kept", "teal": "s", "cats": "s", "chess": "s",
               "fat": "eps"}
# Fixed log-spaced histograms for quantile thresholds (teal/cats: per layer; chess: per channel).
LAYER_HIST = (1e-10, 1e6, 4096)
CHANNEL_HIST = (1e-8, 1e4, 192)
_SPARSE_CHUNK_ELEMS = 1 << 22  # bound on tokens x grid x d_model floats in one CETT chunk


# --------------------------------------------------------------------------------------- formulas
def down_weight_io(module):
    """The output projection's weight as ``[in, out]`` float32, so that ``y = x @ W`` (bias left out).

    nn.Linear stores ``[out, in]``; transformers' GPT-2 Conv1D stores ``[in, out]``.
    """
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise ModelError(f"output projection {type(module).__name__} has no 2-D weight",
                         "PPL-p% needs a linear output projection; pick one with --site PATH:input")
    if type(module).__name__ == "Conv1D":
        return w.detach().float()
    return w.detach().float().t()


def down_column_norms(module):
    """||W_down[:, i]||_2 for every input channel i of the projection, float32 ``[in]``."""
    import torch

    return torch.linalg.vector_norm(down_weight_io(module), dim=1)


def neuron_output_norms(x, col_norms):
    """n_i = |x_i| * ||W_down[:, i]||_2, in float32 (``x`` ``[..., in]``)."""
    return x.float().abs() * col_norms


def cett(x, weight_io, threshold: float, col_norms=None) -> float:
    """CETT(t) of activations ``x`` ``[tokens, in]`` (all counted) under ``y = x @ weight_io``.

    Mean over tokens of ||sum_{i: n_i <= t} x_i w_i|| / ||sum_i x_i w_i|| (0 for a token whose
    output is exactly 0). The streaming calibration evaluates the same formula on a grid.
    """
    import torch

    x = x.float()
    w = weight_io.float()
    cn = torch.linalg.vector_norm(w, dim=1) if col_norms is None else col_norms
    small = torch.where(neuron_output_norms(x, cn) <= threshold, x, torch.zeros_like(x))
    num = torch.linalg.vector_norm(small @ w, dim=-1).double()
    den = torch.linalg.vector_norm(x @ w, dim=-1).double()
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return float(ratio.mean()) if ratio.numel() else math.nan


def threshold_for_cett(grid: Sequence[float], cett_values: Sequence[float], c: float) -> float:
    """The largest t with CETT(t) <= c, from CETT known on an increasing grid of t.

    ``grid[0]`` must be 0 (CETT(0) = 0). Between the last grid point with CETT <= c and the
    next one, t is interpolated linearly. ``c >= 1`` gives +inf (every neuron inactive). The
    result is rounded to float32, the precision of the comparison in the sparse run.
    """
    import numpy as np

    if c >= 1.0:
        return math.inf
    g = np.asarray(grid, dtype=np.float64)
    v = np.asarray(cett_values, dtype=np.float64)
    ok = np.nonzero(v <= c)[0]
    k = int(ok[-1]) if ok.size else 0
    if k >= len(g) - 1:
        t = g[-1]
    else:
        lo, hi = v[k], v[k + 1]  # hi > c by maximality of k
        frac = 0.0 if hi <= lo else min(1.0, max(0.0, (c - lo) / (hi - lo)))
        t = g[k] + frac * (g[k + 1] - g[k])
    t32 = float(np.float32(t))
    return t32 if t32 <= g[-1] else float(np.nextafter(np.float32(t32), np.float32(0)))


def ppl_ratio(ce_sparse: float, ce_dense: float) -> float:
    """exp(CE_sparse - CE_dense): the sparse run's perplexity over the dense one's."""
    return math.exp(ce_sparse - ce_dense)


# ----------------------------------------------------------------------------- streaming accumulators
class CettGrid:
    """Exact per-token CETT at a fixed grid of candidate thresholds, summed over tokens (one layer).

    The grid is fixed by the first batch (``n_quantiles`` quantiles of its positive n_i, at most one
    per positive value, log extensions 4 decades below and 3 above, and 0). State: the grid and a
    float64 sum per grid point, O(grid) whatever the number of tokens.
    """

    def __init__(self, n_quantiles: int = DEFAULT_CETT_GRID):
        self.n_quantiles = int(n_quantiles)
        self.grid = None  # float32 [K], increasing, grid[0] == 0
        self.sums = None  # float64 [K]
        self.n_tokens = 0

    def _init_grid(self, n):
        import torch

        pos = n[n > 0].flatten()
        if pos.numel() > (1 << 24):  # torch.quantile's input limit; an even subsample is plenty
            pos = pos[:: math.ceil(pos.numel() / (1 << 24))]
        if pos.numel() == 0:
            body = torch.logspace(-8, 4, min(self.n_quantiles, DEFAULT_CETT_GRID), dtype=torch.float64)
        else:
            p64 = pos.double()
            lo, hi = float(p64.min()), float(p64.max())
            # No more quantiles than positive values to take them from: the grid follows the data, not the option.
            n_q = min(self.n_quantiles, pos.numel())
            q = torch.quantile(p64, torch.linspace(0, 1, n_q, dtype=torch.float64))
            below = torch.logspace(math.log10(lo) - 4, math.log10(lo), 9, dtype=torch.float64)[:-1]
            above = torch.logspace(math.log10(hi), math.log10(hi) + 3, 7, dtype=torch.float64)[1:]
            body = torch.cat([below, q, above])
        grid = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), body]).float())  # sorted
        self.grid = grid.to(n.device)
        self.sums = torch.zeros(len(grid), dtype=torch.float64, device=n.device)

    def update(self, x, weight_io, col_norms) -> None:
        """Add counted tokens ``x`` ``[tokens, in]`` (float32) of a projection ``y = x @ weight_io``."""
        import torch

        if x.numel() == 0:
            return
        n = neuron_output_norms(x, col_norms)
        if self.grid is None:
            self._init_grid(n)
        # Bucket b_i = first grid index with grid[b] >= n_i: neuron i counts in CETT(grid[k]) iff b_i <= k.
        bucket = torch.bucketize(n, self.grid, right=False)
        full = torch.linalg.vector_norm(x @ weight_io, dim=-1)  # [tokens]
        tok, ch = torch.nonzero(x, as_tuple=True)  # zero activations contribute nothing
        self._accumulate(x, weight_io, full, bucket, tok, ch)
        self.n_tokens += int(x.shape[0])

    def _accumulate(self, x, w, full, bucket, tok, ch) -> None:
        """Per-bucket output sums as one sparse-dense product (bucket-major rows), then a cumulative
        sum over the grid and a norm per grid point: O(grid x d_model) per token."""
        import torch

        K = len(self.grid)
        D = w.shape[1]
        step = max(1, _SPARSE_CHUNK_ELEMS // ((K + 1) * D))
        N = x.shape[0]
        bounds = torch.searchsorted(tok, torch.arange(0, N + step, step, device=x.device).clamp_max(N)).tolist()
        for j, s in enumerate(range(0, N, step)):
            nc = min(step, N - s)
            lo, hi = bounds[j], bounds[j + 1]
            t, c = tok[lo:hi], ch[lo:hi]
            rows = bucket[t, c] * nc + (t - s)  # bucket-major, so the cumulative sum runs over contiguous rows
            a = torch.sparse_coo_tensor(torch.stack([rows, c]), x[t, c], ((K + 1) * nc, x.shape[1]),
                                        check_invariants=False)
            parts = torch.sparse.mm(a, w).view(K + 1, nc * D)
            partial = torch.linalg.vector_norm(parts.cumsum(0).view(K + 1, nc, D)[:K], dim=-1)  # [K, nc]
            fs = full[s:s + nc]
            ratio = torch.where(fs > 0, partial / fs.clamp_min(1e-30), torch.zeros_like(partial))
            self.sums += ratio.sum(dim=1, dtype=torch.float64)

    def values(self):
        """CETT at each grid point (float64 numpy), and the grid (float64 numpy)."""
        import numpy as np

        if self.grid is None or self.n_tokens == 0:
            return np.zeros(1), np.zeros(1)
        v = (self.sums / self.n_tokens).cpu().numpy()
        v[0] = 0.0  # t = 0: only neurons with n_i = 0, whose contribution is the zero vector
        return self.grid.double().cpu().numpy(), v

    def threshold(self, c: float) -> float:
        g, v = self.values()
        return threshold_for_cett(g, v, c)


class LogHistogram:
    """Counts of non-negative values in fixed log-spaced bins, per layer or per channel.

    Bins: an exact-zero count, (0, lo], ``bins`` log-spaced bins up to ``hi``, and (hi, max].
    Quantiles interpolate geometrically inside a bin (linearly in the (0, lo] bin).
    """

    def __init__(self, lo: float, hi: float, bins: int, channels: int | None = None, device: Any = "cpu"):
        import torch

        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.channels = channels
        self.edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
        self._edges32 = self.edges.float().to(device)
        shape = (channels or 1, bins + 3)  # [zero, underflow, bins..., overflow]
        self.counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self.max = torch.zeros(channels or 1, dtype=torch.float64, device=device)

    def update(self, a) -> None:
        """Add values ``a`` ``[tokens, channels]`` (absolute values, float32)."""
        import torch

        if a.numel() == 0:
            return
        C = self.counts.shape[0]
        a2 = a.reshape(-1, a.shape[-1]) if self.channels else a.reshape(-1, 1)
        idx = torch.bucketize(a2, self._edges32, right=False) + 1  # 1: (0, lo]; bins+2: > hi
        idx = torch.where(a2 == 0, torch.zeros_like(idx), idx)
        flat = idx + torch.arange(C, device=a.device)[None, :] * (self.bins + 3)
        self.counts += torch.bincount(flat.flatten(), minlength=C * (self.bins + 3)).view(C, self.bins + 3)
        self.max = torch.maximum(self.max, a2.amax(dim=0).double())

    def _bin_bounds(self):
        import numpy as np

        e = self.edges.numpy()
        lows = np.concatenate([[0.0, 0.0], e[:-1], [e[-1]]])
        highs = np.concatenate([[0.0, e[0]], e[1:], [np.nan]])
        return lows, highs

    def quantile(self, q: float, channel: int = 0) -> float:
        """The q-quantile of the values seen (0 when it falls inside the exact zeros)."""
        import numpy as np

        cnt = self.counts[channel].double().cpu().numpy()
        total = cnt.sum()
        if total == 0:
            return math.nan
        target = q * total
        cum = np.cumsum(cnt)
        if target <= cum[0]:
            return 0.0
        j = int(np.searchsorted(cum, target, side="left"))
        j = min(j, len(cnt) - 1)
        frac = (target - (cum[j - 1] if j > 0 else 0.0)) / max(cnt[j], 1.0)
        lows, highs = self._bin_bounds()
        lo = lows[j]
        hi = highs[j] if j < len(cnt) - 1 else max(float(self.max[channel]), lows[j])
        if j == 1 or lo <= 0:
            return float(lo + frac * (hi - lo))
        return float(lo * (hi / lo) ** frac)

    def scaled_counter(self, scales) -> Callable[[float], float]:
        """f(t) = number of values v_ic with v_ic * scales[c] < t over all channels (per-channel hist).

        Inside a bin the values are taken as log-uniform (uniform in the (0, lo] bin).
        """
        import numpy as np

        cnt = self.counts.double().cpu().numpy()  # [C, B]
        s = np.asarray(scales, dtype=np.float64)
        lows, highs = self._bin_bounds()
        L = np.broadcast_to(lows[1:], (cnt.shape[0], len(lows) - 1))
        H = np.tile(highs[1:], (cnt.shape[0], 1))
        H[:, -1] = np.maximum(self.max.cpu().numpy(), lows[-1])
        body, zeros = cnt[:, 1:], cnt[:, 0]
        logL = np.log(np.where(L > 0, L, 1.0))
        span = np.log(np.where(H > L, H, L + 1.0)) - logL
        span = np.where((L > 0) & (H > L), span, 1.0)

        def count(t: float) -> float:
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.where(s > 0, t / s, np.inf)[:, None]
                frac = np.where(L > 0, (np.log(np.maximum(u, 1e-300)) - logL) / span,
                                np.where(H > 0, u / np.where(H > 0, H, 1.0), 1.0))
            frac = np.where(H <= u, 1.0, np.where(L >= u, 0.0, np.clip(frac, 0.0, 1.0)))
            return float((zeros * (u[:, 0] > 0)).sum() + (body * frac).sum())

        return count

    @property
    def total(self) -> int:
        return int(self.counts.sum())


# ------------------------------------------------------------------------------------------ options
@dataclass
class DataOptions:
    data: str | None = None  # corpus spec; None = the bundled calibration corpus
    text_field: str = "text"
    encoding: str = "utf-8"  # of a local corpus file; a byte-order mark is dropped
    batch_size: int = 4
    max_length: int | None = None  # None: the model's limit, capped at 2048
    max_tokens: int | None = None
    stride: int | None = None
    seed: int = 0
    skip_first: int = 0
    sites: Sequence[str] = field(default_factory=tuple)  # glob overrides (PATH:input of the output projection)


@dataclass
class PplpOptions(DataOptions):
    p: Sequence[float] = DEFAULT_P  # targets in percent: 1 means PPL ratio 1.01
    method: str = "secant"
    tol: float = DEFAULT_TOL  # absolute, on the PPL ratio
    max_passes: int = DEFAULT_MAX_PASSES
    cett_grid: int = DEFAULT_CETT_GRID


@dataclass
class CurveOptions(DataOptions):
    methods: Sequence[str] = DEFAULT_CURVE_METHODS
    values: dict[str, Sequence[float]] = field(default_factory=dict)  # method -> parameter grid override
    cett_grid: int = DEFAULT_CETT_GRID


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
        self.layers = resolve_layers(loaded, self.opts.sites)
        tok = loaded.tokenizer
        from probes.measure import DEFAULT_MAX_LENGTH_CAP, resolve_corpus, resolve_stride

        check_max_length(self.opts.max_length, loaded)  # above the model's position limit: exit 4, before any batch
        model_max = loaded.max_length or DEFAULT_MAX_LENGTH_CAP
        self.max_length = self.opts.max_length or min(model_max, DEFAULT_MAX_LENGTH_CAP)
        self.stride, stride_note = resolve_stride(self.opts.stride, self.max_length)
        self.notes: list[str] = [stride_note] if stride_note else []  # the CLI prints these unless -q
        self.read_note: dict[str, Any] = {}
        if docs_tokens is None:
            self.corpus = resolve_corpus(self.opts.data)
            cw = corpus_mod.corpus_windows(self.corpus, tok, self.max_length, self.stride, causal=True,
                                           max_tokens=self.opts.max_tokens, skip_first=self.opts.skip_first,
                                           text_field=self.opts.text_field, encoding=self.opts.encoding)
            self.windows = cw.windows
            self.n_documents, self.n_corpus_tokens, self.read_note = cw.n_documents, cw.n_corpus_tokens, cw.read_note()
        else:
            self.corpus = "<token ids>"
            self.n_documents = len(docs_tokens)
            self.n_corpus_tokens = sum(len(d) for d in docs_tokens)
            self.windows = corpus_mod.build_windows(docs_tokens, tok, self.max_length, self.stride, causal=True,
                                                    max_tokens=self.opts.max_tokens, skip_first=self.opts.skip_first)
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        pad = pad if pad is not None else ((getattr(tok, "eos_token_id", None) if tok is not None else None) or 0)
        self.batches = list(corpus_mod.batches(self.windows, self.opts.batch_size, pad, loaded.device))
        self.n_tokens = corpus_mod.n_counted(self.windows)
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

    # ---- the one loop
    def _run(self, masker: Callable | None, calibrate: Callable | None, what: str) -> PassStats:
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
        current: dict[str, Any] = {"mask": None}
        # float32 [in, out] copies of the projections: kept for the pass when small, else made per call.
        need_w = masker is not None or calibrate is not None
        small = sum(l.col_norms.numel() * (l.site.module.weight.numel() // max(l.col_norms.numel(), 1))
                    for l in self.layers) <= (1 << 26)
        cached = [l.weight_io() for l in self.layers] if need_w and small else None

        def weight(i: int):
            return cached[i] if cached is not None else self.layers[i].weight_io()

        def hook(site: Site, x):
            if site.canonical_name in gate_of:
                gate_store[gate_of[site.canonical_name]] = x
                return None
            layer = layers[site.canonical_name]
            g = gate_store.pop(site.canonical_name, None)
            x3, m = _with_mask(x, current["mask"], site)
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
            return xs.reshape(x.shape)

        ce_sum = 0.0
        n_tok = 0
        t0 = time.perf_counter()
        self.passes += 1
        n_b = len(self.batches)
        if self.progress:
            self.progress(n_b * self.passes, 0)
        try:
            with torch.inference_mode(), attach_sites(sites, hook):
                for batch in self.batches:
                    current["mask"] = batch.count_mask
                    gate_store.clear()
                    out = forward_batch(self.loaded.model, batch, need_logits=True)
                    logits = getattr(out, "logits", None)
                    if logits is None:
                        raise ModelError(f"{type(self.loaded.model).__name__} returned no logits",
                                         "PPL-p% needs a causal LM with a language-model head")
                    s, n = token_loss_sum(logits, batch.labels)
                    ce_sum += s
                    n_tok += n
                    if self.progress:
                        self.progress(n_b * self.passes, 1)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
            from probes.errors import DeviceError

            raise DeviceError("out of memory on a batch", "lower --batch-size or --max-length") from e
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
               max_passes: int = DEFAULT_MAX_PASSES) -> "PplpTarget":
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


def _mixture_quantile(hist: LogHistogram, scales, q: float) -> float:
    """The q-quantile of v_ic * scales[c] pooled over channels, from per-channel histograms."""
    import numpy as np

    total = hist.total
    if total == 0:
        return math.nan
    target = q * total
    if target <= float(hist.counts[:, 0].sum()):
        return 0.0
    s = np.asarray(scales, dtype=np.float64)
    pos = s[s > 0]
    if pos.size == 0:
        return math.nan
    count = hist.scaled_counter(s)
    lo = hist.lo * float(pos.min()) * 1e-3
    hi = max(float(hist.max.max()), hist.hi) * float(pos.max()) * 2
    for _ in range(100):  # bisection in log t on a monotone count
        mid = math.sqrt(lo * hi)
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-7:
            break
    return float(math.sqrt(lo * hi))


# ------------------------------------------------------------------------------------------ search
@dataclass
class SearchOutcome:
    status: str  # reached | not_reached | unreachable
    c: float | None
    ratio: float | None
    n_evals: int  # evaluations that were new passes
    trace: list[tuple[float, float]]  # (c, ratio) in evaluation order, new passes only
    reason: str = ""
    bound_ratio: float | None = None  # for unreachable: the ratio at the extreme that misses


def search_cett(evaluate: Callable[[float], float], target: float, tol: float = DEFAULT_TOL,
                method: str = "secant", max_evals: int = DEFAULT_MAX_PASSES,
                known: dict[float, float] | None = None) -> SearchOutcome:
    """Find c in [0, 1] with |ratio(c) - target| <= tol.

    ``evaluate(c)`` costs a full pass; ``known`` holds ratios already measured (c = 0 has ratio
    1 by construction). Both methods keep a bracket lo < hi with ratio(lo) < target <
    ratio(hi) (hi = 1 is assumed until measured), so they converge to a crossing even when the
    curve is not monotone; the ratio actually achieved is returned, never the target.
    ``bisection`` halves the bracket. ``secant`` interpolates log(ratio) against log(c) (a power
    law; a straight line in ratio when logs are undefined), with bisection as the safeguard.
    """
    pts: dict[float, float] = dict(known or {0.0: 1.0})
    pts.setdefault(0.0, 1.0)
    trace: list[tuple[float, float]] = []
    n_new = 0

    def measure(c: float) -> float:
        nonlocal n_new
        if c not in pts:
            pts[c] = float(evaluate(c))
            n_new += 1
            trace.append((c, pts[c]))
        return pts[c]

    def done(c: float, status="reached", reason="") -> SearchOutcome:
        return SearchOutcome(status, c, pts[c], n_new, trace, reason)

    def best_point() -> float:
        # Closest ratio; among equals, the larger c (more sparsity for the same perplexity).
        return min(pts, key=lambda c: (abs(pts[c] - target), -c))

    if target <= 1.0:
        if abs(1.0 - target) <= tol:
            return done(0.0)
        return SearchOutcome("unreachable", None, None, 0, trace,
                             f"target ratio {target:.6g} is below 1: the dense model (ratio 1) already exceeds it",
                             bound_ratio=1.0)
    hits = [c for c, r in pts.items() if abs(r - target) <= tol]
    if hits:
        return done(min(hits, key=lambda c: abs(pts[c] - target)))

    def bracket() -> tuple[float, float | None]:
        above = [c for c, r in pts.items() if r > target]
        hi = min(above) if above else None
        lo = max(c for c, r in pts.items() if r < target and (hi is None or c < hi))
        return lo, hi

    widths: list[float] = []  # widths of measured brackets (both ends evaluated), one per step
    sides: list[int] = []  # -1 below the target, +1 above, per new evaluation
    while n_new < max_evals:
        lo, hi = bracket()
        hi_v = 1.0 if hi is None else hi
        w = hi_v - lo
        if hi is None and lo >= 0.999:
            c = 1.0  # nothing below 1 reaches the target: check zero density itself
        elif w < C_TOL:
            break
        elif method == "bisection":
            c = 0.5 * (lo + hi_v)
        else:
            # Two steps from the same side: aim at the far part of the tolerance band so that the
            # next step either lands in it or brackets the target tightly (Illinois-style).
            aim = target
            if len(sides) >= 2 and sides[-1] == sides[-2]:
                aim = target - sides[-1] * 0.6 * tol
            c = _secant_proposal(pts, lo, hi, aim)
            # Safeguards: inside the bracket, not hugging an end, and a bisection whenever two
            # steps on a measured bracket failed to halve it (Brent/Dekker).
            stalled = hi is not None and len(widths) >= 2 and w > 0.5 * widths[-2]
            if hi is None and c is not None and c >= 1.0:
                c = 1.0  # the model says the target lies beyond c = 1: measure zero density first
            elif c is None or not math.isfinite(c) or not (lo < c < hi_v) or stalled:
                c = 0.5 * (lo + hi_v)
            else:
                c = min(max(c, lo + 0.01 * w), hi_v - 0.01 * w)
            if hi is not None:
                widths.append(w)
        r = measure(c)
        sides.append(-1 if r < target else 1)
        if abs(r - target) <= tol:
            return done(c)
        if c == 1.0 and r < target:
            return SearchOutcome("unreachable", None, None, n_new, trace,
                                 f"even zeroing every MLP neuron (c = 1) gives PPL ratio {r:.6g} < {target:.6g}",
                                 bound_ratio=r)
    c = best_point()
    return SearchOutcome("not_reached", c, pts[c], n_new, trace,
                         f"no c within tol {tol:g} of {target:.6g} after {n_new} passes (the curve jumps there); "
                         f"closest ratio {pts[c]:.6g}")


def _secant_proposal(pts: dict[float, float], lo: float, hi: float | None, aim: float) -> float | None:
    """Next c, modelling log(log ratio) as a smooth function of log c (a power law, locally).

    Inside a measured bracket: inverse quadratic interpolation through the three usable points
    nearest the aim when it stays in the bracket, else the secant through the bracket ends.
    One-sided: a least-squares line through up to three points nearest the aim (slope kept in
    [0.5, 20]; slope 2, a quadratic loss response, from a single point).
    """
    V = math.log(math.log(aim))
    usable = {c: (math.log(c), math.log(math.log(r))) for c, r in pts.items() if c > 0 and r > 1.0}
    if not usable:
        return SECANT_START if lo < SECANT_START and (hi is None or SECANT_START < hi) else None
    near = sorted(usable.values(), key=lambda uv: abs(uv[1] - V))[:3]
    if hi is not None and lo in usable and hi in usable:
        (u1, v1), (u2, v2) = usable[lo], usable[hi]
        if len(near) == 3 and len({v for _, v in near}) == 3:
            u = _inverse_quadratic(near, V)
            if u is not None and u1 < u < u2:
                return math.exp(u)
        return math.exp(u1 + (V - v1) * (u2 - u1) / (v2 - v1)) if v2 != v1 else None
    if len(near) == 1:
        slope = 2.0
    else:
        mu = sum(u for u, _ in near) / len(near)
        mv = sum(v for _, v in near) / len(near)
        suu = sum((u - mu) ** 2 for u, _ in near)
        slope = sum((u - mu) * (v - mv) for u, v in near) / suu if suu > 0 else 2.0
        slope = min(max(slope, 0.5), 20.0)
    u0, v0 = near[0]
    return math.exp(u0 + (V - v0) / slope)


def _inverse_quadratic(points: Sequence[tuple[float, float]], v: float) -> float | None:
    """u at ``v`` on the quadratic u(v) through three (u, v) points (Brent's inverse interpolation)."""
    (a, fa), (b, fb), (c, fc) = points
    try:
        return (a * (v - fb) * (v - fc) / ((fa - fb) * (fa - fc)) + b * (v - fa) * (v - fc) / ((fb - fa) * (fb - fc))
                + c * (v - fa) * (v - fb) / ((fc - fa) * (fc - fb)))
    except ZeroDivisionError:
        return None


# ------------------------------------------------------------------------------------------ results
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


@dataclass
class PplpResult:
    targets: list[PplpTarget]
    layers: list[dict[str, Any]]
    dense: dict[str, Any]
    calibration: list[dict[str, Any]]
    info: dict[str, Any]
    warnings: list[str]
    trace: list[dict[str, Any]]

    def table(self):
        """One row per (p, layer); unreachable targets have no layer rows (see ``summary``)."""
        import pandas as pd

        rows = []
        for t in self.targets:
            ev = t.evaluation
            if ev is None or t.status == "unreachable":
                continue
            for i, lay in enumerate(self.layers):
                s = ev.layer_sparsity[i]
                rows.append({"p_pct": t.p, "target_ratio": t.target_ratio, "status": t.status, "method": t.method,
                             "c_star": t.c_star, **lay, "dtype": self.info["model_dtype"],
                             "threshold": ev.thresholds[i], "thresholded_tensor": "n_i = |x_i| * ||W_down[:, i]||_2",
                             "rule": "zero x_i where n_i < threshold",
                             "sparsity": s, "activation_ratio": 1.0 - s if s == s else math.nan,
                             "dense_zero_frac": self.dense["layer_zero_frac"][i],
                             "cett_in_sparse_run": ev.layer_removed_cett[i],
                             "achieved_ratio": ev.ratio, "ce_dense": self.dense["ce"], "ce_sparse": ev.ce_sparse,
                             "n_tokens": self.dense["n_tokens"], "calibration": self.info["cett_calibration"]})
        return pd.DataFrame(rows)

    def summary(self):
        """One row per target p: status, c*, achieved ratio, mean sparsity, passes."""
        import pandas as pd

        rows = []
        warn = "; ".join(self.warnings)
        for t in self.targets:
            ev = t.evaluation if t.status != "unreachable" else None
            sp = [s for s in (ev.layer_sparsity if ev else []) if s == s]
            widths = [lay["width"] or 0 for lay in self.layers]
            wmean = (sum(s * w for s, w in zip(ev.layer_sparsity, widths)) / sum(widths)
                     if ev and sum(widths) else math.nan)
            rows.append({"p_pct": t.p, "target_ratio": t.target_ratio, "status": t.status, "method": t.method,
                         "tol": t.tol, "c_star": t.c_star if ev else math.nan,
                         "achieved_ratio": ev.ratio if ev else math.nan,
                         "mean_sparsity": sum(sp) / len(sp) if sp else math.nan,
                         "width_weighted_sparsity": wmean,
                         "mean_activation_ratio": 1 - sum(sp) / len(sp) if sp else math.nan,
                         "ce_dense": self.dense["ce"], "ce_sparse": ev.ce_sparse if ev else math.nan,
                         "dense_ppl": self.dense["ppl"], "sparse_passes": t.sparse_passes,
                         "full_passes_total": self.info["full_passes"], "n_tokens": self.dense["n_tokens"],
                         "reason": t.reason, "bound_ratio": t.bound_ratio if t.bound_ratio is not None else math.nan,
                         "warning": warn})
        return pd.DataFrame(rows)

    def trace_table(self):
        import pandas as pd

        return pd.DataFrame(self.trace)


def _session_info(s: PplpSession) -> dict[str, Any]:
    dtype = str(s.loaded.dtype).replace("torch.", "")
    return {
        "corpus": s.corpus,
        "corpus_is_default": s.opts.data is None and s.corpus != "<token ids>",
        "n_documents": s.n_documents,
        "n_corpus_tokens": s.n_corpus_tokens,
        **s.read_note,
        "n_windows": len(s.windows),
        "n_counted_tokens": s.n_tokens,
        "min_tokens": MIN_TOKENS,
        "max_length": s.max_length,
        "stride": s.stride,
        **({"notes": list(s.notes)} if s.notes else {}),
        "window_scheme": "lm-eval rolling (context length 1)",
        "prefix_token": corpus_mod.prefix_token(s.loaded.tokenizer) if s.loaded.tokenizer is not None else None,
        "skip_first": s.opts.skip_first,
        "batch_size": s.opts.batch_size,
        "model_dtype": dtype,
        "device": str(s.loaded.device),
        "loss": "mean next-token cross-entropy over counted tokens, per-token losses summed in float64; "
                "dense and sparse runs on the same batches",
        "sparse_run": "forward pre-hook on each MLP output projection zeroes the inactive entries of its input",
        "sparsity": "fraction of the projection input's entries that are exactly 0 in the sparse run (counted "
                    "tokens; natural zeros included); mean = unweighted over layers",
        "n_layers": len(s.layers),
        "glu": any(l.glu for l in s.layers),
        "warnings": list(s.warnings),
    }


def _dense_section(s: PplpSession) -> dict[str, Any]:
    d = s.dense
    return {"ce": d.ce, "ppl": math.exp(d.ce), "n_tokens": d.n_tokens, "layer_zero_frac": d.sparsity(),
            "seconds": round(d.seconds, 3)}


def pplp(loaded: LoadedModel, opts: PplpOptions | None = None, *,
         progress: Callable[[int | None, int], Any] | None = None, log: Callable[[str], Any] | None = None,
         docs_tokens: Sequence[Sequence[int]] | None = None, session: PplpSession | None = None) -> PplpResult:
    """PPL-p% sparsity of ``loaded`` for every p in ``opts.p`` (the Python API of ``actsparse pplp``)."""
    opts = opts or PplpOptions()
    if opts.method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {opts.method!r}; use one of {SEARCH_METHODS}")
    t0 = time.perf_counter()
    s = session or PplpSession(loaded, opts, docs_tokens=docs_tokens, progress=progress, log=log)
    s.calibrate(cett=True, cett_grid=opts.cett_grid)
    targets = [s.search(float(p), opts.method, opts.tol, opts.max_passes) for p in opts.p]
    layers = [l.row() for l in s.layers]
    calib = []
    for l, g in zip(s.layers, s.cett_grids):
        grid, vals = g.values()
        diffs = [b - a for a, b in zip(vals[:-1], vals[1:])]
        calib.append({**l.row(), "grid_points": len(grid), "grid_t_max": float(grid[-1]),
                      "cett_at_grid_max": float(vals[-1]),
                      "cett_monotone_on_grid": bool(all(d >= -1e-9 for d in diffs)),
                      "n_tokens": g.n_tokens})
    info = {**_session_info(s),
            "method": opts.method, "tol": opts.tol, "max_passes": opts.max_passes,
            "p_pct": list(opts.p),
            "cett_calibration": f"exact per-token CETT on a {opts.cett_grid}-quantile grid (first batch; at most one "
                                f"quantile per positive n_i, grid_points in cett_calibration) + log "
                                f"extensions, float64 sums over all counted tokens; t linearly interpolated",
            "threshold_rule": "largest t with CETT(t) <= c; neuron inactive when n_i < t",
            "full_passes": s.passes,
            "seconds": round(time.perf_counter() - t0, 3),
            "options": {**asdict(opts), "stride": s.stride if opts.stride is not None else None}}
    trace = [{"pass": e.pass_index, "method": e.method, "value": e.value, "ppl_ratio": e.ratio,
              "mean_sparsity": e.mean_sparsity, "seconds": round(e.seconds, 3)} for e in s.trace]
    return PplpResult(targets, layers, _dense_section(s), calib, info, list(s.warnings), trace)


# ------------------------------------------------------------------------------------------- curves
TENSOR_LABEL = {
    "cett": "n_i = |x_i| * ||W_down[:, i]||_2 (x = input of the MLP output projection)",
    "teal": "|x| (input of the MLP output projection)",
}


def _tensor_label(method: str, glu: bool) -> str:
    if method in TENSOR_LABEL:
        return TENSOR_LABEL[method]
    if method == "chess":
        return ("|act(gate)_i| * mean|up_i| (mlp.hook_gate_act, channel-wise)" if glu
                else "|x| (no GLU up projection: the cats rule)")
    return "|act(gate)| (mlp.hook_gate_act)" if glu else "|x| (activation = input of the MLP output projection)"


def _rule(method: str, value: float) -> str:
    return {"cett": f"zero where n_i < t_layer, t_layer = largest t with CETT(t) <= {value:g}",
            "fat": f"zero where |a| < {value:g}",
            "topk": f"keep the top {value:g} fraction of |a| per token",
            "topk_global": f"keep the top {value:g} fraction of |a| over all counted tokens of a batch",
            "teal": f"zero where |x| < q_{value:g}(|x|) per layer",
            "cats": f"zero where |a| < q_{value:g}(|a|) per layer",
            "chess": f"zero where |a_i| * mean|up_i| < q_{value:g} of that importance, per layer"}[method]


def _calibration_label(method: str) -> str:
    return {"cett": "exact CETT on a per-layer grid, interpolated",
            "teal": f"quantile from a {LAYER_HIST[2]}-bin log histogram",
            "cats": f"quantile from a {LAYER_HIST[2]}-bin log histogram",
            "chess": f"quantile of a mixture of per-channel {CHANNEL_HIST[2]}-bin log histograms",
            "fat": "none (absolute eps)", "topk": "none (per token)",
            "topk_global": "none (per batch)"}[method]


@dataclass
class CurveResult:
    points: list[dict[str, Any]]
    layer_rows: list[dict[str, Any]]
    info: dict[str, Any]
    warnings: list[str]

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.points)

    def layer_table(self):
        import pandas as pd

        return pd.DataFrame(self.layer_rows)


def curve(loaded: LoadedModel, opts: CurveOptions | None = None, *,
          progress: Callable[[int | None, int], Any] | None = None, log: Callable[[str], Any] | None = None,
          docs_tokens: Sequence[Sequence[int]] | None = None, session: PplpSession | None = None) -> CurveResult:
    """Sparsity vs PPL ratio for each threshold family (the Python API of ``actsparse curve``)."""
    opts = opts or CurveOptions()
    bad = [m for m in opts.methods if m not in CURVE_METHODS]
    if bad:
        import difflib

        close = difflib.get_close_matches(bad[0], CURVE_METHODS, n=1)
        raise ValueError(f"unknown curve method {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f"; valid: {', '.join(CURVE_METHODS)}")
    t0 = time.perf_counter()
    s = session or PplpSession(loaded, opts, docs_tokens=docs_tokens, progress=progress, log=log)
    methods = list(dict.fromkeys(opts.methods))
    s.calibrate(cett="cett" in methods, quantiles=any(m in methods for m in ("teal", "cats", "chess")),
                chess="chess" in methods and any(l.glu for l in s.layers), cett_grid=opts.cett_grid)
    glu = any(l.glu for l in s.layers)
    widths = [l.site.width or int(l.col_norms.numel()) for l in s.layers]
    dense_sp = s.dense.sparsity()
    points = [{"method": "dense", "param": None, "value": None, "thresholded_tensor": None, "rule": "no masking",
               "threshold_scope": None, "calibration": None, "ppl_ratio": 1.0, "ce_dense": s.dense.ce,
               "ce_sparse": s.dense.ce, "mean_sparsity": sum(dense_sp) / len(dense_sp),
               "width_weighted_sparsity": sum(a * w for a, w in zip(dense_sp, widths)) / sum(widths),
               "n_tokens": s.n_tokens, "pass": 1}]
    layer_rows = []
    for method in methods:
        values = tuple(opts.values.get(method) or DEFAULT_CURVE_VALUES[method])
        for v in values:
            ev = s.evaluate(method, float(v))
            scope = {"cett": "per layer", "teal": "per layer", "cats": "per layer", "fat": "global constant",
                     "topk": "per token", "topk_global": "per batch", "chess": "per channel"}[method]
            points.append({"method": method, "param": CURVE_PARAM[method], "value": float(v),
                           "thresholded_tensor": _tensor_label(method, glu), "rule": _rule(method, v),
                           "threshold_scope": scope, "calibration": _calibration_label(method),
                           "ppl_ratio": ev.ratio, "ce_dense": s.dense.ce, "ce_sparse": ev.ce_sparse,
                           "mean_sparsity": ev.mean_sparsity,
                           "width_weighted_sparsity": sum(a * w for a, w in zip(ev.layer_sparsity, widths))
                           / sum(widths), "n_tokens": s.n_tokens, "pass": ev.pass_index})
            for l, sp, rc, thr in zip(s.layers, ev.layer_sparsity, ev.layer_removed_cett, ev.thresholds):
                layer_rows.append({"method": method, "param": CURVE_PARAM[method], "value": float(v), **l.row(),
                                   "threshold": thr if isinstance(thr, (int, float)) else math.nan,
                                   "threshold_note": thr if isinstance(thr, str) else None,
                                   "sparsity": sp, "cett_in_sparse_run": rc, "ppl_ratio": ev.ratio,
                                   "n_tokens": s.n_tokens})
    info = {**_session_info(s), "methods": methods,
            "values": {m: list(opts.values.get(m) or DEFAULT_CURVE_VALUES[m]) for m in methods},
            "full_passes": s.passes, "dense_ce": s.dense.ce, "dense_ppl": math.exp(s.dense.ce),
            "seconds": round(time.perf_counter() - t0, 3),
            "quantile_histograms": {"per_layer": {"lo": LAYER_HIST[0], "hi": LAYER_HIST[1], "bins": LAYER_HIST[2]},
                                    "per_channel": {"lo": CHANNEL_HIST[0], "hi": CHANNEL_HIST[1],
                                                    "bins": CHANNEL_HIST[2]}},
            "options": {**asdict(opts), "stride": s.stride if opts.stride is not None else None}}
    return CurveResult(points, layer_rows, info, list(s.warnings))
