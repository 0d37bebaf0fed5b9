"""The ``actsparse`` CLI through typer's CliRunner: help texts, ``sites``, ``measure`` and bad input.

The model is a tiny randomly initialised GPT-2 with a ReLU MLP and a word-level tokenizer, both
built offline and saved with ``save_pretrained`` into a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_DEVICE, EXIT_MODEL, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
MAX_LEN = 16
N_TOKENS = 320  # 20 full windows of 16: every window counts its first position
N_LAYER, WIDTH = 2, 64

runner = CliRunner()  # click >= 8.2 (vendored by typer) has no mix_stderr: result.stdout and result.stderr are apart


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-relu-gpt2"), WORDS, n_layer=N_LAYER, n_inner=WIDTH)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", WORDS, N_TOKENS)


@pytest.fixture(scope="module")
def measured(model_dir, corpus, tmp_path_factory):
    """One full ``measure`` run (with progress, without -q) shared by the output tests."""
    out = tmp_path_factory.mktemp("runs") / "out"
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "--batch-size", 4, "-o", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    return r, out


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Matplotlib takes ~2 s a run; every run but the shared ``measured`` one (module-scoped, so set up
    before this function-scoped patch) skips the figure."""
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "sparsity.parquet")


# ------------------------------------------------------------------ help
def test_every_command_has_help_text():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"sites", "measure"} <= set(names)
    top = invoke("--help")
    assert top.exit_code == 0
    for c in app.registered_commands:
        name = c.name or c.callback.__name__
        doc = (c.help or c.callback.__doc__ or "").strip()
        assert doc, f"command {name} has no help text"
        r = invoke(name, "--help")
        assert r.exit_code == 0, name
        assert doc.split(".")[0][:40] in " ".join(r.stdout.split()), name
        assert name in top.stdout


def _options_without_help():
    import typer.main

    group = typer.main.get_command(app)  # typer >= 0.17 vendors click: no isinstance(click.Option)
    missing = []
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and not (getattr(p, "help", None) or "").strip():
                missing.append(f"{name} {p.opts[0]}")
    return missing


def test_every_option_has_help_text():
    missing = _options_without_help()
    assert missing == [], f"options without help: {missing}"


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.startswith("actsparse ")


# ------------------------------------------------------------------ sites
def test_sites_lists_the_relu_mlp(model_dir):
    r = invoke("sites", model_dir, "--format", "json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["tables"]["sites"]  # the shape every command's --format json has
    post = [x for x in rows if x["kind"] == "mlp_post"]
    assert [x["canonical_name"] for x in post] == [f"blocks.{i}.mlp.hook_post" for i in range(N_LAYER)]
    assert [x["module_path"] for x in post] == [f"transformer.h.{i}.mlp.c_proj" for i in range(N_LAYER)]
    assert all(x["width"] == WIDTH and x["hook"] == "input" and x["family"] == "gpt2" for x in post)
    table = invoke("sites", model_dir)
    assert table.exit_code == 0 and "blocks.1.mlp.hook_post" in table.stdout
    csv = invoke("sites", model_dir, "--format", "csv", "--kind", "mlp_pre")
    assert csv.exit_code == 0
    assert csv.stdout.splitlines()[0].startswith("canonical_name,") and "hook_post" not in csv.stdout
    mods = invoke("sites", model_dir, "--all-modules", "--format", "json")
    assert "transformer.h.0.mlp.c_fc" in [m["module_path"] for m in json.loads(mods.stdout)["tables"]["modules"]]


# ------------------------------------------------------------------ measure outputs
def test_measure_writes_tables_and_manifest(measured, model_dir):
    r, out = measured
    for f in ("sparsity.parquet", "sparsity.csv", "summary.parquet", "summary.csv", "manifest.json",
              "sparsity_by_layer.png", "summary.md"):
        assert (out / f).is_file(), f
    df = _table(out)
    csv = pd.read_csv(out / "sparsity.csv")
    assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    assert set(df.kind) == {"mlp_post"}  # mlp_pre is opt-in (--kind); no gate for a non-GLU MLP
    post = df[df.kind == "mlp_post"].sort_values("layer")
    assert post.canonical_name.tolist() == [f"blocks.{i}.mlp.hook_post" for i in range(N_LAYER)]
    assert post.module_path.tolist() == [f"transformer.h.{i}.mlp.c_proj" for i in range(N_LAYER)]
    assert (df.dtype == "float32").all() and (df.width == WIDTH).all()
    assert (post.neg_frac == 0).all() and post.zero_frac.between(0.2, 0.8).all()  # random-init ReLU
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"kind", "metric", "mean_over_layers", "width_weighted_mean"} <= set(summary.columns)
    z = summary[(summary.kind == "mlp_post") & (summary.metric == "zero_frac")]
    assert z.mean_over_layers.item() == pytest.approx(post.zero_frac.mean(), rel=1e-12)

    m = json.loads((out / "manifest.json").read_text())
    for key in ("versions", "git_hash", "options", "measurement", "model"):
        assert key in m, key
    assert m["versions"]["torch"] == torch.__version__
    assert m["git_hash"] is None or len(m["git_hash"]) >= 40
    assert m["options"]["checkpoint"] == str(model_dir)
    meas = m["measurement"]
    assert meas["n_counted_tokens"] == N_TOKENS
    assert set(df.n_tokens) == {meas["n_counted_tokens"]}
    assert meas["max_length"] == MAX_LEN and meas["n_windows"] == N_TOKENS // MAX_LEN
    assert meas["skip_first"] == 0 and meas["prefix_token"] == 0
    assert m["model"]["dtype"] == meas["model_dtype"] == "float32"
    assert m["model"]["device"] == meas["device"] == "cpu"


def _independent_zero_frac(model_dir: Path, corpus: Path, skip_first: int = 0) -> dict[int, tuple[int, int]]:
    """(zeros, entries) of each c_proj input over counted positions, with our own forward pre-hook."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from probes import corpus as corpus_mod

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = tok(corpus.read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) == N_TOKENS and 1 not in ids  # no unknown words
    wins = corpus_mod.build_windows([ids], tok, MAX_LEN, skip_first=skip_first)
    counts = {i: [0, 0] for i in range(N_LAYER)}
    box = {}

    def hook(i):
        def pre(mod, args):
            x = args[0][box["mask"]]  # [n_counted, width]
            counts[i][0] += int((x == 0).sum())
            counts[i][1] += x.numel()
        return pre

    handles = [model.transformer.h[i].mlp.c_proj.register_forward_pre_hook(hook(i)) for i in range(N_LAYER)]
    try:
        with torch.no_grad():
            for b in corpus_mod.batches(wins, 4, tok.pad_token_id):
                box["mask"] = b.count_mask
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {i: tuple(v) for i, v in counts.items()}


def test_zero_frac_matches_an_independent_hook(measured, model_dir, corpus):
    _, out = measured
    post = _table(out).query("kind == 'mlp_post'").set_index("layer")
    for layer, (zeros, entries) in _independent_zero_frac(model_dir, corpus).items():
        assert entries == N_TOKENS * WIDTH
        assert post.loc[layer, "zero_frac"] == zeros / entries
        assert post.loc[layer, "n_tokens"] * WIDTH == entries


def test_progress_goes_to_stderr_and_table_to_stdout(measured):
    r, out = measured
    assert "measure" in r.stderr and f"wrote {out}" in r.stderr
    assert "blocks.0.mlp.hook_post" in r.stdout
    assert "Traceback" not in r.stderr


def test_quiet_prints_nothing(model_dir, corpus, tmp_path):
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    assert (tmp_path / "o" / "manifest.json").is_file()


def test_site_override(model_dir, corpus, tmp_path, measured):
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q",
               "--site", "transformer.h.*.mlp.c_proj:input", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    df = _table(tmp_path / "o").sort_values("layer")
    assert df.module_path.tolist() == [f"transformer.h.{i}.mlp.c_proj" for i in range(N_LAYER)]
    assert set(df.kind) == {"custom"} and set(df.hook) == {"input"}
    # the same tensor as the discovered mlp_post site, so the same numbers
    ref = _table(measured[1]).query("kind == 'mlp_post'").sort_values("layer")
    assert df.zero_frac.tolist() == ref.zero_frac.tolist()
    assert df.n_tokens.tolist() == ref.n_tokens.tolist()


def test_overlapping_site_globs_count_each_token_once(model_dir, corpus, tmp_path):
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q",
               "--site", "transformer.h.*.mlp.c_proj:input", "--site", "transformer.h.0.mlp.c_proj:input",
               "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    df = _table(tmp_path / "o")
    assert len(df) == N_LAYER and set(df.n_tokens) == {N_TOKENS}


@pytest.mark.parametrize("kinds, want", [
    (["mlp_pre"], {"mlp_pre"}),
    (["mlp_post,resid_post", "mlp_pre"], {"mlp_post", "resid_post", "mlp_pre"}),  # repeated and comma-separated
])
def test_kind_selects_site_kinds(model_dir, corpus, tmp_path, kinds, want):
    args = [a for k in kinds for a in ("--kind", k)]
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q", *args, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    df = _table(tmp_path / "o")
    assert set(df.kind) == want
    assert (df.groupby("kind").size() == N_LAYER).all()


def test_skip_first_drops_one_token_per_window(model_dir, corpus, tmp_path, measured):
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q", "--skip-first", 1,
               "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    n_windows = N_TOKENS // MAX_LEN
    df = _table(tmp_path / "o")
    assert set(df.n_tokens) == {N_TOKENS - n_windows}
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())["measurement"]
    assert m["skip_first"] == 1 and m["n_counted_tokens"] == N_TOKENS - n_windows
    post = df.query("kind == 'mlp_post'").set_index("layer")
    for layer, (zeros, entries) in _independent_zero_frac(model_dir, corpus, skip_first=1).items():
        assert post.loc[layer, "zero_frac"] == zeros / entries


# ------------------------------------------------------------------ bad input
def _assert_clean_failure(r, code: int, words: tuple[str, ...], out: Path):
    assert r.exit_code == code, (r.exit_code, r.stderr, r.stdout)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("actsparse: error: ")
    low = lines[0].lower()
    for w in words:
        assert w.lower() in low, (w, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists(), "no output folder on failure"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "no temporary leftovers"


def _truncated_copy(model_dir: Path, dst: Path, keep: int | None = None) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    data = (model_dir / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:keep if keep is not None else len(data) // 2])
    return dst


BAD_CASES = {
    "missing path": (lambda t, m, c: ["measure", t / "no-such-model", "--data", c], EXIT_CHECKPOINT,
                     ("does not exist",)),
    "folder without weights": (lambda t, m, c: ["measure", _mkdir(t / "emptydir"), "--data", c], EXIT_CHECKPOINT,
                               ("no weights",)),
    "folder with config only": (lambda t, m, c: ["measure", _config_only(t, m), "--data", c], EXIT_CHECKPOINT,
                                ("no weights",)),
    "text file as checkpoint": (lambda t, m, c: ["measure", _write(t / "notes.txt", "hello world\n"), "--data", c],
                                EXIT_CHECKPOINT, ("text file", "not a checkpoint")),
    "empty file as checkpoint": (lambda t, m, c: ["measure", _write(t / "w.safetensors", ""), "--data", c],
                                 EXIT_CHECKPOINT, ("empty",)),
    "truncated safetensors file (8 bytes kept)": (
        lambda t, m, c: ["measure", _truncated_copy(m, t / "tr", 8) / "model.safetensors", "--config",
                         m / "config.json", "--data", c], EXIT_CHECKPOINT, ("safetensors",)),
    "truncated safetensors file (header cut)": (
        lambda t, m, c: ["measure", _truncated_copy(m, t / "tr", 200) / "model.safetensors", "--config",
                         m / "config.json", "--data", c], EXIT_CHECKPOINT, ("truncated",)),
    "truncated safetensors file (data cut)": (
        lambda t, m, c: ["measure", _truncated_copy(m, t / "tr") / "model.safetensors", "--config",
                         m / "config.json", "--data", c], EXIT_CHECKPOINT, ("truncated",)),
    "truncated safetensors in a model folder": (
        lambda t, m, c: ["measure", _truncated_copy(m, t / "tr"), "--data", c], EXIT_CHECKPOINT, ("truncated",)),
    "empty corpus": (lambda t, m, c: ["measure", m, "--data", _write(t / "e.txt", "")], EXIT_DATA, ("empty",)),
    "whitespace corpus": (lambda t, m, c: ["measure", m, "--data", _write(t / "e.txt", " \n\n ")], EXIT_DATA,
                          ("empty",)),
    "missing corpus": (lambda t, m, c: ["measure", m, "--data", t / "nope.txt"], EXIT_DATA, ("does not exist",)),
    "binary corpus": (lambda t, m, c: ["measure", m, "--data", m / "model.safetensors"], EXIT_DATA, ("binary",)),
    "corpus shorter than one window": (lambda t, m, c: ["measure", m, "--data", _write(t / "s.txt", "the cat sat")],
                                       EXIT_DATA, ("3 tokens", "--max-length")),
    "bad jsonl line": (lambda t, m, c: ["measure", m, "--data", _write(t / "b.jsonl", '{"text": "the cat"}\n{oops\n')],
                       EXIT_DATA, ("line 2",)),
    "unknown --kind": (lambda t, m, c: ["measure", m, "--data", c, "--kind", "mlp_psot"], EXIT_MODEL,
                       ("mlp_psot", "did you mean 'mlp_post'")),
    "--site matching nothing": (lambda t, m, c: ["measure", m, "--data", c, "--site", "model.layers.*.down:input"],
                                EXIT_MODEL, ("matches no module", "--all-modules")),
    "--device cuda without a GPU": (lambda t, m, c: ["measure", m, "--data", c, "--device", "cuda"], EXIT_DEVICE,
                                    ("cuda", "--device cpu")),
    "--device cuda:1 without a GPU": (lambda t, m, c: ["measure", m, "--data", c, "--device", "cuda:1"], EXIT_DEVICE,
                                      ("cuda",)),
}


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _config_only(t: Path, m: Path) -> Path:
    d = _mkdir(t / "cfgonly")
    (d / "config.json").write_bytes((m / "config.json").read_bytes())
    return d


_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_NO_GPU) if "--device cuda" in c else c for c in BAD_CASES])
def test_bad_input_fails_cleanly(case, model_dir, corpus, tmp_path):
    build, code, words = BAD_CASES[case]
    work = _mkdir(tmp_path / "work")
    args = build(work, model_dir, corpus)
    out = tmp_path / "out"
    r = invoke(*args, "--max-length", MAX_LEN, "-q", "-o", out)
    _assert_clean_failure(r, code, words, out)


def test_data_error_without_quiet_prints_only_the_error(model_dir, tmp_path):
    out = tmp_path / "out"
    r = invoke("measure", model_dir, "--data", _write(tmp_path / "e.txt", ""), "--max-length", MAX_LEN, "-o", out)
    _assert_clean_failure(r, EXIT_DATA, ("empty",), out)


def test_sites_bad_input_fails_cleanly(tmp_path):
    r = invoke("sites", tmp_path / "no-such-model")
    assert r.exit_code == EXIT_CHECKPOINT and r.stderr.startswith("actsparse: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_existing_output_needs_force(model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    base = ["measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q", "-o", out]
    r = invoke(*base)
    assert r.exit_code == EXIT_OUTPUT
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--force" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert (out / "keep.txt").read_text() == "precious"

    r = invoke(*base, "--force")  # --force replaces only a folder actsparse wrote
    assert r.exit_code == EXIT_OUTPUT and "keep.txt" in r.stderr and (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert invoke(*base).exit_code == 0  # an empty folder is used as it is
    r = invoke(*base, "--force")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "sparsity.parquet"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_path_that_is_a_file(model_dir, corpus, tmp_path):
    out = _write(tmp_path / "out", "x")
    r = invoke("measure", model_dir, "--data", corpus, "--max-length", MAX_LEN, "-q", "-o", out)
    assert r.exit_code == EXIT_OUTPUT and "is a file" in r.stderr
    assert out.read_text() == "x"
