"""Attention on the massive-activation positions (Sun et al. 2024's exp4, "attention sinks").

Reference: locuslab/massive-activations ``main_llm.py --exp4`` with ``monkey_patch/modify_llama.py``
(``llama_custom_attention_forward``: ``attn_logits`` = q kᵀ / sqrt(head_dim) + the causal mask,
``attn_probs`` = its softmax in float32) and ``lib/plot_utils_llm.py`` (``plot_attn``: the logits of
one layer averaged over heads, lower triangle, for one prompt). The paper reads from these that
attention concentrates on the tokens holding massive activations (position 0 and the first
delimiter).

Here, per layer and head, on the run's sequences, pooled over the counted queries: with causal
attention (decoders: each query sees the keys up to itself) every real query at position >= 1 (query 0
can only attend to itself); with bidirectional attention (encoders, e.g. BERT: each query sees every
real key of its sequence) every real query, position 0 included. Which kind was read is the module's
own ``is_causal`` flag (transformers' attention modules carry it), else read off the probabilities
(no mass above the diagonal: causal); it goes into the ``attention_kind`` column and the manifest:

- ``attn_share_first``: mean attention probability on key position 0;
- ``attn_share_peak``: on the positions Sun's exp3 intervenes (0 and the position of the largest
  |h| at the reference layer, ``probes.massive_intervene.reference_layer``);
- ``attn_share_massive``: on the positions holding Sun-massive entries (|a| > 100 and >= 1000 x the
  sequence's whole-tensor median) at the reference layer (NaN when no sequence has any);
- ``uniform_share_first`` / ``uniform_share_peak``: the same shares if every query spread its
  attention uniformly over the keys it sees (the baseline a share should be compared with): causal,
  query q puts 1/(q+1) on each key 0..q; bidirectional, 1/(number of real keys of its sequence) on
  each of them, padding excluded;
- ``logit_first_mean``, ``logit_peak_mean``, ``logit_other_mean``: the mean attention logit
  (q·k x scaling, before the mask) on key 0, on the peak positions, and on every other visible key.

Non-causal models: Sun et al.'s code reads attention only for LLMs (the causal masks above); their
ViT code (``monkey_patch/modify_vit.py`` ``vit_custom_attention_forward``) computes the same
``attn_logits`` / ``attn_probs`` with no mask (every query sees every token) but plots none. For an
encoder, position 0 is [CLS] only when the sequences start with it (``--bos`` puts the tokenizer's
prefix token, [CLS] for BERT, at position 0); ``first_position`` in the manifest says which. The
prompt map (``massive_attention_prompt``) is the lower triangle (key <= query) for causal attention
and the full square for bidirectional attention.

Probabilities come from the model's own eager attention function (its modeling file's
``eager_attention_forward``), run through a custom ``transformers`` attention implementation for the
duration of the pass; logits are recomputed from the same q and k and checked against the
probabilities (softmax of logits + mask); a model whose attention is not plain softmax(q kᵀ) (logit
soft-capping, attention sinks) gets NaN logit columns and a note. Models whose attention does not go
through transformers' ``AttentionInterface`` cannot be measured (``ModelError``).
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterator

from probes.errors import ModelError
from probes.massive_intervene import check_attention_model, peak_positions, sun_massive_positions

CAPTURE_IMPL = "actsparse_capture"
SUN_ATTENTION_PROMPT = ("The following are multiple choice questions (with answers) about machine learning.\n\n "
                        "A 6-sided die is rolled 15 times and the results are: side 1 comes up 0 times;")  # --exp4
LOGIT_CHECK_TOL = {"float32": 1e-4, "float64": 1e-8}  # max |softmax(logits + mask) - probs|; else 1e-2
NOT_SUPPORTED_FIX = "run massive without --attention on this model"

_CURRENT: dict[str, Any] = {"fn": None}


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the module's own eager attention, plus a callback."""
    mod = sys.modules.get(type(module).__module__)
    eager = getattr(mod, "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"{type(module).__name__} has no eager attention function (eager_attention_forward) in "
                         f"{type(module).__module__}", NOT_SUPPORTED_FIX)
    out, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    fn = _CURRENT["fn"]
    if fn is not None:
        fn(module, query, key, attention_mask, scaling, probs)
    return out, probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_IMPL, eager_mask)


@contextlib.contextmanager
def eager_capture(model, fn: Callable) -> Iterator[None]:
    """Run ``model`` with its eager attention, calling ``fn(module, q, k, mask, scaling, probs)`` at every
    attention call; the model's attention implementation is restored on exit."""
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None) if config is not None else None
    if setter is None or config is None:
        raise ModelError("--attention needs a transformers model whose attention implementation can be switched to "
                         "eager (to read attention probabilities); this model is not one", NOT_SUPPORTED_FIX)
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        raise ModelError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface, so its attention probabilities cannot be read", NOT_SUPPORTED_FIX)
    _register()
    _CURRENT["fn"] = fn
    try:
        setter(CAPTURE_IMPL)
        yield
    finally:
        _CURRENT["fn"] = None
        if old is not None:
            setter(old)


def attention_logits(module, query, key, scaling):
    """q kᵀ x scaling in float32, with grouped key heads repeated as ``repeat_kv`` does."""
    import torch

    hq, hk = query.shape[1], key.shape[1]
    if hk != hq:
        key = key.repeat_interleave(hq // hk, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(float(scaling))  # in place: same values


CAUSAL, BIDIRECTIONAL = "causal", "bidirectional"
HEAD_GROUP_BYTES = 64 << 20  # AttentionShares.on_attention works on as many heads as fit a [B, heads, T, T] float32 of this


def attention_kind(module, probs, valid) -> str:
    """``causal`` or ``bidirectional``: the attention module's own ``is_causal`` flag when it has one (transformers'
    attention modules do), else read off ``probs`` ``[B, H, T, T]``: no probability above the diagonal between
    real tokens (``valid`` ``[B, T]``) means causal."""
    import torch

    flag = getattr(module, "is_causal", None)
    if isinstance(flag, bool):
        return CAUSAL if flag else BIDIRECTIONAL
    T = probs.shape[-1]
    upper = torch.ones(T, T, dtype=torch.bool, device=probs.device).triu(1)
    pair = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, Tq, Tk]
    return BIDIRECTIONAL if bool((probs.float() * pair[:, None]).abs().amax() > 0) else CAUSAL


def visible_keys(kind: str, valid, qmask):
    """``[B, Tq, Tk]`` bool: the keys each counted query sees (causal: real keys up to itself; bidirectional: every
    real key of its sequence)."""
    import torch

    T = valid.shape[1]
    if kind == CAUSAL:
        ar = torch.arange(T, device=valid.device)
        return (ar[None, :] <= ar[:, None])[None] & qmask[:, :, None] & valid[:, None, :]
    return qmask[:, :, None] & valid[:, None, :]


def counted_queries(kind: str, valid):
    """``[B, T]`` bool: the queries a share is pooled over (causal: real queries at position >= 1, query 0 sees only
    itself; bidirectional: every real query)."""
    qmask = valid.clone()
    if kind == CAUSAL:
        qmask[:, 0] = False
    return qmask


class _Layer:
    """Per-layer column sums of one batch: [B, H, T] probability mass and logit sums per key."""

    def __init__(self, p_col, l_col, logits_ok):
        self.p_col, self.l_col, self.logits_ok = p_col, l_col, logits_ok


class AttentionShares:
    """Streaming per-(layer, head) shares and mean logits; ``begin(valid)`` before a forward, ``end(sets)`` after."""

    def __init__(self):
        self.layers: list[_Layer] = []
        self.valid = None
        self.acc: dict[int, dict[str, Any]] = {}
        self.n_seq = 0
        self.n_seq_with_massive = 0
        self.logits_ok = True
        self.max_logit_gap = 0.0
        self.kind: str | None = None  # CAUSAL or BIDIRECTIONAL, from the first attention call

    def begin(self, valid) -> None:
        self.valid = valid.bool()
        self.layers = []

    def on_attention(self, module, query, key, mask, scaling, probs) -> None:
        import torch

        B, H, T, S = probs.shape
        valid = self.valid.to(probs.device)
        if valid.shape != (B, T) or S != T:
            raise ModelError(f"attention of shape {tuple(probs.shape)} does not match the batch {tuple(valid.shape)} "
                             "(cross-attention or a key/value cache)", NOT_SUPPORTED_FIX)
        kind = attention_kind(module, probs, valid)
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise ModelError(f"this model mixes {self.kind} and {kind} attention layers, which one table cannot "
                             "pool", NOT_SUPPORTED_FIX)
        qmask = counted_queries(kind, valid)  # causal: query 0 sees only itself and is not counted
        floating = mask is not None and torch.is_tensor(mask) and mask.is_floating_point()
        checked = floating or (mask is None and kind == BIDIRECTIONAL)  # no mask: bidirectional without padding
        vis = visible_keys(kind, valid, qmask)  # [B, Tq, Tk]
        hq, hk = query.shape[1], key.shape[1]
        keys = key.repeat_interleave(hq // hk, dim=1) if hk != hq else key  # as attention_logits does
        # A few heads at a time: every [B, heads, T, T] temporary below (the masked probabilities, the logits,
        # their softmax, the differences) is one group's, not all heads' (9 heads x 4096^2 floats: 604 MB each).
        # Each head's numbers are computed alone either way, so the sums are the same.
        step = max(1, HEAD_GROUP_BYTES // max(1, B * T * S * 4))
        p_cols, l_cols, gap = [], [], 0.0
        for h0 in range(0, H, step):
            h = slice(h0, min(H, h0 + step))
            pr = probs[:, h].float()
            p_cols.append((pr * qmask[:, None, :, None]).sum(2))  # [B, h, T]: mass each key gets from counted queries
            logits = attention_logits(module, query[:, h], keys[:, h], scaling)  # [B, h, T, T]
            if checked:
                if floating:
                    m = mask[..., :T, :T]
                    m = m[:, h] if m.dim() == 4 and m.shape[1] == H > 1 else m  # a per-head mask: this group's
                check = torch.softmax(logits + m.float() if floating else logits, dim=-1)
                # in place on the softmax's own buffer (the same values as out of place, no more [B, h, T, T])
                gap = max(gap, float(check.sub_(pr).abs_().masked_fill_(~valid[:, None, :, None], 0).max()))
                del check
            l_cols.append(logits.mul_(vis[:, None]).sum(2))  # [B, h, T]; logits is ours: multiplied in place
            del pr, logits
        p_col, l_col = torch.cat(p_cols, 1), torch.cat(l_cols, 1)
        ok = False
        if checked:
            tol = LOGIT_CHECK_TOL.get(str(probs.dtype).replace("torch.", ""), 1e-2)
            self.max_logit_gap = max(self.max_logit_gap, gap)
            ok = gap <= tol
        self.layers.append(_Layer(p_col, l_col, ok))
        self.logits_ok = self.logits_ok and ok

    def end(self, peak_set, massive_set) -> None:
        """Combine this batch's column sums with its position sets (``[B, T]`` bool each)."""
        import torch

        if not self.layers:
            raise ModelError("no attention call was seen in the forward: this model's attention does not go through "
                             "transformers' AttentionInterface", NOT_SUPPORTED_FIX)
        valid = self.valid
        B, T = valid.shape
        dev = self.layers[0].p_col.device
        valid = valid.to(dev)
        kind = self.kind or CAUSAL
        qmask = counted_queries(kind, valid)
        first = torch.zeros((B, T), dtype=torch.bool, device=dev)
        first[:, 0] = valid[:, 0]
        peak, mass = peak_set.to(dev) & valid, massive_set.to(dev) & valid
        other = valid & ~peak
        ar = torch.arange(T, device=dev)
        vis = visible_keys(kind, valid, qmask)
        n_vis = vis.sum(1).double()  # [B, T]: counted queries that see each key
        n_q = float(qmask.sum())
        if kind == CAUSAL:
            # uniform baseline: a query q spreads 1/(q+1) on each key it sees
            inv = torch.where(qmask, 1.0 / (ar[None, :] + 1.0), torch.zeros((), device=dev)).double()  # [B, Tq]
            uni = {k: float((inv * (s.double().cumsum(1))).sum()) for k, s in (("first", first), ("peak", peak))}
        else:
            # uniform baseline: a query spreads 1/n on each of the n real keys of its sequence (padding excluded)
            n_keys = valid.sum(1, keepdim=True).double().clamp(min=1)  # [B, 1]
            inv = torch.where(qmask, 1.0 / n_keys, torch.zeros((), device=dev, dtype=torch.float64))  # [B, Tq]
            uni = {k: float((inv * s.double().sum(1, keepdim=True)).sum()) for k, s in (("first", first),
                                                                                         ("peak", peak))}
        self.n_seq += int(valid[:, 0].sum())
        self.n_seq_with_massive += int(mass.any(1).sum())
        for li, L in enumerate(self.layers):
            a = self.acc.setdefault(li, {k: torch.zeros(L.p_col.shape[1], dtype=torch.float64) for k in (
                "p_first", "p_peak", "p_massive", "l_first", "l_peak", "l_other")} | {
                "n_q": 0.0, "n_first": 0.0, "n_peak": 0.0, "n_other": 0.0, "u_first": 0.0, "u_peak": 0.0})
            pc, lc = L.p_col.double(), L.l_col.double()
            for name, s in (("first", first), ("peak", peak), ("massive", mass)):
                a[f"p_{name}"] += (pc * s[:, None, :]).sum((0, 2)).cpu()
            for name, s in (("first", first), ("peak", peak), ("other", other)):
                a[f"l_{name}"] += (lc * s[:, None, :]).sum((0, 2)).cpu()
                a[f"n_{name}"] += float((n_vis * s).sum())
            a["n_q"] += n_q
            a["u_first"] += uni["first"]
            a["u_peak"] += uni["peak"]
        self.layers = []

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for li in sorted(self.acc):
            a = self.acc[li]
            nq = a["n_q"]
            H = a["p_first"].numel()
            for h in range(H):
                def share(k):
                    return float(a[k][h]) / nq if nq else math.nan

                def logit(k):
                    n = a[f"n_{k}"]
                    return float(a[f"l_{k}"][h]) / n if (n and self.logits_ok) else math.nan

                out.append({"layer": li, "layer_1based": li + 1, "head": h, "n_sequences": self.n_seq,
                            "n_queries": int(nq), "attn_share_first": share("p_first"),
                            "attn_share_peak": share("p_peak"),
                            "attn_share_massive": share("p_massive") if self.n_seq_with_massive else math.nan,
                            "uniform_share_first": a["u_first"] / nq if nq else math.nan,
                            "uniform_share_peak": a["u_peak"] / nq if nq else math.nan,
                            "logit_first_mean": logit("first"), "logit_peak_mean": logit("peak"),
                            "logit_other_mean": logit("other"),
                            "n_seq_with_massive": self.n_seq_with_massive, "attention_kind": self.kind or CAUSAL})
        return out


def run_attention(loaded, ref: dict[str, Any], td, tick: Callable[[int], Any] | None = None,
                  prompt: str | None = None, bos: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                          dict[str, Any]]:
    """Per (layer, head) attention shares on the run's sequences, and the head-mean logits and probabilities of
    ``prompt`` (default: Sun's exp4 prompt) per layer. Returns (``massive_attention`` rows,
    ``massive_attention_prompt`` rows, manifest info)."""
    from probes.runner import forward_batch, run

    check_attention_model(loaded)
    site = ref["site"]
    shares = AttentionShares()
    sets: dict[str, Any] = {}

    def at_layer(y, hc=None):
        if y.dim() == 3:
            import torch

            valid = shares.valid.to(y.device)
            pk = peak_positions(y, valid)
            rows = torch.arange(y.shape[0], device=y.device)
            peak = torch.zeros_like(valid)
            peak[:, 0] = valid[:, 0]
            peak[rows, pk] = peak[rows, pk] | valid[rows, pk]
            sets["peak"], sets["massive"] = peak, sun_massive_positions(y, valid)
        return None

    def forward(m, b):
        shares.begin(b.attention_mask.bool())
        sets.clear()
        return forward_batch(m, b, is_encoder_decoder=False)

    def step(b, out):
        if "peak" not in sets:
            raise ModelError(f"the reference layer {ref['canonical_name']} was not called in the forward",
                             NOT_SUPPORTED_FIX)
        shares.end(sets["peak"], sets["massive"])

    with eager_capture(loaded.model, shares.on_attention):
        run(loaded.model, td.batches(), fwd_hooks=[(site, at_layer)], forward=forward, step=step, progress=tick)
        prompt_rows, prompt_info = _prompt_attention(loaded, prompt or SUN_ATTENTION_PROMPT, bos, shares.kind)
    kind = shares.kind or CAUSAL
    causal = kind == CAUSAL
    info = {"reference": "locuslab/massive-activations main_llm.py --exp4, monkey_patch/modify_llama.py "
                         "llama_custom_attention_forward (attn_logits, attn_probs), lib/plot_utils_llm.py plot_attn"
                         + ("" if causal else "; unmasked (bidirectional) attention as monkey_patch/modify_vit.py "
                            "vit_custom_attention_forward"),
            "reference_layer": ref["layer"], "canonical_name": ref["canonical_name"],
            "layer_rule": ref["layer_rule"],
            "attention_kind": kind,
            "attention_kind_rule": "the attention modules' is_causal flag (else: no probability above the diagonal "
                                   "between real tokens = causal)",
            "first_position": first_position(loaded, bos),
            "queries": ("every real query at position >= 1, pooled over sequences" if causal else
                        "every real query (position 0 included: bidirectional attention), pooled over sequences"),
            "sets": {"first": "key position 0",
                     "peak": "key 0 and the position of the largest |h| at the reference layer (Sun's exp3 positions)",
                     "massive": "keys holding Sun-massive entries at the reference layer"},
            "uniform": ("share if each query q spread 1/(q+1) on every key it sees" if causal else
                        "share if each query spread 1/n on each of the n real keys of its sequence (padding "
                        "excluded)"),
            "prompt_map": "lower triangle (key <= query)" if causal else "full square (every query, every key)",
            "logits": ("q k^T x scaling (the model's eager attention), checked against its probabilities"
                       if shares.logits_ok else "not plain softmax(q k^T x scaling + mask) for this model: logit "
                       "columns are NaN"),
            "max_prob_gap_of_logits": shares.max_logit_gap,
            "n_sequences": shares.n_seq, "n_seq_with_massive": shares.n_seq_with_massive, **prompt_info}
    return shares.rows(), prompt_rows, info


def first_position(loaded, bos: bool) -> str:
    """What position 0 of the run's sequences holds, for the manifest and summary."""
    from probes import corpus as corpus_mod

    tok = loaded.tokenizer
    if bos and tok is not None:
        pre = corpus_mod.prefix_token(tok)
        if pre is not None:
            try:
                text = tok.decode([int(pre)])
            except Exception:
                text = str(pre)
            return f"the prefix token {text} (--bos)"
    return "the first token of each sequence (no special tokens added)"


def _prompt_attention(loaded, prompt: str, bos: bool, kind: str | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One forward of ``prompt`` (already inside ``eager_capture``): per layer, head-mean logits and
    probabilities for every (query, key) with key <= query (their plot_attn: ``attn_logits[0].mean(0)``), every
    key for bidirectional attention (``kind``)."""
    import torch

    from probes import corpus as corpus_mod
    from probes.data import sequence_windows
    from probes.massive_presets import _tokenize

    def decode_token(tokenizer, tid):
        try:
            return tokenizer.decode([int(tid)])
        except Exception:
            return str(tid)

    tok = loaded.tokenizer
    ids = _tokenize(tok, prompt)
    if bos:
        pre = corpus_mod.prefix_token(tok)
        ids = ([pre] if pre is not None else []) + ids
    limit = loaded.max_length
    if limit:
        ids = ids[:limit]
    kept: list[tuple[Any, Any]] = []

    def grab(module, query, key, mask, scaling, probs):
        kept.append((attention_logits(module, query, key, scaling)[0].mean(0).cpu(), probs[0].float().mean(0).cpu()))

    prev = _CURRENT["fn"]
    _CURRENT["fn"] = grab
    try:
        batch = next(corpus_mod.batches(sequence_windows([ids]), 1, 0, loaded.device))
        with torch.inference_mode():
            from probes.runner import forward_batch

            forward_batch(loaded.model, batch, is_encoder_decoder=False)
    finally:
        _CURRENT["fn"] = prev
    toks = [decode_token(tok, t) for t in ids]
    rows = []
    square = kind == BIDIRECTIONAL
    for li, (lg, pr) in enumerate(kept):
        T = lg.shape[0]
        for q in range(T):
            for k in range(T if square else q + 1):
                rows.append({"layer": li, "query": q, "key": k, "query_token": toks[q], "key_token": toks[k],
                             "logit_mean": float(lg[q, k]), "prob_mean": float(pr[q, k])})
    return rows, {"prompt": prompt, "prompt_tokens": len(ids)}
