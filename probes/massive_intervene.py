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

Sequence classifiers (``...ForSequenceClassification``, e.g. a BERT encoder with a linear probe from
``actsparse fit-head``), with ``--data FILE.jsonl --labels FIELD``: the same layer, channels and
positions rule (the layer and channels from the massive statistics of the run's own sequences, as
above; per example, position 0 = [CLS] and the example's largest-|h| position at that layer), applied
to each labelled example (one example per row, tokenized with the tokenizer's special tokens,
truncated at ``--max-length`` or the model's limit); ``mean`` uses the means of those entries over
the examples in the original forward. Quality is what Sun et al. measure on their non-causal models
(main_vit.py ``--exp3`` with lib/eval_utils.py ``test_imagenet``: top-1 accuracy of the classifier,
original vs intervened, on the same examples) plus the mean cross-entropy against the labels:
``ce_mean`` (natural log, mean over examples), ``loss_ratio`` = exp(ce_mean - ce_mean of the original),
``accuracy`` (argmax = label) and ``accuracy_drop`` = original accuracy - this accuracy. Their ViT
intervention itself differs (lib/eval_utils.py ``fix_reg_mean``: the register tokens' whole feature
vectors, at the input of every block, set to means over 10k training images; no ``set_zero``); the
LLM rule above is the one used here. A model with neither a causal-LM head nor a classification head
(a bare encoder) has no quality measure and is refused; no surrogate loss is substituted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from probes.errors import DataError, unknown_name
from probes.selection import kth_smallest_rows

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


QUALITY_PPL, QUALITY_CLASSIFICATION = "perplexity", "classification"
FIT_HEAD_FIX = ("make it a classifier with `actsparse fit-head`, then run massive on the folder it writes with "
                "--data FILE.jsonl --labels FIELD --intervene zero,mean (no surrogate loss is substituted)")
LABELLED_BATCH_SIZE = 8  # labelled examples per batch when --batch-size is not given (padding is masked)


def intervene_quality(loaded, labels: str | None) -> str:
    """How ``--intervene`` measures quality on ``loaded``: ``perplexity`` (a causal LM, no labels) or
    ``classification`` (a sequence classifier with ``labels``); a ``ModelError`` / ``DataError`` before any batch
    for every other case."""
    from probes.errors import ModelError
    from probes.loss import model_head

    name = type(loaded.model).__name__
    if loaded.is_encoder_decoder:
        raise ModelError(f"--intervene measures a causal LM's perplexity or a classifier's accuracy; {name} is an "
                         "encoder-decoder", "run massive without --intervene on this model")
    head = model_head(loaded.model)
    if head == "classification":
        if not labels:
            raise DataError(f"--intervene on {name} (a sequence classifier) measures cross-entropy and accuracy "
                            "against labels, and no --labels was given",
                            "pass --data FILE.jsonl --labels FIELD (the .jsonl field holding each example's label)")
        return QUALITY_CLASSIFICATION
    if labels:
        raise DataError(f"--labels gives a sequence classifier's labels; {name} is "
                        + ("a causal language model, whose --intervene measures perplexity" if loaded.is_causal_lm
                           else "not a sequence classifier"),
                        "drop --labels" if loaded.is_causal_lm else FIT_HEAD_FIX)
    if loaded.is_causal_lm:
        return QUALITY_PPL
    raise ModelError(f"--intervene compares the model's quality with and without its massive activations, and {name} "
                     "has no causal-LM head and no classification head (a bare encoder has no loss on text)",
                     FIT_HEAD_FIX)


def check_attention_model(loaded) -> None:
    """ModelError before any batch for a model whose self-attention ``--attention`` (``probes.attention_sinks``)
    cannot read (encoder-decoders: cross-attention and two stacks); causal decoders and bidirectional encoders pass."""
    from probes.errors import ModelError

    if loaded.is_encoder_decoder:
        raise ModelError("--attention reads one stack's self-attention (causal decoders, bidirectional encoders); "
                         "this model is an encoder-decoder", "run massive without --attention on this model")


def prepare_intervention(loaded, opts, modes: Sequence[str]) -> "LabelledData | None":
    """What ``massive`` checks before any batch for ``--intervene`` / ``--attention`` / ``--labels``: the refusals
    (``intervene_quality``, ``check_attention_model``) and, for a classifier, its labelled
    examples (read now, so a bad file fails before the model runs). None unless a classifier is intervened on."""
    labels = getattr(opts, "labels", None)
    if labels and not modes:
        raise DataError("--labels gives the labels of --intervene on a sequence classifier, and no --intervene was "
                        "given", "add --intervene zero,mean, or drop --labels")
    if getattr(opts, "attention", False):
        check_attention_model(loaded)
    if not modes:
        return None
    if intervene_quality(loaded, labels) == QUALITY_PPL:
        return None
    return LabelledData(loaded, opts)


class LabelledData:
    """The labelled examples of ``--data FILE.jsonl --labels FIELD``, read before any batch (``probes.loss``)."""

    def __init__(self, loaded, opts):
        from types import SimpleNamespace

        from probes.data import resolve_max_length
        from probes.loss import drop_head_fit_examples, first_examples_within, labeled_examples

        self.max_length = resolve_max_length(loaded, opts.max_length)
        examples, fit_note = drop_head_fit_examples(loaded, opts, labeled_examples(opts, loaded))
        # --max-tokens caps the labelled examples as it does for cliff, grad and flatness: the first ones whose
        # real tokens fit
        self.examples, cut_note = first_examples_within(examples, loaded.tokenizer, self.max_length,
                                                        getattr(opts, "max_tokens", None))
        self.note = "; ".join(n for n in (fit_note, cut_note) if n) or None
        self.batch_size = opts.batch_size or LABELLED_BATCH_SIZE
        self.loaded = loaded
        self._opts = SimpleNamespace(batch_size=self.batch_size)
        self.labels_field = opts.labels
        self.corpus = opts.data

    def n_batches(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def batches(self):
        from probes.loss import labeled_text_batches

        return labeled_text_batches(self.examples, self._opts, self.loaded, self.max_length)

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "labels_field": self.labels_field, "n_examples": len(self.examples),
                **({"left_out": self.note} if self.note else {}),
                "max_length": self.max_length, "batch_size": self.batch_size,
                "tokenization": "one example per row with the tokenizer's special tokens ([CLS] ... [SEP] for "
                                "BERT), truncated at max_length, right padding masked"}


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
        flat = v.reshape(1, -1)
        nan_free = bool(torch.isfinite(flat.amax()))  # amax propagates NaN (an inf takes torch's call too)
        med = kth_smallest_rows(flat, (flat.numel() + 1) // 2, nan_free)[0].to(flat.device)
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


class ClassifierLoss:
    """Cross-entropy against the labels and top-1 correctness, per example (``batch.labels`` ``[B]``)."""

    def __init__(self):
        self.ce: list[float] = []
        self.correct: list[bool] = []

    def step(self, batch, out) -> None:
        import torch

        logits = out.logits if hasattr(out, "logits") else out[0]
        lg = logits.float()
        if lg.dim() != 2:
            raise DataError(f"the classifier gave logits of shape {tuple(lg.shape)}, not [batch, classes]",
                            "give a ...ForSequenceClassification checkpoint")
        lab = batch.labels.to(lg.device)
        ce = torch.nn.functional.cross_entropy(lg, lab, reduction="none").double()
        self.ce += [float(v) for v in ce.cpu()]
        self.correct += [bool(v) for v in (lg.argmax(-1) == lab).cpu()]

    @property
    def n(self) -> int:
        return len(self.ce)

    @property
    def ce_mean(self) -> float:
        return math.fsum(self.ce) / self.n if self.n else math.nan

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / self.n if self.n else math.nan


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
                     tick: Callable[[int], Any] | None = None, ref: dict[str, Any] | None = None,
                     labelled: LabelledData | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """PPL of the original model and of each intervention in ``modes`` on ``td``'s sequences; with ``labelled``
    (a sequence classifier), cross-entropy and accuracy on its examples instead.

    Returns (``massive_intervene`` rows, ``massive_intervene_values`` rows, manifest info)."""
    if labelled is not None:
        return _run_classifier_intervention(loaded, sites, rows, probes, labelled, modes, layer, tick, ref)
    if loaded.is_encoder_decoder or not loaded.is_causal_lm:
        raise DataError("--intervene measures next-token perplexity, which needs a causal language model",
                        "run massive without --intervene on this model")
    ref = ref or reference_layer(sites, rows, probes, layer)
    results, hooks_by_mode, means = _intervened_passes(loaded, ref["site"], ref["channels"], td.batches, modes,
                                                       NllSum, tick)
    base = results["original"]
    out = []
    for mode, r in results.items():
        out.append({"mode": mode, **_layer_columns(ref),
                    "n_sequences": len(r.per_window), "n_targets": r.n, "nll_mean": r.nll / r.n if r.n else math.nan,
                    "ppl": r.ppl, **_lm_bars("ppl", r, None),
                    "ppl_ratio": r.ppl / base.ppl if base.n else math.nan, **_lm_bars("ppl_ratio", r, base)})
    vals = _values_rows(ref, hooks_by_mode, means)
    peaks = hooks_by_mode["original"].peaks
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
            "error_bars": ERROR_BARS,
            "ppl_original": base.ppl}
    return out, vals, info


def _intervened_passes(loaded, site, channels, batches, modes, make_quality, tick):
    """The original forward and one per mode over ``batches()`` (a fresh iterator each), the hook on ``site``;
    the means of ``mean`` come from the original pass. Returns (quality per mode, hook per mode, means)."""
    from probes.runner import TokenBatches, forward_batch, run

    results: dict[str, Any] = {}
    hooks: dict[str, InterventionHook] = {}
    means = None
    for mode in ("original", *modes):
        hook = InterventionHook(channels, mode, means)
        quality = make_quality()

        def forward(m, b, _hook=hook):
            _hook.valid = b.attention_mask.bool()
            return forward_batch(m, b, is_encoder_decoder=False, need_logits=True)

        run(loaded.model, batches(), fwd_hooks=[(site, hook)], adapter=TokenBatches(need_logits=True),
            forward=forward, step=quality.step, progress=tick)
        results[mode], hooks[mode] = quality, hook
        if mode == "original":
            means = hook.mean_values()
    return results, hooks, means


def _values_rows(ref, hooks, means) -> list[dict[str, Any]]:
    orig = hooks["original"]
    vals = []
    for cls in ("first", "peak"):
        m = means[cls] if means else None
        for j, c in enumerate(ref["channels"]):
            vals.append({"canonical_name": ref["canonical_name"], "layer": ref["layer"], "position_class": cls,
                         "channel": int(c), "n_sequences": orig.counts[cls],
                         "mean_value": float(m[j]) if m is not None else math.nan})
    return vals


def _layer_columns(ref: dict) -> dict:
    """The intervened layer's identity columns of an intervention row (the same for LMs and classifiers)."""
    return {"canonical_name": ref["canonical_name"], "module_path": ref["module_path"], "layer": ref["layer"],
            "layer_1based": ref["layer"] + 1, "channels": ",".join(str(c) for c in ref["channels"]),
            "n_channels": len(ref["channels"])}


ERROR_BARS = ("error bars over sequences (examples for a classifier), paired: every mode runs on the same ones, so "
              "a ratio's resamples take the same sequences in both passes; _se analytic (delta method for ppl, "
              "ppl_ratio and loss_ratio), _lo / _hi the seeded percentile bootstrap (probes.uncertainty)")


def _lm_bars(name: str, r: NllSum, base: NllSum | None) -> dict[str, float]:
    """``ppl`` (base None: exp(sum NLL / sum targets) over sequences) or ``ppl_ratio`` (exp of the paired per-sequence
    NLL difference over the targets) with its ``_se`` / ``_lo`` / ``_hi``."""
    from probes.uncertainty_extra import exp_ratio_bars

    nll = [s for s, _ in r.per_window]
    n = [k for _, k in r.per_window]
    if base is not None:
        if [k for _, k in base.per_window] != n:
            raise AssertionError("the intervened pass did not see the original pass's sequences")
        nll = [a - b for a, (b, _) in zip(nll, base.per_window)]
    return exp_ratio_bars(name, nll, n)


def _classifier_bars(r: ClassifierLoss, base: ClassifierLoss) -> dict[str, float]:
    """``loss_ratio`` (paired per-example CE difference), ``accuracy`` and ``accuracy_drop`` with their error bars,
    each metric column followed by its ``_se`` / ``_lo`` / ``_hi``."""
    import numpy as np

    from probes.uncertainty import bar_column
    from probes.uncertainty_extra import exp_ratio_bars, ratio_bars

    if len(r.ce) != len(base.ce):
        raise AssertionError("the intervened pass did not see the original pass's examples")
    ones = np.ones(len(r.ce))
    ratio = exp_ratio_bars("loss_ratio", np.subtract(r.ce, base.ce), ones)
    right = np.asarray(r.correct, dtype=float)
    drop = np.asarray(base.correct, dtype=float) - right
    acc = ratio_bars(["accuracy", "accuracy_drop"], np.stack([right, drop], 1), np.ones((len(r.ce), 2)))
    out: dict[str, float] = dict(ratio)
    for col, value in (("accuracy", r.accuracy), ("accuracy_drop", base.accuracy - r.accuracy)):
        out[col] = value
        out.update({bar_column(col, s): acc[bar_column(col, s)] for s in ("_se", "_lo", "_hi")})
    return out


def _run_classifier_intervention(loaded, sites, rows, probes, labelled: LabelledData, modes, layer, tick, ref):
    """``run_intervention`` for a sequence classifier: cross-entropy and accuracy on the labelled examples."""
    ref = ref or reference_layer(sites, rows, probes, layer)
    results, hooks, means = _intervened_passes(loaded, ref["site"], ref["channels"], labelled.batches, modes,
                                               ClassifierLoss, tick)
    base = results["original"]
    out = []
    for mode, r in results.items():
        out.append({"mode": mode, **_layer_columns(ref),
                    "n_sequences": r.n, "ce_mean": r.ce_mean,
                    "loss_ratio": math.exp(r.ce_mean - base.ce_mean) if base.n else math.nan,
                    **_classifier_bars(r, base)})
    peaks = hooks["original"].peaks
    info = {"reference": "locuslab/massive-activations main_llm.py --exp3 with lib/hook.py Intervened_Layer.update "
                         "(positions and channels); quality as main_vit.py --exp3, lib/eval_utils.py test_imagenet "
                         "(top-1 accuracy, original vs intervened), plus mean cross-entropy against the labels",
            "quality": QUALITY_CLASSIFICATION, "modes": list(modes), "layer": ref["layer"],
            "canonical_name": ref["canonical_name"], "module_path": ref["module_path"],
            "layer_rule": ref["layer_rule"] + " (from the run's own sequences)", "channels": ref["channels"],
            "channel_rule": ref["channel_rule"],
            "positions": "per example: 0 ([CLS] for BERT-style tokenizers) and the position of the largest |h| at this "
                         "layer (when not 0)",
            "n_sequences_peak_not_first": sum(1 for p in peaks if p != 0),
            "mean_rule": "set_mean: per (position class, channel) mean of h over the labelled examples in the original "
                         "forward (in-sample; the reference hard-codes its means)",
            "columns": {"ce_mean": "mean over examples of the cross-entropy (natural log) against the label",
                        "loss_ratio": "exp(ce_mean - ce_mean of the original)",
                        "accuracy": "share of examples whose argmax logit is the label",
                        "accuracy_drop": "original accuracy - this accuracy"},
            "error_bars": ERROR_BARS,
            "examples": labelled.describe(),
            "ce_original": base.ce_mean, "accuracy_original": base.accuracy}
    return out, _values_rows(ref, hooks, means), info
