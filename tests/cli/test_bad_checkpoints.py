"""Bad checkpoints through the CLI (issue 12, the checkpoint side): files that are not regular
files, shard indices that point out of their folder, configs and tokenizers that used to end in
"internal error", configs that silently built fewer layers than the weights hold, and messages
that named the wrong file or the wrong problem.

Every failing run must exit with the documented code (README, "Errors and exit codes"), print one
line on stderr (``actsparse: error: PROBLEM -- fix: FIX``), show no traceback, write no output
folder, and leave every input file byte-identical (sha256 before and after). Runs that could block
on a FIFO or read a device forever go to one subprocess with a timeout, so a regression fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_MODEL

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure sparse activations".split()
MAX_LEN = 16  # the models' n_positions too
runner = CliRunner()


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory, word_lm) -> Path:
    """What the cases are made from (never handed to a command itself): a 2-layer and a 4-layer tiny
    GPT-2, a tokenizer with more ids than their embedding, a corpus."""
    root = tmp_path_factory.mktemp("bad-ckpt-base")
    word_lm.save_gpt2(root / "m2", WORDS, n_inner=64, max_len=MAX_LEN)
    word_lm.save_gpt2(root / "m4", WORDS, n_inner=64, max_len=MAX_LEN, n_layer=4)
    tok, _ = word_lm.tokenizer(WORDS + [f"extra{i}" for i in range(40)], MAX_LEN)
    tok.save_pretrained(root / "bigtok")
    word_lm.corpus(root / "corpus.txt", WORDS, 320)
    return root


@pytest.fixture
def work(tmp_path, base) -> Path:
    """A fresh copy of ``base`` for one test: cases edit their copy, the hash check covers all of it."""
    w = tmp_path / "work"
    shutil.copytree(base, w, symlinks=True)
    return w


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Matplotlib costs ~2 s a run; no case here is about figures."""
    import reports.sections.drift
    import reports.measure_report

    monkeypatch.setattr(reports.measure_report, "sparsity_by_layer", lambda *a, **k: [])
    monkeypatch.setattr(reports.sections.drift, "drift_by_layer", lambda *a, **k: [])


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (symlinks followed only to regular files: never
    into a FIFO or /dev/zero)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                if not stat.S_ISREG(os.stat(p).st_mode):
                    continue
            except OSError:
                continue
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def argv(cmd: str, checkpoint, work: Path, out: Path, *extra) -> list[str]:
    args = [cmd, checkpoint, *extra]
    if cmd in ("measure", "grad", "massive", "pplp"):
        args += ["--data", work / "corpus.txt", "--max-tokens", 64]
        if "--max-length" not in extra:
            args += ["--max-length", MAX_LEN]
    if cmd != "sites":
        args += ["-o", out, "-q"]
    return [str(a) for a in args]


def check_one_line(code: int, stderr: str, stdout: str, expected: int, words) -> str:
    assert code == expected, (code, stderr, stdout)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("actsparse: error: ") and " -- fix: " in line, line
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    assert "Traceback" not in stderr + stdout
    return line


def fails(work: Path, out: Path, capfd, cmd: str, checkpoint, *extra, code: int, words=()) -> str:
    """Run one command in-process; check the one-line failure, no output, inputs unchanged."""
    before = hashes(work)
    r = runner.invoke(app, argv(cmd, checkpoint, work, out, *extra))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    line = check_one_line(r.exit_code, r.stderr, r.stdout, code, words)
    leaked = capfd.readouterr().err  # transformers writes to the real stderr, behind CliRunner's back
    assert "LOAD REPORT" not in leaked and "Traceback" not in leaked, leaked
    assert not out.exists()
    assert hashes(work) == before
    return line


def copy_model(src: Path, dst: Path, config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def write_index(folder: Path, header_of: Path, target: str, name: str = "model.safetensors.index.json") -> Path:
    raw = header_of.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    names = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": {k: target for k in names}}))
    return folder / name


# ------------------------------------------------------------------ item 3: not a regular file (subprocess)
DRIVER = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    import reports.measure_report
    reports.measure_report.sparsity_by_layer = lambda *a, **k: []
    from actsparse_cli.main import app
    runner = CliRunner()
    for name, args in json.loads(sys.argv[1]):
        print(json.dumps({"name": name, "start": True}), flush=True)
        r = runner.invoke(app, args)
        print(json.dumps({"name": name, "code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout,
                          "exc": None if r.exception is None or isinstance(r.exception, SystemExit)
                          else repr(r.exception)}), flush=True)
""")


def _special_files(work: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (argv, words the message must hold); each makes its own FIFO / device link / socket."""
    m = work / "m2"
    out = work.parent / "out"
    cases: dict[str, tuple[list[str], tuple[str, ...]]] = {}

    fifo = copy_model(m, work / "fifo-weights")
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")
    for cmd in ("sites", "measure", "spectrum", "drift"):
        cases[f"fifo-weights-{cmd}"] = (argv(cmd, fifo, work, out), ("named pipe", "not a regular file",
                                                                      "model.safetensors"))
    cases["fifo-as-checkpoint-file"] = (argv("spectrum", fifo / "model.safetensors", work, out),
                                        ("named pipe", "not a regular file"))

    cfg = copy_model(m, work / "fifo-config")
    (cfg / "config.json").unlink()
    os.mkfifo(cfg / "config.json")
    cases["fifo-config.json"] = (argv("sites", cfg, work, out), ("config.json", "named pipe"))

    tokf = copy_model(m, work / "fifo-tokenizer")
    (tokf / "tokenizer.json").unlink()
    os.mkfifo(tokf / "tokenizer.json")
    cases["fifo-tokenizer.json"] = (argv("measure", tokf, work, out), ("tokenizer.json", "named pipe"))

    shard = copy_model(m, work / "fifo-shard")
    (shard / "model.safetensors").rename(shard / "real.safetensors")
    os.mkfifo(shard / "model-00001-of-00001.safetensors")
    write_index(shard, shard / "real.safetensors", "model-00001-of-00001.safetensors")
    cases["fifo-shard"] = (argv("spectrum", shard, work, out), ("shard", "named pipe"))

    bare = work / "bare"
    bare.mkdir()
    shutil.copy(m / "model.safetensors", bare / "w.safetensors")
    os.mkfifo(bare / "config-fifo.json")
    cases["fifo---config"] = (argv("sites", bare / "w.safetensors", work, out, "--config", bare / "config-fifo.json"),
                              ("--config", "named pipe"))
    os.mkfifo(work / "tokenizer-fifo")
    cases["fifo---tokenizer"] = (argv("measure", m, work, out, "--tokenizer", work / "tokenizer-fifo"),
                                 ("--tokenizer", "named pipe"))

    zero = copy_model(m, work / "dev-zero")
    (zero / "model.safetensors").unlink()
    (zero / "model.safetensors").symlink_to("/dev/zero")
    for cmd in ("sites", "spectrum", "drift"):
        cases[f"dev-zero-link-{cmd}"] = (argv(cmd, zero, work, out), ("character device", "/dev/zero",
                                                                       "not a regular file"))
    cases["dev-zero-link-as-checkpoint-file"] = (argv("drift", zero / "model.safetensors", work, out),
                                                 ("character device", "/dev/zero"))
    cases["dev-null-as-checkpoint-file"] = (argv("spectrum", "/dev/null", work, out), ("character device",))

    sock = copy_model(m, work / "socket")
    (sock / "model.safetensors").unlink()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock / "model.safetensors"))
    except OSError:  # a path too long for AF_UNIX: the other cases still run
        shutil.rmtree(sock)
    else:
        cases["socket-weights"] = (argv("sites", sock, work, out), ("socket", "not a regular file"))
    finally:
        s.close()
    return cases


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_blocking(work, tmp_path):
    cases = _special_files(work)
    before = hashes(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    todo = [[name, args] for name, (args, _) in cases.items()]
    try:
        p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(todo)], capture_output=True, text=True,
                           timeout=120, env=env, cwd=Path(__file__).parents[2])
        stdout, stderr = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr = text(e.stdout), text(e.stderr) + "\n(timed out)"
    results = {}
    for ln in stdout.splitlines():
        rec = json.loads(ln)
        results[rec["name"]] = rec
    hung = [n for n, r in results.items() if "code" not in r]
    assert not hung, f"blocked on {hung[0]} (no result within the timeout)"
    assert set(results) == set(cases), (sorted(set(cases) - set(results)), stderr[-2000:])
    for name, (_, words) in cases.items():
        r = results[name]
        assert r["exc"] is None, (name, r["exc"])
        check_one_line(r["code"], r["stderr"], r["stdout"], EXIT_CHECKPOINT, words)
    assert hashes(work) == before
    assert not (work.parent / "out").exists()


# ------------------------------------------------------------------ item 5: shard indices stay in their folder
def _escaping_index(work: Path, kind: str) -> Path:
    other = work / "other"
    other.mkdir(exist_ok=True)
    shutil.copy(work / "m2" / "model.safetensors", other / "model.safetensors")  # valid: opened, it would load
    d = copy_model(work / "m2", work / f"index-{kind}")
    weights = d / "model.safetensors"
    target = {"dotdot": "../other/model.safetensors", "absolute": str(other / "model.safetensors"),
              "etc-passwd": "/etc/passwd"}.get(kind)
    if kind == "linked-folder":  # a symlinked folder inside that leads out
        (d / "sub").symlink_to(other, target_is_directory=True)
        target = "sub/model.safetensors"
    write_index(d, weights, target)
    weights.unlink()
    return d


@pytest.fixture
def no_pickle_reader(monkeypatch):
    """The pickle reader must never see a file an index names outside its folder."""
    import probes.formats

    def refuse(path, *a, **k):
        raise AssertionError(f"handed to the pickle reader: {path}")

    monkeypatch.setattr(probes.formats, "_torch_load", refuse)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "etc-passwd", "linked-folder"])
@pytest.mark.parametrize("cmd", ["sites", "spectrum", "drift"])
def test_index_entries_outside_the_folder_are_refused(kind, cmd, work, tmp_path, capfd, no_pickle_reader):
    d = _escaping_index(work, kind)
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT,
          words=("outside the index's folder", "model.safetensors.index.json", "fix it"))


@pytest.mark.parametrize("cmd", ["spectrum", "drift"])
def test_a_torch_index_naming_etc_passwd_never_reaches_the_pickle_reader(cmd, work, tmp_path, capfd,
                                                                         no_pickle_reader):
    d = copy_model(work / "m2", work / "bin-index")
    write_index(d, d / "model.safetensors", "/etc/passwd", name="pytorch_model.bin.index.json")
    (d / "model.safetensors").unlink()
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT, words=("/etc/passwd", "outside"))
    # the index given as the checkpoint itself
    fails(work, tmp_path / "out", capfd, cmd, d / "pytorch_model.bin.index.json", code=EXIT_CHECKPOINT,
          words=("/etc/passwd", "outside"))


def test_hf_cache_style_symlinked_shards_still_load(work, tmp_path):
    """A shard that is a symlink in the folder to a regular file elsewhere (an HF cache snapshot
    linking to its blobs) is fine."""
    blobs = work / "blobs"
    blobs.mkdir()
    d = copy_model(work / "m2", work / "snapshot")
    (d / "model.safetensors").rename(blobs / "3f2a")
    (d / "model-00001-of-00001.safetensors").symlink_to(os.path.relpath(blobs / "3f2a", d))
    write_index(d, blobs / "3f2a", "model-00001-of-00001.safetensors")
    before = hashes(work)
    r = runner.invoke(app, ["sites", str(d)])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["drift", str(d), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.stderr
    assert hashes(work) == before


# ------------------------------------------------------------------ item 7: bad input that used to be "internal error"
@pytest.fixture
def no_forward(monkeypatch):
    """Any forward pass is a failure: the refusals below come before the first batch."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("a batch was run")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "forward", boom)


@pytest.mark.parametrize("cmd", ["measure", "grad", "pplp", "massive"])
def test_max_length_above_the_position_limit_fails_before_any_batch(cmd, work, tmp_path, capfd, no_forward):
    fails(work, tmp_path / "out", capfd, cmd, work / "m2", "--max-length", 32, code=EXIT_DATA,
          words=("--max-length 32", "position limit of 16", "n_positions", "--max-length 16 or less"))


def test_tokenizer_with_more_ids_than_the_embedding(work, tmp_path, capfd, no_forward):
    fails(work, tmp_path / "out", capfd, "measure", work / "m2", "--tokenizer", work / "bigtok", code=EXIT_CHECKPOINT,
          words=("--tokenizer", "60 token ids", "20 rows"))


@pytest.mark.parametrize("key", ["n_embd", "n_head", "n_inner", "n_layer"])
def test_config_sizes_of_zero(key, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "zero", config={key: 0})
    fails(work, tmp_path / "out", capfd, "sites", d, code=EXIT_CHECKPOINT,
          words=("config.json", f"sets {key} to 0", "must be positive"))


def test_config_size_of_zero_through_config_option(work, tmp_path, capfd):
    cfg = json.loads((work / "m2" / "config.json").read_text())
    (work / "cfg0.json").write_text(json.dumps({**cfg, "n_embd": 0}))
    fails(work, tmp_path / "out", capfd, "measure", work / "m2" / "model.safetensors", "--config", work / "cfg0.json",
          code=EXIT_CHECKPOINT, words=("--config", "n_embd to 0"))


@pytest.mark.parametrize("cmd", ["sites", "measure"])
def test_unknown_activation_function(cmd, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "act", config={"activation_function": "frobnicate"})
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_MODEL,
          words=("activation_function", "'frobnicate'", "does not know", "relu"))


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("cmd", ["sites", "measure"])
def test_deeply_nested_config_json(cmd, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "deep")
    (d / "config.json").write_text('{"model_type": "gpt2", "x": ' + DEEP + "}")
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT, words=("config.json", "too deeply"))


def test_deeply_nested_config_option(work, tmp_path, capfd):
    (work / "deep.json").write_text('{"model_type": "gpt2", "x": ' + DEEP + "}")
    fails(work, tmp_path / "out", capfd, "sites", work / "m2" / "model.safetensors", "--config", work / "deep.json",
          code=EXIT_CHECKPOINT, words=("--config", "too deeply"))


@pytest.mark.parametrize("cmd", ["sites", "spectrum", "drift"])
def test_deeply_nested_index_json(cmd, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "deep-index")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT, words=("shard index", "too deeply"))
    fails(work, tmp_path / "out", capfd, cmd, d / "model.safetensors.index.json", code=EXIT_CHECKPOINT,
          words=("index.json", "too deeply"))


def test_huge_seed_is_a_usage_error_naming_the_range(work, tmp_path):
    before = hashes(work)
    r = runner.invoke(app, argv("measure", work / "m2", work, tmp_path / "out", "--seed", str(2**70)))
    assert r.exit_code == 2, r.stderr
    assert "--seed" in r.stderr and "4294967295" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr
    assert not (tmp_path / "out").exists() and hashes(work) == before


# ------------------------------------------------------------------ item 8: config with fewer layers than the weights
@pytest.mark.parametrize("cmd", ["sites", "measure"])
def test_config_with_fewer_layers_than_the_weights(cmd, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "fewer")
    shutil.copy(work / "m4" / "model.safetensors", d / "model.safetensors")
    fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT,
          words=("weights have layers 2-3", "transformer.h", "config.json does not build", "builds 2"))


def test_config_option_with_fewer_layers_than_the_weights(work, tmp_path, capfd):
    fails(work, tmp_path / "out", capfd, "measure", work / "m4" / "model.safetensors", "--config", work / "m2",
          code=EXIT_CHECKPOINT, words=("weights have layers 2-3", "does not build"))


# ------------------------------------------------------------------ item 9: messages that pointed the wrong way
def test_garbage_tokenizer_json_is_named(work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "badtok")
    (d / "tokenizer.json").write_text("garbage {{{")
    line = fails(work, tmp_path / "out", capfd, "measure", d, code=EXIT_CHECKPOINT,
                 words=("tokenizer.json", "cannot be loaded", "--tokenizer"))
    assert "has no tokenizer" not in line


@pytest.mark.parametrize("cmd", ["measure", "sites"])
def test_missing_tokenizer_path_is_named(cmd, work, tmp_path, capfd):
    line = fails(work, tmp_path / "out", capfd, cmd, work / "m2", "--tokenizer", work / "no-such-tokenizer",
                 code=EXIT_CHECKPOINT, words=("--tokenizer", "no-such-tokenizer", "does not exist"))
    assert "has no tokenizer" not in line


@pytest.mark.parametrize("cmd", ["spectrum", "drift"])
def test_bad_safetensors_header_is_not_called_a_pickle(cmd, work, tmp_path, capfd):
    d = copy_model(work / "m2", work / "bad-header")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[:8] = struct.pack("<Q", 2**60)  # a header length no file has
    (d / "model.safetensors").write_bytes(bytes(raw))
    line = fails(work, tmp_path / "out", capfd, cmd, d, code=EXIT_CHECKPOINT,
                 words=("model.safetensors", "not a valid safetensors file", "re-download"))
    assert "pickle" not in line


def _small_gguf(path: Path) -> Path:
    """A 1-layer llama GGUF (f32) that transformers' GGUF loader can build."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    v, h, f = 257, 16, 32
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(MAX_LEN)
    w.add_embedding_length(h)
    w.add_block_count(1)
    w.add_feed_forward_length(f)
    w.add_rope_dimension_count(h // 2)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    def put(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    put("token_embd.weight", v, h)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(h, np.float32))
    for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
        put(f"blk.0.{n}.weight", h, h)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(h, np.float32))
    put("blk.0.ffn_gate.weight", f, h)
    put("blk.0.ffn_up.weight", f, h)
    put("blk.0.ffn_down.weight", h, f)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    put("output.weight", v, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("cmd", ["measure", "spectrum"])
def test_truncated_gguf_is_called_truncated(cmd, work, tmp_path, capfd):
    good = _small_gguf(tmp_path / "good.gguf")
    (work / "trunc.gguf").write_bytes(good.read_bytes()[:-1000])  # header intact, data cut short
    extra = ("--tokenizer", work / "m2") if cmd == "measure" else ()
    line = fails(work, tmp_path / "out", capfd, cmd, work / "trunc.gguf", *extra, code=EXIT_CHECKPOINT,
                 words=("trunc.gguf", "truncated", "re-download"))
    assert "architecture" not in line


def test_quiet_keeps_transformers_off_stderr(work, tmp_path, capfd):
    """-q: no load report (a weight the model does not use) and no GGUF conversion bar."""
    import torch
    from safetensors.torch import load_file, save_file

    d = copy_model(work / "m2", work / "extra")
    sd = load_file(d / "model.safetensors")
    sd["transformer.extra.weight"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()
    r = runner.invoke(app, argv("measure", d, work, tmp_path / "out1"))
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    leaked = capfd.readouterr().err
    assert "LOAD REPORT" not in leaked and "UNEXPECTED" not in leaked, leaked

    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    g = _small_gguf(work / "small.gguf")
    r = runner.invoke(app, argv("measure", g, work, tmp_path / "out2", "--tokenizer", work / "m2"))
    assert r.exit_code == 0, r.stderr
    leaked = capfd.readouterr().err + r.stderr
    assert "de-quantizing" not in leaked and "it/s" not in leaked, leaked
