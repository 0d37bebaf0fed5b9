import subprocess
import sys


def test_probes_import_without_cli_packages():
    """``probes`` is a library: importing it (and its modules) must not pull in typer or rich."""
    code = ("import sys, probes, probes.loading, probes.sites, probes.sparsity, probes.corpus, probes.runner, "
            "probes.measure, probes.formats, probes.hooks; "
            "bad = [m for m in ('typer', 'rich') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_is_fast_and_imports_no_torch():
    """``actsparse --help`` must not import torch or transformers (heavy imports live inside commands)."""
    code = ("import sys; from actsparse_cli.main import app; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_command_parses_its_options_without_pydantic(tmp_path):
    """typer 0.29 coerces every option through pydantic (+60 ms at each command's start); pyproject keeps
    typer below it. A whole ``spectrum`` run (options parsed, tables written) imports neither pydantic nor
    torch."""
    import numpy as np
    import pytest
    from safetensors.numpy import save_file

    import typer

    if tuple(int(p) for p in typer.__version__.split(".")[:2]) >= (0, 29):
        pytest.skip(f"typer {typer.__version__} is installed by hand (pyproject keeps it below 0.29)")
    (tmp_path / "ckpt").mkdir()
    save_file({"h.0.mlp.weight": np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)},
              str(tmp_path / "ckpt" / "model.safetensors"))
    code = ("import sys; from actsparse_cli.main import run\n"
            "try:\n    run(prog_name='actsparse')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in ('pydantic', 'torch') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, "spectrum", str(tmp_path / "ckpt"), "-o", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "o" / "spectrum.csv").exists()
