"""SPARLING's per-channel thresholds, post hoc (kavigupta/sparling, ``sparling/sparsity.py``).

SPARLING (Gupta et al., "SPARLING: learning latent representations with extremely sparse
activations") trains with a sparsity layer, ``EnforceSparsityPerChannel``: for an input ``x`` of
shape ``(N, C)`` it keeps, per channel c, a threshold ``t_c``; in training each batch updates it
with the k-th smallest value of that channel (``update_with_batch``: ``k = max(1, int(N * sparsity))``,
``torch.kthvalue(x, k, dim=0)``, then an exponential moving average with ``momentum`` 0.1), and the
layer returns ``relu(x - t)``: a channel is active only where its **signed** value exceeds its
threshold, so each channel keeps about ``1 - sparsity`` of the positions (its density).

A trained checkpoint without such a layer has no thresholds; this module gives the **post-hoc**
counterpart, labelled as such everywhere (``sparling_posthoc``):

- thresholds: per layer and channel, the exact k-th smallest signed value over a calibration sample
  of counted positions (the reference's ``k = max(1, int(N * sparsity))`` with N the sample's rows),
  computed once from all calibration rows instead of the reference's moving average over batches;
- the rule: zero the entries with ``v <= t_c`` (SPARLING's ``relu(x - t)`` is 0 exactly there) and
  leave the others as they are: a **mask**, without the reference's shift by ``t_c`` (a mask is what
  the sparse passes of ``probes.pplp_session`` can apply, and it leaves the kept values unchanged);
- ``v`` is the tensor the masks of ``probes.pplp_session`` threshold: the MLP activation that enters
  the output projection (``act(gate)`` for GLU MLPs). For a monotone activation (ReLU, and GELU/SiLU
  wherever the threshold is above the activation's minimum, i.e. at any sparsity above ~50 %) a
  threshold on ``act(h)`` keeps exactly the positions a threshold on the signed pre-activation ``h``
  would, so the rule is SPARLING's on the signed pre-activations;
- the density each channel actually reaches on held-out positions: the fraction with ``v > t_c``.

``learned_thresholds(model)`` reads SPARLING layers a checkpoint does contain (modules with a 1-D
``thresholds`` tensor and a ``sparsity``/``momentum`` attribute or a SPARLING class name, or state-dict
entries ending in ``.thresholds``).

Wiring into ``curve``: ``SparlingCalibration.update(layer_index, v3, mask)`` during the dense
calibration pass, then ``SparlingCalibration.masker(sparsity)`` returns ``(masker, thresholds)`` with
the masker's signature ``(layer, x3, g3, m) -> bool drop mask`` of ``PplpSession._masker``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# Calibration rows are kept in memory as float32 [rows, channels] per layer; the cap bounds them.
DEFAULT_CALIB_ROWS = 16384
CALIB_BYTES = 1 << 30  # at most this many bytes of calibration rows over all layers


def kth_index(n: int, sparsity: float) -> int:
    """SPARLING's ``to_drop = max(1, int(N * sparsity))`` (1-based rank of the threshold)."""
    return max(1, int(n * float(sparsity)))


def channel_thresholds(v, sparsity: float):
    """Per-channel thresholds of ``v`` ``[N, C]``: the k-th smallest signed value of each column,
    ``k = max(1, int(N * sparsity))`` (``EnforceSparsityPerChannel.update_with_batch`` on one batch,
    momentum 1). ``sparsity`` 0 gives ``-inf`` (nothing dropped)."""
    import torch

    n, c = v.shape
    if float(sparsity) <= 0.0 or n == 0:
        return torch.full((c,), -math.inf, dtype=torch.float32, device=v.device)
    return torch.kthvalue(v.float(), kth_index(n, sparsity), dim=0).values


def drop_mask(v, thresholds):
    """The entries SPARLING's ``relu(x - t)`` zeroes: ``v <= t`` per channel (last dim)."""
    return v.float() <= thresholds.to(v.device)


def reached_density(v, thresholds, mask=None):
    """Per channel: the fraction of counted rows with ``v > t_c`` (``v`` ``[..., C]``, ``mask`` over its
    leading dims or None). Returns (kept counts [C] float64, rows)."""
    import torch

    rows = v[mask] if mask is not None else v.reshape(-1, v.shape[-1])
    kept = (rows.float() > thresholds.to(rows.device)).double().sum(0)
    return kept, int(rows.shape[0])


@dataclass
class SparlingCalibration:
    """A sample of counted rows per layer (first ``max_rows`` seen), from which per-channel
    thresholds are exact k-th values. ``update`` takes the masked value ``v3`` ``[batch, pos, C]``
    with its count mask (or ``[N, C]`` with None)."""

    n_layers: int
    max_rows: int = DEFAULT_CALIB_ROWS
    rows: list[list[Any]] = field(default_factory=list)
    n_rows: list[int] = field(default_factory=list)
    _sorted: dict[int, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rows = [[] for _ in range(self.n_layers)]
        self.n_rows = [0] * self.n_layers

    def update(self, layer_index: int, v3, mask=None) -> None:
        rows = v3[mask] if mask is not None else v3.reshape(-1, v3.shape[-1])
        room = self.max_rows - self.n_rows[layer_index]
        if room <= 0 or rows.shape[0] == 0:
            return
        rows = rows[:room].detach().float()
        self.rows[layer_index].append(rows.clone())
        self.n_rows[layer_index] += int(rows.shape[0])
        self._sorted.pop(layer_index, None)

    def sample(self, layer_index: int):
        import torch

        if not self.rows[layer_index]:
            raise ValueError(f"no calibration rows for layer {layer_index}")
        if len(self.rows[layer_index]) > 1:
            self.rows[layer_index] = [torch.cat(self.rows[layer_index], 0)]
        return self.rows[layer_index][0]

    def _sorted_sample(self, layer_index: int):
        if layer_index not in self._sorted:  # one sort per layer serves every sparsity of a grid
            self._sorted[layer_index] = self.sample(layer_index).sort(dim=0).values
        return self._sorted[layer_index]

    def thresholds(self, sparsity: float) -> list[Any]:
        """Per layer: float32 [C] thresholds for ``sparsity`` (1 - the target density)."""
        import torch

        out = []
        for i in range(self.n_layers):
            s = self._sorted_sample(i)
            n, c = s.shape
            if float(sparsity) <= 0.0 or n == 0:
                out.append(torch.full((c,), -math.inf, dtype=torch.float32, device=s.device))
            else:
                out.append(s[kth_index(n, sparsity) - 1].clone())
        return out

    def masker(self, sparsity: float) -> tuple[Callable, list[Any]]:
        """``(masker, thresholds)`` as ``PplpSession._masker`` returns them."""
        return sparling_masker(self.thresholds(sparsity))


def sparling_masker(thresholds: Sequence[Any]) -> tuple[Callable, list[Any]]:
    """A masker ``(layer, x3, g3, m) -> bool [batch, pos, C]`` (True: zero the entry) that drops
    ``v <= t_c`` with ``v`` = ``g3`` (act(gate), GLU) or ``x3``, ``t`` = ``thresholds[layer.index]``."""
    ts = list(thresholds)

    def m_sparling(layer, x3, g3, m):
        v = g3 if g3 is not None else x3
        return drop_mask(v, ts[layer.index])

    return m_sparling, ts


# ---------------------------------------------------------------------------- learned thresholds
_SPARLING_CLASSES = ("EnforceSparsityPerChannel", "EnforceSparsityUniversally", "EnforceSparsityPerChannel1D",
                     "EnforceSparsityPerChannel2D", "EnforceSparsityPerChannelAccumulated")


def learned_thresholds(model) -> list[dict[str, Any]]:
    """SPARLING-style layers in ``model`` and their learned thresholds (one row per layer).

    A module counts when it holds a 1-D ``thresholds`` tensor and either its class is one of
    SPARLING's (``sparling/sparsity.py``) or it has a ``sparsity`` or ``momentum`` attribute; other
    parameters or buffers named ``*.thresholds`` are listed with ``module_class`` None."""
    import torch

    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        t = getattr(mod, "thresholds", None)
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            continue
        cls = type(mod).__name__
        if not (cls in _SPARLING_CLASSES or hasattr(mod, "sparsity") or hasattr(mod, "momentum")):
            continue
        seen.add(id(t))
        sp = getattr(mod, "sparsity", None)
        rows.append(_threshold_row(name, cls, t, sp if isinstance(sp, (int, float)) else None))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.split(".")[-1] == "thresholds" and id(t) not in seen and t.dim() == 1:
            rows.append(_threshold_row(name.rsplit(".", 1)[0] if "." in name else "", None, t, None))
    return rows


def _threshold_row(path: str, cls: str | None, t, sparsity: float | None) -> dict[str, Any]:
    v = t.detach().double().cpu()
    finite = v[v.isfinite()]
    return {"module_path": path, "module_class": cls, "channels": int(v.numel()),
            "declared_sparsity": float(sparsity) if sparsity is not None else math.nan,
            "threshold_mean": float(finite.mean()) if finite.numel() else math.nan,
            "threshold_std": float(finite.std()) if finite.numel() > 1 else math.nan,
            "threshold_min": float(finite.min()) if finite.numel() else math.nan,
            "threshold_max": float(finite.max()) if finite.numel() else math.nan,
            "n_nonfinite": int((~v.isfinite()).sum())}
