"""Linear-input spikes (METRICS.md section 4): max |x| against the median |x| of every linear layer's input.

Bug-or-Feature^2 (On-Point-RND/BugOrFeature custom_layers/custom_linear.py): for the input x of every
linear layer, ``spike_max`` = max |x|; ``median_abs_batchmean`` = the exact (lower) median of |x|
over each batch's counted entries, averaged over batches; ``spike_ratio_batchmedian`` = spike_max /
that; the same over the non-zero entries only (``*_nonzero_*``: a ReLU input's median is 0 once half
of it is 0); ``zero_frac`` = fraction of entries exactly 0 (their input-sparsity figure); signed
max/min. Measured in the forward passes of ``probes.gradients`` (``--spikes``).

The reference's other per-linear statistics (``compute_statistics``, eval mode), over counted
positions where it takes every entry of the batch: ``neg_frac`` / ``pos_frac`` = its
``input_negative_percentage`` / ``input_positive_percentage`` (fractions of input entries < 0 / > 0,
despite the name), ``out_neg_frac`` / ``out_pos_frac`` = its ``output_negative_percentage`` /
``output_positive_percentage`` (the same on the layer's output, bias included), and ``bias_mean`` =
its ``bias_mean`` (``bias.mean()``, here in float64; NaN without a bias).
"""

from __future__ import annotations

import math
import re
from typing import Any

from probes.errors import ModelError
from probes.hooks import HookCall, HookPoint

SPIKE_MODES = ("all", "down", "none")


def counted_rows(x, mask, keep_bool: bool = False):
    """Counted rows of ``x`` ``[batch, pos, channels]`` (or ``[N, channels]``) as ``[n, channels]``
    float32; ``mask`` ``[batch, pos]`` bool or None (every row counts). A bool ``x`` stays bool with
    ``keep_bool``."""
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


def lower_medians(a) -> tuple[float, float | None]:
    """Exact lower medians (``torch.median``'s convention) of the 1-D non-negative tensor ``a`` and of
    its non-zero entries, from one selection: sorted, ``a`` is z zeros then the non-zeros, so the
    non-zero median sits at index z + (n - z - 1) // 2."""
    import torch

    n = a.numel()
    if bool(torch.isnan(a).any()):  # torch.median's convention: a NaN anywhere gives NaN (the selections below
        return math.nan, math.nan  # would sort it last and return a number)
    z = int(torch.count_nonzero(a == 0))
    k_all = (n - 1) // 2
    k_nz = z + (n - z - 1) // 2 if z < n else None
    if a.device.type == "cpu":
        import numpy as np

        # O(n) selections, ~10x faster than torch.median on CPU; one k each: numpy's vectorised selection takes a
        # single kth (two in one call took 23 ms on 2.4M entries, two calls 3.2 ms)
        arr = a.detach().numpy()
        med = float(np.partition(arr, k_all)[k_all])
        if k_nz is None:
            return med, None
        return med, (med if k_nz == k_all else float(np.partition(arr, k_nz)[k_nz]))
    med = float(torch.kthvalue(a, k_all + 1).values)
    return med, (float(torch.kthvalue(a, k_nz + 1).values) if k_nz is not None else None)


class LinearInputProbe:
    """Spike statistics of one linear layer's input: max |x|, per-batch exact median of |x|, zeros."""

    name = "spikes"
    REDUCE = {"n_tokens": "sum", "n_entries": "sum", "zero": "sum", "neg": "sum", "pos": "sum", "out_entries": "sum",
              "out_neg": "sum", "out_pos": "sum", "max_abs": "max",
              "max": "max", "min": "min", "median_sum": "sum", "median_nz_sum": "sum", "n_batches": "sum",
              "n_batches_nz": "sum"}

    def __init__(self, width: int, device: Any = "cpu", bias_mean: float = math.nan):
        import torch

        self.width = int(width)
        self.bias_mean = float(bias_mean)  # of the layer's bias (a weight statistic: merges as is)
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        self.state = {"n_tokens": torch.zeros((), **i64), "n_entries": torch.zeros((), **i64),
                      "zero": torch.zeros((), **i64), "neg": torch.zeros((), **i64), "pos": torch.zeros((), **i64),
                      "out_entries": torch.zeros((), **i64), "out_neg": torch.zeros((), **i64),
                      "out_pos": torch.zeros((), **i64),
                      "max_abs": torch.zeros((), **f64), "max": torch.full((), -math.inf, **f64),
                      "min": torch.full((), math.inf, **f64), "median_sum": torch.zeros((), **f64),
                      "median_nz_sum": torch.zeros((), **f64), "n_batches": torch.zeros((), **i64),
                      "n_batches_nz": torch.zeros((), **i64)}

    def update(self, x, mask=None) -> None:
        import torch

        v = counted_rows(x, mask)
        if v.numel() == 0:
            return
        a = v.abs()
        s = self.state
        s["n_tokens"] += v.shape[0]
        s["n_entries"] += v.numel()
        s["zero"] += torch.count_nonzero(a == 0)
        s["neg"] += torch.count_nonzero(v < 0)
        s["pos"] += torch.count_nonzero(v > 0)
        s["max_abs"] = torch.maximum(s["max_abs"], a.max().double())
        s["max"] = torch.maximum(s["max"], v.max().double())
        s["min"] = torch.minimum(s["min"], v.min().double())
        med, med_nz = lower_medians(a.reshape(-1))
        s["median_sum"] += med  # exact lower median of this batch
        s["n_batches"] += 1
        if med_nz is not None:  # ReLU inputs: the plain median is 0 once half the entries are
            s["median_nz_sum"] += med_nz
            s["n_batches_nz"] += 1

    def update_output(self, y, mask=None) -> None:
        """Sign counts of the layer's output ``y`` ``[batch, pos, out]`` (counted positions)."""
        import torch

        v = counted_rows(y, mask)
        if v.numel() == 0:
            return
        s = self.state
        s["out_entries"] += v.numel()
        s["out_neg"] += torch.count_nonzero(v < 0)
        s["out_pos"] += torch.count_nonzero(v > 0)

    def merge(self, other: "LinearInputProbe") -> "LinearInputProbe":
        import torch

        for k, op in self.REDUCE.items():
            b = other.state[k].to(self.state[k].device)
            a = self.state[k]
            self.state[k] = a + b if op == "sum" else (torch.maximum(a, b) if op == "max" else torch.minimum(a, b))
        return self

    def to_row(self) -> dict[str, Any]:
        s = {k: v.detach().cpu() for k, v in self.state.items()}
        ent, nb, oe = int(s["n_entries"]), int(s["n_batches"]), int(s["out_entries"])
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
                "pos_frac": int(s["pos"]) / ent if ent else nan,
                "out_neg_frac": int(s["out_neg"]) / oe if oe else nan,
                "out_pos_frac": int(s["out_pos"]) / oe if oe else nan, "bias_mean": self.bias_mean,
                "max_input_value": float(s["max"]) if ent else nan,
                "min_input_value": float(s["min"]) if ent else nan, "n_batches": nb}


def linear_modules(model) -> list[tuple[str, Any]]:
    import torch

    return [(n, m) for n, m in model.named_modules() if n and (isinstance(m, torch.nn.Linear) or (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None))]


def layer_of(path: str) -> int | None:
    m = re.search(r"\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def spike_mode(spikes: bool | str) -> str:
    """``--spikes`` as one of SPIKE_MODES (True: all, False: none)."""
    mode = {True: "all", False: "none"}.get(spikes, spikes)
    if mode not in SPIKE_MODES:
        raise ModelError(f"unknown spikes mode {spikes!r}", "use all, down or none")
    return mode


def spike_hooks(model, mode: str, down_paths: set[str], probes: dict[str, LinearInputProbe]) -> list[tuple]:
    """Forward hooks (``probes.hooks`` pairs) that feed the input of every linear layer (``down``: the
    MLP output projections only) to a ``LinearInputProbe`` in ``probes`` (by module path), created on
    first sight."""
    import torch

    from probes.vision import as_tokens

    def observer(name: str, lin):
        def observe(x, hc: HookCall) -> None:
            xt, m = as_tokens(x.detach(), hc.mask)  # [batch, pos, in_features]
            p = probes.get(name)
            if p is None:
                b = getattr(lin, "bias", None)
                bm = float(b.detach().double().mean()) if isinstance(b, torch.Tensor) and b.numel() else math.nan
                p = probes[name] = LinearInputProbe(int(xt.shape[-1]), xt.device, bias_mean=bm)
            with torch.no_grad():
                p.update(xt, m)
        return observe

    def out_observer(name: str):
        def observe(y, hc: HookCall) -> None:
            p = probes.get(name)  # made by the input hook, which runs first
            if p is None or not isinstance(y, torch.Tensor):
                return
            yt, m = as_tokens(y.detach(), hc.mask)  # [batch, pos, out_features]
            with torch.no_grad():
                p.update_output(yt, m)
        return observe

    if mode == "none":
        return []
    chosen = [(name, lin) for name, lin in linear_modules(model) if mode == "all" or name in down_paths]
    return ([(HookPoint(f"linear.{name}.hook_in", lin, "input"), observer(name, lin)) for name, lin in chosen]
            + [(HookPoint(f"linear.{name}.hook_out", lin, "output"), out_observer(name)) for name, lin in chosen])


def spike_rows(probes: dict[str, LinearInputProbe], down_paths: set[str], dtype: str) -> list[dict[str, Any]]:
    """One row per linear layer, in the order the forward first reached them."""
    return [{"canonical_name": f"linear.{name}.hook_in", "module_path": name, "kind": "linear_in",
             "layer": layer_of(name), "is_down_proj": name in down_paths, "dtype": dtype, **p.to_row()}
            for name, p in probes.items()]
