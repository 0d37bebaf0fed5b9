"""``probes.quick_sites``: the sites of a GPT-2 folder read from its files equal the sites found in the loaded
model, over configs, weight dtypes, kinds and tokenizers; anything the load would refuse (or that the file
reading cannot vouch for) gives None, and ``actsparse sites`` then prints the load's own error; a listing
read this way imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.loading import load_checkpoint
from probes.quick_sites import listing
from probes.sites import MLP_KINDS, MLP_POST, MLP_PRE, RESID_POST, find_sites

BUNDLED = Path(__file__).resolve().parents[2] / "probes" / "data" / "tiny-relu-lm"
WORDS = "the cat sat on a mat dog ran in park sun is warm".split()
KINDS = [(MLP_POST,), MLP_KINDS, (MLP_POST, MLP_PRE, RESID_POST), (RESID_POST,), (MLP_PRE, MLP_POST)]
runner = CliRunner()


def save(folder: Path, word_lm, *, dtype=None, edit=None, tokenizer: bool = True, **cfg_kw) -> Path:
    """A tiny random GPT2LMHeadModel (``cfg_kw`` over the defaults below) with a word-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab = word_lm.tokenizer(WORDS, 32)
    kw = dict(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, activation_function="relu",
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg = GPT2Config(**{**kw, **cfg_kw})
    cfg.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


def save_llama(folder: Path, word_lm, *, dtype=None, **cfg_kw) -> Path:
    """A tiny random LlamaForCausalLM (``cfg_kw`` over the defaults below) with the word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = word_lm.tokenizer(WORDS, 32)
    kw = dict(vocab_size=vocab + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=0, pad_token_id=0)
    cfg = LlamaConfig(**{**kw, **cfg_kw})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def loaded_rows(path, kinds) -> tuple[str, list[dict]]:
    lm = load_checkpoint(str(path), device="cpu")
    return lm.family, [s.row() for s in find_sites(lm.model, lm.family, kinds)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, word_lm) -> Path:
    return save(tmp_path_factory.mktemp("quick") / "base", word_lm)


@pytest.fixture
def copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "model"))


def edit_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, change) -> None:
    """Re-save model.safetensors after ``change(dict of numpy arrays)``, with the metadata transformers writes."""
    from safetensors.numpy import load_file, save_file

    p = folder / "model.safetensors"
    arrays = load_file(str(p))
    change(arrays)
    save_file(arrays, str(p), metadata={"format": "pt"})


def test_the_bundled_model_lists_what_its_loaded_model_has():
    for kinds in KINDS:
        assert listing(BUNDLED, kinds=kinds) == loaded_rows(BUNDLED, kinds), kinds


@pytest.mark.parametrize("variant", [
    dict(n_inner=None, activation_function="gelu_new"),
    dict(n_layer=3, n_inner=24, n_head=4, activation_function="gelu"),
    dict(tie_word_embeddings=False, activation_function="silu"),
    dict(n_layer=1, activation_function="gelu_pytorch_tanh", dtype="bfloat16"),
    dict(n_inner=40, dtype="float16"),
])
def test_configs_and_dtypes_list_what_the_loaded_model_has(tmp_path, word_lm, variant):
    import torch

    dtype = variant.pop("dtype", None)
    path = save(tmp_path / "m", word_lm, dtype=getattr(torch, dtype) if dtype else None, **variant)
    for kinds in KINDS:
        quick = listing(path, kinds=kinds)
        assert quick is not None, (variant, kinds)
        assert quick == loaded_rows(path, kinds), (variant, kinds)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(attention_bias=True, mlp_bias=True, hidden_act="gelu"),
    dict(tie_word_embeddings=True, num_key_value_heads=4, num_hidden_layers=3),
    dict(head_dim=16, intermediate_size=40, dtype="bfloat16"),
])
def test_llama_configs_list_what_the_loaded_model_has(tmp_path, word_lm, variant):
    import torch

    dtype = variant.pop("dtype", None)
    path = save_llama(tmp_path / "m", word_lm, dtype=getattr(torch, dtype) if dtype else None, **variant)
    for kinds in KINDS:
        quick = listing(path, kinds=kinds)
        assert quick is not None and quick[0] == "llama", (variant, kinds)
        assert quick == loaded_rows(path, kinds), (variant, kinds)
    quick = runner.invoke(app, ["sites", str(path), "--no-cache"])
    full = runner.invoke(app, ["sites", str(path), "--no-cache", "--load-model"])
    assert quick.exit_code == 0 and (quick.stdout, quick.stderr) == (full.stdout, full.stderr)


LLAMA_REFUSED = {
    "rope scaling": (lambda f: edit_config(f, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}), None),
    "missing down_proj": (lambda f: rewrite_weights(f, lambda a: a.pop("model.layers.1.mlp.down_proj.weight")),
                          "parameters missing"),
    "other kv heads": (lambda f: edit_config(f, num_key_value_heads=4), "of another shape"),
    "tied but a head in the file": (lambda f: edit_config(f, tie_word_embeddings=True), None),
    "nan": (lambda f: rewrite_weights(f, nan_at("model.layers.0.mlp.up_proj.weight")), "NaN or Inf"),
    # the classifier's head (score.weight) is not in a causal LM's file
    "other architecture": (lambda f: edit_config(f, architectures=["LlamaForSequenceClassification"]),
                           "parameters missing"),
}


@pytest.mark.parametrize("case", list(LLAMA_REFUSED))
def test_what_a_llama_folder_cannot_vouch_for_goes_to_the_load(tmp_path, word_lm, case):
    path = save_llama(tmp_path / "m", word_lm)
    change, error = LLAMA_REFUSED[case]
    change(path)
    assert_the_load_answers(path, error, case)


def assert_the_load_answers(path: Path, error: str | None, case: str) -> None:
    """The files do not vouch for ``path``: ``sites`` prints exactly what ``--load-model`` prints, which is
    a listing (``error`` None) or an error containing ``error``."""
    assert listing(path) is None
    quick = runner.invoke(app, ["sites", str(path), "--no-cache"])
    full = runner.invoke(app, ["sites", str(path), "--no-cache", "--load-model"])
    assert (quick.exit_code, quick.stdout, quick.stderr) == (full.exit_code, full.stdout, full.stderr), case
    if error is None:
        assert quick.exit_code == 0, quick.stderr
    else:
        assert quick.exit_code != 0 and error in " ".join(quick.stderr.split()), (case, quick.stderr)


def test_a_folder_without_a_tokenizer_is_listed(tmp_path, word_lm):
    path = save(tmp_path / "m", word_lm, tokenizer=False)
    assert listing(path, kinds=MLP_KINDS) == loaded_rows(path, MLP_KINDS)


def test_options_only_the_load_honours_take_the_load(base):
    assert listing(base) is not None and listing(str(base), dtype="float32") is not None
    for opts in (dict(device="auto"), dict(device="cuda"), dict(dtype="bfloat16"), dict(dtype="float16"),
                 dict(tokenizer=str(base)), dict(site=["transformer.h.*.mlp.c_fc:output"]), dict(all_modules=True),
                 dict(config=str(base / "config.json")), dict(arch="gpt2"), dict(device_map="cpu"),
                 dict(kinds=("mlp_post", "no_such_kind"))):
        assert listing(base, **opts) is None, opts
    assert listing(base, kinds=("mlp_gate_act",)) is None  # none in GPT-2: the load says so
    quick = runner.invoke(app, ["sites", str(base), "--kind", "mlp_gate_act"])
    full = runner.invoke(app, ["sites", str(base), "--kind", "mlp_gate_act", "--load-model", "--no-cache"])
    assert quick.exit_code != 0 and (quick.exit_code, quick.stdout, quick.stderr) == (
        full.exit_code, full.stdout, full.stderr)
    assert listing(base / "model.safetensors") is None  # a bare weight file: no config to read sites from
    assert listing(base.parent / "no-such-folder") is None


def nan_at(name):
    def change(a):
        a[name] = a[name].copy()
        a[name].flat[3] = np.nan
    return change


def inf_at(name):
    def change(a):
        a[name] = a[name].copy()
        a[name].flat[0] = -np.inf
    return change


# Each way out: what it does to the folder, and a phrase of the error the load then gives (None: it loads).
REFUSED = {
    "nan weight": (lambda f: rewrite_weights(f, nan_at("transformer.h.1.mlp.c_fc.weight")), "NaN or Inf"),
    "inf weight": (lambda f: rewrite_weights(f, inf_at("transformer.wpe.weight")), "NaN or Inf"),
    "missing tensor": (lambda f: rewrite_weights(f, lambda a: a.pop("transformer.h.0.mlp.c_proj.bias")),
                       "parameters missing"),
    "extra layer": (lambda f: edit_config(f, n_layer=1), "does not build"),
    "other width": (lambda f: edit_config(f, n_inner=48), "of another shape"),
    "unknown activation": (lambda f: edit_config(f, activation_function="relu7"), "activation transformers"),
    "zero size": (lambda f: edit_config(f, n_head=0), "sizes must be positive"),
    "unknown key": (lambda f: edit_config(f, my_own_key=3), None),
    "other head": (lambda f: edit_config(f, architectures=["GPT2Model"]), None),
    "no metadata": (lambda f: rewrite_weights_plain(f), None),
    "tokenizer past the embedding": (lambda f: shrink_vocab(f), "token ids but the model's input embedding"),
    # the tokenizer adds the token, with the next id, one past the embedding
    "pad token the vocabulary lacks": (lambda f: edit_tokenizer_config(f, pad_token="<pad>"),
                                       "token ids but the model's input embedding"),
    # BERT's class adds its own special tokens ([SEP], [CLS], ...) past the embedding
    "other tokenizer class": (lambda f: edit_tokenizer_config(f, tokenizer_class="BertTokenizerFast"),
                              "token ids but the model's input embedding"),
    "corrupt tokenizer": (lambda f: (f / "tokenizer.json").write_text("{not json"), "cannot be loaded"),
    "truncated weights": (lambda f: truncate(f / "model.safetensors"), "truncated"),
    "sharded": (lambda f: reshard(f), None),
    "sampling flags": (lambda f: (f / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.7, "bos_token_id": 0})), None),
    # tied, and a head in the file that differs from the embedding: transformers warns and unties
    "a head of its own though tied": (lambda f: rewrite_weights(f, lambda a: a.update(
        {"lm_head.weight": a["transformer.wte.weight"] + 1})), None),
}


def rewrite_weights_plain(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    p = folder / "model.safetensors"
    save_file(load_file(str(p)), str(p))


def shrink_vocab(folder: Path) -> None:
    """Embedding rows (and vocab_size) one short of the tokenizer's ids."""
    cfg = json.loads((folder / "config.json").read_text())
    rows = cfg["vocab_size"] - 1
    edit_config(folder, vocab_size=rows)
    rewrite_weights(folder, lambda a: a.update({"transformer.wte.weight": a["transformer.wte.weight"][:rows].copy()}))


def edit_tokenizer_config(folder: Path, **changes) -> None:
    p = folder / "tokenizer_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) - 100])


def reshard(folder: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_files_cannot_vouch_for_goes_to_the_load(copy, case):
    change, error = REFUSED[case]
    change(copy)
    assert_the_load_answers(copy, error, case)


def test_the_command_prints_what_a_loaded_model_gives_and_imports_neither_torch_nor_transformers(base, tmp_path):
    variants = [(), ("--kind", "mlp_pre,resid_post"), ("--format", "json"), ("--format", "csv"), ("--format", "md")]
    for args in variants:
        quick = runner.invoke(app, ["sites", str(base), *args])
        full = runner.invoke(app, ["sites", str(base), *args, "--load-model", "--no-cache"])
        assert quick.exit_code == 0 and (quick.stdout, quick.stderr) == (full.stdout, full.stderr), args
    cache = tmp_path / "cache"
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom actsparse_cli.main import app\n"
            f"r = CliRunner().invoke(app, ['sites', {str(BUNDLED)!r}])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules), r.exit_code)\n"
            "sys.stdout.write(r.stdout)")
    env = {**os.environ, "ACTSPARSE_CACHE_DIR": str(cache), "COLUMNS": os.environ.get("COLUMNS", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    imported, _, table = r.stdout.partition("\n")
    assert imported == "[] 0"
    assert table == runner.invoke(app, ["sites", str(BUNDLED), "--load-model", "--no-cache"]).stdout
    assert not cache.exists() or not any(cache.rglob("*.json"))  # read from the files: nothing cached
