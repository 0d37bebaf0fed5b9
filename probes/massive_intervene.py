"""Sun et al. 2024's intervention on massive activations (their exp3), on a run's sequences.

Reference: locuslab/massive-activations, ``main_llm.py --exp3`` with ``lib/hook.py``
(``Intervened_Layer.update``, ``setup_intervene_hook``) and ``lib/eval_utils.py`` (``eval_ppl``).
Their hook sits on the output of one decoder layer (``--layer_id``, 1-based: the layer where the
massive activations first appear, 2 for LLaMA-2-7B) and overwrites, for the model's massive
channels (2533 and 1415 for LLaMA-2-7B), the entries at position 0 and at the position of that
sequence's largest |h| at that layer (when it is not 0), with 0 (``set_zero``) or with the
entries' mean values (``set_mean``: constants, one per position and channel, e.g. 767.6 at
position 0 and 2546.8 at the other position for channel 2533). Perplexity is then measured with
the hook in place; the paper's finding is that zeroing destroys the model while the means leave
it intact.

Here, for any model, on the run's own sequences:

- the layer is the first ``resid_post`` layer (0-based) holding Sun-massive entries (|a| > 100 and
  >= 1000 x that sequence's whole-tensor median, ``n_massive`` of ``massive_layers``); with none, the
  ``resid_post`` layer with the largest ``ratio_top1_median`` (recorded in ``layer_rule``), or the
  ``--intervene-layer`` given;
- the channels are those holding Sun-massive entries at that layer (most entries first); with
  none, the 2 channels with the largest max |a| there (their LLaMA-2 hooks change 2 channels);
- per sequence, the positions are 0 and the position of the largest |h| over the whole
  ``[positions, channels]`` tensor of that layer (their ``token_dim``, computed per row: their
  flat index over a batch is only right for batch size 1);
- ``mean`` sets each entry to the mean of that (position class, channel) entry over the run's
  sequences in the original forward (class ``first`` = position 0, ``peak`` = the largest-|h|
  position when it is not 0): their constants, measured in-sample rather than hard-coded;
- perplexity is exp(sum of next-token NLL / number of targets) over every real token, the
  original and each intervention on the same sequences. ``eval_ppl`` averages per-sequence mean
  losses of equal-length sequences, which is the same number for equal lengths (sun2024 chunks).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from probes.errors import DataError, unknown_name

INTERVENE_MODES = ("zero", "mean")
FALLBACK_N_CHANNELS = 2  # their LLaMA-2-7B / 13B hooks overwrite 2 channels
SUN_ABS = 100.0
SUN_RATIO = 1000.0


def parse_modes(modes: Sequence[str] | str | None) -> tuple[str, ...]:
    """``"zero,mean"`` or ``["zero", "mean"]`` -> ``("zero", "mean")`` (order kept, duplicates dropped)."""
    if modes is None:
        return ()
    items = modes.split(",") if isinstance(modes, str) else [p for m in modes for p in str(m).split(",")]
    out: list[str] = []
    for m in (s.strip() for s in items):
        if not m:
            continue
        if m not in INTERVENE_MODES:
            raise unknown_name("intervention", m, INTERVENE_MODES, error=DataError)
        if m not in out:
            out.append(m)
    return tuple(out)


def reference_layer(sites, rows: Sequence[dict[str, Any]], probes: dict[str, Any], layer: int | None = None,
                    option: str = "--intervene-layer") -> dict[str, Any]:
    """The layer, site and channels to intervene on (see the module docstring for the rule)."""
    resid = [s for s in sites if s.kind == "resid_post" and s.layer is not None]
    by_name = {r["canonical_name"]: r for r in rows}
    resid = [s for s in resid if s.canonical_name in by_name and s.canonical_name in probes]
    if not resid:
        raise DataError("the intervention and the attention analysis work on the residual stream after each block, "
                        "which this run did not measure", "add --kind resid_post (or drop --kind)")
    if layer is not None:
        hits = [s for s in resid if s.layer == layer]
        if not hits:
            have = sorted({s.layer for s in resid})
            raise DataError(f"{option} {layer} is not a layer of this model (its layers are {have[0]} to {have[-1]})",
                            f"use {option} {have[0]} to {have[-1]}, or leave it out (the first layer with massive "
                            "activations)")
        site, rule = hits[0], f"given ({option})"
    else:
        massive = [s for s in resid if by_name[s.canonical_name]["n_massive"] > 0]
        if massive:
            site, rule = massive[0], "first resid_post layer with Sun-massive entries"
        else:
            def ratio(s):
                v = by_name[s.canonical_name].get("ratio_top1_median")
                return v if v == v and v is not None else -1.0
            site = max(resid, key=ratio)
            rule = "no Sun-massive entries in any layer: the resid_post layer with the largest top1_mean / median_mean"
    p = probes[site.canonical_name]
    chans = p.massive_channels()
    if chans:
        channels = [c for c, _ in chans]
        channel_rule = "channels with Sun-massive entries at this layer, most entries first"
    else:
        import torch

        mx = p.state["chan_max_abs"].detach().cpu()
        channels = [int(c) for c in torch.argsort(mx, descending=True)[:FALLBACK_N_CHANNELS].tolist()]
        channel_rule = (f"no Sun-massive entries at this layer: the {FALLBACK_N_CHANNELS} channels with the "
                        "largest max |a|")
    return {"site": site, "layer": site.layer, "canonical_name": site.canonical_name,
            "module_path": site.module_path, "channels": channels, "layer_rule": rule, "channel_rule": channel_rule}


def peak_positions(y, valid):
    """Per row of ``y`` ``[B, T, C]``: the position of the largest |y| over the row's valid positions and
    every channel (ties: the first in (position, channel) order, as ``torch.sort``'s first index)."""
    a = y.detach().float().abs().amax(-1)  # [B, T]
    a = a.masked_fill(~valid, -1.0)
    return a.argmax(1)  # first maximum


def sun_massive_positions(y, valid):
    """``[B, T]`` bool: positions holding an entry with |a| > 100 and |a| >= 1000 x the lower median of |a|
    over that row's whole valid ``[positions, channels]`` tensor (Sun et al.'s rule, as ``massive_layers``)."""
    import torch

    a = y.detach().float().abs()
    out = torch.zeros(valid.shape, dtype=torch.bool, device=y.device)
    for b in range(a.shape[0]):
        v = a[b][valid[b]]
        if v.numel() == 0:
            continue
        flat = v.reshape(-1)
        med = flat.kthvalue((flat.numel() + 1) // 2).values
        hit = ((a[b] > SUN_ABS) & (a[b] >= SUN_RATIO * med)).any(-1) & valid[b]
        out[b] = hit
    return out


class InterventionHook:
    """Forward-hook function (``probes.hooks``) on the reference layer's output: records the entries'
    values (``mode`` ``original``) or overwrites them with 0 / their means (``zero`` / ``mean``)."""

    def __init__(self, channels: Sequence[int], mode: str, means: dict[str, Any] | None = None):
        import torch

        self.channels = torch.tensor(list(channels), dtype=torch.long)
        self.mode = mode
        self.means = means or {}  # class -> tensor [n_channels] (float64) or None
        self.valid = None  # [B, T] bool of the batch in flight (set by the forward)
        k = len(channels)
        self.sums = {c: torch.zeros(k, dtype=torch.float64) for c in ("first", "peak")}
        self.counts = {"first": 0, "peak": 0}
        self.peaks: list[int] = []

    def __call__(self, y, hc=None):
        import torch

        if y.dim() != 3:
            return None
        B, T, _ = y.shape
        valid = self.valid if self.valid is not None else torch.ones((B, T), dtype=torch.bool, device=y.device)
        valid = valid.to(y.device).bool()
        ch = self.channels.to(y.device)
        peak = peak_positions(y, valid)
        rows = valid[:, 0]  # rows with at least one token
        self.peaks += [int(p) for p, r in zip(peak.tolist(), rows.tolist()) if r]
        if self.mode == "original":
            for b in range(B):
                if not bool(rows[b]):
                    continue
                self.sums["first"] += y[b, 0, ch].detach().double().cpu()
                self.counts["first"] += 1
                if int(peak[b]) != 0:
                    self.sums["peak"] += y[b, int(peak[b]), ch].detach().double().cpu()
                    self.counts["peak"] += 1
            return None
        out = y.clone()
        for b in range(B):
            if not bool(rows[b]):
                continue
            p = int(peak[b])
            if p != 0:  # their order: the other position first, then position 0
                out[b, p, ch] = self._value("peak", out, ch)
            out[b, 0, ch] = self._value("first", out, ch)
        return out

    def _value(self, cls: str, out, ch):
        import torch

        if self.mode == "zero":
            return torch.zeros(len(ch), dtype=out.dtype, device=out.device)
        m = self.means.get(cls)
        if m is None:  # no sequence had this class in the original pass: fall back to the other class's means
            m = self.means.get("first" if cls == "peak" else "peak")
        return m.to(out.device, out.dtype)

    def mean_values(self) -> dict[str, Any]:
        return {c: (self.sums[c] / self.counts[c]) if self.counts[c] else None for c in self.sums}


class NllSum:
    """Sum of next-token NLL over real tokens (targets whose token and predecessor are both real)."""

    def __init__(self):
        self.nll = 0.0
        self.n = 0
        self.per_window: list[tuple[float, int]] = []

    def step(self, batch, out) -> None:
        import torch

        logits = out.logits if hasattr(out, "logits") else out[0]
        ids, att = batch.input_ids, batch.attention_mask.bool()
        lg = logits[:, :-1, :].float()
        tgt = ids[:, 1:]
        ok = att[:, 1:] & att[:, :-1]
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1),
                                                reduction="none").view(tgt.shape)
        nll = torch.where(ok, nll, torch.zeros_like(nll)).double()
        for b in range(nll.shape[0]):
            s, n = float(nll[b].sum()), int(ok[b].sum())
            self.per_window.append((s, n))
            self.nll += s
            self.n += n

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n) if self.n else math.nan


def run_intervention(loaded, sites, rows, probes, td, modes: Sequence[str], layer: int | None = None,
                     tick: Callable[[int], Any] | None = None, ref: dict[str, Any] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """PPL of the original model and of each intervention in ``modes`` on ``td``'s sequences.

    Returns (``massive_intervene`` rows, ``massive_intervene_values`` rows, manifest info)."""
    from probes.runner import TokenBatches, run

    if loaded.is_encoder_decoder or not loaded.is_causal_lm:
        raise DataError("--intervene measures next-token perplexity, which needs a causal language model",
                        "run massive without --intervene on this model")
    ref = ref or reference_layer(sites, rows, probes, layer)
    site = ref["site"]
    results: dict[str, NllSum] = {}
    hooks_by_mode: dict[str, InterventionHook] = {}
    means = None
    for mode in ("original", *modes):
        hook = InterventionHook(ref["channels"], mode, means)
        nll = NllSum()

        def forward(m, b, _hook=hook):
            from probes.runner import forward_batch

            _hook.valid = b.attention_mask.bool()
            return forward_batch(m, b, is_encoder_decoder=False, need_logits=True)

        run(loaded.model, td.batches(), fwd_hooks=[(site, hook)], adapter=TokenBatches(need_logits=True),
            forward=forward, step=nll.step, progress=tick)
        results[mode], hooks_by_mode[mode] = nll, hook
        if mode == "original":
            means = hook.mean_values()
    base = results["original"]
    out = []
    for mode, r in results.items():
        out.append({"mode": mode, "canonical_name": ref["canonical_name"], "module_path": ref["module_path"],
                    "layer": ref["layer"], "layer_1based": ref["layer"] + 1,
                    "channels": ",".join(str(c) for c in ref["channels"]), "n_channels": len(ref["channels"]),
                    "n_sequences": len(r.per_window), "n_targets": r.n, "nll_mean": r.nll / r.n if r.n else math.nan,
                    "ppl": r.ppl, "ppl_ratio": r.ppl / base.ppl if base.n else math.nan})
    vals = []
    orig = hooks_by_mode["original"]
    for cls in ("first", "peak"):
        m = means[cls] if means else None
        for j, c in enumerate(ref["channels"]):
            vals.append({"canonical_name": ref["canonical_name"], "layer": ref["layer"], "position_class": cls,
                         "channel": int(c), "n_sequences": orig.counts[cls],
                         "mean_value": float(m[j]) if m is not None else math.nan})
    peaks = orig.peaks
    info = {"reference": "locuslab/massive-activations main_llm.py --exp3, lib/hook.py Intervened_Layer.update, "
                         "lib/eval_utils.py eval_ppl",
            "modes": list(modes), "layer": ref["layer"], "canonical_name": ref["canonical_name"],
            "module_path": ref["module_path"], "layer_rule": ref["layer_rule"], "channels": ref["channels"],
            "channel_rule": ref["channel_rule"],
            "positions": "per sequence: 0 and the position of the largest |h| at this layer (when not 0)",
            "n_sequences_peak_not_first": sum(1 for p in peaks if p != 0),
            "mean_rule": "set_mean: per (position class, channel) mean of h over the run's sequences in the original "
                         "forward (in-sample; the reference hard-codes its means)",
            "ppl": "exp(sum of next-token NLL / number of targets), every real token (no --skip-first)",
            "ppl_original": base.ppl}
    return out, vals, info
