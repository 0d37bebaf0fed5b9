"""Gradient (derivative) sparsity and linear-input spikes (METRICS.md sections 3-4).

Definitions (arXiv 2309.03004; cdgyp/sparsity codes/modules/hooks.py). With h the pre-activation,
a = act(h) and g = dL/da from a backward pass on the model's own loss:
- ``deriv_sparsity``: fraction of entries with act'(h) == 0 (ReLU family, ``exact_zero_region``) or
  |act'(h)| <= eps_d (smooth activations; eps_d = 1e-6). ``deriv_sparsity_rule`` says which.
- ``deriv_sq_mean``: mean of act'(h)^2.
- ``eff_grad_sparsity@tau``: fraction of entries with |eta| < tau, eta = g * act'(h) (= dL/dh),
  tau in {1e-9, 1e-6, 1e-3}; ``eta_l1_per_token`` / ``eta_l2sq_per_token``: mean over tokens of
  ||eta_t||_1 and ||eta_t||_2^2.
act'(h) is the analytic derivative of ``probes.activations`` (``act_analytic`` False marks an
unknown elementwise module differentiated by autograd instead). Statistics are float32; sums are
float32 within one token's row (<= width values) and float64 across tokens.

How the gradients are taken (no parameter is updated, no parameter gradient is kept):
- every parameter gets ``requires_grad_(False)`` for the run (restored afterwards);
- the input embedding's output (token models) or the pixel tensor (vision) is replaced by a fresh
  leaf that requires grad, so autograd records the graph of the activations only;
- ``torch.autograd.grad(loss, leaf)`` runs the backward; nothing is accumulated in any ``.grad``.
- At each activation module a forward PRE-hook sees h and computes act'(h) (before an in-place
  activation overwrites h); the forward hook registers a TENSOR hook on the output a, which
  receives g = dL/da. Full backward hooks break on in-place ReLU; tensor hooks do not. Sites with
  no activation module fall back to a tensor hook on the pre-activation linear's output, which
  receives eta = dL/dh directly (``eta_method`` says which).
- A module called several times per forward is measured per call (rows ``.call{k}``).

The loss (``loss``): ``causal_lm`` = next-token cross-entropy on the counted positions
(``Batch.labels``, -100 elsewhere, no extra shift); ``mlm`` = BERT masked-LM cross-entropy with
15 % of positions masked (80/10/10, seeded) for models with a masked-LM head;
``classification`` = cross-entropy against labels (image folders, or ``--labels FIELD`` of a
.jsonl for sequence classifiers). ``auto`` picks by the model's head and the data; a model with
no loss on the data is refused (ModelError), never given a surrogate. ``none`` (only when asked)
runs forward passes only: the act'(h) columns are filled, every eta column is NaN. ``loss_reduction``:
``sum`` (default: every counted token / image contributes with weight 1, so eta does not depend
on the batch size) or ``mean`` (the training convention: divided by the batch's count).

Spikes (Bug-or-Feature^2, On-Point-RND/BugOrFeature custom_layers/custom_linear.py), for the
input x of every linear layer in the same forward passes: ``spike_max`` = max |x|;
``median_abs_batchmean`` = the exact (lower) median of |x| over each batch's counted entries,
averaged over batches; ``spike_ratio_batchmedian`` = spike_max / that; the same over the non-zero
entries only (``*_nonzero_*``: a ReLU input's median is 0 once half of it is 0); ``zero_frac`` =
fraction of entries exactly 0 (their input-sparsity figure); signed max/min.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from probes.activations import Activation, is_activation_module, resolve_activation
from probes.errors import DataError, DeviceError, ModelError
from probes.vision import ACT, CONV_ACT, as_tokens, call_name, is_image_spec

DEFAULT_TAUS = (1e-9, 1e-6, 1e-3)
EPS_D = 1e-6
MLM_PROB = 0.15
LOSSES = ("auto", "causal_lm", "mlm", "classification", "none")
REDUCTIONS = ("sum", "mean")


def tau_label(t: float) -> str:
    return f"{t:g}"


# ============================================================================ probes

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

    @staticmethod
    def _valid(x, mask, keep_bool: bool = False):
        """Counted rows of ``x`` as ``[n, channels]`` float32 (a bool mask stays bool with ``keep_bool``)."""
        import torch

        if x.dim() == 2:
            x = x.unsqueeze(1)
        if mask is not None and not bool(mask.all()):
            v = x[mask.to(x.device)]
        else:  # every position counts: no copy
            v = x.reshape(-1, x.shape[-1])
        if v.dtype == torch.float32 or (keep_bool and v.dtype == torch.bool):
            return v
        return v.float()

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
        s["deriv_zero"] += (v == 0).sum()
        s["deriv_small"] += (v.abs() <= self.eps_d).sum()
        s["deriv_sq_sum"] += self._sum64(v.square())

    def update_backward(self, eta, mask=None) -> None:
        """``eta`` = dL/dh as ``[batch, pos, channels]``."""
        import torch

        v = self._valid(eta, mask)
        if v.numel() == 0:
            return
        s = self.state
        a = v.abs()
        s["n_grad_tokens"] += v.shape[0]
        s["eta_zero"] += (a == 0).sum()
        for j, t in enumerate(self.taus):
            s["eta_small"][j] += (a < t).sum()
        s["eta_l1_sum"] += self._sum64(a)
        s["eta_l2sq_sum"] += self._sum64(a.square())
        amax = a.max()
        if not bool(torch.isfinite(amax)):
            s["nonfinite_grad"] += (~torch.isfinite(v)).sum()
        s["eta_abs_max"] = torch.maximum(s["eta_abs_max"], amax.double())

    def merge(self, other: "GradientSparsityProbe") -> "GradientSparsityProbe":
        import torch

        if (other.width, other.taus, other.eps_d, other.exact_zero_region) != \
                (self.width, self.taus, self.eps_d, self.exact_zero_region):
            raise ValueError("cannot merge gradient probes with different width, taus, eps_d or activation kind")
        for k, op in self.REDUCE.items():
            b = other.state[k].to(self.state[k].device)
            self.state[k] = self.state[k] + b if op == "sum" else torch.maximum(self.state[k], b)
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
        return row


def lower_medians(a) -> tuple[float, float | None]:
    """Exact lower medians (``torch.median``'s convention) of the 1-D non-negative tensor ``a`` and of
    its non-zero entries, from one selection: sorted, ``a`` is z zeros then the non-zeros, so the
    non-zero median sits at index z + (n - z - 1) // 2."""
    import torch

    n = a.numel()
    z = int((a == 0).sum())
    k_all = (n - 1) // 2
    k_nz = z + (n - z - 1) // 2 if z < n else None
    if a.device.type == "cpu":
        import numpy as np

        kth = [k_all] if k_nz is None else sorted({k_all, k_nz})
        part = np.partition(a.detach().numpy(), kth)  # O(n) selection, ~3x faster than torch.median on CPU
        return float(part[k_all]), (float(part[k_nz]) if k_nz is not None else None)
    med = float(torch.kthvalue(a, k_all + 1).values)
    return med, (float(torch.kthvalue(a, k_nz + 1).values) if k_nz is not None else None)


class LinearInputProbe:
    """Spike statistics of one linear layer's input: max |x|, per-batch exact median of |x|, zeros."""

    name = "spikes"
    REDUCE = {"n_tokens": "sum", "n_entries": "sum", "zero": "sum", "neg": "sum", "max_abs": "max",
              "max": "max", "min": "min", "median_sum": "sum", "median_nz_sum": "sum", "n_batches": "sum",
              "n_batches_nz": "sum"}

    def __init__(self, width: int, device: Any = "cpu"):
        import torch

        self.width = int(width)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        self.state = {"n_tokens": torch.zeros((), **i64), "n_entries": torch.zeros((), **i64),
                      "zero": torch.zeros((), **i64), "neg": torch.zeros((), **i64),
                      "max_abs": torch.zeros((), **f64), "max": torch.full((), -math.inf, **f64),
                      "min": torch.full((), math.inf, **f64), "median_sum": torch.zeros((), **f64),
                      "median_nz_sum": torch.zeros((), **f64), "n_batches": torch.zeros((), **i64),
                      "n_batches_nz": torch.zeros((), **i64)}

    def update(self, x, mask=None) -> None:
        import torch

        v = GradientSparsityProbe._valid(x, mask)
        if v.numel() == 0:
            return
        a = v.abs()
        s = self.state
        s["n_tokens"] += v.shape[0]
        s["n_entries"] += v.numel()
        s["zero"] += (a == 0).sum()
        s["neg"] += (v < 0).sum()
        s["max_abs"] = torch.maximum(s["max_abs"], a.max().double())
        s["max"] = torch.maximum(s["max"], v.max().double())
        s["min"] = torch.minimum(s["min"], v.min().double())
        med, med_nz = lower_medians(a.reshape(-1))
        s["median_sum"] += med  # exact lower median of this batch
        s["n_batches"] += 1
        if med_nz is not None:  # ReLU inputs: the plain median is 0 once half the entries are
            s["median_nz_sum"] += med_nz
            s["n_batches_nz"] += 1

    def merge(self, other: "LinearInputProbe") -> "LinearInputProbe":
        import torch

        for k, op in self.REDUCE.items():
            b = other.state[k].to(self.state[k].device)
            a = self.state[k]
            self.state[k] = a + b if op == "sum" else (torch.maximum(a, b) if op == "max" else torch.minimum(a, b))
        return self

    def to_row(self) -> dict[str, Any]:
        s = {k: v.detach().cpu() for k, v in self.state.items()}
        ent, nb = int(s["n_entries"]), int(s["n_batches"])
        nan = float("nan")
        nbz = int(s["n_batches_nz"])
        med = float(s["median_sum"]) / nb if nb else nan
        mednz = float(s["median_nz_sum"]) / nbz if nbz else nan
        mx = float(s["max_abs"]) if ent else nan

        def ratio(m):
            return (mx / m if m > 0 else (math.inf if mx > 0 else nan)) if m == m else nan

        return {"n_tokens": int(s["n_tokens"]), "in_features": self.width,
                "spike_max": mx, "median_abs_batchmean": med, "spike_ratio_batchmedian": ratio(med),
                "median_abs_nonzero_batchmean": mednz, "spike_ratio_nonzero_batchmedian": ratio(mednz),
                "zero_frac": int(s["zero"]) / ent if ent else nan, "neg_frac": int(s["neg"]) / ent if ent else nan,
                "max_input_value": float(s["max"]) if ent else nan,
                "min_input_value": float(s["min"]) if ent else nan, "n_batches": nb}


# ============================================================================ sites

@dataclass
class GradSite:
    canonical_name: str
    module_path: str  # the activation module (eta_method "g*act'(h)") or the pre-activation linear
    kind: str  # mlp_post (plain MLP: a is the down projection's input), mlp_gate_act (GLU), conv_act, act, custom
    layer: int | None
    family: str
    act: Activation
    eta_method: str  # "g*act'(h)" | "dL/dh"
    module: Any = field(repr=False, compare=False, default=None)
    pre_module_path: str | None = None
    down_module_path: str | None = None

    def row(self) -> dict[str, Any]:
        return {"canonical_name": self.canonical_name, "module_path": self.module_path, "kind": self.kind,
                "layer": self.layer, "family": self.family, "act": self.act.label,
                "act_analytic": self.act.analytic, "eta_method": self.eta_method,
                "pre_module_path": self.pre_module_path, "down_module_path": self.down_module_path}


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _act_child(modules: dict, parent: str) -> str | None:
    pref = parent + "." if parent else ""
    hits = [n for n, m in modules.items() if n.startswith(pref) and "." not in n[len(pref):] and n
            and is_activation_module(m)]
    return hits[0] if len(hits) == 1 else None


def _prev_sibling_act(modules: dict, path: str) -> str | None:
    import torch

    parent = _parent(path)
    pm = modules.get(parent) if parent else None
    if not isinstance(pm, torch.nn.Sequential):
        return None
    names = [n for n, _ in pm.named_children()]
    leaf = path.rsplit(".", 1)[-1]
    i = names.index(leaf) if leaf in names else -1
    for j in range(i - 1, -1, -1):
        cand = f"{parent}.{names[j]}"
        if is_activation_module(modules[cand]):
            return cand
        if type(modules[cand]).__name__ not in ("Dropout", "Identity"):
            return None
    return None


def find_grad_sites(model, family: str | None = None, config: Any = None, globs: Sequence[str] = (),
                    act_name: str | None = None) -> list[GradSite]:
    """One site per MLP activation (and per conv activation module). ModelError if none."""
    from probes.sites import MLP_GATE_ACT, MLP_POST, MLP_PRE, find_sites
    from probes.vision import find_conv_sites

    modules = dict(model.named_modules())
    if globs:
        out = []
        for s in find_sites(model, family, (MLP_POST,), globs):
            if not is_activation_module(s.module):
                raise ModelError(f"--site {s.module_path} is a {type(s.module).__name__}, not an activation module",
                                 "gradient sparsity needs the activation module itself, e.g. "
                                 "--site 'transformer.h.*.mlp.act'")
            out.append(GradSite(f"custom.{s.module_path}.hook_act", s.module_path, "custom", s.layer, "custom",
                                resolve_activation(s.module, config, act_name), "g*act'(h)", s.module))
        return out
    try:
        sites = find_sites(model, family, (MLP_POST, MLP_GATE_ACT, MLP_PRE))
    except ModelError:
        sites = []
        mlp_error = True
    else:
        mlp_error = False
    by_layer: dict[tuple[str, int | None], dict[str, Any]] = {}
    for s in sites:
        stack = s.canonical_name.split("blocks.")[0]
        by_layer.setdefault((stack, s.layer), {})[s.kind] = s
    out: list[GradSite] = []
    for (stack, layer), g in by_layer.items():
        post, gate, pre = g.get(MLP_POST), g.get(MLP_GATE_ACT), g.get(MLP_PRE)
        if post is None:
            continue
        if gate is not None:
            act_path, kind, canon = gate.module_path, MLP_GATE_ACT, gate.canonical_name
        else:
            act_path = None
            if pre is not None:
                act_path = _act_child(modules, _parent(pre.module_path))
            if act_path is None:
                act_path = (_act_child(modules, _parent(post.module_path))
                            or _prev_sibling_act(modules, post.module_path))
            kind, canon = MLP_POST, post.canonical_name
        if act_path is not None:
            m = modules[act_path]
            out.append(GradSite(canon, act_path, kind, layer, post.family, resolve_activation(m, config, act_name),
                                "g*act'(h)", m, pre.module_path if pre else None, post.module_path))
        elif pre is not None:
            # The activation is a function call inside forward: dL/dh straight from the pre-activation.
            out.append(GradSite(canon, pre.module_path, kind, layer, post.family,
                                resolve_activation(None, config, act_name), "dL/dh", pre.module,
                                pre.module_path, post.module_path))
    registry = any(s.family not in ("structural", "mlp") for s in out)
    conv = [] if registry else find_conv_sites(model)
    if conv:
        out = []  # a conv net: every activation module, per channel (a structural "MLP" guess is only its head)
        for s in conv:
            out.append(GradSite(s.canonical_name, s.module_path, CONV_ACT, s.layer, "conv",
                                resolve_activation(s.module, config, act_name), "g*act'(h)", s.module))
    if not out:
        if mlp_error:
            find_sites(model, family, (MLP_POST,))  # re-raise the registry's message with candidates
        raise ModelError(f"no activation module or pre-activation found next to the MLP sites of this "
                         f"{type(model).__name__}", "name the activation modules with --site 'PATH.*.act'")
    return out


# ============================================================================ loss and entry

def model_head(model) -> str:
    n = type(model).__name__
    if n.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if n.endswith("ForMaskedLM"):
        return "mlm"
    if n.endswith(("ForSequenceClassification", "ForImageClassification", "ForImageClassificationWithTeacher")):
        return "classification"
    return "none"


def resolve_loss(loaded, loss: str, image_data: bool, has_labels: bool) -> str:
    """The loss to differentiate, or ModelError when the model has none on this data."""
    if loss not in LOSSES:
        raise ModelError(f"unknown loss {loss!r}", f"use one of {', '.join(LOSSES)}")
    head = model_head(loaded.model)
    module = loaded.family in ("module", "timm", "torchvision")
    name = type(loaded.model).__name__
    refuse_fix = ("give a checkpoint with its head (…ForCausalLM, …ForMaskedLM, …ForSequenceClassification / "
                  "…ForImageClassification with labels), or pass --loss none for the forward-only derivative "
                  "statistics; actsparse never substitutes a surrogate loss")
    if loss == "none":
        return "none"
    if loaded.is_encoder_decoder:
        raise ModelError(f"{name} is an encoder-decoder: its training loss needs targets (T5 span corruption), "
                         "which a plain corpus does not give", refuse_fix)
    if loss == "auto":
        if image_data:
            if not has_labels:
                raise ModelError("these image inputs have no labels (random: inputs, or an image folder without "
                                 "class folders), so no loss is available for gradients",
                                 "use imagefolder:DIR with DIR/CLASS/IMAGE files, or --loss none for the forward-only "
                                 "act'(h) statistics")
            if head == "classification" or module:
                return "classification"
            raise ModelError(f"{name} has no classification head, so no loss is available for gradients", refuse_fix)
        if has_labels:
            if head == "classification" or module:
                return "classification"
            raise ModelError(f"--labels given but {name} has no classification head", refuse_fix)
        if head in ("causal_lm", "mlm"):
            return head
        raise ModelError(f"{name} has no loss on text: no language-model head and no classification labels "
                         f"(a bare encoder such as a sentence-embedding model was trained with a loss on pairs)",
                         refuse_fix)
    if loss == "classification" and not has_labels:
        raise ModelError("loss classification needs labels", "give imagefolder:DIR, or --labels FIELD with a .jsonl")
    if loss in ("causal_lm", "mlm") and head != loss:
        raise ModelError(f"loss {loss} needs a {'causal' if loss == 'causal_lm' else 'masked'}-LM head; "
                         f"{name} has {head if head != 'none' else 'none'}", refuse_fix)
    return loss


def check_loss(loaded, options: "GradOptions") -> str:
    """Resolve the loss before any model work (the CLI calls this before its progress bar)."""
    from probes import vision

    if is_image_spec(options.data):
        data = vision.open_image_data(options.data, loaded.config, options.n_images)
        return resolve_loss(loaded, options.loss, True, data.has_labels)
    return resolve_loss(loaded, options.loss, False, bool(options.labels))


def cross_entropy(logits, labels, reduction: str):
    """Cross-entropy in float32 over positions with a label (-100: ignored); ``sum`` or ``mean``."""
    import torch

    lf = logits.float().reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1).to(lf.device)
    if lab.numel() and int(lab.max()) >= lf.shape[-1]:
        raise DataError(f"label {int(lab.max())} is out of range for a model with {lf.shape[-1]} outputs",
                        f"labels must be 0..{lf.shape[-1] - 1} (or names in the model's label2id)")
    total = torch.nn.functional.cross_entropy(lf, lab, ignore_index=-100, reduction="sum")
    if reduction == "mean":
        n = int((lab != -100).sum())
        return total / max(n, 1)
    return total


@contextmanager
def activation_grads_only(model, hook_embeddings: bool = True):
    """Freeze every parameter for the run (restored after) and make the model's inputs a leaf.

    Yields ``leaves``: a list that the embedding hook fills with one fresh leaf per forward (token
    models). For float inputs (images) the caller makes the pixel tensor a leaf itself.
    """
    import torch

    flags = [(p, p.requires_grad) for p in model.parameters()]
    leaves: list = []
    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        emb = None
        get = getattr(model, "get_input_embeddings", None)
        if callable(get):
            try:
                emb = get()
            except (NotImplementedError, AttributeError):
                emb = None
        embs = [emb] if isinstance(emb, torch.nn.Module) else [m for m in model.modules()
                                                               if isinstance(m, torch.nn.Embedding)][:1]

        def make_leaf(module, args, out):
            if not torch.is_tensor(out) or not out.is_floating_point():
                return None
            leaf = out.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()  # a non-leaf copy: later in-place ops on it stay legal

        for e in (embs if hook_embeddings else []):
            handles.append(e.register_forward_hook(make_leaf))
        yield leaves
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)


# ============================================================================ the run

@dataclass
class GradOptions:
    data: str | None = None  # corpus, or imagefolder:DIR / random:SHAPE; None = the bundled corpus
    text_field: str = "text"
    encoding: str = "utf-8"  # of a local corpus file; a byte-order mark is dropped
    labels: str | None = None  # .jsonl label field for sequence classifiers
    batch_size: int = 4
    max_length: int | None = None
    max_tokens: int | None = None
    n_images: int | None = None
    stride: int | None = None
    seed: int = 0
    skip_first: int = 0
    taus: Sequence[float] = DEFAULT_TAUS
    eps_d: float = EPS_D
    loss: str = "auto"
    loss_reduction: str = "sum"
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


SUMMARY_PREFIXES = ("deriv_sparsity", "deriv_zero_frac", "deriv_small_frac@", "deriv_sq_mean", "eff_grad_zero_frac",
                    "eff_grad_sparsity@", "eta_l1_per_token", "eta_l2sq_per_token")


def summarize(rows: list[dict[str, Any]]):
    """Model-level means per site kind: unweighted over layers and weighted by width."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    if df.empty:
        return pd.DataFrame(out)
    metrics = [c for c in df.columns if c.startswith(SUMMARY_PREFIXES) and c != "deriv_sparsity_rule"]
    for kind, g in df.groupby("kind", sort=False):
        for m in metrics:
            v = g[m].astype(float)
            ok = v.notna()
            w = g["width"].astype(float)[ok]
            out.append({"kind": kind, "metric": m, "n_layers": int(ok.sum()),
                        "mean_over_layers": float(v[ok].mean()) if ok.any() else math.nan,
                        "width_weighted_mean": float((v[ok] * w).sum() / w.sum()) if ok.any() else math.nan})
    return pd.DataFrame(out)


def _linear_modules(model) -> list[tuple[str, Any]]:
    import torch

    return [(n, m) for n, m in model.named_modules() if n and (isinstance(m, torch.nn.Linear) or (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None))]


def _layer_of(path: str) -> int | None:
    m = re.search(r"\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def mlm_mask(batch, tokenizer, prob: float, gen):
    """BERT masking (Devlin et al.): ``prob`` of the counted, non-special positions are targets;
    of those 80 % become [MASK], 10 % a random token, 10 % stay. Returns (input_ids, labels)."""
    import torch

    ids = batch.input_ids.clone()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cand = batch.count_mask.clone()
    for t in special:
        cand &= ids != t
    r = torch.rand(ids.shape, generator=gen).to(ids.device)
    target = cand & (r < prob)
    if cand.any() and not target.any():  # at least one target per batch
        first = cand.flatten().nonzero()[0, 0]
        target.view(-1)[first] = True
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    r2 = torch.rand(ids.shape, generator=gen).to(ids.device)
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ModelError("masked-LM loss needs a tokenizer with a [MASK] token", "pass --tokenizer")
    ids[target & (r2 < 0.8)] = mask_id
    rnd = target & (r2 >= 0.8) & (r2 < 0.9)
    vocab = len(tokenizer)
    ids[rnd] = torch.randint(0, vocab, ids.shape, generator=gen).to(ids.device)[rnd]
    return ids, labels


def _labeled_examples(opts: GradOptions, loaded) -> list[tuple[str, int]]:
    """``(text, label id)`` per line of a .jsonl of labeled documents for a sequence classifier
    (read with the corpus reader: line by line, strict encoding, regular files only)."""
    from pathlib import Path

    from probes.corpus import corpus_path, iter_jsonl_records, text_value

    if opts.data is None or Path(opts.data).suffix != ".jsonl":
        raise DataError(f"--labels needs a .jsonl corpus with a label field; got {opts.data!r}",
                        "give --data FILE.jsonl with one {\"text\": ..., \"label\": ...} per line")
    p = corpus_path(opts.data)
    tok = loaded.tokenizer
    if tok is None:
        raise DataError("this checkpoint has no tokenizer", "pass --tokenizer")
    cfg = loaded.config
    l2i = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
    n_labels = getattr(cfg, "num_labels", None)
    ex = []
    for i, obj in iter_jsonl_records(opts.data, opts.encoding):
        if not isinstance(obj, dict) or opts.text_field not in obj or opts.labels not in obj:
            raise DataError(f"{p} line {i} lacks {opts.text_field!r} or {opts.labels!r}",
                            "pass --text-field / --labels with the right keys")
        text = text_value(obj[opts.text_field], f"{p} line {i}", opts.text_field)
        if text is None:
            raise DataError(f"{p} line {i}: {opts.text_field!r} is null", "give every labeled example a text")
        lab = obj[opts.labels]
        if isinstance(lab, str) and lab in l2i:
            lab = l2i[lab]
        try:
            lab = int(lab)
        except (TypeError, ValueError) as e:
            raise DataError(f"{p} line {i}: label {obj[opts.labels]!r} is neither an id nor a name in label2id",
                            "use integer labels or the model's label names") from e
        if lab < 0 or (isinstance(n_labels, int) and lab >= n_labels):
            raise DataError(f"{p} line {i}: label {lab} is out of range for a model with {n_labels} classes",
                            f"labels must be 0..{(n_labels or 1) - 1}")
        ex.append((text, lab))
    if not ex:
        raise DataError(f"{p} has no labeled examples", "give a .jsonl with text and label fields")
    return ex


def _labeled_text_batches(ex: list[tuple[str, int]], opts: GradOptions, loaded, max_length: int):
    """Batches of labeled examples for a sequence classifier: one example per row, truncated."""
    import torch

    from probes.corpus import Batch

    tok = loaded.tokenizer
    for i in range(0, len(ex), opts.batch_size):
        group = ex[i:i + opts.batch_size]
        enc = tok([t for t, _ in group], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        att = enc["attention_mask"]
        yield Batch(enc["input_ids"].to(loaded.device), att.to(loaded.device), att.bool().to(loaded.device),
                    torch.tensor([lab for _, lab in group], dtype=torch.long, device=loaded.device)), None


def measure_gradients(loaded, options: GradOptions | None = None,
                      progress: Callable[[int, int], Any] | None = None,
                      site_list: Sequence[GradSite] | None = None, dist: Any = None) -> GradResult:
    """Gradient sparsity per activation site, plus linear-input spikes, over ``options.data``.

    ``progress(total_batches, advance)`` and ``dist`` (data-parallel: windows split over the ranks,
    probes merged) as in ``probes.measure.measure``; only token windows split (not images or
    ``--labels`` examples).
    """
    import torch

    from probes import corpus as corpus_mod
    from probes import distributed, vision
    from probes.measure import DEFAULT_MAX_LENGTH_CAP, resolve_corpus, resolve_stride

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
    if image:
        data = vision.open_image_data(opts.data, loaded.config, opts.n_images)
        loss_kind = resolve_loss(loaded, opts.loss, True, data.has_labels)
        pre = vision.resolve_preprocessor(loaded)
        cap = opts.n_images if data.kind == "imagefolder" else None
        nb = vision.n_batches(data, opts.batch_size, cap)
        batches: Iterator = ((b, None) for b in vision.image_batches(data, pre, opts.batch_size, loaded.device,
                                                                      opts.seed, cap))
        describe_data = data.describe
    else:
        data_spec = resolve_corpus(opts.data)
        loss_kind = resolve_loss(loaded, opts.loss, False, bool(opts.labels))
        from probes.loading import check_max_length
        check_max_length(opts.max_length, loaded)  # above the model's position limit: exit 4, before any batch
        model_max = loaded.max_length or DEFAULT_MAX_LENGTH_CAP
        max_length = opts.max_length or min(model_max, DEFAULT_MAX_LENGTH_CAP)
        if loss_kind == "classification":
            examples = _labeled_examples(opts, loaded)
            nb = math.ceil(len(examples) / opts.batch_size)
            batches = _labeled_text_batches(examples, opts, loaded, max_length)
            describe_data = lambda: {  # noqa: E731
                "corpus": data_spec, "labels_field": opts.labels, "max_length": max_length,
                "window_scheme": "one truncated example per line"}
        else:
            causal = loss_kind == "causal_lm" or (loss_kind == "none" and loaded.is_causal_lm)
            stride, stride_note = resolve_stride(opts.stride, max_length)
            if stride_note:
                info["notes"] = [stride_note]  # the CLI prints it unless -q
            corpus = corpus_mod.corpus_windows(data_spec, loaded.tokenizer, max_length, stride, causal=causal,
                                               max_tokens=opts.max_tokens, skip_first=opts.skip_first,
                                               text_field=opts.text_field, encoding=opts.encoding)
            windows = corpus.windows
            tok = loaded.tokenizer
            pad = getattr(tok, "pad_token_id", None)
            pad = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
            local = dist.shard(windows, opts.batch_size) if dist is not None else windows
            nb = math.ceil(len(local) / opts.batch_size)
            batches = ((b, None) for b in corpus_mod.batches(local, opts.batch_size, pad, loaded.device))
            describe_data = lambda: {  # noqa: E731
                "corpus": data_spec, "corpus_is_default": opts.data is None, "n_documents": corpus.n_documents,
                **corpus.read_note(),
                "n_windows": len(windows), "n_counted_tokens": corpus_mod.n_counted(windows),
                "max_length": max_length, "stride": stride,
                "window_scheme": "lm-eval rolling (context length 1)" if causal else "encoder [CLS] chunk [SEP]",
                "skip_first": opts.skip_first}
    if progress:
        progress(nb, 0)

    # ---- hooks
    probes: dict[tuple[str, int], GradientSparsityProbe] = {}
    spikes: dict[str, LinearInputProbe] = {}
    counter: dict[str, int] = {}
    calls: dict[str, int] = {}
    dims: dict[tuple[str, int], int] = {}
    pending: dict[str, Any] = {}
    cur: dict[str, Any] = {"mask": None}
    missing_grad: set[str] = set()

    def probe_for(site: GradSite, k: int, width: int, device) -> GradientSparsityProbe:
        key = (site.canonical_name, k)
        p = probes.get(key)
        if p is None:
            p = probes[key] = GradientSparsityProbe(width, opts.taus, opts.eps_d, site.act.exact_zero_region, device)
        return p

    def deriv_tokens(site: GradSite, h, mask):
        k = counter.get(site.canonical_name, 0)
        counter[site.canonical_name] = k + 1
        dims[(site.canonical_name, k)] = h.dim()
        hd = h.detach()
        # 0/1 derivatives (ReLU) stay a bool mask: one byte per entry kept until the backward pass
        d = site.act.mask(hd) if site.act.mask is not None else site.act.deriv(hd.float())
        dt, m = as_tokens(d, mask)
        probe_for(site, k, int(dt.shape[-1]), dt.device).update_forward(dt, m)
        return k, d, m

    def on_grad(site: GradSite, k: int, d, m, g_is_eta: bool):
        def hook(g):
            with torch.no_grad():
                eta = g.float() if g_is_eta else g.float() * d
                et, mm = as_tokens(eta, m)
                probes[(site.canonical_name, k)].update_backward(et, mm)
            return None
        return hook

    handles = []

    def add_site_hooks(site: GradSite):
        if site.eta_method == "g*act'(h)":
            def pre_hook(module, args, kwargs, _s=site):
                h = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
                if h is None or not torch.is_tensor(h) or not h.is_floating_point():
                    return None
                pending[_s.canonical_name] = deriv_tokens(_s, h, cur["mask"])
                return None

            def fwd_hook(module, args, out, _s=site):
                state = pending.pop(_s.canonical_name, None)
                a = out if torch.is_tensor(out) else (out[0] if isinstance(out, (tuple, list)) else None)
                if state is None or a is None:
                    return None
                k, d, m = state
                if a.requires_grad:
                    a.register_hook(on_grad(_s, k, d, m, False))
                elif torch.is_grad_enabled():
                    missing_grad.add(_s.canonical_name)
                return None

            handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(site.module.register_forward_hook(fwd_hook))
        else:
            def lin_hook(module, args, out, _s=site):
                h = out if torch.is_tensor(out) else out[0]
                k, d, m = deriv_tokens(_s, h, cur["mask"])
                if h.requires_grad:
                    h.register_hook(on_grad(_s, k, d, m, True))
                elif torch.is_grad_enabled():
                    missing_grad.add(_s.canonical_name)
                return None

            handles.append(site.module.register_forward_hook(lin_hook))

    down_paths = {s.down_module_path for s in sites if s.down_module_path}
    spike_mode = {True: "all", False: "none"}.get(opts.spikes, opts.spikes)
    if spike_mode not in ("all", "down", "none"):
        raise ModelError(f"unknown spikes mode {opts.spikes!r}", "use all, down or none")
    if spike_mode != "none":
        for name, lin in _linear_modules(model):
            if spike_mode == "down" and name not in down_paths:
                continue
            def spike_hook(module, args, _n=name):
                x = args[0] if args else None
                if x is None or not torch.is_tensor(x) or not x.is_floating_point():
                    return None
                xt, m = as_tokens(x.detach(), cur["mask"])
                p = spikes.get(_n)
                if p is None:
                    p = spikes[_n] = LinearInputProbe(int(xt.shape[-1]), xt.device)
                with torch.no_grad():
                    p.update(xt, m)
                return None

            handles.append(lin.register_forward_pre_hook(spike_hook))

    # ---- loop
    gen = torch.Generator().manual_seed(int(opts.seed))

    def forward_loss(batch, leaves):
        """Forward one batch; returns (loss or None for --loss none, number of loss targets)."""
        if image:
            cur["mask"] = None
            x = batch.pixel_values.to(loaded.dtype).detach().requires_grad_(True)
            leaves.append(x)
            logits = vision.logits_of(vision.forward_images(model, x))
            if loss_kind == "none":
                return None, 0
            if logits is None or logits.dim() != 2:
                raise ModelError(f"{type(model).__name__} gives no [batch, classes] logits",
                                 "gradient sparsity on images needs an image classifier")
            return cross_entropy(logits, batch.labels, opts.loss_reduction), int(batch.labels.numel())
        cur["mask"] = batch.count_mask
        ids, labels = batch.input_ids, batch.labels
        if loss_kind == "mlm":
            ids, labels = mlm_mask(batch, loaded.tokenizer, MLM_PROB, gen)
        out = model(input_ids=ids, attention_mask=batch.attention_mask)
        if loss_kind == "none":
            return None, 0
        logits = out.logits if hasattr(out, "logits") else vision.logits_of(out)
        return cross_entropy(logits, labels, opts.loss_reduction), int((labels != -100).sum())

    n_loss_targets = 0
    loss_sum = 0.0
    n_items = 0
    t0 = time.perf_counter()
    try:
        for s in sites:
            add_site_hooks(s)
        grad_mode = torch.no_grad() if loss_kind == "none" else torch.enable_grad()
        with grad_mode, activation_grads_only(model, not image and loss_kind != "none") as leaves:
            for batch, _ in batches:
                counter.clear()
                pending.clear()
                leaves.clear()
                loss, n_targets = forward_loss(batch, leaves)
                if loss is not None:
                    if not loss.requires_grad or not leaves:
                        raise ModelError(f"the loss of {type(model).__name__} does not depend on its inputs through "
                                         "a differentiable path", "report this model; gradients cannot be measured")
                    torch.autograd.grad(loss, leaves, allow_unused=True)  # fires the tensor hooks; no .grad kept
                    loss_sum += float(loss.detach()) * (n_targets if opts.loss_reduction == "mean" else 1)
                n_loss_targets += n_targets
                n_items += int(batch.pixel_values.shape[0]) if image else int(batch.input_ids.shape[0])
                for name, k in counter.items():
                    calls[name] = max(calls.get(name, 0), k)
                if progress is not None:
                    progress(nb, 1)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        raise DeviceError("out of memory on a forward+backward", "lower --batch-size or --max-length") from e
    finally:
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0
    if dist is not None and dist.active:  # before the n_items check: a rank may have had no windows
        cpu_spikes = {k: distributed.probe_to_cpu(p) for k, p in spikes.items()}
        probes, per_rank = dist.merge_probes(probes, extra={
            "spikes": cpu_spikes, "calls": calls, "dims": dims, "missing_grad": sorted(missing_grad),
            "loss_sum": loss_sum, "n_loss_targets": n_loss_targets, "n_items": n_items, "seconds": elapsed})
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
    spike_rows = []
    for name, p in spikes.items():
        spike_rows.append({"canonical_name": f"linear.{name}.hook_in", "module_path": name, "kind": "linear_in",
                           "layer": _layer_of(name), "is_down_proj": name in down_paths, "dtype": dtype,
                           **p.to_row()})
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
        "mean_loss_per_target": loss_sum / n_loss_targets if n_loss_targets else None,
        "n_loss_targets": n_loss_targets,
        "n_items": n_items,
        "gradient_method": "params requires_grad_(False); input embedding output / pixel tensor made a leaf; "
                           "torch.autograd.grad(loss, leaf); tensor hooks on activation outputs (g) or "
                           "pre-activations (dL/dh); no parameter .grad is ever populated",
        "deriv": "analytic act'(h) from probes.activations (act_analytic False: autograd through the module)",
        "eps_d": opts.eps_d,
        "taus": list(opts.taus),
        "spikes": spike_mode,
        "spike_median": "median_abs_batchmean: exact lower median of |x| over each batch's counted entries, "
                        "averaged over batches",
        "statistics_dtype": "float32 (float64 sums)",
        "model_dtype": dtype,
        "device": str(loaded.device),
        "n_sites": len(rows),
        "n_linear_layers": len(spike_rows),
        "sites_without_gradient": sorted(missing_grad),
        "seconds": round(elapsed, 3),
        "per_call": "a module called several times per forward gives one row per call (.call{k})",
        "options": {**asdict(opts), **({"stride": info["stride"]} if opts.stride is not None and "stride" in info
                                       else {})},
    })
    return GradResult(rows, spike_rows, info, {f"{n}#{k}": p for (n, k), p in probes.items()})
