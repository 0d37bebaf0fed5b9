"""Corpus to token windows: lm-evaluation-harness rolling windows, encoder windows, caps, bad corpora, batches."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes import corpus as corpus_mod
from probes.corpus import (Window, batches, build_windows, encoder_windows, n_counted, prefix_token, read_documents,
                           rolling_windows, tokenize_documents)
from probes.errors import EXIT_DATA, DataError

PREFIX = 7


# ------------------------------------------------------------------ an independent lm-eval reference
def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm-evaluation-harness ``utils.get_rolling_token_windows``, rewritten from its documented behaviour.

    Yields ``(input_tokens, pred_tokens)``. The first window is the prefix token followed by the
    first ``max_seq_len - 1`` tokens and predicts the first ``max_seq_len`` tokens; every later
    window predicts at most ``max_seq_len - context_len + 1`` new tokens and its inputs are the
    ``max_seq_len`` tokens that end one before its last target.
    """
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[:first - 1], token_list[:first]
    predicted = first
    while predicted < len(token_list):
        n_pred = min(len(token_list) - predicted, pred_len)
        end = predicted + n_pred
        yield token_list[end - max_seq_len - 1:end - 1], token_list[end - n_pred:end]
        predicted += n_pred


def lm_eval_make_disjoint_window(pair):
    """lm-eval ``make_disjoint_window``: the context keeps only the part not already in the targets."""
    a, b = pair
    return a[:len(a) - (len(b) - 1)], b


def lm_eval_model_rows(token_list, prefix, max_length, context_len=1):
    """What lm-eval feeds the model for loglikelihood_rolling: (inputs, labels with -100 on context)."""
    rows = []
    for ctx, cont in map(lm_eval_make_disjoint_window,
                         lm_eval_rolling_windows(token_list, prefix, max_length, context_len)):
        full = (ctx + cont)[-(max_length + 1):]
        inputs = full[:-1]
        labels = [-100] * (len(inputs) - len(cont)) + cont  # the last len(cont) logits score cont
        rows.append((inputs, labels))
    return rows


def test_reference_on_a_documented_example():
    # worked by hand: tokens 0..9, max_seq_len 4, context_len 1
    got = list(lm_eval_rolling_windows(list(range(10)), -1, 4, 1))
    assert got == [([-1, 0, 1, 2], [0, 1, 2, 3]), ([3, 4, 5, 6], [4, 5, 6, 7]), ([5, 6, 7, 8], [8, 9])]
    assert [lm_eval_make_disjoint_window(p) for p in got][2] == ([5, 6, 7], [8, 9])


# ------------------------------------------------------------------ rolling windows
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 120), max_length=st.integers(2, 40), seed=st.integers(0, 10 ** 6))
def test_rolling_windows_match_lm_eval(n, max_length, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (n,), generator=g).tolist()  # repeats on purpose
    ours = [(w.input_ids, w.labels) for w in rolling_windows(tokens, PREFIX, max_length)]
    assert ours == lm_eval_model_rows(tokens, PREFIX, max_length, context_len=1)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 120), max_length=st.integers(2, 40), data=st.data())
def test_strided_windows_match_lm_eval_with_longer_context(n, max_length, data):
    # stride s = lm-eval's pred_len = max_length - context_len + 1
    stride = data.draw(st.integers(1, max_length))
    tokens = list(range(1000, 1000 + n))
    ours = [(w.input_ids, w.labels) for w in rolling_windows(tokens, PREFIX, max_length, stride)]
    assert ours == lm_eval_model_rows(tokens, PREFIX, max_length, context_len=max_length - stride + 1)


def _check_windows(tokens, windows, max_length, prefix):
    """Every token predicted once; counted positions are exactly the labelled ones; labels align."""
    seq = ([prefix] if prefix is not None else []) + tokens
    nxt = {seq[i]: seq[i + 1] for i in range(len(seq) - 1)}  # tokens are distinct
    predicted = []
    counted_inputs = []
    for w in windows:
        assert 1 <= len(w.input_ids) <= max_length
        assert len(w.input_ids) == len(w.labels) == len(w.count)
        for i, (t, lab, c) in enumerate(zip(w.input_ids, w.labels, w.count)):
            assert (lab != -100) == c
            if c:
                assert lab == nxt[t], "label[i] must be the token after input[i]"
                predicted.append(lab)
                counted_inputs.append(t)
        # counted positions are one contiguous block at the end (context, if any, comes first)
        k = w.count.index(True)
        assert all(w.count[k:]) and not any(w.count[:k])
        # inputs are consecutive corpus tokens
        start = seq.index(w.input_ids[0])
        assert w.input_ids == seq[start:start + len(w.input_ids)]
    return predicted, counted_inputs


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 150), max_length=st.integers(2, 33), data=st.data())
def test_every_token_predicted_and_counted_exactly_once(n, max_length, data):
    stride = data.draw(st.one_of(st.none(), st.integers(1, max_length + 5)))
    tokens = list(range(1000, 1000 + n))
    wins = list(rolling_windows(tokens, PREFIX, max_length, stride))
    predicted, counted_inputs = _check_windows(tokens, wins, max_length, PREFIX)
    assert predicted == tokens  # in order, each once
    assert counted_inputs == [PREFIX] + tokens[:-1]  # every input position counted once
    s = min(stride or max_length, max_length)
    # the first window predicts max_length tokens, every later one ``stride`` (the last may be short)
    counts = [sum(w.count) for w in wins]
    assert counts[0] == min(n, max_length)
    assert all(c == s for c in counts[1:-1]) and all(0 < c <= s for c in counts[1:])
    assert all(len(w.input_ids) == max_length for w in wins[1:])  # later windows are full of context


def test_overlapping_windows_leave_overlap_uncounted():
    tokens = list(range(1000, 1010))
    wins = list(rolling_windows(tokens, PREFIX, 4, stride=2))
    assert [w.input_ids for w in wins] == [[PREFIX, 1000, 1001, 1002], [1001, 1002, 1003, 1004],
                                           [1003, 1004, 1005, 1006], [1005, 1006, 1007, 1008]]
    assert [w.count for w in wins] == [[True] * 4, [False, False, True, True], [False, False, True, True],
                                       [False, False, True, True]]
    assert [w.labels for w in wins][1] == [-100, -100, 1004, 1005]


def test_no_prefix_token_predicts_all_but_the_first():
    tokens = list(range(1000, 1011))
    wins = list(rolling_windows(tokens, None, 4))
    predicted, counted = _check_windows(tokens, wins, 4, None)
    assert predicted == tokens[1:] and counted == tokens[:-1]
    assert wins[0].input_ids == [1000, 1001, 1002, 1003]


def test_rolling_windows_reject_max_length_below_two():
    with pytest.raises(DataError):
        list(rolling_windows([1, 2, 3], PREFIX, 1))


# ------------------------------------------------------------------ encoder windows
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 100), max_length=st.integers(3, 30))
def test_encoder_windows_cover_every_token_once(n, max_length):
    tokens = list(range(1000, 1000 + n))
    wins = list(encoder_windows(tokens, 101, 102, max_length))
    body = []
    for w in wins:
        assert w.input_ids[0] == 101 and w.input_ids[-1] == 102
        assert 3 <= len(w.input_ids) <= max_length
        assert w.labels == w.input_ids and all(w.count)
        body += w.input_ids[1:-1]
    assert body == tokens
    assert all(len(w.input_ids) == max_length for w in wins[:-1])


def test_encoder_windows_without_cls_sep_and_too_short():
    assert [w.input_ids for w in encoder_windows([1, 2, 3], None, None, 2)] == [[1, 2], [3]]
    assert [w.input_ids for w in encoder_windows([1, 2, 3], 9, None, 3)] == [[9, 1, 2], [9, 3]]
    with pytest.raises(DataError):
        list(encoder_windows([1, 2, 3], 101, 102, 2))


# ------------------------------------------------------------------ build_windows
def _tok(**kw):
    base = dict(bos_token_id=PREFIX, eos_token_id=8, cls_token_id=None, sep_token_id=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_prefix_token_prefers_bos_then_eos_then_cls():
    assert prefix_token(_tok()) == PREFIX
    assert prefix_token(_tok(bos_token_id=None)) == 8
    assert prefix_token(_tok(bos_token_id=None, eos_token_id=None, cls_token_id=3)) == 3
    assert prefix_token(_tok(bos_token_id=None, eos_token_id=None)) is None


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17, 33, 60, 99, 100])
@pytest.mark.parametrize("stride", [None, 3])
def test_max_tokens_cap_is_exact(max_tokens, stride):
    docs = [list(range(1000, 1040)), list(range(2000, 2060))]  # 100 tokens
    wins = build_windows(docs, _tok(), 16, stride, max_tokens=max_tokens)
    assert n_counted(wins) == max_tokens
    # the cap keeps the earliest tokens: counted labels are a prefix of the corpus in order
    labels = [lab for w in wins for lab in w.labels if lab != -100]
    assert labels == (docs[0] + docs[1])[:max_tokens]
    assert all(sum(w.count) > 0 for w in wins)


def test_max_tokens_above_corpus_keeps_everything():
    docs = [list(range(1000, 1040))]
    assert n_counted(build_windows(docs, _tok(), 16, max_tokens=10 ** 6)) == 40


def test_windows_never_cross_documents():
    docs = [list(range(1000, 1010)), list(range(2000, 2010))]
    wins = build_windows(docs, _tok(), 4)
    for w in wins:
        ids = [t for t in w.input_ids if t != PREFIX]
        assert all(t < 2000 for t in ids) or all(t >= 2000 for t in ids)
    assert sum(w.input_ids[0] == PREFIX for w in wins) == 2  # each document starts with the prefix


@pytest.mark.parametrize("skip", [1, 2])
def test_skip_first_drops_leading_positions_of_each_window(skip):
    docs = [list(range(1000, 1032))]  # 32 tokens, max_length 8: 4 full windows, no context anywhere
    base = build_windows(docs, _tok(), 8)
    wins = build_windows(docs, _tok(), 8, skip_first=skip)
    assert len(wins) == len(base) == 4
    assert n_counted(wins) == n_counted(base) - skip * len(base)
    for w in wins:
        assert w.count[:skip] == [False] * skip and all(w.count[skip:])
        assert w.labels[:skip] == [-100] * skip


def test_skip_first_on_a_window_that_starts_with_context():
    # 10 tokens, max_length 4: the last window [t5..t8] counts only its last 2 positions already
    base = build_windows([list(range(1000, 1010))], _tok(), 4)
    wins = build_windows([list(range(1000, 1010))], _tok(), 4, skip_first=1)
    assert base[-1].count == [False, False, True, True] == wins[-1].count
    assert n_counted(base) - n_counted(wins) == 2  # only the two windows that counted position 0


def test_skip_first_with_max_tokens():
    docs = [list(range(1000, 1032))]
    wins = build_windows(docs, _tok(), 8, skip_first=1, max_tokens=10)
    assert n_counted(wins) == 10
    assert all(not w.count[0] for w in wins)


def test_skip_first_everything_is_an_error():
    with pytest.raises(DataError, match="no token positions"):
        build_windows([list(range(1000, 1016))], _tok(), 8, skip_first=8)


def test_corpus_shorter_than_one_window():
    with pytest.raises(DataError) as ei:
        build_windows([[1000, 1001, 1002]], _tok(), 16)
    msg = ei.value.one_line()
    assert "3 tokens" in msg and "--max-length 16" in msg and "\n" not in msg
    assert ei.value.exit_code == EXIT_DATA


def test_encoder_build_windows_use_cls_and_sep():
    tok = _tok(bos_token_id=None, eos_token_id=None, cls_token_id=101, sep_token_id=102)
    wins = build_windows([list(range(1000, 1020))], tok, 8, causal=False)
    assert all(w.input_ids[0] == 101 and w.input_ids[-1] == 102 for w in wins)
    assert n_counted(wins) == 20 + 2 * len(wins)  # [CLS] and [SEP] positions count too
    capped = build_windows([list(range(1000, 1020))], tok, 8, causal=False, max_tokens=11)
    assert n_counted(capped) == 11


# ------------------------------------------------------------------ reading and tokenizing corpora
@pytest.fixture(scope="module")
def wordlevel_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat dog ran".split()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")


def test_txt_corpus_is_one_document(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("the cat sat\n\non a mat\n")
    assert read_documents(str(p)) == ["the cat sat\n\non a mat\n"]


def test_tokenize_documents(wordlevel_tokenizer):
    out = tokenize_documents(["the cat sat", "dog ran"], wordlevel_tokenizer)
    assert out == [[2, 3, 4], [8, 9]]


@pytest.mark.parametrize("content", ["", "   \n\n\t  \n"])
def test_empty_corpus(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(DataError, match="is empty") as ei:
        read_documents(str(p))
    assert ei.value.exit_code == EXIT_DATA


def test_empty_jsonl_corpus(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text('\n{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataError, match="is empty"):
        read_documents(str(p))


def test_only_special_tokens_corpus(tmp_path, wordlevel_tokenizer):
    p = tmp_path / "special.txt"
    p.write_text("<|endoftext|><|endoftext|> <|endoftext|>")
    docs = read_documents(str(p))
    with pytest.raises(DataError, match="no ordinary tokens"):
        tokenize_documents(docs, wordlevel_tokenizer)


def test_no_tokenizer_is_a_data_error():
    with pytest.raises(DataError, match="no tokenizer"):
        tokenize_documents(["text"], None)


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [{"text": "the cat", "id": 1}, {"text": ""}, {"text": "dog ran"}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_documents(str(p)) == ["the cat", "dog ran"]
    q = tmp_path / "d.jsonl"
    q.write_text('{"body": "the cat"}\n')
    assert read_documents(str(q), text_field="body") == ["the cat"]
    assert read_documents(str(p), max_docs=1) == ["the cat"]


@pytest.mark.parametrize("bad, lineno, what", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', 3, "not valid JSON"),
    ('{"text": "ok"}\n\n\n{"body": "x"}\n', 4, "has no 'text' field"),
    ('{"text": "ok"}\n[1, 2]\n', 2, "has no 'text' field"),
    ('"just a string"\n', 1, "has no 'text' field"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, bad, lineno, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(bad)
    with pytest.raises(DataError) as ei:
        read_documents(str(p))
    msg = ei.value.one_line()
    assert f"line {lineno} " in msg and what in msg
    assert "\n" not in msg and ei.value.exit_code == EXIT_DATA


def test_jsonl_line_separator_inside_a_string(tmp_path):
    p = tmp_path / "u2028.jsonl"
    docs = ["first\u2028second", "third\x85fourth", "plain"]
    p.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    assert read_documents(str(p)) == docs


def test_jsonl_null_text_is_not_the_word_none(tmp_path):
    p = tmp_path / "null.jsonl"
    p.write_text('{"text": null}\n{"text": "the cat"}\n')
    assert read_documents(str(p)) == ["the cat"]


@pytest.mark.parametrize("payload", [
    bytes(range(256)) * 8,  # binary with NUL bytes
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100),
])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".bin"])
def test_binary_file_as_corpus(tmp_path, payload, suffix):
    p = tmp_path / f"corpus{suffix}"
    p.write_bytes(payload)
    with pytest.raises(DataError, match="binary file") as ei:
        read_documents(str(p))
    assert ei.value.exit_code == EXIT_DATA


def test_safetensors_file_as_corpus(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(p))
    with pytest.raises(DataError, match="binary"):
        read_documents(str(p))


def test_missing_and_folder_corpus(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="is a folder"):
        read_documents(str(tmp_path))


def test_text_pipeline_end_to_end(tmp_path, wordlevel_tokenizer):
    p = tmp_path / "c.txt"
    p.write_text(" ".join(["the cat sat on a mat"] * 5))  # 30 tokens
    docs = tokenize_documents(read_documents(str(p)), wordlevel_tokenizer)
    wins = build_windows(docs, wordlevel_tokenizer, 8)
    assert n_counted(wins) == 30
    assert wins[0].input_ids[0] == wordlevel_tokenizer.bos_token_id


# ------------------------------------------------------------------ batches
def test_batches_right_pad_and_mask():
    wins = [Window([1, 2, 3], [2, 3, 4], [True, True, True]),
            Window([5, 6], [-100, 7], [False, True]),
            Window([9], [10], [True])]
    out = list(batches(wins, 2, pad_id=0))
    assert len(out) == 2
    b = out[0]
    assert b.input_ids.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.count_mask.tolist() == [[True, True, True], [False, True, False]]
    assert b.labels.tolist() == [[2, 3, 4], [-100, 7, -100]]
    assert b.count_mask.dtype == torch.bool and b.input_ids.dtype == torch.long
    last = out[1]
    assert last.input_ids.tolist() == [[9]] and last.count_mask.tolist() == [[True]]


def test_batches_pad_id_and_invariants():
    wins = list(rolling_windows(list(range(1000, 1023)), PREFIX, 5))
    total = 0
    for b in batches(wins, 3, pad_id=-1):
        pad = b.attention_mask == 0
        assert (b.input_ids[pad] == -1).all()
        assert not b.count_mask[pad].any()
        assert (b.labels[pad] == -100).all()
        assert ((b.labels != -100) == b.count_mask).all()
        total += int(b.count_mask.sum())
    assert total == n_counted(wins) == 23


def test_batch_size_must_be_positive():
    with pytest.raises(DataError):
        list(batches([Window([1], [2], [True])], 0))


def test_module_documents_the_lm_eval_convention():
    assert "get_rolling_token_windows" in corpus_mod.__doc__
