"""Security (issue 8): hostile strings from checkpoints and corpora stay text in index.html and summary.md;
writing never goes through a symbolic link or outside the output folder; manifests record paths as
given; no code from a checkpoint runs by default (trust_remote_code off, weights_only on).

What is already covered elsewhere and not repeated here: a hostile checkpoint *path* through a real
measure -> report run (tests/cli/test_report_cli.py), hostile names in ``compare`` markdown
(tests/unit/test_compare.py), a pickle payload refused by every loader and run only with
--unsafe-pickle (tests/integration/test_loading_roundtrip.py, tests/cli/test_bad_input_matrix.py).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_MODEL, EXIT_OUTPUT
from probes.measure import MeasureResult
from probes.sparsity import ActivationSparsityProbe

pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # the \r in names, in figure titles

HOSTILE = "<script>alert(1)</script>"
# everything that breaks markdown or HTML: a tag, a cell pipe, backticks, a newline, a javascript link, an image
EVIL = f"{HOSTILE}|`tick`\n](javascript:alert(1)) ![x](http://tracker.invalid/p.png) & \r end"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------ checks
def _outside_code(line: str) -> str:
    """The parts of a markdown line outside `code spans` (which render their content literally)."""
    return " ".join(re.split(r"(?<!\\)`", line)[0::2])  # an escaped \` opens no span


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def assert_safe_markdown(md: str, where: str) -> None:
    """No raw HTML, link or image outside code spans (which render their content as text), and
    unbroken tables."""
    for line in md.splitlines():
        assert len(re.findall(r"(?<!\\)`", line)) % 2 == 0, (where, line)  # code spans pair up as written
        text = _outside_code(line)
        assert not re.search(r"<[A-Za-z/!?]", text), (where, line)  # no tag, comment or autolink outside code
        assert not re.search(r"(?<!\\)\]\(", text), (where, line)  # no link or image: `](` always escaped
    # every row of a table has as many cells as its header: no pipe or newline split a cell
    table: list[str] = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            n = _unescaped_pipes(table[0])
            assert all(_unescaped_pipes(r) == n for r in table), (where, table)
            table = []


def assert_safe_html(page: str) -> None:
    assert "<script" not in page.lower() and HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the string is there, as text
    assert not re.search(r"(href|src)\s*=\s*[\"']?\s*javascript:", page, re.I)
    assert not re.search(r"(href|src)=\"https?:", page)  # nothing from the network either
    assert not re.search(r"<[a-z]+[^>]*\son[a-z]+\s*=", page, re.I)  # no event-handler attributes


# ---------------------------------------------------------------------------------- a measure output
def _measure_result(corpus: str) -> MeasureResult:
    g = torch.Generator().manual_seed(0)
    rows = []
    for layer, (module, canon) in enumerate([(f"h.0.mlp.{EVIL}", "blocks.0.mlp.hook_post"),
                                             ("h.1.mlp.act", f"custom.{EVIL}")]):
        p = ActivationSparsityProbe(8)
        p.update(torch.relu(torch.randn(2, 6, 8, generator=g)))
        rows.append({"canonical_name": canon, "module_path": module, "kind": "mlp_post", "layer": layer,
                     "dtype": "float32", **p.to_row()})
    info = {"n_counted_tokens": 12, "corpus": corpus, "corpus_is_default": False, "window_scheme": "rolling",
            "max_length": 6, "model_dtype": "float32", "device": "cpu", "n_windows": 2}
    return MeasureResult(rows=rows, info=info)


def _fake_loaded():
    return SimpleNamespace(model=torch.nn.Linear(2, 2), family="gpt2", dtype=torch.float32, device="cpu",
                           is_causal_lm=True, source={"kind": "hf_folder", "path": EVIL}, tokenizer=None)


@pytest.fixture()
def hostile_measure(tmp_path) -> Path:
    """A measure output whose checkpoint path, corpus path and module names are all hostile."""
    from reports.measure_report import write_measure_outputs

    out = tmp_path / "m"
    checkpoint = f"/models/{EVIL}/model"
    write_measure_outputs(out, _measure_result(f"/data/{EVIL}.txt"), _fake_loaded(),
                          {"checkpoint": checkpoint, "data": f"/data/{EVIL}.txt"})
    return out


def test_measure_summary_md_escapes_checkpoint_corpus_and_module_names(hostile_measure):
    md = (hostile_measure / "summary.md").read_text()
    assert_safe_markdown(md, "measure summary.md")
    # the strings are still there, readable
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "h.0.mlp." in md
    man = json.loads((hostile_measure / "manifest.json").read_text())
    assert man["options"]["checkpoint"] == f"/models/{EVIL}/model"  # the manifest keeps the path as given


def test_report_bundle_of_hostile_output_is_inert(hostile_measure, tmp_path):
    out = tmp_path / "report"
    r = invoke("report", hostile_measure, "-o", out, "--title", EVIL)
    assert r.exit_code == 0, r.output
    assert_safe_html((out / "index.html").read_text())
    assert_safe_markdown((out / "summary.md").read_text(), "bundle summary.md")
    assert_safe_markdown((out / "inputs" / "m" / "summary.md").read_text(), "copied summary.md")


def test_other_summaries_escape_names_tokens_and_paths(tmp_path):
    """massive, grad, drift, pplp and curve summaries: checkpoint, corpus, module names and token strings."""
    from reports import grad_report, massive_report, pplp_report
    from reports.sections import drift as drift_section

    nan = float("nan")
    massive = SimpleNamespace(
        info={"preset": "sun2024", "n_sequences": 2, "n_counted_tokens": 10, "max_length": 8, "bos": False,
              "model_dtype": "float32", "device": "cpu", "overflow": EVIL, "nonfinite_sites": [EVIL]},
        layers=[{"kind": "resid_post", "canonical_name": EVIL, "layer": 0, "layer_1based": 1, "top1_mean": 1.0, "top2_mean": 1.0,
                 "top3_mean": 1.0, "median_mean": 0.1, "ratio_top1_median": 10.0, "n_massive": 0,
                 "massive_channels": "", "massive_positions": "", "token_ratio_max": 2.0, "n_massive_tokens": 0}],
        global_max={"value": 5.0, "canonical_name": EVIL, "module_path": EVIL, "sample": 0, "position": 1,
                    "channel": 2, "token": EVIL},
        int8=[{"canonical_name": EVIL, "policy": "max_abs", "threshold": 5.0, "rel_rmse": 0.1, "sqnr_db": 20.0,
               "clip_rate": 0.0}])
    grad = SimpleNamespace(
        info={"taus": [1e-3], "loss": "causal_lm", "loss_definition": "mean CE", "loss_reduction": "sum",
              "n_loss_targets": 10, "mean_loss_per_target": 1.0, "corpus": EVIL, "model_dtype": "float32",
              "device": "cpu"},
        rows=[{"canonical_name": EVIL, "module_path": EVIL, "act": "relu", "n_tokens": 10, "deriv_sparsity": 0.5,
               "deriv_sq_mean": 0.5, "eff_grad_sparsity@0.001": 0.1, "eta_l1_per_token": 1.0,
               "eta_l2sq_per_token": 1.0}],
        spike_rows=[{"is_down_proj": True, "module_path": EVIL, "spike_max": 3.0, "median_abs_batchmean": 1.0,
                     "spike_ratio_batchmedian": 3.0, "median_abs_nonzero_batchmean": 1.0,
                     "spike_ratio_nonzero_batchmedian": 3.0, "zero_frac": 0.5}])
    drift = SimpleNamespace(
        info={"n_tensors_measured": 1, "n_tensors_skipped": 0},
        summary=lambda: pd.DataFrame([{"checkpoint": f"/x/{EVIL}", "kind": "linear", "n_tensors": 1, "n_weights": 4,
                                       "mean_weighted": 0.0, "neg_pct_weighted": 50.0, "std_mean": 1.0,
                                       "extreme_frac_mean": 0.001}]))
    pplp = SimpleNamespace(
        info={"corpus": EVIL, "method": "bisect", "tol": 0.01, "full_passes": 3, "n_counted_tokens": 10,
              "dense_ppl": 2.0},
        dense={"n_tokens": 10, "ppl": 2.0, "ce": 0.69}, warnings=[EVIL],
        summary=lambda: pd.DataFrame([{"p_pct": 1.0, "status": "ok", "c_star": 0.1, "achieved_ratio": 1.01,
                                       "mean_sparsity": 0.5, "mean_activation_ratio": 0.5, "sparse_passes": 2,
                                       "reason": EVIL}]),
        table=lambda: pd.DataFrame([{"p_pct": 1.0, "layer": 0, "module_path": EVIL, "threshold": 0.1,
                                     "sparsity": 0.5, "cett_in_sparse_run": 0.01}]),
        points=[{"method": "cett", "value": 0.1, "thresholded_tensor": EVIL, "ppl_ratio": 1.01, "mean_sparsity": nan}])
    options = {"checkpoint": f"/models/{EVIL}", "checkpoints": [f"/models/{EVIL}"]}
    writers = {"massive": lambda d: massive_report.write_summary_md(d, massive, options),
               "grad": lambda d: grad_report.grad_summary_md(d, grad, options),
               "drift": lambda d: drift_section.drift_summary_md(d, drift, options),
               "pplp": lambda d: pplp_report.write_pplp_summary_md(d, pplp, options),
               "curve": lambda d: pplp_report.write_curve_summary_md(d, pplp, options)}
    for name, write in writers.items():
        d = tmp_path / name
        d.mkdir()
        write(d)
        assert_safe_markdown((d / "summary.md").read_text(), name)


def test_md_escape_neutralises_links_and_keeps_text():
    from reports.bundle_report import md_code, md_escape

    s = md_escape("[click](javascript:alert(1)) a|b <i> `x")
    assert s == "\\[click\\](javascript:alert(1)) a\\|b &lt;i&gt; \\`x"
    assert md_code("a`b|c\nd") == "`a'b\\|c d`"
    # a stray backtick in escaped text cannot pair with the next code span and expose its raw content
    line = f"{md_escape('name`')} ({md_code(HOSTILE)})"
    assert not re.search(r"<[A-Za-z/!?]", _outside_code(line))


# ------------------------------------------------------------------------------------- paths
def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under root (links as their target, files as bytes, folders as 'dir'), not following links."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


def test_output_folder_that_is_a_symbolic_link_is_refused(hostile_measure, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "target").mkdir(parents=True)
    (elsewhere / "target" / "keep.txt").write_text("keep")
    before = _tree(elsewhere)
    for force in ((), ("--force",)):
        for target in (elsewhere / "target", elsewhere / "missing"):  # a live and a dangling link
            link = tmp_path / "out-link"
            link.unlink(missing_ok=True)
            link.symlink_to(target, target_is_directory=True)
            r = invoke("report", hostile_measure, "-o", link, *force)
            assert r.exit_code == EXIT_OUTPUT, r.output
            assert "symbolic link" in r.output and "Traceback" not in r.output
            assert link.is_symlink() and _tree(elsewhere) == before  # nothing written there or beside it


def test_force_replaces_links_inside_the_output_folder_without_following_them(hostile_measure, tmp_path):
    victim_dir, victim_file = tmp_path / "victim", tmp_path / "victim.txt"
    victim_dir.mkdir()
    (victim_dir / "precious.txt").write_text("precious")
    victim_file.write_text("precious")
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").symlink_to(victim_file)
    (out / "index.html").symlink_to(victim_file)
    (out / "tables").symlink_to(victim_dir, target_is_directory=True)
    (out / "figures").symlink_to(victim_dir, target_is_directory=True)
    outside_before = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("report")}
    r = invoke("report", hostile_measure, "-o", out, "--force")
    # a folder of links is not one actsparse wrote: --force refuses it (exit 5), following nothing
    assert r.exit_code == 5 and "did not write" in r.output, r.output
    outside_after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("report")}
    assert outside_after == outside_before  # the victims are untouched, no temporary or .old folder left
    # one of ours whose listed files were swapped for links: replaced whole, the links' targets untouched
    (out / "summary.md").unlink()
    (out / "index.html").unlink()
    (out / "tables").unlink()
    (out / "figures").unlink()
    assert invoke("report", hostile_measure, "-o", out, "--force").exit_code == 0
    (out / "summary.md").unlink()
    (out / "summary.md").symlink_to(victim_file)
    r = invoke("report", hostile_measure, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("report")} == outside_before
    for p in out.rglob("*"):
        assert not p.is_symlink(), p
        assert out.resolve() in p.resolve().parents, p
    assert (out / "tables" / "m" / "sparsity.parquet").is_file() and (out / "summary.md").is_file()


def test_names_from_a_checkpoint_never_leave_the_output_folder(tmp_path, monkeypatch):
    """Tensor names become figure file names (spectrum --plot esd): '../' and separators stay inside."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = ["../../../escaped.weight", f"..{os.sep}..{os.sep}{HOSTILE}|x.weight", "/abs/path.weight", "...weight",
             "a/b.weight", "a_b.weight"]
    save_file({n: torch.randn(40, 20, generator=g) for n in names}, tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    before = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("deep/er/out")}
    r = invoke("spectrum", "w.safetensors", "--plot", "esd", "-o", "deep/er/out", "-q")
    assert r.exit_code == 0, r.output
    out = tmp_path / "deep" / "er" / "out"
    after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("deep/er/out")}
    assert after == before  # nothing written anywhere but the output folder
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.resolve().parents for p in written)
    man = json.loads((out / "manifest.json").read_text())
    assert man["options"]["checkpoint"] == "w.safetensors"  # as given, not resolved
    for f in man["files"]:
        assert not Path(f).is_absolute() and ".." not in Path(f).parts and (out / f).is_file(), f
    esd = sorted(p.name for p in (out / "esd").iterdir())
    assert len(esd) == 2 * len(names)  # one PNG + SVG per tensor, none lost to a name collision
    # ... and the bundle built from it stays inside its own folder too
    r = invoke("report", "deep/er/out", "-o", "rep", "-q")
    assert r.exit_code == 0, r.output
    assert all((tmp_path / "rep").resolve() in p.resolve().parents for p in (tmp_path / "rep").rglob("*"))
    assert_safe_html((tmp_path / "rep" / "index.html").read_text())


def test_report_manifest_records_paths_as_given(hostile_measure, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlink").symlink_to(hostile_measure, target_is_directory=True)
    r = invoke("report", "m/../m", "mlink", "-o", "rep", "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "rep" / "manifest.json").read_text())
    assert man["options"]["inputs"] == ["m/../m", "mlink"] and man["options"]["output"] == "rep"
    assert [i["path"] for i in man["inputs"]] == ["m/../m", "mlink"]
    assert str(tmp_path) not in json.dumps(man["options"])


def test_symlinked_files_in_an_input_are_not_copied_into_the_bundle(hostile_measure, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (hostile_measure / "notes.txt").symlink_to(secret)
    (hostile_measure / "leak.png").symlink_to(secret)
    out = tmp_path / "rep"
    assert invoke("report", hostile_measure, "-o", out, "-q").exit_code == 0
    assert not any("TOP SECRET" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ code from checkpoints
def test_code_execution_switches_are_off_by_default():
    import typer

    from probes.loading import load_checkpoint

    sig = inspect.signature(load_checkpoint)
    assert sig.parameters["trust_remote_code"].default is False
    assert sig.parameters["unsafe_pickle"].default is False
    cli = typer.main.get_command(app)
    seen = set()
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if {"--trust-remote-code", "--unsafe-pickle"} & set(getattr(p, "opts", ())):  # typer's own click
                assert p.default is False, (name, p.opts)
                seen.add(p.opts[0])
    assert seen == {"--trust-remote-code", "--unsafe-pickle"}


def _remote_code_folder(root: Path, marker: Path) -> Path:
    from safetensors.torch import save_file

    d = root / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "evilcode", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (d / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evilcode'\n")
    save_file({"w": torch.zeros(2, 2)}, d / "model.safetensors")
    return d


def test_remote_code_in_a_checkpoint_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    marker = tmp_path / "PWNED"
    folder = _remote_code_folder(tmp_path, marker)
    # transformers copies remote code into its modules cache: keep that in tmp_path
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for cmd in ("sites", "measure"):
        r = invoke(cmd, folder)
        assert r.exit_code == EXIT_MODEL, r.output
        assert "needs custom code" in r.output and "--trust-remote-code" in r.output
        assert not marker.exists()
    # the payload is real: with the switch (and only with it) it runs
    modules = set(sys.modules)
    try:
        invoke("sites", folder, "--trust-remote-code")
        assert marker.exists()
    finally:
        for m in set(sys.modules) - modules:
            if m.startswith("transformers_modules"):
                del sys.modules[m]
