"""Why activation sparsity appears (arXiv 2309.03004, code cdgyp/sparsity): flatness, gradient density,
diagonality and the effect of each activation, per MLP layer, from one backward pass on the model's loss.

Notation per MLP layer (a plain MLP ``z = V act(K x + b)``; K the key weight, the first linear, with
d_ff rows; V the value weight): x the key input, h = K x + b the pre-activation, a = act(h) the value
input, g = dL/da, eta = g * act'(h) = dL/dh, and dz = dL/dz at the MLP output. The loss and its
reduction are ``probes.loss``'s (default: the mean over the batch's targets, the reference's training
loss); the backward pass is ``probes.gradients``' (parameters frozen, the input embedding made a leaf,
``torch.autograd.grad``; tensor hooks, no ``.grad`` kept). Statistics are float32 per token row and
float64 across rows; only counted positions (``count_mask``) enter any of them.

Columns and their reference (cdgyp/sparsity, codes/modules/hooks.py unless said otherwise):

- ``grad_density_g2`` = E[g^2 | activated] / E[g^2] and ``grad_density_abs`` = E[|g| | activated] / E[|g|]
  over entries, "activated" = g * act'(h) != 0 (``GradientDensityPlugin.do_logs``: ``g_activated`` keeps
  the entries whose gradient w.r.t. the activation's INPUT is non-zero). The paper's axis label is
  E[g^2 | alpha > 0] / E[g^2] (codes/scripts/after_training/gradient_density.py ``get_ratio``), while that
  script's estimate averages 10^bin-centre over a histogram of log10|g|, i.e. E[|g|]: both are given,
  computed exactly from sums, not from bins. The histogram (table ``flatness_hist``): log10|g| of all and
  of activated entries, ``hist_bins`` bins on ``hist_range`` (the plugin's default ``log_range`` [-10, 5];
  values below are clamped into the first bin as the plugin's second ``histogram`` call does, values
  above the range are counted in ``g_above_range``).
- ``aug_flatness_key`` / ``aug_flatness_value``: per sequence, sum over its counted tokens of
  ||dL/d(linear output)||^2 ||linear input||^2, averaged over sequences
  (``CoefficientPlugin.AugmentedFlatnessHook``: ``((grad_output**2).sum(-1) * (inputs**2).sum(-1)).sum(1).mean()``),
  for the key (eta, x) and the value (dz, a) linear; ``aug_flatness`` their sum and ``aug_flatness_share``
  its share of the sum over layers.
- ``coef_L0`` (``L0CoefficientHook``'s 'preview' = sum / weight): ``coef_L0_sum`` = mean over entries of
  g^2 [a > 0] ||x||^2, ``coef_L0_weight`` = fraction of entries with a > 0. ``coef_L2`` = mean ||dz||^2
  per token, ``a2`` = mean ||a||^2, ``L2_term`` = mean ||a||^2 ||dz||^2 (``L2CoefficientHook``).
- Diagonality (``DiagonalityPlugin.do_logs``, eps = 1e-5 of ``MkkTPlugin``), for p in {1, 2}:
  ``kkT_diag_p{p}`` / ``kkT_offdiag_p{p}``: sums of |K K^T|^p on / off the diagonal, ``kkT_log_ratio_p{p}`` =
  log10(diag / (off + eps)); per token with x = |g|^p: ``gg_diag_p{p}`` = mean sum_i x_i^2, ``gg_offdiag_p{p}`` =
  mean ((sum_i x_i)^2 - sum_i x_i^2) (the diagonal and off-diagonal mass of |g g^T|^p), ``gg_log_ratio_p{p}`` =
  mean log10(diag / (off + eps)) (their 'M'); ``ggkk_*`` the same for |g g^T|^p o |K K^T|^p (their
  'hadamard'). ``gg_diag_share_p{p}`` / ``kkT_diag_share_p{p}`` = diag / (diag + off) of the summed masses:
  ours, scale-free (eps = 1e-5 dominates the log ratio when g is small, as it is under a mean loss).
  Tokens whose g is all zero give log10(0): they are left out of the log-ratio means (``n_zero_g_tokens``).
- ``beneficial_*`` / ``detrimental_*`` (``EffectiveGradientSparsity.do_logs`` 'activation_effect'): entries
  with eta < 0 / eta > 0: count, fraction of entries, sum of |eta| and mean |eta| (their code logs the
  detrimental ones with a minus sign; here all are positive). ``concentration_g@p`` = fraction of
  entries with |g| < p * 1e9 for p in {1e-9, 1e-6, 1e-3} (their 'concentration_g', thresholds as in their
  code: 1, 1e3, 1e6). ``eff_grad_sparsity@tau`` = fraction of |eta| < tau (their 'effective_concentration',
  as ``probes.gradients``).
- ``g2_min`` / ``g2_max`` / ``g2_mean``, ``g2_log_ratio`` = mean log10(max g^2 / (min g^2 + eps)),
  ``g2_log_ratio_with_mean`` = mean log10(mean g^2 / (min g^2 + eps)) over tokens
  (``SpectralObservationPlugin.do_logs`` 'spectral_g2', eps 1e-5).
- act'(h) for an activation module: autograd through the module (the derivative the reference's hooks see;
  ``_autograd_deriv``); the ReLU family: h > 0; an activation called inside forward: the analytic one.
- ``kappa_2309`` (and ``@0.1``) of the key weight K, neurons x inputs: ``probes.spectrum_fit.kkt_columns``.
- ``act_zero_frac``: fraction of entries with a == 0 (activation sparsity at the value input).

ReLU'(0) = 0 (autograd); cdgyp's ``CustomizedReLU.derivative`` uses x >= 0: the two differ only on
entries with h == 0 exactly. GLU MLPs: K is the gate weight, g = dL/d act(gate) and the value input is
act(gate) * up (the reference has no GLU).

- ``GradientRecorder.forward`` (``ActivationObservationPlugin``, p = 1), per sequence on its counted
  tokens, with G = dz dz^T (token x token, dz the MLP output gradient): ``sample_diagonal_gradients`` =
  mean over sequences of sum |diag G|; ``sample_gradient_ratio`` = mean log10(diag / (off + 1e-32)) with
  off = sum |off-diagonal G|; ``sample_pn_gradient_ratio`` = mean log10(sum of positive entries / (|sum
  of negative entries| + 1e-32)); ``sample_matrix_inner_product_ratio`` = mean log10(diag / (|off| +
  1e-32)) of a a^T o G (signed sums); ``sample_diag_share`` (ours) = sum diag / sum (diag + off). Their
  ``summarize`` smooths these over training steps (EMA, beta 0.9); here they are plain means over the
  sequences measured. Cost: O(batch x pos^2) per layer and batch, state O(1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from probes.data import DataOptions, resolve_max_length, token_windows
from probes.errors import DataError, ModelError
from probes.gradients import DEFAULT_TAUS, embedding_leaf_hooks, frozen_parameters, tau_label
from probes.hooks import HookCall, HookPoint
from probes.loss import DEFAULT_REDUCTION, MLM_PROB, REDUCTIONS, cross_entropy, first_examples_within, \
    labeled_examples, labeled_text_batches, mlm_mask, resolve_loss
from probes.runner import Runner, TokenBatches
from probes.spikes import counted_rows
from probes.vision import is_image_spec

DIAG_EPS = 1e-5  # MkkTPlugin(eps=1e-5): DiagonalityPlugin and SpectralObservationPlugin
LOG_RANGE = (-10.0, 5.0)  # GradientDensityPlugin(log_range=[-10, 5])
HIST_BINS = 150  # 0.1 decade per bin on the default range (the plugin: 10000 bins, the notebook draws 1000)
CONCENTRATION_P = (1e-9, 1e-6, 1e-3)  # EffectiveGradientSparsity: |g| < p * 1e9
POWERS = (1, 2)


@dataclass
class FlatnessOptions(DataOptions):
    """``DataOptions`` (text corpora) plus the loss and the histogram of log10|g|."""

    labels: str | None = None  # .jsonl label field for sequence classifiers
    loss: str = "auto"
    loss_reduction: str = DEFAULT_REDUCTION
    taus: Sequence[float] = DEFAULT_TAUS
    act: str | None = None
    sites: Sequence[str] = field(default_factory=tuple)
    hist_range: tuple[float, float] = LOG_RANGE
    hist_bins: int = HIST_BINS


def _sum64(x):
    import torch

    if x.dim() == 0:
        return x.double()
    return x.float().sum(-1, dtype=torch.float32).sum(dtype=torch.float64) if x.dim() > 1 else \
        x.sum(dtype=torch.float64)


class FlatnessProbe:
    """Streaming, mergeable sums at one MLP layer: O(d_ff + bins) state.

    ``update_g`` (at dL/da), ``update_key`` (at dL/dh with ||x||^2) and ``update_value`` (at dL/dz with
    ||a||^2) each add one batch's counted rows. ``kk_abs`` is |K K^T| (d_ff x d_ff, float32) for the
    'hadamard' diagonality, or None; it is a constant of the layer, not state."""

    SCALARS = ("n_tokens", "n_entries", "n_act", "g2_sum", "g2_act_sum", "abs_sum", "abs_act_sum",
               "above_g", "above_act", "ben_n", "ben_sum", "det_n", "det_sum", "l0_sum", "l0_n", "a_zero",
               "g2min_sum", "g2max_sum", "g2mean_sum", "g2lr_sum", "g2lrm_sum", "g2lr_n", "n_zero_g",
               "key_n_tokens", "key_af_sum", "key_n_seq", "val_n_tokens", "val_af_sum", "val_n_seq",
               "val_a2_sum", "val_dz2_sum", "val_l2_sum",
               "seq_n", "seq_diag_sum", "seq_off_sum", "seq_lr_sum", "seq_lr_n", "seq_pn_sum", "seq_pn_n",
               "seq_ip_sum", "seq_ip_n")

    def __init__(self, width: int, taus: Sequence[float] = DEFAULT_TAUS, hist_range=LOG_RANGE,
                 hist_bins: int = HIST_BINS, kk_abs: Any = None, device: Any = "cpu"):
        import torch

        self.width = int(width)
        self.taus = tuple(float(t) for t in taus)
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self.hist_bins = int(hist_bins)
        self.kk_abs = kk_abs
        f64 = dict(dtype=torch.float64, device=device)
        s = {k: torch.zeros((), **f64) for k in self.SCALARS}
        s["eta_small"] = torch.zeros(len(self.taus), **f64)
        s["conc"] = torch.zeros(len(CONCENTRATION_P), **f64)
        for p in POWERS:
            for m in ("gg", "ggkk"):
                for k in ("diag", "off", "lr"):
                    s[f"{m}_{k}_p{p}"] = torch.zeros((), **f64)
        s["hist_g"] = torch.zeros(self.hist_bins, **f64)
        s["hist_act"] = torch.zeros(self.hist_bins, **f64)
        self.state = s

    # ---------------------------------------------------------------- updates
    def _hist(self, logabs):
        import torch

        lo, hi = self.hist_range
        v = logabs.clamp(min=lo)
        above = torch.count_nonzero(v > hi)
        return torch.histc(v.float(), bins=self.hist_bins, min=lo, max=hi).double(), above

    def update_g(self, g, d, a=None, x2=None, mask=None) -> None:
        """g = dL/da, d = act'(h) (float or bool), a = the value input, x2 = ||x||^2 per token ``[b, p]``;
        all ``[batch, pos, ...]`` with the count ``mask`` ``[batch, pos]`` or None."""
        import torch

        gr = counted_rows(g, mask)
        if gr.numel() == 0:
            return
        if gr.shape[-1] != self.width:
            raise ValueError(f"probe built for width {self.width}, got {gr.shape[-1]}")
        dr = counted_rows(d, mask)
        s = self.state
        n, c = gr.shape
        eta = gr * dr
        act = eta != 0
        g2 = gr.square()
        ab = gr.abs()
        s["n_tokens"] += n
        s["n_entries"] += n * c
        s["n_act"] += act.sum()
        s["g2_sum"] += _sum64(g2)
        s["g2_act_sum"] += _sum64(g2 * act)
        s["abs_sum"] += _sum64(ab)
        s["abs_act_sum"] += _sum64(ab * act)
        with torch.no_grad():
            logabs = torch.log10(ab)
        h, above = self._hist(logabs)
        s["hist_g"] += h
        s["above_g"] += above
        h, above = self._hist(logabs[act])
        s["hist_act"] += h
        s["above_act"] += above
        ea = eta.abs()
        for j, t in enumerate(self.taus):
            s["eta_small"][j] += torch.count_nonzero(ea < t)
        for j, p in enumerate(CONCENTRATION_P):
            s["conc"][j] += torch.count_nonzero(ab < p * 1e9)
        neg, pos = eta < 0, eta > 0
        s["ben_n"] += neg.sum()
        s["ben_sum"] += _sum64(ea * neg)
        s["det_n"] += pos.sum()
        s["det_sum"] += _sum64(ea * pos)
        # SpectralObservationPlugin.do_logs: per-token min / max / mean of g^2 over channels
        g2min, g2max, g2mean = g2.min(-1).values, g2.max(-1).values, g2.mean(-1)
        s["g2min_sum"] += _sum64(g2min)
        s["g2max_sum"] += _sum64(g2max)
        s["g2mean_sum"] += _sum64(g2mean)
        lr, lrm = torch.log10(g2max / (g2min + DIAG_EPS)), torch.log10(g2mean / (g2min + DIAG_EPS))
        ok = torch.isfinite(lr) & torch.isfinite(lrm)
        s["g2lr_sum"] += _sum64(lr[ok])
        s["g2lrm_sum"] += _sum64(lrm[ok])
        s["g2lr_n"] += ok.sum()
        zero_row = ~(gr != 0).any(-1)
        s["n_zero_g"] += zero_row.sum()
        # DiagonalityPlugin: x = |g|^p per token; 'M' and 'hadamard' with |K K^T|^p
        for p in POWERS:
            x = ab if p == 1 else g2
            diag = x.square().sum(-1, dtype=torch.float64)
            full = x.sum(-1, dtype=torch.float64).square()
            self._diag(f"gg_{{}}_p{p}", diag, full - diag, zero_row)
            if self.kk_abs is not None:
                M = self.kk_abs if p == 1 else self.kk_abs.square()
                M = M.to(x.device, x.dtype)
                diag_h = (x.square() * torch.diagonal(M)).sum(-1, dtype=torch.float64)
                full_h = ((x @ M) * x).sum(-1, dtype=torch.float64)
                self._diag(f"ggkk_{{}}_p{p}", diag_h, full_h - diag_h, zero_row)
        if a is not None:
            ar = counted_rows(a, mask)
            on = ar > 0
            s["a_zero"] += torch.count_nonzero(ar == 0)
            s["l0_n"] += on.sum()
            if x2 is not None:
                x2r = counted_rows(x2.unsqueeze(-1), mask)
                s["l0_sum"] += _sum64(g2 * on * x2r)

    def _diag(self, key: str, diag, off, skip) -> None:
        import torch

        s = self.state
        s[key.format("diag")] += diag.sum()
        s[key.format("off")] += off.sum()
        lr = torch.log10(diag / (off + DIAG_EPS))
        ok = ~skip & torch.isfinite(lr)
        s[key.format("lr")] += lr[ok].sum()

    def update_key(self, eta, x2, mask=None) -> None:
        """dL/dh at the key output and ||x||^2 ``[b, p]`` of its input: augmented flatness of K."""
        er = counted_rows(eta, mask)
        x2r = counted_rows(x2.unsqueeze(-1), mask)[:, 0]
        s = self.state
        s["key_n_tokens"] += er.shape[0]
        s["key_af_sum"] += _sum64(er.square().sum(-1) * x2r)
        s["key_n_seq"] += eta.shape[0] if eta.dim() == 3 else 1

    def update_value(self, dz, a2, mask=None, a=None) -> None:
        """dL/dz at the value output and ||a||^2 ``[b, p]`` of its input: augmented flatness of V, L2 terms;
        with ``a`` (the value input) also ``GradientRecorder``'s token x token statistics per sequence."""
        if a is not None and dz.dim() == 3:
            self._recorder(dz, a, mask)
        dr = counted_rows(dz, mask)
        a2r = counted_rows(a2.unsqueeze(-1), mask)[:, 0]
        dz2 = dr.square().sum(-1)
        s = self.state
        s["val_n_tokens"] += dr.shape[0]
        s["val_af_sum"] += _sum64(dz2 * a2r)
        s["val_a2_sum"] += _sum64(a2r)
        s["val_dz2_sum"] += _sum64(dz2)
        s["val_n_seq"] += dz.shape[0] if dz.dim() == 3 else 1

    def _recorder(self, g, a, mask) -> None:
        """cdgyp's ``GradientRecorder.forward`` (p = 1, ``ActivationObservationPlugin``'s default) per sequence,
        on its counted positions: G = g g^T over the MLP output gradient (token x token), its diagonal and
        off-diagonal L1 masses, the positive / negative entry masses, and the inner products of
        a a^T o G on / off the diagonal."""
        import torch

        if mask is not None:
            keep = mask.to(g.device).unsqueeze(-1)
            g, a = g * keep, a * keep  # an uncounted token's row and column of G are then 0
        G = torch.einsum("bid,bjd->bij", g.float(), g.float())
        eye = torch.eye(G.shape[-1], device=G.device, dtype=torch.bool)
        diag = (G * eye).abs().sum((-1, -2)).double()
        off = (G * ~eye).abs().sum((-1, -2)).double()
        pos = (G * (G > 0)).abs().sum((-1, -2)).double()
        neg = (G * (G < 0)).abs().sum((-1, -2)).double()
        ip = torch.einsum("bid,bjd->bij", a.float(), a.float()) * G
        ip_d = (ip * eye).sum((-1, -2)).double()
        ip_o = (ip * ~eye).sum((-1, -2)).double()
        has = (mask.to(g.device).any(-1) if mask is not None else torch.ones(G.shape[0], dtype=torch.bool,
                                                                              device=G.device))
        s = self.state
        s["seq_n"] += has.sum()
        s["seq_diag_sum"] += diag[has].sum()
        s["seq_off_sum"] += off[has].sum()
        for key, v in (("seq_lr", torch.log10(diag / (off + 1e-32))), ("seq_pn", torch.log10(pos / (neg + 1e-32))),
                       ("seq_ip", torch.log10(ip_d / (ip_o.abs() + 1e-32)))):
            ok = has & torch.isfinite(v)
            s[f"{key}_sum"] += v[ok].sum()
            s[f"{key}_n"] += ok.sum()

    # ---------------------------------------------------------------- merge and row
    def merge(self, other: "FlatnessProbe") -> "FlatnessProbe":
        if (other.width, other.taus, other.hist_range, other.hist_bins) != \
                (self.width, self.taus, self.hist_range, self.hist_bins):
            raise ValueError("cannot merge flatness probes with different width, taus or histogram")
        for k, v in other.state.items():
            self.state[k] = self.state[k] + v.to(self.state[k].device)
        return self

    def to_row(self) -> dict[str, Any]:
        s = {k: (v.item() if v.dim() == 0 else v.detach().cpu().tolist()) for k, v in self.state.items()}
        nan = math.nan

        def div(a, b):
            return a / b if b else nan

        n, ent = int(s["n_tokens"]), s["n_entries"]
        row: dict[str, Any] = {"n_tokens": n, "width": self.width}
        row["grad_density_g2"] = div(div(s["g2_act_sum"], s["n_act"]), div(s["g2_sum"], ent))
        row["grad_density_abs"] = div(div(s["abs_act_sum"], s["n_act"]), div(s["abs_sum"], ent))
        row["activated_frac"] = div(s["n_act"], ent)
        row["g_above_range"] = int(s["above_g"])
        key_seq, val_seq = s["key_n_seq"], s["val_n_seq"]
        row["aug_flatness_key"] = div(s["key_af_sum"], key_seq)
        row["aug_flatness_value"] = div(s["val_af_sum"], val_seq)
        row["aug_flatness"] = row["aug_flatness_key"] + row["aug_flatness_value"]
        row["coef_L0_sum"] = div(s["l0_sum"], ent)
        row["coef_L0_weight"] = div(s["l0_n"], ent)
        row["coef_L0"] = div(row["coef_L0_sum"], row["coef_L0_weight"]) if row["coef_L0_weight"] else nan
        vt = s["val_n_tokens"]
        row["coef_L2"] = div(s["val_dz2_sum"], vt)
        row["a2"] = div(s["val_a2_sum"], vt)
        row["L2_term"] = div(s["val_af_sum"], vt)
        nz = n - int(s["n_zero_g"])
        for p in POWERS:
            for m in ("gg", "ggkk"):
                d, o = s[f"{m}_diag_p{p}"], s[f"{m}_off_p{p}"]
                if m == "ggkk" and self.kk_abs is None:
                    d = o = nan
                row[f"{m}_diag_p{p}"] = div(d, n)
                row[f"{m}_offdiag_p{p}"] = div(o, n)
                row[f"{m}_log_ratio_p{p}"] = div(s[f"{m}_lr_p{p}"], nz) if d == d else nan
                row[f"{m}_diag_share_p{p}"] = div(d, d + o) if d == d else nan
        row["n_zero_g_tokens"] = int(s["n_zero_g"])
        for t, cnt in zip(self.taus, s["eta_small"]):
            row[f"eff_grad_sparsity@{tau_label(t)}"] = div(cnt, ent)
        for p, cnt in zip(CONCENTRATION_P, s["conc"]):
            row[f"concentration_g@{p:g}"] = div(cnt, ent)
        for name, k in (("beneficial", "ben"), ("detrimental", "det")):
            row[f"{name}_count"] = int(s[f"{k}_n"])
            row[f"{name}_frac"] = div(s[f"{k}_n"], ent)
            row[f"{name}_sum"] = s[f"{k}_sum"]
            row[f"{name}_mean"] = div(s[f"{k}_sum"], s[f"{k}_n"])
        row["g2_min"] = div(s["g2min_sum"], n)
        row["g2_max"] = div(s["g2max_sum"], n)
        row["g2_mean"] = div(s["g2mean_sum"], n)
        row["g2_log_ratio"] = div(s["g2lr_sum"], s["g2lr_n"])
        row["g2_log_ratio_with_mean"] = div(s["g2lrm_sum"], s["g2lr_n"])
        row["act_zero_frac"] = div(s["a_zero"], ent)
        row["sample_diagonal_gradients"] = div(s["seq_diag_sum"], s["seq_n"])
        row["sample_gradient_ratio"] = div(s["seq_lr_sum"], s["seq_lr_n"])
        row["sample_pn_gradient_ratio"] = div(s["seq_pn_sum"], s["seq_pn_n"])
        row["sample_matrix_inner_product_ratio"] = div(s["seq_ip_sum"], s["seq_ip_n"])
        row["sample_diag_share"] = div(s["seq_diag_sum"], s["seq_diag_sum"] + s["seq_off_sum"])
        return row

    def hist_rows(self) -> list[dict[str, Any]]:
        lo, hi = self.hist_range
        w = (hi - lo) / self.hist_bins
        g, a = self.state["hist_g"].tolist(), self.state["hist_act"].tolist()
        return [{"bin": i, "log10_lo": lo + i * w, "log10_hi": lo + (i + 1) * w, "g_count": int(g[i]),
                 "g_activated_count": int(a[i])} for i in range(self.hist_bins)]


# ============================================================================ the key weight

def key_matrix(module) -> Any:
    """K as neurons x inputs (float64): an ``nn.Linear`` weight as stored, transformers' Conv1D transposed."""
    w = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        w = w.t()
    return w.double()


def kkt_stats(K) -> dict[str, Any]:
    """``DiagonalityPlugin``'s K K^T masses (p = 1, 2), and arXiv 2309.03004's kappa of K (``kkt_columns``)."""
    import torch

    from probes.spectrum_fit import kkt_columns

    kk = K @ K.t()
    out: dict[str, Any] = {}
    for p in POWERS:
        m = kk.abs() ** p
        d = float(torch.diagonal(m).sum())
        o = float(m.sum()) - d
        out[f"kkT_diag_p{p}"], out[f"kkT_offdiag_p{p}"] = d, o
        out[f"kkT_log_ratio_p{p}"] = math.log10(d / (o + DIAG_EPS)) if d > 0 else -math.inf
        out[f"kkT_diag_share_p{p}"] = d / (d + o) if d + o > 0 else math.nan
    svals = torch.linalg.svdvals(K).cpu().numpy()
    kc = kkt_columns(svals, int(K.shape[0]))
    out["kappa_2309"], out["kappa_2309@0.1"] = kc["kappa_2309"], kc["kappa_2309@0.1"]
    return out


# ============================================================================ the run

@dataclass
class FlatnessResult:
    rows: list[dict[str, Any]]
    hist: list[dict[str, Any]]
    info: dict[str, Any]
    probes: dict[str, Any] = field(repr=False, default_factory=dict)

    def tables(self) -> dict[str, Any]:
        import pandas as pd

        return {"flatness": pd.DataFrame(self.rows), "flatness_hist": pd.DataFrame(self.hist)}


def _autograd_deriv(site, h):
    """act'(h) from autograd through the activation module itself, in the model's dtype: what the
    reference's module backward hooks see as grad_input / grad_output. (PyTorch's erf-GELU backward is
    exactly 0 below h ~ -6.15 in float32, where an analytic derivative is tiny but not 0; on MiniLM that
    moves ~0.1 % of the entries, carrying ~10 % of E[g^2], in or out of "activated".) An in-place module
    or one autograd cannot run falls back to the analytic derivative."""
    import torch

    try:
        with torch.enable_grad():
            x = h.detach().clone().requires_grad_(True)
            y = site.module.forward(x)  # .forward: not through the hooks attached to the module
            (d,) = torch.autograd.grad(y, x, torch.ones_like(y))
        return d.float()
    except (RuntimeError, TypeError):
        return site.act.deriv(h.float())


def _sites(loaded, opts: FlatnessOptions):
    from probes.grad_sites import find_grad_sites

    sites = find_grad_sites(loaded.model, loaded.family, loaded.config, opts.sites, opts.act)
    ok = [s for s in sites if s.pre_module_path and s.down_module_path]
    if not ok:
        name = type(loaded.model).__name__
        raise ModelError(f"no MLP with a key (first) and a value (second) linear found in {name}",
                         "flatness needs transformer MLP blocks; run `actsparse grad` for per-activation "
                         "gradient sparsity")
    return ok


def check_flatness(loaded, options: FlatnessOptions) -> str:
    """Refuse before any batch: image data, no loss, an unknown reduction, no MLP with key and value."""
    if is_image_spec(options.data):
        raise DataError("flatness runs on text corpora only",
                        "give a text --data (a .txt/.jsonl file), or run `actsparse grad` on images")
    if options.loss_reduction not in REDUCTIONS:
        raise ModelError(f"unknown loss reduction {options.loss_reduction!r}", "use sum or mean")
    lo, hi = options.hist_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or options.hist_bins < 1:
        raise DataError(f"bad histogram range {options.hist_range} / bins {options.hist_bins}",
                        "use a finite range lo < hi and at least one bin")
    kind = resolve_loss(loaded, options.loss, False, bool(options.labels))
    if kind == "none":
        raise ModelError("flatness needs a backward pass, and --loss none runs forward passes only",
                         "use --loss auto (the model's own loss)")
    _sites(loaded, options)
    return kind


def flatness(loaded, options: FlatnessOptions | None = None, progress: Callable[[int, int], Any] | None = None
             ) -> FlatnessResult:
    """The per-layer table of arXiv 2309.03004's flatness and gradient-structure statistics (module docstring)."""
    import torch

    opts = options or FlatnessOptions()
    loss_kind = check_flatness(loaded, opts)
    torch.manual_seed(opts.seed)
    model = loaded.model
    sites = _sites(loaded, opts)
    modules = dict(model.named_modules())
    info: dict[str, Any] = {}
    # ---- data (as probes.gradients: token windows, or labeled examples for a classifier)
    if loss_kind == "classification":
        max_length = resolve_max_length(loaded, opts.max_length)
        examples, cut = first_examples_within(labeled_examples(opts, loaded), loaded.tokenizer, max_length,
                                              opts.max_tokens)  # with --max-tokens, the first examples that fit
        if cut:
            info["notes"] = [cut]
        nb = math.ceil(len(examples) / opts.batch_size)
        batches: Any = labeled_text_batches(examples, opts, loaded, max_length)
        data_info: dict[str, Any] = {"corpus": opts.data, "labels_field": opts.labels, "max_length": max_length,
                                     "window_scheme": "one truncated example per line"}
    else:
        td = token_windows(loaded, opts, causal=loss_kind == "causal_lm")
        if td.notes:
            info["notes"] = list(td.notes)
        nb = td.n_batches(td.windows)
        batches = td.batches(td.windows)
        data_info = {k: v for k, v in td.describe().items() if k not in ("n_corpus_tokens", "prefix_token")}
        data_info["skip_first"] = opts.skip_first
    if progress:
        progress(nb, 0)

    # ---- per layer: the key weight's statistics and one probe
    probes: dict[tuple[str, int], FlatnessProbe] = {}
    kstats: dict[str, dict[str, Any]] = {}
    kk_abs: dict[str, Any] = {}
    for s in sites:
        K = key_matrix(modules[s.pre_module_path])
        kstats[s.canonical_name] = kkt_stats(K)
        kk_abs[s.canonical_name] = (K @ K.t()).abs().float()
    scratch: dict[tuple[str, int], dict[str, Any]] = {}

    def probe(site, call: int, width: int, device) -> FlatnessProbe:
        key = (site.canonical_name, call)
        p = probes.get(key)
        if p is None:
            kk = kk_abs[site.canonical_name]
            p = probes[key] = FlatnessProbe(width, opts.taus, opts.hist_range, opts.hist_bins,
                                            kk if kk.shape[0] == width else None, device)
        return p

    def slot(site, hc: HookCall) -> dict[str, Any]:
        return scratch.setdefault((site.canonical_name, hc.call), {})

    fwd: list[tuple] = []
    bwd: list[tuple] = []
    for s in sites:
        key_pt = HookPoint(f"{s.canonical_name}.key", modules[s.pre_module_path])
        val_pt = HookPoint(f"{s.canonical_name}.value", modules[s.down_module_path])

        def on_x(x, hc, _s=s):  # key input
            slot(_s, hc)["x2"] = x.detach().float().square().sum(-1)

        def on_h(h, hc, _s=s):  # the pre-activation: act'(h)
            hd = h.detach()
            if _s.act.mask is not None:  # ReLU family: h > 0, as autograd
                d = _s.act.mask(hd).float()
            elif _s.eta_method == "g*act'(h)":
                d = _autograd_deriv(_s, hd)
            else:
                d = _s.act.deriv(hd.float())
            slot(_s, hc)["d"] = d

        def on_a(a, hc, _s=s):  # value input
            ad = a.detach().float()
            st = slot(_s, hc)
            st["a"], st["a2"] = ad, ad.square().sum(-1)

        def on_eta(eta, hc, _s=s):  # dL/dh at the key output
            st = slot(_s, hc)
            if "x2" in st:
                probe(_s, hc.call, int(eta.shape[-1]), eta.device).update_key(eta.float(), st["x2"], hc.mask)

        def on_g(g, hc, _s=s):  # dL/da
            st = slot(_s, hc)
            if "d" in st:
                probe(_s, hc.call, int(g.shape[-1]), g.device).update_g(g.float(), st["d"], st.get("a"),
                                                                        st.get("x2"), hc.mask)

        def on_dz(dz, hc, _s=s):  # dL/dz at the value output
            st = slot(_s, hc)
            if "a2" in st:
                probe(_s, hc.call, int(st["a"].shape[-1]), dz.device).update_value(dz.float(), st["a2"], hc.mask,
                                                                                   st["a"])

        fwd += [(key_pt, "input", on_x), (val_pt, "input", on_a)]
        bwd += [(key_pt, "output", on_eta), (val_pt, "output", on_dz)]
        if s.eta_method == "g*act'(h)":  # the activation module: h at its input, g at its output
            fwd.append((s, "input", on_h))
            bwd.append((s, "output", on_g))
        else:  # activation inside forward: h at the key output, g at the value input
            fwd.append((key_pt, "output", on_h))
            bwd.append((val_pt, "input", on_g))
    leaves: list = []
    fwd += embedding_leaf_hooks(model, leaves)
    gen = torch.Generator().manual_seed(int(opts.seed))

    def forward_loss(m, batch):
        leaves.clear()
        scratch.clear()
        ids, labels = batch.input_ids, batch.labels
        if loss_kind == "mlm":
            ids, labels = mlm_mask(batch, loaded.tokenizer, MLM_PROB, gen)
        out = m(input_ids=ids, attention_mask=batch.attention_mask)
        return cross_entropy(out.logits, labels, opts.loss_reduction), int((labels != -100).sum())

    totals: dict[str, Any] = {"loss_sum": 0.0, "n_targets": 0, "per_batch": []}

    def backward(batch, out) -> None:
        loss, n_targets = out
        if not loss.requires_grad or not leaves:
            raise ModelError(f"the loss of {type(model).__name__} does not depend on its inputs through a "
                             "differentiable path", "report this model; gradients cannot be measured")
        torch.autograd.grad(loss, leaves, allow_unused=True)
        totals["loss_sum"] += float(loss.detach()) * (n_targets if opts.loss_reduction == "mean" else 1)
        totals["n_targets"] += n_targets
        totals["per_batch"].append(n_targets)
        scratch.clear()

    with frozen_parameters(model), Runner(model, fwd_hooks=fwd, bwd_hooks=bwd, adapter=TokenBatches(),
                                          forward=forward_loss, mode="grad",
                                          progress=(lambda k: progress(nb, k)) if progress else None) as runner:
        runner.run(batches, backward)
    if runner.n_items == 0:
        raise DataError("no batches to measure", "check --data")

    rows, hist = [], []
    for s in sites:
        n_calls = max((k + 1 for (name, k) in probes if name == s.canonical_name), default=0)
        for k in range(n_calls):
            p = probes.get((s.canonical_name, k))
            if p is None:
                continue
            name = s.canonical_name + (f".call{k}" if n_calls > 1 else "")
            ident = {"canonical_name": name, "layer": s.layer, "kind": s.kind, "module_path": s.module_path,
                     "key_module": s.pre_module_path, "value_module": s.down_module_path, "act": s.act.label,
                     "call": k}
            row = {**ident, **p.to_row(), **kstats[s.canonical_name]}
            rows.append(row)
            hist += [{"canonical_name": name, "layer": s.layer, **h} for h in p.hist_rows()]
    total_af = sum(r["aug_flatness"] for r in rows if r["aug_flatness"] == r["aug_flatness"])
    for r in rows:
        r["aug_flatness_share"] = r["aug_flatness"] / total_af if total_af else math.nan
    per_batch = totals["per_batch"]
    info.update(data_info)
    info.update({
        "reference": "arXiv 2309.03004, cdgyp/sparsity codes/modules/hooks.py: GradientDensityPlugin, "
                     "CoefficientPlugin, DiagonalityPlugin, EffectiveGradientSparsity, SpectralObservationPlugin",
        "loss": loss_kind, "loss_reduction": opts.loss_reduction,
        "loss_targets_per_batch": {"n_batches": len(per_batch), "min": min(per_batch, default=None),
                                   "max": max(per_batch, default=None)},
        "n_loss_targets": totals["n_targets"],
        "mean_loss_per_target": totals["loss_sum"] / totals["n_targets"] if totals["n_targets"] else None,
        "n_items": runner.n_items,
        "scale": "g, eta, dz are gradients of each batch's "
                 + ("MEAN loss (the reference's protocol)" if opts.loss_reduction == "mean" else "SUMMED loss")
                 + ": every absolute quantity (augmented flatness, coefficients, g^2, eta thresholds) depends "
                   "on the reduction and on the loss targets per batch; the ratios and shares do not",
        "diag_eps": DIAG_EPS, "hist_range": list(opts.hist_range), "hist_bins": opts.hist_bins,
        "taus": list(opts.taus), "concentration_p": list(CONCENTRATION_P),
        "relu_derivative_at_0": "0 (autograd); cdgyp's CustomizedReLU.derivative uses x >= 0",
        "model_dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device),
        "n_layers": len(rows), "seconds": round(runner.seconds, 3),
        "options": asdict(opts),
    })
    return FlatnessResult(rows, hist, info, {f"{n}#{k}": p for (n, k), p in probes.items()})
