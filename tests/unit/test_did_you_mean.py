"""probes.errors.did_you_mean / unknown_name: the one "did you mean" of every command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from probes.errors import EXIT_DATA, EXIT_MODEL, ActsparseError, DataError, ModelError, did_you_mean, unknown_name

ROOT = Path(__file__).resolve().parents[2]


def test_did_you_mean_names_the_closest_choice():
    assert did_you_mean("resid_pst", ["embed", "resid_post", "final_norm"]) == "; did you mean 'resid_post'?"
    assert did_you_mean("mlp_ou", ("mlp_out", "mlp_pre", "attn_out"), n=3) == "; did you mean 'mlp_out' or 'mlp_pre'?"
    # difflib ratios 0.917, 0.889, 0.72: best first
    assert (did_you_mean("blocks.0.mlp", ["blocks.0.attn", "blocks.1.mlp", "blocks.0.mlp.fc"], n=3, cutoff=0.4)
            == "; did you mean 'blocks.1.mlp', 'blocks.0.mlp.fc' or 'blocks.0.attn'?")
    assert did_you_mean("zzz", ["embed", "resid_post"]) == ""
    assert did_you_mean("x", []) == ""
    assert did_you_mean("sun", {"sun2024": 1, "maxact2026": 2}) == "; did you mean 'sun2024'?"  # a dict: its keys


def test_unknown_name_is_one_line_problem_and_fix_with_every_valid_name():
    e = unknown_name("preset", "sun204", ["sun2024", "maxact2026"], error=DataError)
    assert isinstance(e, DataError) and e.exit_code == EXIT_DATA
    assert e.one_line() == "unknown preset 'sun204'; did you mean 'sun2024'? -- fix: use one of sun2024, maxact2026"
    e = unknown_name("site kind", "nothing", ["mlp_post", "mlp_pre"], exit_code=3)
    assert type(e) is ActsparseError and e.exit_code == 3
    assert e.one_line() == "unknown site kind 'nothing' -- fix: use one of mlp_post, mlp_pre"
    assert "\n" not in unknown_name("x", "a\nb", ["a"]).one_line()


def test_callers_use_it():
    from probes.activations import from_name
    from probes.massive import resolve_preset
    from probes.track import resolve_analyses

    with pytest.raises(DataError, match=r"unknown preset 'sun2023'; did you mean 'sun2024'\? -- fix: use one of"):
        resolve_preset("sun2023")
    with pytest.raises(ActsparseError, match=r"unknown analysis 'mesure'; did you mean 'measure'\?"):
        resolve_analyses("mesure")
    with pytest.raises(ModelError, match=r"unknown activation 'rellu'; did you mean 'relu'") as e:
        from_name("rellu")
    assert e.value.exit_code == EXIT_MODEL


# probes/pplp.py (curve()'s method check) is being rewritten elsewhere; its block goes when it does.
_NOT_YET = {"probes/pplp.py"}


def test_no_other_did_you_mean():
    """One helper: no module outside probes/errors.py calls difflib for its own suggestions."""
    found = []
    for pkg in ("reports", "actsparse_cli", "probes"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "probes/errors.py" or rel in _NOT_YET:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import) and any(a.name == "difflib" for a in node.names) or (
                        isinstance(node, ast.ImportFrom) and node.module == "difflib"):
                    found.append(f"{rel}:{node.lineno}")
    assert not found, "difflib used outside probes.errors.did_you_mean: " + ", ".join(found)
