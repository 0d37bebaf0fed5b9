"""Linear probing: a sequence classifier made from a frozen pretrained encoder and one fitted linear layer.

A bare encoder (all-MiniLM-L6-v2, a BERT trained with a loss on sentence pairs) has no loss on
text, and actsparse never substitutes a surrogate (``probes.loss``). The standard way to a real
classifier on such an encoder is linear probing: load it as ``AutoModelForSequenceClassification``
with the corpus' labels, keep every encoder weight as pretrained (frozen), capture the input
features of the final classification ``Linear`` (BERT ``classifier``: the pooled [CLS] state;
GPT-2/Llama ``score``: the last non-pad token's state) on a fit split, and fit that Linear alone by
multinomial logistic regression. The result is an ordinary classifier with its own head and loss,
which every analysis reads through its ``classification`` path (``--data FILE.jsonl --labels FIELD``).

The fit: minimise ``mean_i CE(W x_i + b, y_i) + (l2 / 2) * ||W||_F^2`` (bias not penalised) over
the fit split's features, in float64, from ``W = 0, b = 0``, by full-batch L-BFGS with a strong-Wolfe
line search (``torch.optim.LBFGS``): a strictly convex problem in ``W`` with a deterministic
optimiser, so the same inputs give the same head. Features are used as the model computes them (no
standardisation), so the saved Linear is exactly the fitted one.

The split is deterministic: with ``h = 1 - fit_share``, example ``i`` (0-based, in file order) is
held out when ``floor((i + 1) * h) > floor(i * h)`` (``fit_share = 0.5``: every second example,
i = 1, 3, 5, ...). The held-out indices go into ``actsparse_head.json`` next to the weights.

Probes never write files: ``fit_linear_head`` returns the fitted model; ``reports.head_checkpoint``
writes it (atomically, refusing an existing folder without ``force``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from probes.errors import DataError, ModelError
from probes.loss import file_sha256

HEAD_FILE = "actsparse_head.json"
DEFAULT_L2 = 1e-3
DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_SIZE = 32
DEFAULT_FIT_SHARE = 0.5
LBFGS_MAX_ITER = 2000
SPLIT_RULE = "example i (0-based, file order) is held out when floor((i+1)*h) > floor(i*h), h = 1 - fit_share"
OBJECTIVE = "mean cross-entropy + (l2/2)*||W||_F^2 (bias not penalised), float64, full-batch L-BFGS from W=0, b=0"


@dataclass
class LinearHeadFit:
    """A fitted linear head: the classifier model (in memory), its tokenizer, and what the fit gave."""

    model: Any  # the ...ForSequenceClassification with the fitted head, eval mode, float32
    tokenizer: Any
    head_module: str  # e.g. "classifier" (BERT), "score" (GPT-2, Llama)
    label_names: list[str]
    record: dict[str, Any] = field(default_factory=dict)  # written as actsparse_head.json

    @property
    def fit_accuracy(self) -> float:
        return self.record["fit_accuracy"]

    @property
    def heldout_accuracy(self) -> float:
        return self.record["heldout_accuracy"]


def heldout_mask(n: int, fit_share: float) -> list[bool]:
    """True for the held-out examples of ``n`` under the evenly spaced rule (``SPLIT_RULE``)."""
    h = 1.0 - fit_share
    return [math.floor((i + 1) * h + 1e-9) > math.floor(i * h + 1e-9) for i in range(n)]


def read_labeled(data: str, labels_field: str, text_field: str = "text", encoding: str = "utf-8",
                 max_examples: int | None = None) -> tuple[list[str], list[Any]]:
    """Texts and raw labels of a .jsonl (the corpus reader: regular files, strict decoding)."""
    from pathlib import Path

    from probes.corpus import corpus_path, iter_jsonl_records, text_value

    if Path(str(data)).suffix != ".jsonl":
        raise DataError(f"fit-head needs a .jsonl corpus with a label field; got {data!r}",
                        "give --data FILE.jsonl with one {\"text\": ..., \"label\": ...} per line")
    p = corpus_path(str(data))
    texts, raw = [], []
    for i, obj in iter_jsonl_records(str(data), encoding):
        if max_examples is not None and len(texts) >= max_examples:
            break
        if not isinstance(obj, dict) or text_field not in obj or labels_field not in obj:
            missing = text_field if isinstance(obj, dict) and labels_field in obj else labels_field
            raise DataError(f"{p} line {i} has no {missing!r} field",
                            "pass --labels / --text-field with the keys the file uses")
        text = text_value(obj[text_field], f"{p} line {i}", text_field)
        if text is None:
            raise DataError(f"{p} line {i}: {text_field!r} is null", "give every labeled example a text")
        lab = obj[labels_field]
        if isinstance(lab, bool) or not isinstance(lab, (str, int)):
            raise DataError(f"{p} line {i}: label {lab!r} is neither a name (string) nor an integer id",
                            "use string label names or integer ids 0..K-1")
        texts.append(text)
        raw.append(lab)
    if not texts:
        raise DataError(f"{p} has no labeled examples", "give a .jsonl with text and label fields")
    return texts, raw


def label_ids(raw: list[Any]) -> tuple[list[str], list[int]]:
    """Label names (ids sorted by name; integer labels must be 0..K-1 and keep their ids) and ids."""
    kinds = {type(x) for x in raw}
    if kinds == {int}:
        top = max(raw)
        if min(raw) < 0 or set(raw) != set(range(top + 1)):
            raise DataError(f"integer labels must be 0..K-1 with every id present; found {sorted(set(raw))[:10]}",
                            "use string label names, or renumber the ids 0..K-1")
        names = [str(k) for k in range(top + 1)]
        return names, list(raw)
    if kinds != {str}:
        raise DataError("the labels mix names (strings) and integer ids", "use one kind of label throughout")
    names = sorted(set(raw))
    index = {n: k for k, n in enumerate(names)}
    return names, [index[x] for x in raw]


def _base(model) -> Any:
    prefix = getattr(model, "base_model_prefix", "") or ""
    return getattr(model, prefix, model) if prefix else model


def find_head(clf) -> tuple[str, Any]:
    """The final classification Linear of ``clf``: the one module holding every parameter outside
    the base model. A head of more than one layer (RoBERTa dense+out_proj, DistilBERT
    pre_classifier+classifier) is refused: only a single linear layer is fitted here."""
    import torch

    prefix = getattr(clf, "base_model_prefix", "") or ""
    outside = [n for n, _ in clf.named_parameters() if not (prefix and n.startswith(prefix + "."))]
    owners = sorted({n.rpartition(".")[0] for n in outside})
    name = type(clf).__name__
    if len(owners) != 1:
        raise ModelError(f"{name} has a classification head of more than one layer ({', '.join(owners) or 'none'}); "
                         "fit-head fits a single linear layer on frozen features",
                         "give an encoder whose ...ForSequenceClassification head is one Linear (BERT, GPT-2, "
                         "Llama families)")
    mod = clf.get_submodule(owners[0])
    if not isinstance(mod, torch.nn.Linear):
        raise ModelError(f"the classification head {owners[0]} of {name} is a {type(mod).__name__}, not one Linear",
                         "give an encoder whose ...ForSequenceClassification head is one Linear (BERT, GPT-2, "
                         "Llama families)")
    return owners[0], mod


def build_classifier(loaded, label_names: list[str], seed: int = 0):
    """``AutoModelForSequenceClassification`` of ``loaded``'s config with these labels, its base model
    holding ``loaded``'s encoder weights exactly (every one; a missing one is refused, never random)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = type(loaded.config).from_dict(loaded.config.to_dict())
    cfg.num_labels = len(label_names)
    cfg.id2label = dict(enumerate(label_names))
    cfg.label2id = {n: k for k, n in enumerate(label_names)}
    cfg.problem_type = "single_label_classification"
    cfg.architectures = None
    tok = loaded.tokenizer
    if getattr(cfg, "pad_token_id", None) is None:  # decoders pool the last non-pad token: they need a pad id
        if tok.pad_token_id is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    try:
        clf = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError as e:
        raise ModelError(f"transformers has no sequence-classification model for {cfg.model_type!r}",
                         "give an encoder of a family with a ...ForSequenceClassification class (BERT, GPT-2, "
                         "Llama, ...)") from e
    src = _base(loaded.model).state_dict()
    missing, unexpected = _base(clf).load_state_dict(src, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"the encoder lacks {len(missing)} weight(s) that {type(clf).__name__} needs "
                         f"(e.g. {missing[0]!r}); they would be random, not pretrained",
                         "give the encoder's full checkpoint (with its pooler, for BERT)")
    clf.to(device=loaded.device, dtype=torch.float32).eval()
    return clf


def capture_features(clf, head, tokenizer, texts: list[str], *, max_length: int, batch_size: int, device,
                     progress: Callable[[int, int], None] | None = None):
    """The inputs the head's Linear sees for each text (float64 ``[n, d]``), in eval mode without
    gradients, checked against the model's own logits (the head applied to them must give them)."""
    import torch

    feats: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def hook(_mod, args):
        seen.append(args[0].detach())

    total = math.ceil(len(texts) / batch_size)
    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for k in range(0, len(texts), batch_size):
                enc = tokenizer(texts[k:k + batch_size], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt").to(device)
                seen.clear()
                logits = clf(**enc).logits.float()
                x = seen[-1]
                if x.dim() == 3:  # decoder heads score every position, then pool the last non-pad token
                    x = _pool_like(x, logits, head, enc)
                if not torch.allclose(head(x).float(), logits, atol=1e-4, rtol=1e-4):
                    raise ModelError(f"cannot tell which features {type(clf).__name__}'s head reads (the head "
                                     "applied to its captured input does not give the model's logits)",
                                     "give a BERT-, GPT-2- or Llama-family encoder")
                feats.append(x.double().cpu())
                if progress is not None:
                    progress(total, 1)
    finally:
        handle.remove()
    return torch.cat(feats)


def _pool_like(x, logits, head, enc):
    """Of ``x [batch, pos, d]``, the row per example whose head output is the model's logits (HF's
    decoder classifiers: the last non-pad token), found by comparing, not by assuming a padding side."""
    import torch

    scores = head(x).float()  # [batch, pos, K]
    err = (scores - logits[:, None, :]).abs().amax(-1)  # [batch, pos]
    err = err.masked_fill(enc["attention_mask"] == 0, float("inf")) if "attention_mask" in enc else err
    pos = err.argmin(-1)
    return x[torch.arange(x.shape[0]), pos]


def fit_logistic(x, y, n_classes: int, l2: float, *, bias: bool = True, max_iter: int = LBFGS_MAX_ITER):
    """Multinomial logistic regression (``OBJECTIVE``): ``(W [K, d], b [K], info)`` in float64.
    ``bias=False`` (GPT-2/Llama ``score`` has none): ``b`` is fixed at 0 and only ``W`` is fitted."""
    import torch

    x = x.double()
    y = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=bias)
    params = [w, b] if bias else [w]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small problem: one thread is fastest (and its sums are run-to-run identical)
    try:
        opt.step(objective)
        final = objective()
    finally:
        torch.set_num_threads(threads)
    grad = max(float(p.grad.abs().max()) for p in params)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), {"objective": float(final.detach()), "max_abs_grad": grad, "lbfgs_iterations": n_iter,
                                    "converged": grad < 1e-6}


def _metrics(x, y, w, b) -> tuple[float, float]:
    import torch

    logits = x @ w.T + b
    y = torch.as_tensor(y, dtype=torch.long)
    return (float((logits.argmax(-1) == y).double().mean()),
            float(torch.nn.functional.cross_entropy(logits, y)))


def fit_linear_head(encoder_path: str, data: str, labels_field: str, *, text_field: str = "text",
                    encoding: str = "utf-8", fit_share: float = DEFAULT_FIT_SHARE, l2: float = DEFAULT_L2,
                    max_length: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_examples: int | None = None, seed: int = 0, device: str = "auto",
                    tokenizer: str | None = None, config: str | None = None, arch: str | None = None,
                    trust_remote_code: bool = False, unsafe_pickle: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> LinearHeadFit:
    """Fit the final classification Linear of ``encoder_path`` (as a sequence classifier with the
    labels of ``data``'s ``labels_field``) on frozen features; see the module docstring."""
    from probes.data import resolve_max_length
    from probes.loading import load_checkpoint

    if not 0.0 < fit_share < 1.0:
        raise DataError(f"--fit-share {fit_share} must lie strictly between 0 and 1", "use e.g. --fit-share 0.5")
    if not (l2 >= 0.0 and math.isfinite(l2)):
        raise DataError(f"--l2 {l2} must be finite and >= 0", "use e.g. --l2 0.001")
    texts, raw = read_labeled(data, labels_field, text_field, encoding, max_examples)
    names, ys = label_ids(raw)
    if len(names) < 2:
        raise DataError(f"{data} has only one label ({names[0]!r}); a classifier needs two or more",
                        "give a .jsonl with at least two label values in --labels")
    held = heldout_mask(len(texts), fit_share)
    n_held = sum(held)
    if n_held == 0 or n_held == len(texts):
        raise DataError(f"{len(texts)} examples leave {'no' if n_held == 0 else 'only'} held-out examples at "
                        f"--fit-share {fit_share}", "give more examples, or another --fit-share")
    loaded = load_checkpoint(encoder_path, config=config, arch=arch, device=device, dtype="float32",
                             trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, tokenizer=tokenizer)
    if loaded.tokenizer is None or loaded.config is None:
        what = "no tokenizer" if loaded.tokenizer is None else "no config"
        raise ModelError(f"{encoder_path} has {what}; fit-head builds a text classifier from a Hugging Face encoder",
                         "give a model folder with config.json and tokenizer files (or pass --tokenizer)")
    # None: DEFAULT_MAX_LENGTH, or the model's position limit when that is smaller (topic texts are short)
    length = resolve_max_length(loaded, max_length) if max_length is not None else \
        min(DEFAULT_MAX_LENGTH, loaded.max_length or DEFAULT_MAX_LENGTH)
    clf = build_classifier(loaded, names, seed)
    head_name, head = find_head(clf)
    x = capture_features(clf, head, loaded.tokenizer, texts, max_length=length, batch_size=batch_size,
                         device=loaded.device, progress=progress)
    fit_idx = [i for i, h in enumerate(held) if not h]
    held_idx = [i for i, h in enumerate(held) if h]
    y_fit = [ys[i] for i in fit_idx]
    w, b, info = fit_logistic(x[fit_idx], y_fit, len(names), l2, bias=head.bias is not None)
    import torch

    with torch.no_grad():
        head.weight.copy_(w.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias))
    fit_acc, fit_loss = _metrics(x[fit_idx], y_fit, w, b)
    y_held = [ys[i] for i in held_idx]
    held_acc, held_loss = _metrics(x[held_idx], y_held, w, b)
    majority = max(y_held.count(k) for k in range(len(names))) / len(y_held)
    record = {
        "tool": "actsparse", "kind": "linear_head", "encoder": str(encoder_path),
        "encoder_family": loaded.family, "model_class": type(clf).__name__, "head_module": head_name,
        "n_features": int(x.shape[1]), "data": str(data), "data_sha256": file_sha256(data),
        "labels_field": labels_field, "text_field": text_field,
        "label_names": names, "n_examples": len(texts), "max_examples": max_examples, "max_length": length,
        "objective": OBJECTIVE, "l2": l2, "head_bias": head.bias is not None, **info,
        "split": {"rule": SPLIT_RULE, "fit_share": fit_share, "n_fit": len(fit_idx), "n_heldout": len(held_idx),
                  "heldout_indices": held_idx},
        "fit_accuracy": fit_acc, "fit_loss": fit_loss, "heldout_accuracy": held_acc, "heldout_loss": held_loss,
        "chance_accuracy": 1.0 / len(names), "majority_heldout_accuracy": majority, "seed": seed,
    }
    return LinearHeadFit(clf, loaded.tokenizer, head_name, names, record)
