"""A hint never names an option the running command lacks (issue 13): the no-loss refusal of
`measure --grad` on a bare encoder used to advise `--loss none`, which only `actsparse grad` has."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from hint_check import assert_hints_name_real_options, command_options
from probes.errors import EXIT_MODEL

WORDS = "the cat sat on a mat dog ran in park sun is warm today".split()


@pytest.fixture(scope="module")
def bare_encoder(tmp_path_factory, word_lm):
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bare-bert")
    tok, vocab = word_lm.tokenizer(WORDS, 32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "corpus.txt").write_text(" ".join(WORDS * 30))
    return folder


@pytest.mark.parametrize("cmd", [["measure", "--grad"], ["grad"]])
def test_no_loss_hint_names_options_that_exist(cmd, bare_encoder, tmp_path):
    r = CliRunner().invoke(app, [*cmd, str(bare_encoder), "--data", str(bare_encoder / "corpus.txt"),
                                 "--max-length", "16", "-o", str(tmp_path / "out")])
    assert r.exit_code == EXIT_MODEL, r.stderr
    assert "no loss" in r.stderr and "--loss none" in r.stderr
    assert_hints_name_real_options(cmd[0], r.stderr)
    assert not (tmp_path / "out").exists()


def test_the_hint_checker_catches_a_foreign_option():
    assert "--loss" in command_options()["grad"] and "--loss" not in command_options()["measure"]
    with pytest.raises(AssertionError, match="has no --loss"):
        assert_hints_name_real_options("measure", "actsparse: error: x -- fix: pass --loss none")
    assert_hints_name_real_options("measure", "actsparse: error: x -- fix: run `actsparse grad --loss none`")
