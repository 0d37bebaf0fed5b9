"""Shell completion as Typer provides it (issue 17): commands and options complete."""

from __future__ import annotations

import os
import subprocess
import sys


def _complete(words: str, cword: int) -> list[str]:
    env = dict(os.environ, _ACTSPARSE_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword),
               HF_HUB_OFFLINE="1")
    code = "import sys; sys.argv = ['actsparse']; from actsparse_cli.main import app; app(prog_name='actsparse')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return r.stdout.split()


def test_commands_and_options_complete():
    assert "analyze" in _complete("actsparse an", 1)
    assert {"--max-tokens", "--massive"} <= set(_complete("actsparse measure --ma", 2))
