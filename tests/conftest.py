import os

# Tests never touch the network: hub loads must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

EOT = "<|endoftext|>"


def word_tokenizer(words, max_len: int):
    """A word-level tokenizer over ``words`` (id 0 = <|endoftext|>, 1 = [UNK]) and its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOT: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                  unk_token="[UNK]", model_max_length=max_len)
    return tok, len(vocab)


def save_word_gpt2(folder, words, *, max_len: int = 64, n_layer: int = 2, n_embd: int = 16, n_inner=None,
                   activation: str = "relu", edit=None, seed: int = 0):
    """A tiny GPT-2 (random init, ``seed``) with a word-level tokenizer, saved as a Hugging Face folder.
    ``edit(model)`` may change weights before saving."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab_size = word_tokenizer(words, max_len)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     n_inner=n_inner, activation_function=activation, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0)
    cfg.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_word_corpus(path, words, n_words: int, seed: int = 0):
    """``n_words`` words drawn from ``words`` (seeded), as one line of text."""
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))
    return path


@pytest.fixture(scope="session")
def word_lm():
    """The helpers above, for tests that build tiny word-level models and corpora."""
    import types

    return types.SimpleNamespace(tokenizer=word_tokenizer, save_gpt2=save_word_gpt2, corpus=write_word_corpus)



@pytest.fixture(autouse=True)
def _hints_name_real_options(monkeypatch, request):
    """Every CLI run in the suite: each `-- fix:` hint names only options the command has
    (tests/cli/hint_check.py). Wraps CliRunner.invoke, so no test has to remember it."""
    if "cli" not in request.node.path.parts and "golden" not in request.node.path.parts:
        return
    from typer.testing import CliRunner

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "cli"))
    try:
        from hint_check import assert_hints_name_real_options
    finally:
        sys.path.pop(0)
    real = CliRunner.invoke

    def invoke(self, cli, args=None, *a, **k):
        r = real(self, cli, args, *a, **k)
        words = [str(x) for x in (args or [])]
        cmd = next((w for w in words if not w.startswith("-")), None)
        try:
            err = r.stderr
        except ValueError:
            err = ""
        if cmd:
            from hint_check import command_options

            if cmd in command_options():
                assert_hints_name_real_options(cmd, err)
        return r

    monkeypatch.setattr(CliRunner, "invoke", invoke)
