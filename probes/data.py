"""The shared data set-up of every text analysis: options, then corpus -> token windows -> batches.

``CorpusOptions`` holds what every text analysis reads (which corpus, how it is decoded, how many
tokens, in what batches, from which seed); ``DataOptions`` adds ``stride``, the step of the rolling
windows that measure, grad and pplp cut. ``massive`` builds on ``CorpusOptions`` only: its presets
cut their own sequences (the papers' protocols), so a stride would mean nothing there.

``token_windows`` is the one place that resolves ``--max-length`` (refused above the model's
position limit; default the model's limit capped at ``DEFAULT_MAX_LENGTH_CAP``), the stride, the
corpus (default: the bundled calibration text) and the pad id (the tokenizer's pad token, else
EOS, else 0), and cuts the windows. ``TokenData`` batches them, whole or as one rank's share of
a data-parallel run (``probes.distributed``: round robin over batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from probes import corpus as corpus_mod
from probes.corpus import Batch, Window

DEFAULT_MAX_LENGTH_CAP = 2048
ROLLING_SCHEME = "lm-eval rolling (context length 1)"
ENCODER_SCHEME = "encoder [CLS] chunk [SEP]"


@dataclass
class CorpusOptions:
    """What every text analysis reads. ``batch_size``/``seed`` None: the analysis' own default."""

    data: str | None = None  # corpus spec; None = the bundled calibration corpus
    text_field: str = "text"
    encoding: str = "utf-8"  # of a local corpus file; a byte-order mark is dropped
    batch_size: int | None = 4
    max_length: int | None = None  # None: the model's limit, capped at DEFAULT_MAX_LENGTH_CAP
    max_tokens: int | None = None
    seed: int | None = 0
    skip_first: int = 0

    def data_fields(self, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The shared data fields this object has (those of ``DataOptions``, less ``exclude``), to build
        another analysis' options from: ``GradOptions(**opts.data_fields(), taus=...)``."""
        return {k: getattr(self, k) for k in DataOptions.__dataclass_fields__
                if k not in exclude and hasattr(self, k)}


@dataclass
class DataOptions(CorpusOptions):
    """``CorpusOptions`` plus the stride of rolling windows (measure, grad, pplp, curve)."""

    batch_size: int = 4
    seed: int = 0
    stride: int | None = None  # None: non-overlapping windows (stride = max_length)


def resolve_corpus(data: str | None) -> str:
    """The corpus spec to read: ``data``, or the bundled calibration text."""
    if data:
        return data
    from probes.embedded import default_corpus

    return default_corpus()


def resolve_stride(stride: int | None, max_length: int) -> tuple[int, str | None]:
    """The stride the windows use (at most ``max_length``), and a note when a larger one was asked for."""
    used = min(stride or max_length, max_length)
    if stride is not None and stride > max_length:
        return used, f"--stride {stride} is above --max-length {max_length}; clamped to {used}"
    return used, None


def resolve_max_length(loaded: Any, requested: int | None) -> int:
    """``requested``, refused (DataError, exit 4) above the model's position limit; default: the model's
    limit capped at ``DEFAULT_MAX_LENGTH_CAP``. Checked before any corpus is read or batch run."""
    from probes.loading import check_max_length

    check_max_length(requested, loaded)
    return requested or min(loaded.max_length or DEFAULT_MAX_LENGTH_CAP, DEFAULT_MAX_LENGTH_CAP)


def pad_id(tokenizer: Any) -> int:
    """The id right padding uses (never counted, never attended): pad token, else EOS, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)


@dataclass
class TokenData:
    """Token windows ready to batch, and how they were made (for the manifest)."""

    windows: list[Window]
    batch_size: int
    pad_id: int
    device: Any = "cpu"
    corpus: str | None = None
    corpus_is_default: bool = False
    n_documents: int | None = None
    n_corpus_tokens: int | None = None
    read_note: dict[str, Any] = field(default_factory=dict)  # set when the corpus was read only in part
    max_length: int | None = None
    stride: int | None = None
    causal: bool = True
    prefix_token: int | None = None  # the token before a document's first window (causal)
    notes: list[str] = field(default_factory=list)  # for the user (the CLI prints them unless -q)

    @property
    def n_counted(self) -> int:
        return corpus_mod.n_counted(self.windows)

    @property
    def window_scheme(self) -> str:
        return ROLLING_SCHEME if self.causal else ENCODER_SCHEME

    def local(self, dist: Any = None) -> list[Window]:
        """This rank's windows under a data-parallel ``dist`` (all of them without one)."""
        if dist is None:
            return self.windows
        return dist.shard(self.windows, self.batch_size)

    def n_batches(self, windows: Sequence[Window] | None = None) -> int:
        return math.ceil(len(self.windows if windows is None else windows) / self.batch_size)

    def batches(self, windows: Sequence[Window] | None = None) -> Iterator[Batch]:
        """Right-padded batches of ``windows`` (default: all), on the model's device."""
        return corpus_mod.batches(self.windows if windows is None else windows, self.batch_size, self.pad_id,
                                  self.device)

    def describe(self) -> dict[str, Any]:
        """The manifest keys that say what was read and how it was cut."""
        return {"corpus": self.corpus, "corpus_is_default": self.corpus_is_default, "n_documents": self.n_documents,
                "n_corpus_tokens": self.n_corpus_tokens, **self.read_note, "n_windows": len(self.windows),
                "n_counted_tokens": self.n_counted, "max_length": self.max_length, "stride": self.stride,
                "window_scheme": self.window_scheme, "prefix_token": self.prefix_token}


def token_windows(loaded: Any, opts: DataOptions, *, causal: bool,
                  docs_tokens: Sequence[Sequence[int]] | None = None) -> TokenData:
    """Corpus -> token windows of ``opts`` for ``loaded`` (rolling windows when ``causal``, else
    ``[CLS] chunk [SEP]``). ``docs_tokens``: already tokenized documents instead of ``opts.data``."""
    tok = loaded.tokenizer
    max_length = resolve_max_length(loaded, opts.max_length)
    stride, stride_note = resolve_stride(opts.stride, max_length)
    td = TokenData([], opts.batch_size, pad_id(tok), loaded.device, max_length=max_length, stride=stride,
                   causal=causal, notes=[stride_note] if stride_note else [])
    if docs_tokens is None:
        td.corpus = resolve_corpus(opts.data)
        td.corpus_is_default = opts.data is None
        cw = corpus_mod.corpus_windows(td.corpus, tok, max_length, stride, causal=causal, max_tokens=opts.max_tokens,
                                       skip_first=opts.skip_first, text_field=opts.text_field, encoding=opts.encoding)
        td.windows, td.n_documents, td.n_corpus_tokens, td.read_note = (cw.windows, cw.n_documents,
                                                                        cw.n_corpus_tokens, cw.read_note())
    else:
        td.corpus = "<token ids>"
        td.n_documents = len(docs_tokens)
        td.n_corpus_tokens = sum(len(d) for d in docs_tokens)
        td.windows = corpus_mod.build_windows(docs_tokens, tok, max_length, stride, causal=causal,
                                              max_tokens=opts.max_tokens, skip_first=opts.skip_first)
    if causal and tok is not None:
        td.prefix_token = corpus_mod.prefix_token(tok)
    return td


def sequence_windows(sequences: Sequence[Sequence[int]], skip_first: int = 0) -> list[Window]:
    """Whole sequences as windows that count every position but the first ``skip_first`` (no labels
    beyond the inputs: for analyses that read activations, not losses)."""
    out = []
    for ids in sequences:
        count = [True] * len(ids)
        count[:skip_first] = [False] * min(skip_first, len(count))
        out.append(Window(list(ids), list(ids), count))
    return out
