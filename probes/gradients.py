"""Gradient (derivative) sparsity (METRICS.md section 3), measured with linear-input spikes (section 4).

Definitions (arXiv 2309.03004; cdgyp/sparsity codes/modules/hooks.py). With h the pre-activation,
a = act(h) and g = dL/da from a backward pass on the model's own loss (``probes.loss``):
- ``deriv_sparsity``: fraction of entries with act'(h) == 0 (ReLU family, ``exact_zero_region``) or
  |act'(h)| <= eps_d (smooth activations; eps_d = 1e-6). ``deriv_sparsity_rule`` says which.
- ``deriv_sq_mean``: mean of act'(h)^2.
- ``eff_grad_sparsity@tau``: fraction of entries with |eta| < tau, eta = g * act'(h) (= dL/dh),
  tau in {1e-9, 1e-6, 1e-3}; ``eta_l1_per_token`` / ``eta_l2sq_per_token``: mean over tokens of
  ||eta_t||_1 and ||eta_t||_2^2.
act'(h) is the analytic derivative of ``probes.activations`` (``act_analytic`` False marks an
unknown elementwise module differentiated by autograd instead). Statistics are float32; sums are
float32 within one token's row (<= width values) and float64 across tokens.

How the gradients are taken (no parameter is updated, no parameter gradient is kept), all through
the hooks of ``probes.runner.Runner``:
- every parameter gets ``requires_grad_(False)`` for the run (restored afterwards);
- the input embedding's output (token models; a forward hook that replaces it) or the pixel tensor
  (vision) is a fresh leaf that requires grad, so autograd records the graph of the activations only;
- ``torch.autograd.grad(loss, leaf)`` runs the backward; nothing is accumulated in any ``.grad``.
- At each activation module a forward hook on its INPUT sees h and computes act'(h) (before an
  in-place activation overwrites h); a backward hook on its OUTPUT a receives g = dL/da (a tensor
  hook: full module backward hooks break on in-place ReLU). Sites with no activation module
  (``probes.grad_sites``) hook the pre-activation linear's output, which receives eta = dL/dh
  directly (``eta_method`` says which).
- A module called several times per forward is measured per call (rows ``.call{k}``).

The loss and its reduction: see ``probes.loss``. ``none`` (only when asked) runs forward passes only:
the act'(h) columns are filled, every eta column is NaN. ``loss_reduction``: ``mean`` (default, the
reference's protocol: cdgyp/sparsity's ``EffectiveGradientSparsity`` in codes/modules/hooks.py takes
g from the backward pass of the training loss, a mean over the batch's targets, and counts
|eta| < tau with absolute tau) or ``sum`` (every counted token / image weighs 1: eta is the
mean-reduction eta times the batch's number of targets). The batch is ours (``--batch-size`` windows
or images); eta and every ``eff_grad_sparsity@tau`` depend on the reduction and on the number of loss
targets per batch, both recorded in the manifest (``loss_reduction``, ``loss_targets_per_batch``).
ReLU'(0) = 0 as in autograd (``probes.activations``); cdgyp's ``CustomizedReLU.derivative``
(codes/modules/activations.py) uses ``x >= 0``, i.e. 1: the two differ only on entries with h == 0.

Spikes of every linear layer's input are measured in the same forward passes (``probes.spikes``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from probes.data import DataOptions, resolve_corpus, resolve_max_length, token_windows
from probes.errors import DataError, DeviceError, ModelError
from probes.grad_sites import GradSite, find_grad_sites  # noqa: F401  (re-exported)
from probes.hooks import HookCall, HookPoint
from probes.loss import (DEFAULT_REDUCTION, LOSSES, MLM_PROB, REDUCTIONS, cross_entropy,  # noqa: F401
                         first_examples_within, labeled_examples, labeled_text_batches, mlm_mask, model_head,
                         resolve_loss)
from probes.runner import ImageBatches, Runner, TokenBatches, forward_images
from probes.spikes import (LinearInputProbe, counted_rows, lower_medians, spike_hooks, spike_mode,  # noqa: F401
                           spike_rows)
from probes.vision import ACT, CONV_ACT, as_tokens, call_name, is_image_spec

DEFAULT_TAUS = (1e-9, 1e-6, 1e-3)
EPS_D = 1e-6
_labeled_examples = labeled_examples  # the old private name (tests import it)


def tau_label(t: float) -> str:
    return f"{t:g}"


# ============================================================================ the probe

class GradientSparsityProbe:
    """Streaming, mergeable statistics of act'(h) (forward) and eta = dL/dh (backward) at one site."""

    name = "gradients"
    REDUCE = {"n_tokens": "sum", "deriv_zero": "sum", "deriv_small": "sum", "deriv_sq_sum": "sum",
              "n_grad_tokens": "sum", "eta_zero": "sum", "eta_small": "sum", "eta_l1_sum": "sum",
              "eta_l2sq_sum": "sum", "eta_abs_max": "max", "nonfinite_grad": "sum"}

    def __init__(self, width: int, taus: Sequence[float] = DEFAULT_TAUS, eps_d: float = EPS_D,
                 exact_zero_region: bool = True, device: Any = "cpu"):
        import torch

        self.width = int(width)
        self.taus = tuple(float(t) for t in taus)
        self.eps_d = float(eps_d)
        self.exact_zero_region = bool(exact_zero_region)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        self.state = {
            "n_tokens": torch.zeros((), **i64),
            "deriv_zero": torch.zeros((), **i64),
            "deriv_small": torch.zeros((), **i64),
            "deriv_sq_sum": torch.zeros((), **f64),
            "n_grad_tokens": torch.zeros((), **i64),
            "eta_zero": torch.zeros((), **i64),
            "eta_small": torch.zeros(len(self.taus), **i64),
            "eta_l1_sum": torch.zeros((), **f64),
            "eta_l2sq_sum": torch.zeros((), **f64),
            "eta_abs_max": torch.zeros((), **f64),
            "nonfinite_grad": torch.zeros((), **i64),
        }
        # per window (batch row), for the error bars (probes.uncertainty.WindowValues state, O(windows)): the
        # forward pass adds (tokens, deriv zeros, deriv small) rows, the backward pass (grad tokens, eta zeros,
        # eta < tau) rows, each numbered by its own batch-row count, so the two halves of one window add up
        from probes.uncertainty import new_state

        self.windows = {**new_state(), "fwd_seen": 0, "bwd_seen": 0, "ok": True}

    _valid = staticmethod(counted_rows)  # counted rows as [n, channels] float32 (bool kept on request)

    @staticmethod
    def _sum64(x):
        # float32 partial sums over each row (<= width values), float64 across the many rows
        import torch

        return x.sum(-1, dtype=torch.float32).sum(dtype=torch.float64)

    def update_forward(self, d, mask=None) -> None:
        """``d`` = act'(h) as ``[batch, pos, channels]`` (float, or bool for 0/1 derivatives);
        ``mask`` ``[batch, pos]`` bool or None."""
        import torch

        v = self._valid(d, mask, keep_bool=True)
        if v.shape[-1] != self.width:
            raise ValueError(f"probe built for width {self.width}, got {v.shape[-1]}")
        self._window_rows(d, mask, "fwd")
        if v.numel() == 0:
            return
        s = self.state
        s["n_tokens"] += v.shape[0]
        if v.dtype == torch.bool:  # act'(h) in {0, 1}: one count gives all three statistics
            nnz = torch.count_nonzero(v)
            s["deriv_zero"] += v.numel() - nnz
            s["deriv_small"] += v.numel() - nnz
            s["deriv_sq_sum"] += nnz.double()
            return
        s["deriv_zero"] += torch.count_nonzero(v == 0)
        s["deriv_small"] += torch.count_nonzero(v.abs() <= self.eps_d)
        s["deriv_sq_sum"] += self._sum64(v.square())

    def update_backward(self, eta, mask=None) -> None:
        """``eta`` = dL/dh as ``[batch, pos, channels]``."""
        import torch

        v = self._valid(eta, mask)
        self._window_rows(eta, mask, "bwd")
        if v.numel() == 0:
            return
        s = self.state
        a = v.abs()
        s["n_grad_tokens"] += v.shape[0]
        s["eta_zero"] += torch.count_nonzero(a == 0)
        for j, t in enumerate(self.taus):
            s["eta_small"][j] += torch.count_nonzero(a < t)
        s["eta_l1_sum"] += self._sum64(a)
        s["eta_l2sq_sum"] += self._sum64(a.square())
        amax = a.max()
        if not bool(torch.isfinite(amax)):
            s["nonfinite_grad"] += torch.count_nonzero(~torch.isfinite(v))
        s["eta_abs_max"] = torch.maximum(s["eta_abs_max"], amax.double())

    def window_fields(self) -> tuple[str, ...]:
        return ("n_tokens", "deriv_zero", "deriv_small", "n_grad_tokens", "eta_zero",
                *(f"eta_small@{tau_label(t)}" for t in self.taus))

    def _window_rows(self, x, mask, half: str) -> None:
        """Per batch row of ``x`` ``[batch, pos, channels]``: the counts of this half (``fwd``: act'(h) == 0 and
        |act'(h)| <= eps_d; ``bwd``: eta == 0 and |eta| < tau) on counted positions, added to the window values.
        Another layout (no batch rows) turns the error bars off for this probe."""
        import torch

        from probes.boolcount import count_rows
        from probes.uncertainty import WindowValues

        w = self.windows
        if x.dim() != 3 or (mask is not None and tuple(mask.shape) != tuple(x.shape[:2])):
            w["ok"] = False
            return
        B = x.shape[0]
        m = (torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None
             else mask.to(x.device).bool())
        m3 = m.unsqueeze(-1)
        full = mask is None or bool(m.all())
        n_tok = m.sum(1).double()
        cols = torch.zeros(B, len(self.window_fields()), dtype=torch.float64, device=x.device)

        def per_row(hit):  # entries of each batch row that hit, on counted positions (probes.boolcount)
            return count_rows(hit if full else hit & m3).double()

        if half == "fwd":
            if x.dtype == torch.bool:
                zero = per_row(~x)
                small = zero
            else:
                zero = per_row(x == 0)
                small = per_row(x.abs() <= self.eps_d)
            cols[:, 0], cols[:, 1], cols[:, 2] = n_tok, zero, small
        else:
            a = x.abs()
            cols[:, 3], cols[:, 4] = n_tok, per_row(a == 0)
            for j, t in enumerate(self.taus):
                cols[:, 5 + j] = per_row(a < t)
        key = f"{half}_seen"
        ids = list(range(w[key], w[key] + B))
        w[key] += B
        WindowValues(self.window_fields(), w).add(ids, cols)

    def se_row(self) -> dict[str, Any]:
        """``n_windows`` and the analytic standard errors over windows (batch rows; ``probes.uncertainty.ratio_se``)
        of ``deriv_sparsity`` and each ``eff_grad_sparsity@tau`` (``eff_grad_sparsity_se@tau``): both are ratios
        of window sums of counts over window sums of entries. NaN when the windows could not be told apart."""
        from probes.uncertainty import WindowValues, bar_column, ratio_se

        w = self.windows
        nan = float("nan")
        import numpy as np

        _, v = WindowValues(self.window_fields(), w).arrays()
        # windows are numbered by arrival, so ranks or shards merged give the same rows in another order: sort
        # them by value, so that the float sums (and the se) are the same to the last bit however they came
        v = v[np.lexsort(v.T[::-1])] if len(v) else v
        ok = bool(w.get("ok", True)) and len(v) > 0
        row: dict[str, Any] = {"n_windows": int((v[:, 0] > 0).sum()) if ok else 0}
        c = self.width
        num = v[:, 1] if self.exact_zero_region else v[:, 2]
        row["deriv_sparsity_se"] = float(ratio_se(num, v[:, 0] * c)) if ok else nan
        for j, t in enumerate(self.taus):
            row[bar_column(f"eff_grad_sparsity@{tau_label(t)}", "_se")] = (
                float(ratio_se(v[:, 5 + j], v[:, 3] * c)) if ok else nan)
        return row

    def merge(self, other: "GradientSparsityProbe") -> "GradientSparsityProbe":
        import torch

        from probes.uncertainty import WindowValues

        if (other.width, other.taus, other.eps_d, other.exact_zero_region) != \
                (self.width, self.taus, self.eps_d, self.exact_zero_region):
            raise ValueError("cannot merge gradient probes with different width, taus, eps_d or activation kind")
        for k, op in self.REDUCE.items():
            b = other.state[k].to(self.state[k].device)
            self.state[k] = self.state[k] + b if op == "sum" else torch.maximum(self.state[k], b)
        # windows numbered by arrival: the other probe's come after this one's (concatenation)
        mine, theirs = self.windows, other.windows
        shift = max(mine["fwd_seen"], mine["bwd_seen"])
        WindowValues(self.window_fields(), mine).merge(WindowValues(self.window_fields(), {
            **theirs, "next": 0, "ids": [i + shift for i in theirs["ids"]]}))
        mine["fwd_seen"] = shift + theirs["fwd_seen"]
        mine["bwd_seen"] = shift + theirs["bwd_seen"]
        mine["ok"] = bool(mine["ok"]) and bool(theirs["ok"])
        return self

    def to_row(self) -> dict[str, Any]:
        s = {k: v.detach().cpu() for k, v in self.state.items()}
        n, ng, c = int(s["n_tokens"]), int(s["n_grad_tokens"]), self.width
        ent, gent = n * c, ng * c
        nan = float("nan")
        row: dict[str, Any] = {"n_tokens": n, "width": c}
        row["deriv_sparsity_rule"] = "act'(h)==0" if self.exact_zero_region else f"|act'(h)|<={self.eps_d:g}"
        zero = int(s["deriv_zero"]) / ent if ent else nan
        small = int(s["deriv_small"]) / ent if ent else nan
        row["deriv_sparsity"] = zero if self.exact_zero_region else small
        row["deriv_zero_frac"] = zero
        row[f"deriv_small_frac@{self.eps_d:g}"] = small
        row["deriv_sq_mean"] = float(s["deriv_sq_sum"]) / ent if ent else nan
        row["n_grad_tokens"] = ng
        row["eff_grad_zero_frac"] = int(s["eta_zero"]) / gent if gent else nan
        for t, cnt in zip(self.taus, s["eta_small"].tolist()):
            row[f"eff_grad_sparsity@{tau_label(t)}"] = cnt / gent if gent else nan
        row["eta_l1_per_token"] = float(s["eta_l1_sum"]) / ng if ng else nan
        row["eta_l2sq_per_token"] = float(s["eta_l2sq_sum"]) / ng if ng else nan
        row["eta_abs_max"] = float(s["eta_abs_max"]) if ng else nan
        row["nonfinite_grad"] = int(s["nonfinite_grad"])
        row.update(self.se_row())  # after every measured column
        return row


# ============================================================================ gradients of activations only

def check_loss(loaded, options: "GradOptions") -> str:
    """Resolve the loss before any model work (the CLI calls this before its progress bar)."""
    from probes import vision

    if is_image_spec(options.data):
        data = vision.open_image_data(options.data, loaded.config, options.n_images)
        return resolve_loss(loaded, options.loss, True, data.has_labels)
    return resolve_loss(loaded, options.loss, False, bool(options.labels))


@contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Every parameter ``requires_grad_(False)`` for the body; the flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def embedding_leaf_hooks(model, leaves: list) -> list[tuple]:
    """A forward hook (``probes.hooks`` pair) that replaces the input embedding's output by a fresh leaf
    that requires grad (appended to ``leaves``, one per forward), so autograd records the graph of the
    activations only."""
    import torch

    emb = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    embs = [emb] if isinstance(emb, torch.nn.Module) else [m for m in model.modules()
                                                           if isinstance(m, torch.nn.Embedding)][:1]

    def make_leaf(out, hc: HookCall):
        leaf = out.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()  # a non-leaf copy: later in-place ops on it stay legal

    return [(HookPoint(f"input_embedding.{i}", e, "output"), make_leaf) for i, e in enumerate(embs)]


# ============================================================================ the run

@dataclass
class GradOptions(DataOptions):
    """``DataOptions`` (``data`` may also be imagefolder:DIR / random:SHAPE) plus the gradient settings."""

    labels: str | None = None  # .jsonl label field for sequence classifiers
    n_images: int | None = None
    taus: Sequence[float] = DEFAULT_TAUS
    eps_d: float = EPS_D
    loss: str = "auto"
    loss_reduction: str = DEFAULT_REDUCTION  # "mean" over the batch's targets (cdgyp), or "sum"
    act: str | None = None  # override the activation name
    sites: Sequence[str] = field(default_factory=tuple)
    spikes: bool | str = True  # True/"all": every linear; "down": down projections only; False/"none": off


@dataclass
class GradResult:
    rows: list[dict[str, Any]]
    spike_rows: list[dict[str, Any]]
    info: dict[str, Any]
    probes: dict[str, Any] = field(repr=False, default_factory=dict)

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def spikes_table(self):
        import pandas as pd

        return pd.DataFrame(self.spike_rows)

    def summary(self):
        return summarize(self.rows)

    def tables(self) -> dict[str, Any]:
        """Every table of the result, by the name it is written under (``probes.analysis.Result``);
        ``spikes`` only when the spike probe saw a linear input."""
        spikes = self.spikes_table()
        return {"gradients": self.table(), "gradients_summary": self.summary(),
                **({"spikes": spikes} if len(spikes) else {})}


SUMMARY_PREFIXES = ("deriv_sparsity", "deriv_zero_frac", "deriv_small_frac@", "deriv_sq_mean", "eff_grad_zero_frac",
                    "eff_grad_sparsity@", "eta_l1_per_token", "eta_l2sq_per_token")


def summarize(rows: list[dict[str, Any]]):
    """Model-level means per site kind: unweighted over layers and weighted by width."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return pd.DataFrame(out)
    from probes.uncertainty import is_uncertainty_column

    metrics = [c for c in df.columns if c.startswith(SUMMARY_PREFIXES) and c != "deriv_sparsity_rule"
               and not is_uncertainty_column(c, df.columns)]
    for kind, g in df.groupby("kind", sort=False):
        for m in metrics:
            v = g[m].astype(float)
            ok = v.notna()
            w = g["width"].astype(float)[ok]
            out.append({"kind": kind, "metric": m, "n_layers": int(ok.sum()),
                        "mean_over_layers": float(v[ok].mean()) if ok.any() else math.nan,
                        "width_weighted_mean": float((v[ok] * w).sum() / w.sum()) if ok.any() else math.nan})
    return pd.DataFrame(out)


def site_hooks(sites: Sequence[GradSite], probes: dict, dims: dict, opts: GradOptions) -> tuple[list, list]:
    """Forward hooks that compute act'(h) at every site and backward hooks that receive g (or dL/dh),
    feeding one ``GradientSparsityProbe`` per (site, call) in ``probes``."""
    import torch

    def deriv(site: GradSite):
        def fn(h, hc: HookCall) -> None:  # h: the pre-activation, [batch, pos, ch] (or conv [B, C, H, W])
            key = (site.canonical_name, hc.call)
            dims[key] = h.dim()
            hd = h.detach()
            # 0/1 derivatives (ReLU) stay a bool mask: one byte per entry kept until the backward pass
            d = site.act.mask(hd) if site.act.mask is not None else site.act.deriv(hd.float())
            dt, m = as_tokens(d, hc.mask)
            p = probes.get(key)
            if p is None:
                p = probes[key] = GradientSparsityProbe(int(dt.shape[-1]), opts.taus, opts.eps_d,
                                                        site.act.exact_zero_region, dt.device)
            p.update_forward(dt, m)
            hc.ctx["d"], hc.ctx["m"] = d, m  # for this call's backward hook
        return fn

    def grad(site: GradSite, g_is_eta: bool):
        def fn(g, hc: HookCall) -> None:  # g = dL/da (or dL/dh), the shape of the hooked tensor
            if "d" not in hc.ctx:
                return
            with torch.no_grad():
                eta = g.float() if g_is_eta else g.float() * hc.ctx["d"]
                et, mm = as_tokens(eta, hc.ctx["m"])
                probes[(site.canonical_name, hc.call)].update_backward(et, mm)
        return fn

    fwd, bwd = [], []
    for s in sites:
        if s.eta_method == "g*act'(h)":
            fwd.append((s, "input", deriv(s)))
            bwd.append((s, "output", grad(s, False)))
        else:  # the pre-activation linear: h is its output, and the gradient there is eta itself
            fwd.append((s, "output", deriv(s)))
            bwd.append((s, "output", grad(s, True)))
    return fwd, bwd


def _per_batch_summary(per_batch: Sequence[int]) -> dict[str, Any]:
    """Loss targets per batch (the divisor of a mean loss) for the manifest: min, mean, max, batches."""
    if not per_batch:
        return {"n_batches": 0, "min": None, "mean": None, "max": None}
    return {"n_batches": len(per_batch), "min": min(per_batch), "mean": sum(per_batch) / len(per_batch),
            "max": max(per_batch)}


def measure_gradients(loaded, options: GradOptions | None = None,
                      progress: Callable[[int, int], Any] | None = None,
                      site_list: Sequence[GradSite] | None = None, dist: Any = None) -> GradResult:
    """Gradient sparsity per activation site, plus linear-input spikes, over ``options.data``.

    ``progress(total_batches, advance)`` and ``dist`` (data-parallel: windows split over the ranks,
    probes merged) as in ``probes.measure.measure``; only token windows split (not images or
    ``--labels`` examples).
    """
    import torch

    from probes import distributed, vision

    opts = options or GradOptions()
    if opts.loss_reduction not in REDUCTIONS:
        raise ModelError(f"unknown loss reduction {opts.loss_reduction!r}", "use sum or mean")
    torch.manual_seed(opts.seed)
    model = loaded.model
    image = is_image_spec(opts.data)
    info: dict[str, Any] = {}
    sites = list(site_list) if site_list is not None else find_grad_sites(model, loaded.family, loaded.config,
                                                                           opts.sites, opts.act)
    dist = dist if dist is not None else distributed.current()
    if dist is not None and dist.active and (image or opts.labels):
        raise DeviceError(f"gradient sparsity on {'images' if image else '--labels examples'} does not run under "
                          f"torchrun ({dist.world_size} ranks): only token windows are split over ranks",
                          "run it in a single process")
    # ---- data
    adapter: Any = TokenBatches()
    if image:
        data = vision.open_image_data(opts.data, loaded.config, opts.n_images)
        loss_kind = resolve_loss(loaded, opts.loss, True, data.has_labels)
        pre = vision.resolve_preprocessor(loaded)
        cap = opts.n_images if data.kind == "imagefolder" else None
        nb = vision.n_batches(data, opts.batch_size, cap)
        batches: Any = vision.image_batches(data, pre, opts.batch_size, loaded.device, opts.seed, cap)
        adapter = ImageBatches()
        describe_data = data.describe  # after the run: it counts the images decoded and skipped
    else:
        loss_kind = resolve_loss(loaded, opts.loss, False, bool(opts.labels))
        if loss_kind == "classification":
            max_length = resolve_max_length(loaded, opts.max_length)  # exit 4 before any file is read
            examples, cut = first_examples_within(labeled_examples(opts, loaded), loaded.tokenizer, max_length,
                                                  opts.max_tokens)  # with --max-tokens, the first examples that fit
            if cut:
                info.setdefault("notes", []).append(cut)
            nb = math.ceil(len(examples) / opts.batch_size)
            batches = labeled_text_batches(examples, opts, loaded, max_length)
            data_info = {"corpus": resolve_corpus(opts.data), "labels_field": opts.labels, "max_length": max_length,
                         "window_scheme": "one truncated example per line"}
        else:
            causal = loss_kind == "causal_lm" or (loss_kind == "none" and loaded.is_causal_lm)
            td = token_windows(loaded, opts, causal=causal)
            if td.notes:
                info["notes"] = list(td.notes)  # the CLI prints them unless -q
            local = td.local(dist)
            nb = td.n_batches(local)
            batches = td.batches(local)
            # (this manifest never had n_corpus_tokens / prefix_token: the goldens pin its keys)
            data_info = {k: v for k, v in td.describe().items() if k not in ("n_corpus_tokens", "prefix_token")}
            data_info["skip_first"] = opts.skip_first
        describe_data = lambda: data_info  # noqa: E731
    if progress:
        progress(nb, 0)

    # ---- hooks
    probes: dict[tuple[str, int], GradientSparsityProbe] = {}
    dims: dict[tuple[str, int], int] = {}
    spikes: dict[str, LinearInputProbe] = {}
    leaves: list = []
    down_paths = {s.down_module_path for s in sites if s.down_module_path}
    mode_spikes = spike_mode(opts.spikes)
    fwd, bwd = site_hooks(sites, probes, dims, opts)
    fwd += spike_hooks(model, mode_spikes, down_paths, spikes)
    if not image and loss_kind != "none":
        fwd += embedding_leaf_hooks(model, leaves)

    # ---- loop
    gen = torch.Generator().manual_seed(int(opts.seed))

    def forward_loss(m, batch):
        """Forward one batch; returns (loss or None for --loss none, number of loss targets)."""
        leaves.clear()
        if image:
            x = batch.pixel_values.to(loaded.dtype).detach().requires_grad_(True)
            leaves.append(x)
            logits = vision.logits_of(forward_images(m, x))
            if loss_kind == "none":
                return None, 0
            if logits is None or logits.dim() != 2:
                raise ModelError(f"{type(m).__name__} gives no [batch, classes] logits",
                                 "gradient sparsity on images needs an image classifier")
            return cross_entropy(logits, batch.labels, opts.loss_reduction), int(batch.labels.numel())
        ids, labels = batch.input_ids, batch.labels
        if loss_kind == "mlm":
            ids, labels = mlm_mask(batch, loaded.tokenizer, MLM_PROB, gen)
        out = m(input_ids=ids, attention_mask=batch.attention_mask)
        if loss_kind == "none":
            return None, 0
        logits = out.logits if hasattr(out, "logits") else vision.logits_of(out)
        return cross_entropy(logits, labels, opts.loss_reduction), int((labels != -100).sum())

    totals: dict[str, Any] = {"loss_sum": 0.0, "n_loss_targets": 0, "per_batch": []}

    def backward(batch, out) -> None:
        loss, n_targets = out
        if loss is not None:
            if not loss.requires_grad or not leaves:
                raise ModelError(f"the loss of {type(model).__name__} does not depend on its inputs through "
                                 "a differentiable path", "report this model; gradients cannot be measured")
            torch.autograd.grad(loss, leaves, allow_unused=True)  # fires the tensor hooks; no .grad kept
            totals["loss_sum"] += float(loss.detach()) * (n_targets if opts.loss_reduction == "mean" else 1)
            totals["per_batch"].append(n_targets)  # the divisor of a mean loss: eta scales with 1 / it
        totals["n_loss_targets"] += n_targets

    with frozen_parameters(model), Runner(model, fwd_hooks=fwd, bwd_hooks=bwd, adapter=adapter, forward=forward_loss,
                                          mode="no_grad" if loss_kind == "none" else "grad",
                                          progress=(lambda k: progress(nb, k)) if progress else None) as runner:
        runner.run(batches, backward)
    names = {s.canonical_name for s in sites}
    calls = {n: k for n, k in runner.calls.items() if n in names}
    missing_grad = set(runner.missing_grad) & names
    loss_sum, n_loss_targets, n_items, elapsed = (totals["loss_sum"], totals["n_loss_targets"], runner.n_items,
                                                  runner.seconds)
    if dist is not None and dist.active:  # before the n_items check: a rank may have had no windows
        cpu_spikes = {k: distributed.probe_to_cpu(p) for k, p in spikes.items()}
        probes, per_rank = dist.merge_probes(probes, extra={
            "spikes": cpu_spikes, "calls": calls, "dims": dims, "missing_grad": sorted(missing_grad),
            "loss_sum": loss_sum, "n_loss_targets": n_loss_targets, "n_items": n_items, "seconds": elapsed,
            "per_batch": totals["per_batch"]})
        totals["per_batch"] = [n for e in per_rank for n in e["per_batch"]]
        spikes = distributed.merge_probe_dicts([e["spikes"] for e in per_rank])
        calls, dims = {}, {}
        for e in per_rank:
            for name, k in e["calls"].items():
                calls[name] = max(calls.get(name, 0), k)
            dims.update(e["dims"])
        missing_grad = {n for e in per_rank for n in e["missing_grad"]}
        loss_sum = sum(e["loss_sum"] for e in per_rank)
        n_loss_targets = sum(e["n_loss_targets"] for e in per_rank)
        n_items = sum(e["n_items"] for e in per_rank)
        elapsed = max(e["seconds"] for e in per_rank)
        info.update({"world_size": dist.world_size, "backend": dist.backend, "shard": distributed.SHARD_SCHEME,
                     "n_items_per_rank": [e["n_items"] for e in per_rank],
                     "mlm_masks": "drawn per rank from --seed (not the single-process masks)"
                     if loss_kind == "mlm" else None})
    if n_items == 0:
        raise DataError("no batches to measure", "check --data")

    dtype = str(loaded.dtype).replace("torch.", "")
    rows = []
    for s in sites:
        n_calls = calls.get(s.canonical_name, 0)
        for k in range(n_calls):
            p = probes.get((s.canonical_name, k))
            if p is None:
                continue
            kind = s.kind
            if kind == CONV_ACT and dims.get((s.canonical_name, k)) != 4:
                kind = ACT
            rows.append({**s.row(), "canonical_name": call_name(s.canonical_name, k, n_calls), "kind": kind,
                         "call": k, "dtype": dtype, **p.to_row()})
    spike_table = spike_rows(spikes, down_paths, dtype)
    info.update(describe_data())
    info.update({
        "loss": loss_kind,
        "loss_definition": {
            "causal_lm": "next-token cross-entropy on counted positions (labels -100 elsewhere)",
            "mlm": f"masked-LM cross-entropy, {MLM_PROB:.0%} of counted non-special positions masked "
                   f"(80% [MASK] / 10% random / 10% kept), seed {opts.seed}",
            "classification": "cross-entropy against the labels",
            "none": "no loss (asked for): forward-only act'(h) statistics; every eta column is NaN",
        }[loss_kind],
        "loss_reduction": opts.loss_reduction,
        "loss_targets_per_batch": _per_batch_summary(totals["per_batch"]),
        "eta_scale": None if loss_kind == "none" else (
            "eta = dL/dh of each batch's MEAN loss (the reference's protocol, cdgyp/sparsity): the summed-loss eta "
            "divided by that batch's number of loss targets" if opts.loss_reduction == "mean" else
            "eta = dL/dh of each batch's SUMMED loss: every target weighs 1 (the mean-loss eta times the batch's "
            "number of loss targets)") + "; tau is absolute, so eta, eta_l1/l2 and every eff_grad_sparsity@tau "
            "depend on the reduction and on the loss targets per batch (--batch-size x counted positions)",
        "mean_loss_per_target": loss_sum / n_loss_targets if n_loss_targets else None,
        "n_loss_targets": n_loss_targets,
        "n_items": n_items,
        "gradient_method": "params requires_grad_(False); input embedding output / pixel tensor made a leaf; "
                           "torch.autograd.grad(loss, leaf); tensor hooks on activation outputs (g) or "
                           "pre-activations (dL/dh); no parameter .grad is ever populated",
        "deriv": "analytic act'(h) from probes.activations (act_analytic False: autograd through the module); "
                 "ReLU'(0) = 0 as autograd (cdgyp's CustomizedReLU.derivative uses x >= 0, i.e. 1)",
        "eps_d": opts.eps_d,
        "taus": list(opts.taus),
        "spikes": mode_spikes,
        "spike_median": "median_abs_batchmean: exact lower median of |x| over each batch's counted entries, "
                        "averaged over batches",
        "statistics_dtype": "float32 (float64 sums)",
        "model_dtype": dtype,
        "device": str(loaded.device),
        "n_sites": len(rows),
        "n_linear_layers": len(spike_table),
        "sites_without_gradient": sorted(missing_grad),
        "seconds": round(elapsed, 3),
        "per_call": "a module called several times per forward gives one row per call (.call{k})",
        "options": {**asdict(opts), **({"stride": info["stride"]} if opts.stride is not None and "stride" in info
                                       else {})},
    })
    return GradResult(rows, spike_table, info, {f"{n}#{k}": p for (n, k), p in probes.items()})
