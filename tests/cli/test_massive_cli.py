"""``actsparse massive`` through typer's CliRunner.

The model is a tiny GPT-2 built offline whose position embedding writes +500 into channel 3 of
the first position, so every layer's residual stream carries a known massive activation at
(position 0, channel 3); its word-level tokenizer is built with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.errors import EXIT_DATA, EXIT_MODEL, EXIT_OUTPUT

WORDS = "the cat sat on a mat dog ran in park sun is warm today we measure massive activations".split()
MAX_LEN = 16
N_LAYER = 2
SPIKE_CHANNEL, SPIKE = 3, 500.0

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_lm) -> Path:
    def spike(model):  # embedding output at (position 0, channel 3) is exactly 500 for every token
        model.transformer.wte.weight[:, SPIKE_CHANNEL] = 0.0
        model.transformer.wpe.weight[0, SPIKE_CHANNEL] = SPIKE

    return word_lm.save_gpt2(tmp_path_factory.mktemp("tiny-spiky-gpt2"), WORDS, max_len=MAX_LEN, n_layer=N_LAYER,
                             activation="gelu_new", edit=spike)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, word_lm) -> Path:
    return word_lm.corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", WORDS, 20 * MAX_LEN)


@pytest.fixture(scope="module")
def full_run(model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "out"
    # one prompt is one sequence: nothing to hold out, so the INT8 scales are calibrated in-sample (asked for)
    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 5, "--int8", "--int8-calibration", "in-sample",
               "--prompt", "the sun is warm today", "--plot", "layers", "--plot", "3d", "--plot", "heatmap",
               "--layer", 1, "-o", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    return r, out


def test_help_lists_the_options():
    r = invoke("massive", "--help")
    assert r.exit_code == 0
    for opt in ("--preset", "--prompt", "--plot", "--layer", "--int8", "--data", "--max-length", "--force", "-o"):
        assert opt in r.stdout


def test_full_run_writes_tables_figures_and_manifest(full_run):
    r, out = full_run
    names = {p.name for p in out.iterdir()}
    for stem in ("massive_layers", "massive_topk", "massive_channels", "massive_int8"):
        assert {f"{stem}.parquet", f"{stem}.csv"} <= names
    for fig in ("massive_layers", "massive_3d", "massive_heatmap"):
        assert {f"{fig}.png", f"{fig}.svg"} <= names
    assert {"manifest.json", "summary.md"} <= names
    man = json.loads((out / "manifest.json").read_text())
    assert man["command"] == "massive"
    m = man["massive"]
    assert m["preset"] == "sun2024 (prompt)" and m["bos"] is False and m["model_dtype"] == "float32"
    assert "lower median" in m["median_kind"]["median_mean"] and "token_median_mean" in m["median_kind"]
    assert m["global_max"]["channel"] == SPIKE_CHANNEL and m["global_max"]["position"] == 0
    assert m["int8"]["site"] == m["global_max"]["canonical_name"]
    assert set(man["files"]) <= names | {"manifest.json"}
    assert "global max" in r.stdout


def test_known_spike_is_reported_at_every_layer(full_run):
    _, out = full_run
    layers = pd.read_parquet(out / "massive_layers.parquet")
    assert {"layer_1based", "top1_mean", "median_mean", "token_median_mean", "ratio_top1_median",
            "n_massive", "n_massive_tokens", "massive_channels", "peak_token"} <= set(layers.columns)
    emb = layers[layers.kind == "embed"].iloc[0]
    # The embedding output holds exactly the planted value: position 0, channel 3, the prompt's first token.
    assert (emb.peak_value, emb.peak_position, emb.peak_channel, emb.peak_token) == (SPIKE, 0, SPIKE_CHANNEL, "the")
    resid = layers[layers.kind == "resid_post"].sort_values("layer")
    assert list(resid.layer) == list(range(N_LAYER)) and list(resid.layer_1based) == list(range(1, N_LAYER + 1))
    assert (resid.massive_channels == str(SPIKE_CHANNEL)).all()
    assert (resid.massive_positions == "0:1").all() and (resid.n_massive_first_token == 1).all()
    assert (resid.peak_channel == SPIKE_CHANNEL).all() and (resid.peak_position == 0).all()
    topk = pd.read_parquet(out / "massive_topk.parquet")
    first = topk[(topk.kind == "embed") & (topk["rank"] == 1)].iloc[0]
    assert (first["value"], first["sample"], first["position"], first["channel"], first["token"]) == \
        (SPIKE, 0, 0, SPIKE_CHANNEL, "the")
    int8 = pd.read_parquet(out / "massive_int8.parquet")
    assert set(int8.policy) == {"max_abs", "p99.9"} and (int8.sqnr_db > 0).all()


def test_int8_held_out_by_default_and_refused_on_one_prompt(model_dir, corpus, tmp_path):
    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 6, "--int8", "-o", tmp_path / "h")
    assert r.exit_code == 0, r.stderr + r.stdout
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())["massive"]["int8"]
    assert m["calibration"] == "held-out"
    assert m["n_calibration_sequences"] >= 1 and m["n_evaluation_sequences"] >= 1
    int8 = pd.read_csv(tmp_path / "h" / "massive_int8.csv")
    assert set(int8.calibration) == {"held-out"} and set(int8.policy) == {"max_abs", "p99.9"}
    r = invoke("massive", model_dir, "--int8", "--prompt", "the sun is warm today", "-o", tmp_path / "p")
    assert r.exit_code != 0 and "--int8-calibration in-sample" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p").exists()


def test_corpus_run_prints_table_without_output(model_dir, corpus):
    r = invoke("massive", model_dir, "--data", corpus, "--preset", "sun2024", "--n-samples", 3)
    assert r.exit_code == 0, r.stderr + r.stdout
    assert "blocks.1.hook_resid_post" in r.stdout and "global max" in r.stdout


def test_maxact_preset_on_jsonl(model_dir, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:i + 3 + i])}) for i in range(6)) + "\n")
    out = tmp_path / "out"
    r = invoke("massive", model_dir, "--preset", "maxact2026", "--data", docs, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr + r.stdout
    m = json.loads((out / "manifest.json").read_text())["massive"]
    assert m["preset"] == "maxact2026" and m["n_sequences"] == 6 and m["batch_size"] == 8
    layers = pd.read_parquet(out / "massive_layers.parquet")
    assert (layers[layers.kind == "resid_post"].n_sequences == 6).all()


@pytest.mark.parametrize("args,code,needle", [
    (("--plot", "layers"), 2, "-o"),
    (("--layer", "1"), 2, "--prompt"),
    (("--kind", "resid_pst"), EXIT_MODEL, "did you mean 'resid_post'"),
    (("--max-length", "4000"), EXIT_DATA, "--max-length"),
])
def test_bad_input_is_one_line(model_dir, corpus, args, code, needle):
    r = invoke("massive", model_dir, "--data", corpus, *args)
    assert r.exit_code == code, r.stderr + r.stdout
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_existing_output_is_not_overwritten(model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = invoke("massive", model_dir, "--data", corpus, "-o", out)
    assert r.exit_code == EXIT_OUTPUT and "--force" in r.stderr
    assert (out / "keep.txt").exists()


def test_unknown_preset_is_a_usage_error(model_dir):
    r = invoke("massive", model_dir, "--preset", "sun2023")
    assert r.exit_code == 2


def _capture_figures(monkeypatch) -> dict[str, list[tuple[str, list[list[float]]]]]:
    """Record, per figure stem, each panel's title and the y data of its lines, as the figure is saved."""
    import reports.massive_report as mr

    drawn: dict[str, list[tuple[str, list[list[float]]]]] = {}
    real_save = mr.save

    def save(fig, folder, stem):
        drawn[stem] = [(ax.get_title(), [list(map(float, ln.get_ydata())) for ln in ax.get_lines()])
                       for ax in fig.axes if ax.get_label() != "<colorbar>"]
        return real_save(fig, folder, stem)

    monkeypatch.setattr(mr, "save", save)
    return drawn


def test_kind_mlp_out_rows_are_shown_in_terminal_summary_and_figures(model_dir, corpus, tmp_path, monkeypatch):
    """--kind mlp_out: the rows asked for are in the terminal table, summary.md and the figures' data
    (the residual-stream filter used to drop them all and write no massive_layers figure)."""
    drawn = _capture_figures(monkeypatch)
    out = tmp_path / "out"
    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 3, "--kind", "mlp_out", "-o", out)
    assert r.exit_code == 0, r.stderr + r.stdout
    layers = pd.read_parquet(out / "massive_layers.parquet")
    assert set(layers.kind) == {"mlp_out"} and len(layers) == N_LAYER
    names = [f"blocks.{i}.hook_mlp_out" for i in range(N_LAYER)]
    for n in names:
        assert n in r.stdout
    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| blocks.")]
    assert [line.split(" | ")[:2] for line in rows] == [[f"| {n}", str(i)] for i, n in enumerate(names)], summary
    assert {"massive_layers.png", "massive_layers.svg", "massive_heatmap.png"} <= {p.name for p in out.iterdir()}
    ((title, lines),) = drawn["massive_layers"]  # one panel: mlp_out, top-1/2/3 and median per layer
    assert title == "mlp_out" and len(lines) == 5 and lines[4] == [100.0, 100.0]  # the |a| = 100 guide
    top1 = layers.sort_values("layer").top1_mean.to_list()
    assert lines[0] == pytest.approx(top1)
    assert [t for t, _ in drawn["massive_heatmap"]] == [""]  # one kind: one panel, no panel title


def test_kinds_given_are_all_shown_and_the_default_stays_the_residual_stream(model_dir, corpus, monkeypatch):
    from reports.massive_report import layer_panels, shown_kinds

    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 3, "--kind", "mlp_out,resid_post")
    assert r.exit_code == 0, r.stderr + r.stdout
    assert "blocks.1.hook_mlp_out" in r.stdout and "blocks.1.hook_resid_post" in r.stdout
    r = invoke("massive", model_dir, "--data", corpus, "--n-samples", 3)  # no --kind: as before
    assert r.exit_code == 0, r.stderr + r.stdout
    assert "blocks.1.hook_resid_post" in r.stdout and "hook_mlp_out" not in r.stdout
    assert "hook_attn_out" not in r.stdout and "mlp.hook_pre" not in r.stdout
    # the figures' panels, from a table holding every kind (the default run measures them all)
    rows = [{"canonical_name": f"blocks.{i}.hook_{k}", "kind": k, "layer": i, "layer_1based": i + 1}
            for i in range(2) for k in ("attn_out", "mlp_out", "resid_post")]
    rows += [{"canonical_name": "blocks.0.hook_resid_pre", "kind": "embed", "layer": None, "layer_1based": None}]
    df = pd.DataFrame(rows)
    assert [(t, list(g.layer)) for t, g in layer_panels(df)] == [("residual stream", [0, 1])]
    assert [t for t, _ in layer_panels(df, ["mlp_out", "resid_post"])] == ["mlp_out", "residual stream"]
    assert [t for t, _ in layer_panels(df[df.kind == "mlp_out"])] == ["mlp_out"]  # read back from a --kind run
    assert shown_kinds(["embed", "mlp_out"]) == {"embed", "resid_post", "final_norm", "custom"}
    assert shown_kinds(["mlp_out"]) == {"mlp_out"}
    assert shown_kinds(["embed", "mlp_out"], ["mlp_out"]) == {"mlp_out", "custom"}
