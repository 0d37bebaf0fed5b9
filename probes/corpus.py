"""Text corpora to token windows, read as a stream.

Sources: a ``.txt`` file (one continuous text), a ``.jsonl`` file (one document per line,
``text`` field), or ``hf:NAME[:CONFIG][:SPLIT]`` (Hugging Face ``datasets`` in streaming mode,
when installed and reachable). Windows follow lm-evaluation-harness' rolling loglikelihood
convention (``get_rolling_token_windows`` with context length 1): the first window is the prefix
token followed by the document's first ``max_length - 1`` tokens, each later window ends one token
before the last token it predicts, and every token is predicted (and counted) exactly once.
``stride < max_length`` gives overlapping windows whose overlap is context only (not counted).
Encoder models (BERT-style) get ``[CLS] chunk [SEP]`` windows instead.

Reading is bounded by what is measured (``corpus_windows``): with ``max_tokens`` it stops once
the windows that hold that many counted tokens are filled. A long document is tokenized from its
start on growing prefixes of its text; of each prefix only the tokens that end before a
whitespace run well before the cut are kept (fast tokenizers' offset mapping), so the tokens, and
hence the windows, are the ones the whole text gives. Only regular files are read (a FIFO or
device would block or never end), decoding is strict (``--encoding``, UTF-8 by default; a bad
byte is reported with its offset) and a leading byte-order mark is dropped.

Size (~740 lines), on purpose: one streaming pipeline, file -> documents -> tokens -> windows, in
which each stage's stopping rule comes from the next one (the token budget of ``corpus_windows``
decides how much of a document is tokenized, which decides how many bytes are read; the read
sizes ``CHUNK_BYTES``, ``MIN_READ_BYTES`` and ``BYTES_PER_TOKEN`` are tuned, and patched by the
tests, as one). The stages are sections below, in that order.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from probes.errors import CheckpointError, DataError

DEFAULT_ENCODING = "utf-8"
CHUNK_BYTES = 1 << 20  # one read
MIN_READ_BYTES = 1 << 14  # the first prefix of a long document (also covers the binary sniff)
BYTES_PER_TOKEN = 16  # first guess at the text a token needs (English BPE: about 4); doubled while short
SAFE_MARGIN_CHARS = 256  # a kept token ends at least this far before the cut ...
NO_SPACE_CHARS = 4096  # ... at the start of a whitespace run, looked for this far back (else cut there anyway)
BINARY_SNIFF_BYTES = 4096  # a NUL byte in the first 4 KiB means a binary file
_WIDE_ENCODINGS = ("utf-16", "utf-32")  # NUL bytes are ordinary there
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", dict: "object", list: "array"}


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


# ------------------------------------------------------------------------------------------ files
def resolve_encoding(encoding: str | None) -> str:
    """The codec name for ``--encoding`` (DataError for an unknown or non-text codec).

    ``utf-8-sig`` reads as ``utf-8``: a leading byte-order mark is dropped for every encoding."""
    name = encoding or DEFAULT_ENCODING
    try:
        info = codecs.lookup(name)
    except LookupError as e:
        raise DataError(f"unknown --encoding {name!r}",
                        "use a Python codec name such as utf-8, latin-1, cp1252 or utf-16") from e
    if not getattr(info, "_is_text_encoding", True):
        raise DataError(f"--encoding {name!r} is not a text encoding", "use utf-8, latin-1, cp1252, utf-16, ...")
    return "utf-8" if info.name == "utf-8-sig" else info.name


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(spec: str, mode: int) -> CheckpointError:
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return CheckpointError(f"corpus {spec} is {what}, not a regular file (reading it could block or never end)",
                           "save the text to a regular .txt or .jsonl file and pass that")


def corpus_path(spec: str) -> Path:
    """The path of a local corpus, checked without opening it: it exists, is a file and a regular
    one (FIFOs, devices and sockets are refused with exit 2, symlinks followed)."""
    p = Path(spec).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError(f"corpus {spec!r} does not exist",
                        "give a .txt or .jsonl file, or hf:NAME[:CONFIG][:SPLIT]") from None
    except OSError as e:
        raise DataError(f"corpus {spec!r} cannot be read ({e.strerror or e})",
                        "check the path and its permissions") from e
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"corpus {spec!r} is a folder", "give a .txt or .jsonl file")
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(spec, st.st_mode)
    return p


def check_corpus_spec(spec: str | None, encoding: str | None = None) -> None:
    """Fail before any model work on an unusable ``--encoding`` or a local corpus that is missing, a
    folder or not a regular file (reads nothing; None is the bundled corpus, ``hf:`` is checked when read)."""
    resolve_encoding(encoding)
    if spec and not spec.startswith("hf:"):
        corpus_path(spec)


def _open_regular(p: Path, spec: str):
    """Open for reading without blocking on a FIFO swapped in after the check, and check again."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"corpus {spec!r} cannot be read ({e.strerror or e})",
                        "check the path and its permissions") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(spec, st.st_mode)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class TextStream:
    """The decoded text of a regular file, read on demand: strict decoding with exact byte offsets
    in errors, a binary sniff on the first bytes, a leading byte-order mark dropped."""

    def __init__(self, spec: str, encoding: str | None = None):
        self.spec = spec
        self.encoding = resolve_encoding(encoding)
        self.path = corpus_path(spec)
        self._f = _open_regular(self.path, spec)
        self._decoder = codecs.getincrementaldecoder(self.encoding)(errors="strict")
        self._sniff = not self.encoding.startswith(_WIDE_ENCODINGS)
        self._started = False  # the first character is decoded (the BOM check is done)
        self.n_bytes = 0  # bytes read so far
        self.eof = False

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, n_bytes: int | None = None) -> str:
        """The text of the next ``n_bytes`` bytes at most (default CHUNK_BYTES; '' and ``eof`` set at the end)."""
        if self.eof:
            return ""
        n_bytes = n_bytes or CHUNK_BYTES
        if self.n_bytes == 0:
            n_bytes = max(n_bytes, BINARY_SNIFF_BYTES)
        try:
            chunk = self._f.read(n_bytes)
        except OSError as e:
            raise DataError(f"corpus {self.spec} cannot be read ({e.strerror or e})", "check the file") from e
        if self.n_bytes == 0 and self._sniff and b"\x00" in chunk[:BINARY_SNIFF_BYTES]:
            raise DataError(f"corpus {self.spec} is a binary file, not text", "give a UTF-8 .txt or .jsonl file")
        final = len(chunk) < n_bytes  # a regular file gives short reads only at its end
        state = self._decoder.getstate()
        held = len(state[0]) if isinstance(state[0], (bytes, bytearray)) else 0  # bytes of a split character
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as e:
            raise self._decode_error(e, self.n_bytes - held) from None
        self.n_bytes += len(chunk)
        self.eof = final
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        return text

    def read_all(self) -> str:
        parts = []
        while not self.eof:
            parts.append(self.read())
        return "".join(parts)

    def _decode_error(self, e: UnicodeDecodeError, base: int) -> DataError:
        offset = base + e.start
        bad = bytes(e.object[e.start:min(e.end, e.start + 4)]).hex(" ")
        if self.encoding == "utf-8":
            fix = ("pass --encoding with the file's real encoding (e.g. --encoding latin-1 or cp1252), "
                   "or re-save it as UTF-8")
        else:
            fix = "pass --encoding with the file's real encoding, or re-save it as UTF-8"
        return DataError(f"corpus {self.spec} is not valid {self.encoding} text: byte offset {offset} "
                         f"(bytes {bad}: {e.reason})", fix)


# ------------------------------------------------------------------------------------------ documents
def text_value(val: Any, where: str, text_field: str) -> str | None:
    """A document's text from a JSON value: strings as they are, null skipped (None), anything else refused."""
    if val is None or isinstance(val, str):
        return val
    kind = _JSON_TYPES.get(type(val), type(val).__name__)
    raise DataError(f"{where}: {text_field!r} is a {kind}, not a string",
                    "store the text as a JSON string, or pass --text-field with the field that holds the text")


def iter_jsonl_records(spec: str, encoding: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line of a .jsonl file, read line by line.

    Lines split on "\\n" only: JSON strings may hold U+2028/U+2029/U+0085, which str.splitlines() breaks on."""
    with TextStream(spec, encoding) as stream:
        pending: list[str] = []  # the text of a line not ended yet
        lineno = 0
        while True:
            chunk = stream.read()
            if "\n" not in chunk and not stream.eof:
                pending.append(chunk)  # a long line: join once it ends, not chunk by chunk
                continue
            lines = ("".join(pending) + chunk).split("\n")
            pending = [lines.pop()] if not stream.eof else []
            for line in lines:
                lineno += 1
                line = line.rstrip("\r")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{spec} line {lineno} is not valid JSON ({e.msg})",
                                    "fix or remove that line") from e
                yield lineno, obj
            if stream.eof:
                return


def _jsonl_documents(spec: str, text_field: str, encoding: str | None) -> Iterator[str]:
    for lineno, obj in iter_jsonl_records(spec, encoding):
        if not isinstance(obj, dict) or text_field not in obj:
            keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{spec} line {lineno} has no {text_field!r} field (has {keys})",
                            "pass --text-field with the right key")
        val = text_value(obj[text_field], f"{spec} line {lineno}", text_field)
        if val is not None and val.strip():
            yield val


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    """Rows of a Hugging Face dataset in streaming mode (nothing is downloaded beyond what is read)."""
    parts = name.split(":")
    ds_name, cfg, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError as e:
        raise DataError("hf: corpora need the 'datasets' package", "pip install datasets, or give a .txt file") from e
    fix = "check the name and network (offline: give a local .txt/.jsonl)"
    try:
        rows = iter(datasets.load_dataset(ds_name, cfg, split=split, streaming=True))
    except Exception as e:
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
                        fix) from e
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"cannot read dataset {name!r} (row {i}): {str(e).splitlines()[0][:200] if str(e) else ''}",
                            fix) from e
        if text_field not in row:
            raise DataError(f"dataset {name} has no field {text_field!r} (has {list(row)[:6]})", "pass --text-field")
        val = text_value(row[text_field], f"dataset {name} row {i}", text_field)
        if val is not None and val.strip():
            yield val
        i += 1


def _is_jsonl(spec: str) -> bool:
    return Path(spec).suffix == ".jsonl"


def iter_documents(spec: str, text_field: str = "text", encoding: str | None = None) -> Iterator[str]:
    """The non-blank documents of a corpus, one at a time (a .txt file is one document)."""
    if spec.startswith("hf:"):
        yield from _hf_documents(spec[3:], text_field)
        return
    if _is_jsonl(spec):
        yield from _jsonl_documents(spec, text_field, encoding)
        return
    with TextStream(spec, encoding) as stream:
        text = stream.read_all()
    if text.strip():
        yield text


def read_documents(spec: str, text_field: str = "text", max_docs: int | None = None,
                   encoding: str | None = None) -> list[str]:
    """Documents from a corpus spec. Raises DataError with a fix for anything unusable."""
    docs = []
    for d in iter_documents(spec, text_field, encoding):
        docs.append(d)
        if max_docs and len(docs) >= max_docs:
            break
    if not docs:
        raise DataError(f"corpus {spec} is empty", "give a corpus with some text in it")
    return docs


def scan_corpus(spec: str, text_field: str = "text", encoding: str | None = None) -> dict[str, int]:
    """Check a whole corpus (path, encoding, JSON) in constant memory: its document and character counts."""
    n_docs = n_chars = 0
    if spec.startswith("hf:") or _is_jsonl(spec):
        for d in iter_documents(spec, text_field, encoding):
            n_docs += 1
            n_chars += len(d)
    else:
        blank = True
        with TextStream(spec, encoding) as stream:
            while not stream.eof:
                chunk = stream.read()
                n_chars += len(chunk)
                blank = blank and not chunk.strip()
        n_docs = 0 if blank else 1
    if not n_docs:
        raise DataError(f"corpus {spec} is empty", "give a corpus with some text in it")
    return {"n_documents": n_docs, "n_characters": n_chars}


# ------------------------------------------------------------------------------------------ tokens
NO_ORDINARY_TOKENS = ("the corpus has no ordinary tokens (empty, or only special tokens)",
                      "give a corpus with real text")


def _check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise DataError("this checkpoint has no tokenizer, so text cannot be turned into tokens",
                        "pass --tokenizer with a folder or hub id holding the model's tokenizer")


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[list[int]]:
    _check_tokenizer(tokenizer)
    out = []
    for d in docs:
        ids = _token_ids(tokenizer, d)
        if ids:
            out.append(ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not out or (special and all(t in special for doc in out for t in doc)):
        raise DataError(*NO_ORDINARY_TOKENS)
    return out


def safe_cut(text: str) -> int:
    """A position in ``text`` (a prefix of a longer text) before which tokenization cannot depend on
    what follows the prefix: the start of a whitespace run at least SAFE_MARGIN_CHARS before its
    end (pre-tokenizers split there), or, in a run of NO_SPACE_CHARS without whitespace, that far back."""
    end = len(text) - SAFE_MARGIN_CHARS
    if end <= 0:
        return 0
    lo = max(0, end - NO_SPACE_CHARS)
    i = end - 1
    while i >= lo and not text[i].isspace():
        i -= 1
    if i < lo:
        return lo
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


def prefix_token_ids(tokenizer, text: str) -> list[int] | None:
    """The tokens of ``text`` (a prefix of a longer text) that the whole text has too: those ending
    before ``safe_cut``, found with the fast tokenizer's offset mapping. None without offsets."""
    cut = safe_cut(text)
    if cut <= 0:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    k = 0
    for start, end in enc["offset_mapping"]:
        if end > cut or start >= cut:
            break
        k += 1
    return list(ids[:k])


class _Document:
    """One document's text, given as growing prefixes: ``prefix(limit)`` is ``(text, complete)`` with at
    least the first ``limit`` bytes (a file) or characters (a string) of it; ``limit`` None: all of it."""

    def __init__(self, text: str | None = None, stream: TextStream | None = None):
        self._text, self._stream = text, stream
        self._parts: list[str] = []

    def prefix(self, limit: int | None) -> tuple[str, bool]:
        if self._text is not None:
            if limit is None or limit >= len(self._text):
                return self._text, True
            return self._text[:limit], False
        s = self._stream
        assert s is not None
        while not s.eof and (limit is None or s.n_bytes < limit):
            self._parts.append(s.read(None if limit is None else min(CHUNK_BYTES, max(1, limit - s.n_bytes))))
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return (self._parts[0] if self._parts else ""), s.eof


def document_tokens(doc: _Document, tokenizer, enough: Callable[[list[int]], bool] | None,
                    est_tokens: int | None) -> tuple[list[int], str, bool]:
    """``(token ids, text read, complete)`` of a document, from its start: all of it when ``enough`` is
    None; else growing prefixes (first about ``est_tokens`` tokens' worth, then doubled) until
    ``enough(ids)`` holds or the document ends. The ids are always the whole text's first tokens."""
    limit = None
    if enough is not None and getattr(tokenizer, "is_fast", False):
        limit = max(MIN_READ_BYTES, BYTES_PER_TOKEN * max(1, est_tokens or 1))
    while True:
        text, complete = doc.prefix(limit)
        ids = _token_ids(tokenizer, text) if complete else prefix_token_ids(tokenizer, text)
        if ids is None:  # no offsets (a slow tokenizer): read the whole document
            limit = None
            continue
        if complete or (enough is not None and enough(ids)):
            return ids, text, complete
        limit = 2 * max(limit or 0, len(text))


# ------------------------------------------------------------------------------------------ windows
def prefix_token(tokenizer) -> int | None:
    """The token lm-eval puts before the first window: BOS if the model has one, else EOS."""
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def rolling_windows(tokens: Sequence[int], prefix: int | None, max_length: int,
                    stride: int | None = None, complete: bool = True) -> Iterator[Window | None]:
    """lm-eval rolling windows (context length 1) generalised to a stride.

    Each window predicts up to ``stride`` new tokens; inputs are the tokens just before them,
    filled back to ``max_length`` with earlier tokens as uncounted context. ``complete=False``:
    ``tokens`` are only the start of the document; a window that would need a token past them is
    not made, a ``None`` is yielded instead (read more) and the windows end.
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
        want = start + (max_length if first else stride)
        if not complete and want > n:
            yield None
            return
        end = min(n, want)
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
    if not complete:
        yield None


def encoder_windows(tokens: Sequence[int], cls: int | None, sep: int | None, max_length: int,
                    complete: bool = True) -> Iterator[Window | None]:
    """Non-overlapping ``[CLS] chunk [SEP]`` windows for encoder models; every position counts.
    ``complete=False`` as in ``rolling_windows``."""
    body = max_length - (cls is not None) - (sep is not None)
    if body < 1:
        raise DataError(f"--max-length {max_length} leaves no room for text", "use a larger --max-length")
    for i in range(0, len(tokens), body):
        if not complete and i + body > len(tokens):
            yield None
            return
        chunk = list(tokens[i:i + body])
        ids = ([cls] if cls is not None else []) + chunk + ([sep] if sep is not None else [])
        yield Window(ids, list(ids), [True] * len(ids))
    if not complete:
        yield None


def _limit_window(w: Window, skip_first: int, room: int | None) -> int:
    """Apply ``--skip-first`` and at most ``room`` counted tokens to ``w`` (in place); its count."""
    if skip_first:
        w.count[:skip_first] = [False] * min(skip_first, len(w.count))
        w.labels = [t if c else -100 for t, c in zip(w.labels, w.count)]
    c = sum(w.count)
    if room is not None and c > room:
        for i in [i for i, v in enumerate(w.count) if v][room:]:
            w.count[i] = False
            w.labels[i] = -100
        c = room
    return c


def _doc_windows(tokens: Sequence[int], tokenizer, max_length: int, stride: int | None, causal: bool,
                 complete: bool = True) -> Iterator[Window | None]:
    if causal:
        return rolling_windows(tokens, prefix_token(tokenizer), max_length, stride, complete)
    return encoder_windows(tokens, getattr(tokenizer, "cls_token_id", None),
                           getattr(tokenizer, "sep_token_id", None), max_length, complete)


def _no_positions() -> DataError:
    return DataError("no token positions left to measure (check --skip-first and --max-tokens)",
                     "lower --skip-first or raise --max-tokens")


def _too_short(total: int, max_length: int) -> DataError:
    return DataError(f"the corpus has {total} tokens, fewer than one window of --max-length {max_length}",
                     f"give a longer corpus or pass --max-length {max(2, total)} or less")


def build_windows(docs_tokens: Sequence[Sequence[int]], tokenizer, max_length: int, stride: int | None = None,
                  causal: bool = True, max_tokens: int | None = None, skip_first: int = 0) -> list[Window]:
    """All windows of all (tokenized) documents, capped at ``max_tokens`` counted tokens."""
    total = sum(len(d) for d in docs_tokens)
    if total < max_length and max_tokens is None:
        raise _too_short(total, max_length)
    wins: list[Window] = []
    counted = 0
    for doc in docs_tokens:
        for w in _doc_windows(doc, tokenizer, max_length, stride, causal):
            c = _limit_window(w, skip_first, None if max_tokens is None else max_tokens - counted)
            if c > 0:
                wins.append(w)
                counted += c
            if max_tokens is not None and counted >= max_tokens:
                return wins
    if not wins:
        raise _no_positions()
    return wins


@dataclass
class CorpusWindows:
    """The windows of a corpus and what was read to make them (for the manifest)."""

    spec: str
    windows: list[Window]
    n_documents: int  # non-blank documents read
    n_corpus_tokens: int  # tokens of the text read
    complete: bool  # the whole corpus was read
    n_bytes_read: int | None = None  # a local file's bytes read
    encoding: str = DEFAULT_ENCODING

    @property
    def n_counted(self) -> int:
        return n_counted(self.windows)

    def read_note(self) -> dict[str, Any]:
        """Manifest keys that say the corpus was read only in part (none when read whole)."""
        if self.complete:
            return {}
        what = f"{self.n_bytes_read} bytes" if self.n_bytes_read is not None else f"{self.n_documents} documents"
        return {"corpus_read": f"first {what}: enough for --max-tokens; n_documents and n_corpus_tokens "
                               "count what was read"}


@dataclass
class _Budget:
    """Windows made so far and the counted tokens still wanted."""

    max_tokens: int | None
    skip_first: int
    windows: list[Window] = field(default_factory=list)
    counted: int = 0
    special: set[int] = field(default_factory=set)
    ordinary_seen: bool = False

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.counted >= self.max_tokens

    def room(self, counted: int) -> int | None:
        return None if self.max_tokens is None else self.max_tokens - counted


def corpus_windows(spec: str, tokenizer, max_length: int, stride: int | None = None, causal: bool = True,
                   max_tokens: int | None = None, skip_first: int = 0, text_field: str = "text",
                   encoding: str | None = None) -> CorpusWindows:
    """The windows of a corpus spec (as ``build_windows`` on the whole corpus gives them), reading and
    tokenizing only as much as they need: with ``max_tokens`` the reading stops once the windows are
    filled, without it the whole corpus is read (regular files only, so bounded by their size).
    DataError (CheckpointError for a non-regular file) with a fix for anything unusable."""
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too short", "use --max-length 2 or more")
    eff_stride = min(stride or max_length, max_length)
    b = _Budget(max_tokens, skip_first)
    n_docs = n_tokens = 0
    stream: TextStream | None = None
    checked = False

    def est_tokens() -> int | None:
        """Tokens of text the remaining budget needs, at a guess (the read doubles while short)."""
        if max_tokens is None:
            return None
        per = max(1, eff_stride - skip_first)
        return -(-(max_tokens - b.counted) // per) * eff_stride + max_length

    def add(doc: _Document) -> bool:
        """Windows of one document; False when it was blank."""
        nonlocal checked, n_tokens
        if not checked:
            if tokenizer is None and not doc.prefix(MIN_READ_BYTES)[0].strip() and not doc.prefix(None)[0].strip():
                return False  # a blank corpus says so before asking for a tokenizer
            _check_tokenizer(tokenizer)
            b.special = set(getattr(tokenizer, "all_special_ids", []) or [])
            checked = True
        made: dict[str, Any] = {}

        def enough(ids: list[int], complete: bool = False) -> bool:
            wins, counted = [], b.counted
            for w in _doc_windows(ids, tokenizer, max_length, stride, causal, complete):
                if w is None:
                    return False  # the windows go on past the tokens read
                c = _limit_window(w, skip_first, b.room(counted))
                if c > 0:
                    wins.append(w)
                    counted += c
                if b.max_tokens is not None and counted >= b.max_tokens:
                    break
            ordinary = b.ordinary_seen or any(t not in b.special for t in ids) if b.special else True
            if not complete and b.max_tokens is not None and counted >= b.max_tokens and not ordinary:
                return False  # the windows are full, but an ordinary token must be seen somewhere
            made.update(wins=wins, counted=counted, ordinary=ordinary)
            return True

        ids, text, complete = document_tokens(doc, tokenizer, enough if max_tokens is not None else None,
                                              est_tokens())
        if complete:
            enough(ids, complete=True)
        if not text.strip():
            return False
        n_tokens += len(ids)
        b.windows += made["wins"]
        b.counted = made["counted"]
        b.ordinary_seen = b.ordinary_seen or bool(ids and made["ordinary"])
        return True

    if spec.startswith("hf:") or _is_jsonl(spec):
        docs = iter_documents(spec, text_field, encoding)
        complete = True
        try:
            for d in docs:
                n_docs += add(_Document(text=d))
                if b.full and b.ordinary_seen:
                    complete = False  # later documents are not read (nor checked)
                    break
        finally:
            docs.close()
    else:
        stream = TextStream(spec, encoding)
        with stream:
            n_docs += add(_Document(stream=stream))
            complete = stream.eof
    if not n_docs:
        raise DataError(f"corpus {spec} is empty", "give a corpus with some text in it")
    if not b.ordinary_seen:
        raise DataError(*NO_ORDINARY_TOKENS)
    if max_tokens is None and n_tokens < max_length:
        raise _too_short(n_tokens, max_length)
    if not b.windows:
        raise _no_positions()
    return CorpusWindows(spec, b.windows, n_docs, n_tokens, complete,
                         stream.n_bytes if stream is not None else None, resolve_encoding(encoding))


def text_tokens(spec: str, tokenizer, n_tokens: int | None, encoding: str | None = None
                ) -> tuple[list[int], bool, int]:
    """``(ids, complete, bytes read)``: the first ``n_tokens`` tokens (at least, and at least one ordinary
    token, when the text has them) of a .txt corpus, as the whole text gives them; all with None."""
    if tokenizer is None:
        scan_corpus(spec, encoding=encoding)  # an empty corpus says so first
    _check_tokenizer(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def enough(ids: list[int]) -> bool:
        return len(ids) >= (n_tokens or 0) and (not special or any(t not in special for t in ids))

    with TextStream(spec, encoding) as stream:
        ids, text, complete = document_tokens(_Document(stream=stream), tokenizer,
                                              enough if n_tokens is not None else None, n_tokens)
    if complete and not text.strip():
        raise DataError(f"corpus {spec} is empty", "give a corpus with some text in it")
    return ids, complete, stream.n_bytes


def string_tokens(text: str, tokenizer, n_tokens: int, ordinary: bool = True) -> list[int]:
    """The first ``n_tokens`` tokens at least (all when fewer) of an in-memory text, as the whole text
    gives them, tokenizing only a prefix; ``ordinary``: also until a non-special token shows up."""
    _check_tokenizer(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if ordinary else set()

    def enough(ids: list[int]) -> bool:
        return len(ids) >= n_tokens and (not special or any(t not in special for t in ids))

    return document_tokens(_Document(text=text), tokenizer, enough, n_tokens)[0]


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
