"""The presets of the massive-activation analysis and the sequences they draw (``probes.massive``).

A preset is one paper's data set-up: Sun et al. 2024 (``sun2024``: contiguous chunks of the joined
corpus at the family's length, no BOS) and Max_act_llm (``maxact2026``: one document per sample,
truncated). ``build_samples`` turns a corpus (or one prompt) into the sequences a run measures,
and says how they were drawn, for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from probes.errors import DataError, unknown_name

# Sun et al.'s sequence length per family (lib/load_model.py); others use 4096. Capped at the model's limit.
FAMILY_SEQ_LEN = {"llama": 4096, "mistral": 4096, "mixtral": 4096, "falcon": 4096, "phi": 4096,
                  "gpt_neox": 2048, "opt": 2048, "mpt": 2048, "gpt2": 1024}
SUN_DEFAULT_SEQ_LEN = 4096
MAX_DOCS_SUN = 500  # get_data samples 500 documents before joining them
MAXACT_MAX_SEQ_LEN = 32768  # analyze_model.py --max_seq_len default (capped here at the model's position limit)


@dataclass(frozen=True)
class Preset:
    name: str
    sampling: str  # "chunks" (contiguous chunks of the joined corpus) or "per_sample" (one document each)
    n_samples: int
    seed: int
    batch_size: int
    protocol: str
    reference_dtype: str = "float32"  # the dtype the reference ran in (on GPU): --dtype auto uses it on CUDA


PRESETS: dict[str, Preset] = {
    "sun2024": Preset(
        "sun2024", "chunks", 10, 1, 1,
        "Sun et al. 2024 (main_llm.py --exp2, lib/load_data.get_data): documents sampled with numpy seed 1 (at most "
        "500), joined with blank lines, tokenized with no special tokens (no BOS), cut into contiguous chunks of the "
        "family's length (LLaMA/Mistral 4096, OPT/Pythia/MPT 2048, GPT-2 1024, else 4096; capped at the model's "
        "position limit), 10 sequences; per-sequence statistics averaged over sequences; float16 on CUDA "
        "(lib/load_model.py load_llm torch_dtype=torch.float16)", reference_dtype="float16"),
    "maxact2026": Preset(
        "maxact2026", "per_sample", 2000, 0, 8,
        "Max_act_llm analyze_model.py: one document per sample (a plain-text corpus is split at blank lines), "
        "tokenized with no special tokens, truncated to max_length (default 32768, analyze_model.py --max_seq_len; "
        "capped at the model's position limit), first 2000 samples, batched by length with right padding that is "
        "masked out; bfloat16 on CUDA (analyze_model.py main torch_dtype=torch.bfloat16)",
        reference_dtype="bfloat16"),
}


@dataclass
class Sample:
    input_ids: list[int]
    sample_id: int


def resolve_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS, error=DataError)
    return PRESETS[name]


def family_seq_len(family: str | None, model_max: int | None) -> int:
    n = FAMILY_SEQ_LEN.get(family or "", SUN_DEFAULT_SEQ_LEN)
    return min(n, model_max) if model_max else n


def _tokenize(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise DataError("this checkpoint has no tokenizer, so text cannot be turned into tokens",
                        "pass --tokenizer with a folder or hub id holding the model's tokenizer")
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _ordinary(tokenizer, ids: Sequence[int]) -> bool:
    """Whether ``ids`` hold at least one token that is not a special token (``<|endoftext|>`` ...)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return any(t not in special for t in ids)


NO_ORDINARY_TOKENS = ("the corpus has no ordinary tokens (empty, or only special tokens)",
                      "give a corpus with real text")


def build_samples(loaded, opts, preset: Preset) -> tuple[list[Sample], dict[str, Any]]:
    """The sequences a preset measures, and a description of how they were drawn (for the manifest).

    ``opts``: a ``probes.massive.MassiveOptions`` (its corpus fields, ``prompt``, ``bos``, ``seed``,
    ``n_samples``, ``max_length`` and ``max_tokens``).
    """
    from pathlib import Path

    import numpy as np

    from probes import corpus as corpus_mod
    from probes.data import resolve_corpus

    tok = loaded.tokenizer
    prefix = corpus_mod.prefix_token(tok) if opts.bos and tok is not None else None
    if opts.bos and prefix is None:
        raise DataError("--bos asked for, but the tokenizer has no BOS, EOS or CLS token", "drop --bos")
    seed = preset.seed if opts.seed is None else opts.seed
    from probes.loading import check_max_length
    check_max_length(opts.max_length, loaded)  # above the model's position limit: exit 4, before any batch
    model_max = loaded.max_length
    info: dict[str, Any] = {"bos": opts.bos, "prefix_token": prefix, "special_tokens": "none added"
                            + (" except the prefix token" if prefix is not None else ""), "seed": seed}
    if opts.prompt is not None:
        ids = _tokenize(tok, opts.prompt)
        if not ids:
            raise DataError("the prompt has no tokens", "give a non-empty --prompt")
        L = opts.max_length or model_max or len(ids) + 1
        seq = ([prefix] if prefix is not None else []) + ids
        info.update(sampling="prompt", prompt=opts.prompt, max_length=L)
        return [Sample(seq[:L], 0)], info
    data = resolve_corpus(opts.data)
    n_samples = opts.n_samples or preset.n_samples
    body_room = 1 if prefix is not None else 0
    samples: list[Sample] = []
    # One continuous text (.txt) under --max-tokens: read and tokenize only the chunks that the cap keeps
    # (the text's first tokens, as the whole text gives them); otherwise the whole corpus, as before.
    chunks_from_text = (preset.sampling == "chunks" and opts.max_tokens is not None and not data.startswith("hf:")
                        and Path(data).suffix != ".jsonl")
    docs: list[str] = [] if chunks_from_text else corpus_mod.read_documents(data, opts.text_field,
                                                                             encoding=opts.encoding)
    info.update(corpus=data, corpus_is_default=opts.data is None, n_documents=1 if chunks_from_text else len(docs))
    if preset.sampling == "chunks":
        L = opts.max_length or family_seq_len(loaded.family, model_max)
        body = L - body_room
        if chunks_from_text:
            if body < 1:
                raise DataError(f"--max-length {L} leaves no room for text", "use a larger --max-length")
            need = min(n_samples, -(-opts.max_tokens // L)) * body
            ids, complete, n_bytes = corpus_mod.text_tokens(data, tok, need, opts.encoding)
            if not complete:
                info["corpus_read"] = (f"first {n_bytes} bytes: enough for --max-tokens; n_corpus_tokens and "
                                       "n_full_chunks_available count what was read")
        else:
            if len(docs) > 1:
                rng = np.random.RandomState(seed)
                pick = rng.choice(len(docs), min(MAX_DOCS_SUN, len(docs)), replace=False).tolist()
                docs = [docs[i] for i in pick]
                info["documents_sampled"] = len(pick)
            ids = _tokenize(tok, "\n\n".join(docs))
        if not _ordinary(tok, ids):
            raise DataError(*NO_ORDINARY_TOKENS)
        if body < 1:
            raise DataError(f"--max-length {L} leaves no room for text", "use a larger --max-length")
        n_full = len(ids) // body
        if n_full == 0:
            raise DataError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {L}",
                            f"give a longer corpus or pass --max-length {max(2, len(ids))} or less")
        for i in range(min(n_samples, n_full)):
            chunk = ids[i * body:(i + 1) * body]
            samples.append(Sample(([prefix] if prefix is not None else []) + chunk, i))
        info.update(sampling="contiguous chunks of the joined corpus", max_length=L, n_corpus_tokens=len(ids),
                    n_full_chunks_available=n_full)
    else:
        L = opts.max_length or min(model_max or MAXACT_MAX_SEQ_LEN, MAXACT_MAX_SEQ_LEN)
        if len(docs) == 1:
            docs = [d for d in (p.strip() for p in docs[0].split("\n\n")) if d]
            info["split"] = "plain-text corpus split at blank lines into samples"
        for i, d in enumerate(docs):
            if len(samples) >= n_samples:
                break
            ids = corpus_mod.string_tokens(d, tok, L - body_room)  # the sample's tokens; not the whole document's
            if not _ordinary(tok, ids):
                continue
            samples.append(Sample((([prefix] if prefix is not None else []) + ids)[:L], i))
        if not samples:
            raise DataError(*NO_ORDINARY_TOKENS)
        info.update(sampling="one sample per document, truncated", max_length=L)
    if opts.max_tokens is not None:
        kept, total = [], 0
        for smp in samples:
            room = opts.max_tokens - total
            if room <= 0:
                break
            kept.append(Sample(smp.input_ids[:room], smp.sample_id))
            total += len(kept[-1].input_ids)
        samples = kept
    return samples, info
