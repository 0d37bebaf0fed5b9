"""``actsparse sites``' listing cache (``actsparse_cli/sites_cache.py``): a hit prints exactly what a fresh
run prints and loads nothing; any change of what the listing depends on (config, weight bytes, tokenizer,
options) misses; errors and noisy loads are never stored; a corrupt entry or an unwritable folder is no
error. Every cache here lives under ``tmp_path`` (``ACTSPARSE_CACHE_DIR``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import actsparse_cli.sites_cmd as sites_cmd
from actsparse_cli import sites_cache
from actsparse_cli.main import app

WORDS = "the cat sat on a mat dog ran in park sun is warm".split()
runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, word_lm) -> Path:
    """A GPT-2 folder whose config has a key that ``probes.quick_sites`` does not know, so that ``sites`` loads
    the model (a folder it reads from the files never reaches the cache)."""
    folder = word_lm.save_gpt2(tmp_path_factory.mktemp("sites-cache-model"), WORDS, n_layer=2, n_inner=32)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "note": "a key for the load to read"}, indent=2))
    return folder


@pytest.fixture
def model(saved, tmp_path) -> Path:
    """A private copy (tests change files in it)."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sites_cache, "RACY_S", 0.0)  # the copies above are seconds old
    return tmp_path / "cache" / "sites"


@pytest.fixture
def loads(monkeypatch) -> list:
    """Each model load the command does."""
    calls: list = []
    real = sites_cmd.load

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(sites_cmd, "load", counted)
    return calls


def run(*args) -> tuple[int, str, str]:
    r = runner.invoke(app, ["sites", *[str(a) for a in args]])
    return r.exit_code, r.stdout, r.stderr


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


VARIANTS = [(), ("--format", "json"), ("--format", "csv"), ("--format", "md"), ("--all-modules",),
            ("--all-modules", "--format", "json"), ("--kind", "mlp_pre,resid_post", "--format", "csv"),
            ("--site", "transformer.h.*.mlp.c_fc:output", "--format", "json")]


def test_a_hit_prints_what_a_fresh_run_prints_and_loads_nothing(model, cache, loads):
    for args in VARIANTS:
        for e in entries(cache):
            e.unlink()
        fresh = run(model, *args, "--no-cache")
        assert fresh[0] == 0, fresh
        assert entries(cache) == []  # --no-cache stores nothing
        n = len(loads)
        first = run(model, *args)  # a miss: loads, stores
        assert len(loads) == n + 1 and len(entries(cache)) == 1, args
        second = run(model, *args)  # a hit: no load
        assert len(loads) == n + 1, args
        assert fresh == first == second, args
    # The output format is not part of the key: one entry serves them all.
    n = len(loads)
    assert run(model, "--site", "transformer.h.*.mlp.c_fc:output")[0] == 0 and len(loads) == n
    # The JSON keeps pandas' column types (widths of None-bearing columns as floats), as before the cache.
    mods = json.loads(run(model, "--all-modules", "--format", "json")[1])["tables"]["modules"]
    assert {"module_path": "transformer.h.0.mlp.c_fc", "class": "Conv1D", "in": 16.0, "out": 32.0} in mods


def test_a_changed_config_misses(model, cache, loads):
    before = run(model, "--all-modules")
    assert "ReLU" in before[1]
    cfg = json.loads((model / "config.json").read_text())
    cfg["activation_function"] = "gelu_new"
    (model / "config.json").write_text(json.dumps(cfg))
    after = run(model, "--all-modules")
    assert len(loads) == 2 and after[0] == 0 and "NewGELUActivation" in after[1] and "ReLU" not in after[1]
    assert after == run(model, "--all-modules", "--no-cache")


def test_changed_weight_bytes_miss_though_header_and_size_stay(model, cache, loads):
    assert run(model)[0] == 0 and len(entries(cache)) == 1
    path = model / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:  # one weight becomes NaN in place: same header, same size
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        begin = header["transformer.h.0.mlp.c_fc.weight"]["data_offsets"][0]
        f.seek(8 + n + begin)
        f.write(struct.pack("<f", float("nan")))
    assert path.stat().st_size == size
    code, out, err = run(model)
    assert len(loads) == 2 and code == 3 and "NaN or Inf" in err and out == ""
    assert (code, out, err) == run(model, "--no-cache")
    assert len(entries(cache)) == 1  # the error was not stored


def test_a_changed_tokenizer_misses(model, cache, loads, word_lm):
    assert run(model)[0] == 0
    tok, _ = word_lm.tokenizer(WORDS + [f"extra{i}" for i in range(64)], 64)  # more ids than embedding rows
    tok.save_pretrained(model)
    code, _, err = run(model)
    assert len(loads) == 2 and code == 2 and "token ids" in err


def test_options_and_copies_get_their_own_entries(model, cache, loads, tmp_path):
    assert run(model)[0] == 0
    assert run(model, "--kind", "mlp_pre")[0] == 0
    assert run(model, "--dtype", "float32")[0] == 0
    assert run(model, "--all-modules")[0] == 0
    other = Path(shutil.copytree(model, tmp_path / "other"))  # same bytes elsewhere: never shared
    assert run(other)[0] == 0
    assert len(loads) == 5 and len(entries(cache)) == 5
    assert run(model, "--kind", "mlp_pre")[0] == 0 and run(other)[0] == 0 and len(loads) == 5


def test_racy_inputs_and_noisy_loads_are_not_stored(model, cache, loads, monkeypatch):
    monkeypatch.setattr(sites_cache, "RACY_S", 3600.0)  # every input "just changed"
    assert run(model)[0] == 0 and entries(cache) == []
    monkeypatch.setattr(sites_cache, "RACY_S", 0.0)
    real = sites_cmd.load

    for logger, msg in (("transformers.modeling_utils", "LOAD REPORT from: x"), ("some.lib", "careful")):
        def noisy(*a, logger=logger, msg=msg, **k):
            logging.getLogger(logger).warning(msg)
            return real(*a, **k)

        monkeypatch.setattr(sites_cmd, "load", noisy)
        assert run(model)[0] == 0 and entries(cache) == [], logger

    def warns(*a, **k):
        import warnings

        warnings.warn("a python warning", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(sites_cmd, "load", warns)
    with pytest.warns(UserWarning, match="a python warning"):
        assert run(model)[0] == 0 and entries(cache) == []
    # the watch leaves logging and warnings as it found them
    assert logging.Logger.callHandlers.__qualname__ == "Logger.callHandlers"
    assert all(not isinstance(f, sites_cache.Watch) for f in logging.getLogger("transformers.modeling_utils").filters)


def test_a_corrupt_entry_is_ignored_and_replaced(model, cache, loads):
    good = run(model)
    [entry] = entries(cache)
    for junk in (b"", b"{not json", json.dumps({"schema": 1, "key": {}, "family": "x", "rows": []}).encode(),
                 entry.read_bytes().replace(b'"hook_post"', b'"hook_pre"').replace(b'"schema": 1', b'"schema": 0')):
        entry.write_bytes(junk)
        assert run(model) == good
    n = len(loads)
    assert run(model) == good and len(loads) == n  # replaced by a sound entry: a hit again


def test_an_unwritable_cache_is_no_error(model, tmp_path, monkeypatch, loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(blocker))  # sites/ cannot be made under a file
    monkeypatch.setattr(sites_cache, "RACY_S", 0.0)
    assert run(model) == run(model, "--no-cache")
    assert run(model)[0] == 0 and len(loads) == 3


def test_what_is_not_cacheable(model, tmp_path):
    base = dict(config=None, tokenizer=None, arch=None, device="cpu", dtype="auto", trust_remote_code=False,
                unsafe_pickle=False, device_map=None, kinds=("mlp_post",), site=None, all_modules=False)
    assert sites_cache.key_material(str(model), **base) is not None
    for change in (dict(arch="gpt2"), dict(trust_remote_code=True), dict(unsafe_pickle=True), dict(device_map="auto"),
                   dict(device="auto"),
                   dict(device="cuda"), dict(tokenizer="gpt2"), dict(config="org/some-config")):
        assert sites_cache.key_material(str(model), **{**base, **change}) is None, change
    for ckpt in ("gpt2", "org/model", str(tmp_path / "missing"), str(tmp_path)):  # hub ids, no path, no weights
        assert sites_cache.key_material(ckpt, **base) is None, ckpt


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path / "c"))
    assert sites_cache.cache_dir() == tmp_path / "c" / "sites"
    monkeypatch.delenv("ACTSPARSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert sites_cache.cache_dir() == tmp_path / "xdg" / "actsparse" / "sites"


def test_a_hit_imports_neither_torch_nor_transformers_nor_pandas(model, cache, loads):
    """The point of the cache, in a fresh interpreter: a hit answers without the heavy imports."""
    first = run(model)  # stored here, in this process
    assert len(loads) == 1 and len(entries(cache)) == 1
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom actsparse_cli.main import app\n"
            f"r = CliRunner().invoke(app, ['sites', {str(model)!r}])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))\n"
            "sys.stdout.write(r.stdout)")
    env = {**os.environ, "ACTSPARSE_CACHE_DIR": str(cache.parent), "COLUMNS": os.environ.get("COLUMNS", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    imported, _, table = r.stdout.partition("\n")
    assert imported == "[]" and table == first[1]
