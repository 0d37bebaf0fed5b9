"""The loss that gradient sparsity differentiates, and the labeled data some losses need.

``causal_lm`` = next-token cross-entropy on the counted positions (``Batch.labels``, -100 elsewhere,
no extra shift); ``mlm`` = BERT masked-LM cross-entropy with 15 % of positions masked (80/10/10,
seeded) for models with a masked-LM head; ``classification`` = cross-entropy against labels (image
folders, or ``--labels FIELD`` of a .jsonl for sequence classifiers). ``auto`` picks by the model's
head and the data; a model with no loss on the data is refused (ModelError), never given a
surrogate. ``none`` (only when asked) means forward passes only.

Reduction (``REDUCTIONS``, default ``mean``): the loss of one batch is the MEAN over that batch's
loss targets (positions with a label, or images), the training loss as cdgyp/sparsity computes it
(T5: the model's ``CrossEntropyLoss(ignore_index=-100)``; ImageNet: ``nn.CrossEntropyLoss()``,
codes/scripts/imagenet1k/imagenet1k.py ``train_one_epoch``), whose ``EffectiveGradientSparsity``
(codes/modules/hooks.py) compares |eta| with absolute thresholds. ``sum`` gives every target weight 1:
eta is then (mean-reduction eta) x (targets in the batch), so eta and every ``eff_grad_sparsity@tau``
depend on the reduction and on the number of targets per batch.
"""

from __future__ import annotations

from typing import Any

from probes.errors import DataError, ModelError

MLM_PROB = 0.15
LOSSES = ("auto", "causal_lm", "mlm", "classification", "none")
REDUCTIONS = ("mean", "sum")
DEFAULT_REDUCTION = "mean"  # cdgyp/sparsity: the training loss, a mean over the batch's targets


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
                  "…ForImageClassification with labels), or run `actsparse grad --loss none` for the "
                  "forward-only derivative statistics; actsparse never substitutes a surrogate loss")
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
                                 "use imagefolder:DIR with DIR/CLASS/IMAGE files, or `actsparse grad --loss none` for "
                                 "the forward-only act'(h) statistics")
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


def labeled_examples(opts: Any, loaded) -> list[tuple[str, int]]:
    """``(text, label id)`` per line of a .jsonl of labeled documents for a sequence classifier
    (read with the corpus reader: line by line, strict encoding, regular files only). ``opts``: the
    analysis' options (``data``, ``encoding``, ``text_field``, ``labels``)."""
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


def labeled_text_batches(ex: list[tuple[str, int]], opts: Any, loaded, max_length: int):
    """Batches of labeled examples for a sequence classifier: one example per row, truncated."""
    import torch

    from probes.corpus import Batch

    tok = loaded.tokenizer
    for i in range(0, len(ex), opts.batch_size):
        group = ex[i:i + opts.batch_size]
        enc = tok([t for t, _ in group], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        att = enc["attention_mask"]
        yield Batch(enc["input_ids"].to(loaded.device), att.to(loaded.device), att.bool().to(loaded.device),
                    torch.tensor([lab for _, lab in group], dtype=torch.long, device=loaded.device))




HEAD_RECORD = "actsparse_head.json"  # written by `actsparse fit-head` (reports/head_checkpoint.py)


def file_sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def drop_head_fit_examples(loaded, opts: Any, examples: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], str | None]:
    """Leave out the examples a linear-probe head was fitted on, for analyses that measure quality.

    A classifier made by ``actsparse fit-head`` records (``actsparse_head.json`` in its folder) the corpus
    it was fitted on (``data_sha256``, the labels and text fields) and the held-out indices; when ``--data``
    is that same file (same bytes) with the same fields, the examples of its fit split are removed, so the
    accuracy and loss are measured on examples the head has not seen. Returns the kept examples and a note
    (None when nothing was removed)."""
    import json
    from pathlib import Path

    path = (getattr(loaded, "source", None) or {}).get("path")
    rec_file = Path(path) / HEAD_RECORD if path else None
    if rec_file is None or not rec_file.is_file() or opts.data is None:
        return examples, None
    try:
        rec = json.loads(rec_file.read_text(encoding="utf-8"))
        sha = rec.get("data_sha256")
        if not sha or rec.get("labels_field") != opts.labels or rec.get("text_field", "text") != opts.text_field:
            return examples, None
        if file_sha256(opts.data) != sha:
            return examples, None
        n_fit_pool = int(rec["n_examples"])
        held = set(int(i) for i in rec["split"]["heldout_indices"])
    except (OSError, ValueError, KeyError, TypeError):
        return examples, None
    kept = [e for i, e in enumerate(examples) if i >= n_fit_pool or i in held]
    dropped = len(examples) - len(kept)
    if not dropped:
        return examples, None
    if not kept:
        raise DataError(f"every labeled example of {opts.data} was used to fit this checkpoint's head",
                        "give examples the head was not fitted on (--data), or refit it with a smaller --fit-share")
    return kept, (f"{dropped} of {len(examples)} labeled examples left out: {HEAD_RECORD} says the head was fitted "
                  f"on them; quality is measured on the other {len(kept)}")


def first_examples_within(examples: list[tuple[str, int]], tokenizer, max_length: int, max_tokens: int | None
                          ) -> tuple[list[tuple[str, int]], str | None]:
    """With ``--max-tokens``, the first labeled examples whose real tokens (tokenized with special tokens,
    truncated at ``max_length``) fit in ``max_tokens`` (at least one); a note when some were cut."""
    if max_tokens is None:
        return examples, None
    kept, n = [], 0
    for text, lab in examples:
        k = len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        if kept and n + k > max_tokens:
            break
        kept.append((text, lab))
        n += k
    if len(kept) == len(examples):
        return examples, None
    return kept, f"--max-tokens {max_tokens}: the first {len(kept)} of {len(examples)} labeled examples"
