"""Text corpora to token windows.

Sources: a ``.txt`` file (one continuous text), a ``.jsonl`` file (one document per line,
``text`` field), or ``hf:NAME[:CONFIG][:SPLIT]`` (Hugging Face ``datasets``, when installed
and reachable). Windows follow lm-evaluation-harness' rolling loglikelihood convention
(``get_rolling_token_windows`` with context length 1): the first window is the prefix token
followed by the document's first ``max_length - 1`` tokens, each later window ends one token
before the last token it predicts, and every token is predicted (and counted) exactly once.
``stride < max_length`` gives overlapping windows whose overlap is context only (not counted).
Encoder models (BERT-style) get ``[CLS] chunk [SEP]`` windows instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from probes.errors import DataError


@dataclass
class Window:
    input_ids: list[int]
    labels: list[int]  # next-token targets (causal) or the inputs (encoders); -100 where not counted
    count: list[bool]  # positions whose statistics count


@dataclass
class Batch:
    input_ids: Any  # LongTensor [batch, pos]
    attention_mask: Any  # LongTensor [batch, pos]
    count_mask: Any  # BoolTensor [batch, pos]
    labels: Any  # LongTensor [batch, pos], -100 where not counted


def read_documents(spec: str, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from a corpus spec. Raises DataError with a fix for anything unusable."""
    if spec.startswith("hf:"):
        return _read_hf(spec[3:], text_field, max_docs)
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"corpus {spec!r} does not exist", "give a .txt or .jsonl file, or hf:NAME[:CONFIG][:SPLIT]")
    if p.is_dir():
        raise DataError(f"corpus {spec!r} is a folder", "give a .txt or .jsonl file")
    raw = p.read_bytes()
    if b"\x00" in raw[:4096]:
        raise DataError(f"corpus {spec} is a binary file, not text", "give a UTF-8 .txt or .jsonl file")
    text = raw.decode("utf-8", errors="replace")
    if p.suffix == ".jsonl":
        docs = []
        # Split on "\n" only: JSON strings may hold U+2028/U+2029/U+0085, which str.splitlines() breaks on.
        for i, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{spec} line {i} is not valid JSON ({e.msg})", "fix or remove that line") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{spec} line {i} has no {text_field!r} field (has {keys})",
                                "pass --text-field with the right key")
            val = obj[text_field]
            if val is not None and str(val).strip():
                docs.append(str(val))
            if max_docs and len(docs) >= max_docs:
                break
    else:
        docs = [text] if text.strip() else []
    if not docs:
        raise DataError(f"corpus {spec} is empty", "give a corpus with some text in it")
    return docs


def _read_hf(name: str, text_field: str, max_docs: int | None) -> list[str]:
    parts = name.split(":")
    ds_name, cfg, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError as e:
        raise DataError("hf: corpora need the 'datasets' package", "pip install datasets, or give a .txt file") from e
    try:
        ds = datasets.load_dataset(ds_name, cfg, split=split)
    except Exception as e:
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0][:200]}",
                        "check the name and network (offline: give a local .txt/.jsonl)") from e
    docs = [str(r[text_field]) for r in ds if str(r.get(text_field, "")).strip()]
    if max_docs:
        docs = docs[:max_docs]
    if not docs:
        raise DataError(f"dataset {name} has no text in field {text_field!r}", "pass --text-field")
    return docs


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[list[int]]:
    if tokenizer is None:
        raise DataError("this checkpoint has no tokenizer, so text cannot be turned into tokens",
                        "pass --tokenizer with a folder or hub id holding the model's tokenizer")
    out = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"]
        if ids:
            out.append(list(ids))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not out or (special and all(t in special for doc in out for t in doc)):
        raise DataError("the corpus has no ordinary tokens (empty, or only special tokens)",
                        "give a corpus with real text")
    return out


def prefix_token(tokenizer) -> int | None:
    """The token lm-eval puts before the first window: BOS if the model has one, else EOS."""
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def rolling_windows(tokens: Sequence[int], prefix: int | None, max_length: int,
                    stride: int | None = None) -> Iterator[Window]:
    """lm-eval rolling windows (context length 1) generalised to a stride.

    Each window predicts up to ``stride`` new tokens; inputs are the tokens just before them,
    filled back to ``max_length`` with earlier tokens as uncounted context.
    """
    n = len(tokens)
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too short", "use --max-length 2 or more")
    stride = min(stride or max_length, max_length)
    seq = ([prefix] if prefix is not None else []) + list(tokens)
    off = 1 if prefix is not None else 0  # seq[i + off] is tokens[i]; seq[off - 1] is the prefix
    # Targets are tokens[start:end]; inputs are the tokens one position earlier.
    start = 0 if prefix is not None else 1
    first = True
    while start < n:
        end = min(n, start + (max_length if first else stride))
        in_end = end - 1 + off  # exclusive index into seq of the last input
        in_start = max(0, in_end - max_length)
        inputs = seq[in_start:in_end]
        targets = list(tokens[in_start - off + 1: end])  # inputs shifted by one
        n_ctx = len(inputs) - (end - start)
        count = [False] * n_ctx + [True] * (end - start)
        labels = [t if c else -100 for t, c in zip(targets, count)]
        yield Window(inputs, labels, count)
        start = end
        first = False


def encoder_windows(tokens: Sequence[int], cls: int | None, sep: int | None, max_length: int) -> Iterator[Window]:
    """Non-overlapping ``[CLS] chunk [SEP]`` windows for encoder models; every position counts."""
    body = max_length - (cls is not None) - (sep is not None)
    if body < 1:
        raise DataError(f"--max-length {max_length} leaves no room for text", "use a larger --max-length")
    for i in range(0, len(tokens), body):
        chunk = list(tokens[i:i + body])
        ids = ([cls] if cls is not None else []) + chunk + ([sep] if sep is not None else [])
        yield Window(ids, list(ids), [True] * len(ids))


def build_windows(docs_tokens: Sequence[Sequence[int]], tokenizer, max_length: int, stride: int | None = None,
                  causal: bool = True, max_tokens: int | None = None, skip_first: int = 0) -> list[Window]:
    """All windows of all documents, capped at ``max_tokens`` counted tokens."""
    total = sum(len(d) for d in docs_tokens)
    if total < max_length and max_tokens is None:
        raise DataError(f"the corpus has {total} tokens, fewer than one window of --max-length {max_length}",
                        f"give a longer corpus or pass --max-length {max(2, total)} or less")
    wins: list[Window] = []
    counted = 0
    for doc in docs_tokens:
        if causal:
            it = rolling_windows(doc, prefix_token(tokenizer), max_length, stride)
        else:
            it = encoder_windows(doc, getattr(tokenizer, "cls_token_id", None),
                                 getattr(tokenizer, "sep_token_id", None), max_length)
        for w in it:
            if skip_first:
                w.count[:skip_first] = [False] * min(skip_first, len(w.count))
                w.labels = [t if c else -100 for t, c in zip(w.labels, w.count)]
            c = sum(w.count)
            if max_tokens is not None and counted + c > max_tokens:
                keep = max_tokens - counted
                idx = [i for i, v in enumerate(w.count) if v][keep:]
                for i in idx:
                    w.count[i] = False
                    w.labels[i] = -100
                c = keep
            if c > 0:
                wins.append(w)
                counted += c
            if max_tokens is not None and counted >= max_tokens:
                return wins
    if not wins:
        raise DataError("no token positions left to measure (check --skip-first and --max-tokens)",
                        "lower --skip-first or raise --max-tokens")
    return wins


def batches(windows: Sequence[Window], batch_size: int, pad_id: int = 0, device: Any = "cpu") -> Iterator[Batch]:
    """Right-padded batches; padding has attention_mask 0, count_mask False, label -100."""
    import torch

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1", "use --batch-size 1 or more")
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = max(len(w.input_ids) for w in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(group), T), dtype=torch.long)
        cnt = torch.zeros((len(group), T), dtype=torch.bool)
        lab = torch.full((len(group), T), -100, dtype=torch.long)
        for b, w in enumerate(group):
            L = len(w.input_ids)
            ids[b, :L] = torch.tensor(w.input_ids)
            att[b, :L] = 1
            cnt[b, :L] = torch.tensor(w.count)
            lab[b, :L] = torch.tensor(w.labels)
        yield Batch(ids.to(device), att.to(device), cnt.to(device), lab.to(device))


def n_counted(windows: Sequence[Window]) -> int:
    return sum(sum(w.count) for w in windows)
