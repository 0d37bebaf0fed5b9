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
