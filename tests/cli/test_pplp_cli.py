"""``actsparse pplp`` and ``actsparse curve`` end to end with CliRunner.

A tiny GPT-2 (ReLU) with a tiny byte-level BPE tokenizer (built offline with ``tokenizers``) is
trained for a few seconds on a synthetic word chain and saved to a temporary folder, so the
commands load it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta", "rho", "tau"]


def word_chain(n: int, seed: int) -> str:
    """Each word is followed by a fixed successor 80 % of the time: learnable in a few steps."""
    rng = random.Random(seed)
    succ = {w: WORDS[(i * 5 + 3) % len(WORDS)] for i, w in enumerate(WORDS)}
    out = [WORDS[0]]
    for _ in range(n - 1):
        out.append(succ[out[-1]] if rng.random() < 0.8 else rng.choice(WORDS))
    return " ".join(out) + "\n"


def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import transformers as tf

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared CPU
    try:
        root = tmp_path_factory.mktemp("pplp_cli")
        train_text = word_chain(6000, 1)
        tok = build_tokenizer(train_text)
        (root / "corpus.txt").write_text(word_chain(5000, 2))
        (root / "short.txt").write_text(word_chain(300, 3))
        torch.manual_seed(0)
        cfg = tf.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                            activation_function="relu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
        ids = torch.tensor(tok(train_text)["input_ids"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(80):
            idx = torch.randint(0, len(ids) - 65, (16,))
            b = torch.stack([ids[i:i + 64] for i in idx])
            loss = model(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        model.save_pretrained(root / "lm")
        tok.save_pretrained(root / "lm")
        tf.GPT2Model(cfg).save_pretrained(root / "base")  # no LM head
        tok.save_pretrained(root / "base")
        yield root
    finally:
        torch.set_num_threads(n_threads)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


COMMON = ("--max-length", 64, "--batch-size", 8)


def test_pplp_writes_tables_and_manifest(workdir):
    out = workdir / "out_pplp"
    r = run("pplp", workdir / "lm", "--data", workdir / "corpus.txt", "--p", 1, "--p", 5, *COMMON, "-o", out)
    assert r.exit_code == 0, r.output
    assert "PPL-p% sparsity" in r.stdout and "reached" in r.stdout
    for name in ("pplp", "pplp_summary", "pplp_trace", "cett_calibration"):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file()
    summ = pd.read_parquet(out / "pplp_summary.parquet")
    assert list(summ.p_pct) == [1.0, 5.0] and set(summ.status) == {"reached"}
    assert ((summ.achieved_ratio - summ.target_ratio).abs() <= 1e-3).all()
    per_layer = pd.read_parquet(out / "pplp.parquet")
    assert len(per_layer) == 2 * 2 and set(per_layer.module_path) == {"transformer.h.0.mlp.c_proj",
                                                                       "transformer.h.1.mlp.c_proj"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "pplp" and man["pplp"]["method"] == "secant"
    assert [t["status"] for t in man["pplp"]["targets"]] == ["reached", "reached"]
    assert man["pplp"]["full_passes"] == int(summ.full_passes_total.iloc[0])
    assert man["warnings"] == []
    assert "summary.md" in man["files"] and (out / "summary.md").read_text().startswith("# actsparse pplp")

    # Existing folder: refused without --force (exit 5), replaced with it.
    r = run("pplp", workdir / "lm", "--data", workdir / "corpus.txt", *COMMON, "-o", out, "-q")
    assert r.exit_code == 5 and "--force" in r.stderr
    r = run("pplp", workdir / "lm", "--data", workdir / "corpus.txt", *COMMON, "-o", out, "-q", "--force",
            "--method", "bisection")
    assert r.exit_code == 0 and r.stdout == ""
    assert json.loads((out / "manifest.json").read_text())["pplp"]["method"] == "bisection"


def test_unreachable_target_is_reported_not_failed(workdir):
    r = run("pplp", workdir / "lm", "--data", workdir / "corpus.txt", "--p", 100000, *COMMON)
    assert r.exit_code == 0, r.output
    assert "unreachable" in r.stdout and "c = 1" in r.stdout


def test_short_corpus_warns_loudly_in_output_and_manifest(workdir):
    out = workdir / "out_short"
    r = run("pplp", workdir / "lm", "--data", workdir / "short.txt", *COMMON, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert "WARNING" in r.stderr and "4096" in r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["warnings"] and "4096" in man["warnings"][0]
    assert "WARNING" in (out / "summary.md").read_text()


def test_curve_writes_table_and_plot(workdir):
    out = workdir / "out_curve"
    r = run("curve", workdir / "lm", "--data", workdir / "corpus.txt", "--method", "cett,topk", "--method", "teal",
            "--values", "cett=0.1,0.3", "--values", "topk=0.5", "--values", "teal=0.9", *COMMON, "-o", out)
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "curve.parquet")
    assert list(df.method) == ["dense", "cett", "cett", "topk", "teal"]
    assert df.thresholded_tensor.iloc[1:].notna().all()
    for f in ("curve.png", "curve.svg", "curve_layers.parquet", "curve.csv", "manifest.json", "summary.md"):
        assert (out / f).is_file()
    assert (out / "curve.png").stat().st_size > 1000
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "curve" and man["curve"]["methods"] == ["cett", "topk", "teal"]


def test_curve_teal_options_reach_the_bundle(workdir):
    out = workdir / "out_curve_teal"
    r = run("curve", workdir / "lm", "--data", workdir / "corpus.txt", "--method", "teal,absq_down",
            "--values", "teal=0.5", "--values", "absq_down=0.5", "--teal-eval", "all", "--calib-fraction", "0.5",
            *COMMON, "-o", out)
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())["curve"]
    split = man["calibration_split"]
    assert split["fraction"] == 0.5 and split["calibration_windows"][1] == split["evaluation_windows"][0]
    assert man["teal"]["eval"] == "all" and man["teal"]["projection_set"] == "gpt2"
    proj = pd.read_parquet(out / "teal_projections.parquet")
    assert set(proj.projection) == {"qkv", "o", "up", "down"} and (proj.teal_eval == "all").all()
    df = pd.read_parquet(out / "curve.parquet").set_index("method")
    eff = (proj.params * proj.sparsity).sum() / proj.params.sum()
    assert df.loc["teal"].effective_sparsity == pytest.approx(eff)
    assert "effective sparsity" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args,code,needle", [
    (("curve", "{lm}", "--calib-fraction", "0.95"), 2, "--calib-fraction"),
    (("curve", "{lm}", "--teal-eval", "decode"), 2, "--teal-eval"),
    (("curve", "{lm}", "--method", "cets"), 2, "did you mean 'cett'"),
    (("curve", "{lm}", "--values", "nope=1"), 2, "METHOD=v1"),
    (("curve", "{lm}", "--plot"), 2, "-o FOLDER"),
    (("pplp", "{lm}", "--p", "0"), 2, "positive percentage"),
    (("pplp", "{base}"), 3, "language-model head"),
    (("pplp", "{missing}"), 2, "does not exist"),
])
def test_bad_input_exits_clearly(workdir, args, code, needle):
    paths = {"lm": workdir / "lm", "base": workdir / "base", "missing": workdir / "nope"}
    argv = [a.format(**paths) for a in args] + ["--data", str(workdir / "corpus.txt"), *map(str, COMMON)]
    r = run(*argv)
    assert r.exit_code == code, r.output
    assert needle in " ".join(r.output.replace("│", " ").split()), r.output  # rich wraps usage errors in a box
    assert "Traceback" not in r.output


def _embedded_missing() -> bool:
    try:
        from probes.embedded import default_checkpoint

        default_checkpoint()
        return False
    except Exception:
        return True


@pytest.mark.skipif(_embedded_missing(), reason="the embedded checkpoint is not built in this tree")
def test_defaults_to_the_embedded_model_and_corpus(tmp_path):
    out = tmp_path / "embedded"
    r = run("pplp", "--p", 5, "--max-tokens", 4096, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["pplp"]["corpus_is_default"] and man["pplp"]["n_counted_tokens"] == 4096
    assert man["pplp"]["targets"][0]["status"] == "reached"


def test_help_texts():
    for cmd in ("pplp", "curve"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "--data" in r.stdout
