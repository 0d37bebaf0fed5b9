"""Issue 17, "Figures": the properties each fixed figure must have (figure captured before saving)."""

from __future__ import annotations

import pandas as pd
import pytest


def _capture(monkeypatch, module, attr="save"):
    figs = []

    def fake(fig, folder, stem):
        figs.append((stem, fig))
        return [f"{stem}.png", f"{stem}.svg"]

    monkeypatch.setattr(module, attr, fake)
    return figs


def test_alpha_by_layer_x_is_block_and_one_group_per_role(monkeypatch, tmp_path):
    from reports import spectrum_plots

    figs = _capture(monkeypatch, spectrum_plots, "save_into")
    names = [f"transformer.h.{b}.{m}.weight" for b in range(3)
             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["transformer.wte.weight"]
    df = pd.DataFrame({"name": names, "alpha": [2.5] * len(names), "sigma_mp": [0.6] * len(names),
                       "ww_skipped": False, "non_ww": False})
    spectrum_plots.plot_alpha_by_layer(df, tmp_path)
    (stem, fig), = figs
    assert stem == "alpha_by_layer"
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"attn (qkv)", "o", "up", "down", "other"}
    assert len({ln.get_marker() for ln in lines.values()}) == len(lines)
    for role in ("attn (qkv)", "o", "up", "down"):
        assert sorted(round(x) for x in lines[role].get_xdata()) == [0, 1, 2]
    assert [round(x) for x in lines["other"].get_xdata()] == [4]  # right of the blocks, after a gap
    assert fig.axes[-1].get_xlabel() == "block (0-based)" and ax.get_ylabel() == "alpha"
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["0", "1", "2", "other"]
    assert len(fig.axes) == 2  # sigma_mp panel kept


@pytest.mark.parametrize("name,role,block", [
    ("model.layers.7.self_attn.q_proj.weight", "q", 7),
    ("model.layers.7.mlp.gate_proj.weight", "gate", 7),
    ("bert.encoder.layer.2.attention.self.key.weight", "k", 2),
    ("bert.encoder.layer.2.attention.output.dense.weight", "o", 2),
    ("bert.encoder.layer.2.intermediate.dense.weight", "up", 2),
    ("bert.encoder.layer.2.output.dense.weight", "down", 2),
    ("lm_head.weight", "other", None),
])
def test_matrix_role_and_block(name, role, block):
    from reports.spectrum_plots import block_index, matrix_role

    assert matrix_role(name) == role and block_index(name) == block


def test_drift_by_layer_is_a_grid(monkeypatch, tmp_path):
    from reports.sections import drift

    figs = _capture(monkeypatch, drift)
    rows = [dict(checkpoint_index=ci, checkpoint=f"/m/ck{ci}", name=f"h.{l}.w", kind="linear", layer=l,
                 mean=0.0, neg_pct=50.0, std=0.02, extreme_frac=0.001, extreme_threshold=0.1)
            for ci in (0, 1) for l in range(4)]
    drift.drift_by_layer(pd.DataFrame(rows), tmp_path, "t")
    (stem, fig), = figs
    assert stem == "drift_by_layer"
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == 5
    assert len({round(ax.get_position().y0, 3) for ax in visible}) > 1  # more than one row of axes
    w, h = fig.get_size_inches()
    assert w / h < 3


def _sparsity_table(zero, near):
    return pd.DataFrame({"kind": "mlp_post", "layer": range(len(zero)), "canonical_name": [f"l{i}" for i in range(len(zero))],
                         "zero_frac": zero, "near_zero_frac@0.001": near, "near_zero_frac@0.01": [2 * v for v in near]})


def test_sparsity_by_layer_scales_to_smooth_data_and_says_so(monkeypatch, tmp_path):
    from reports import figures

    figs = _capture(monkeypatch, figures)
    figures.sparsity_by_layer(_sparsity_table([0.001, 0.0005, 0.0], [0.01, 0.03, 0.02]), tmp_path, "gelu", 100)
    (stem, fig), = figs
    assert stem == "sparsity_by_layer"
    ymax = fig.axes[0].get_ylim()[1]
    assert 6.0 <= ymax < 100  # the largest bar (6 %) plus headroom, not a fixed 0-100 axis
    assert any("exact zeros mean little" in t.get_text() for t in fig.texts)


def test_sparsity_figures_relu_keep_full_scale_without_note(monkeypatch, tmp_path):
    from reports import figures
    from reports.sections import sparsity

    figs = _capture(monkeypatch, figures)
    figures.sparsity_by_layer(_sparsity_table([0.9, 0.95], [0.46, 0.48]), tmp_path, "relu", 100)
    fig = figs[0][1]
    assert fig.axes[0].get_ylim()[1] == 100  # 95 % + headroom, capped
    assert not any("exact zeros" in t.get_text() for t in fig.texts)
    tiny = _capture(monkeypatch, sparsity, "save_into")
    sparsity.plot_sparsity_vs_threshold(_sparsity_table([0.0, 0.0], [0.001, 0.002]), tmp_path, "t")
    assert tiny[0][1].axes[0].get_ylim()[1] == 1.0  # at least 1 %
    assert any("exact zeros mean little" in t.get_text() for t in tiny[0][1].texts)


def test_curve_methods_have_distinct_marker_and_dash(monkeypatch, tmp_path):
    from reports import pplp_report

    figs = _capture(monkeypatch, pplp_report)
    rows = [dict(method="dense", mean_sparsity=0.8, ppl_ratio=1.0, thresholded_tensor="|x|")]
    for m in ("cett", "topk", "teal", "cats", "fat"):  # teal and cats identical, as on a ReLU model
        rows += [dict(method=m, mean_sparsity=s, ppl_ratio=r, thresholded_tensor="|x| (input)")
                 for s, r in ((0.85, 1.01), (0.9, 1.1))]
    pplp_report.plot_curve(pd.DataFrame(rows), tmp_path, "t", 100)
    (stem, fig), = figs
    assert stem == "curve"
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().split(" on ")[0] in
             ("cett", "topk", "teal", "cats", "fat")]
    assert len(lines) == 5
    styles = [(ln.get_marker(), str(ln.get_linestyle())) for ln in lines]
    assert len(set(styles)) == 5
    by = {ln.get_label().split(" on ")[0]: ln for ln in lines}
    assert by["teal"].get_linestyle() != by["cats"].get_linestyle()
    assert by["teal"].get_markersize() > by["cats"].get_markersize()  # TEAL shows around CATS


@pytest.mark.parametrize("n_layers", [4, 20])
def test_trend_massive_has_no_low_contrast_yellow_and_keeps_layer_key(monkeypatch, tmp_path, n_layers):
    import matplotlib.colors as mc

    from reports import figures, track

    figs = _capture(monkeypatch, figures)
    ma = pd.DataFrame([dict(step=s, kind="resid_post", layer=l, ratio_top1_median=5.0 + l + s / 100)
                       for s in (0, 100, 200) for l in range(n_layers)])
    track.plot_trend_massive(ma, None, tmp_path, "t")
    (stem, fig), = figs
    assert stem == "trend_massive"
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("layer ")]
    assert len(lines) == n_layers
    for ln in lines:
        r, g, b = mc.to_rgb(ln.get_color())
        assert 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.7  # no light colour (viridis' yellow is ~0.86)
        assert mc.to_hex(ln.get_color()).lower() != "#f0e442"
    if n_layers <= 12:
        assert fig.legends and len(fig.legends[0].get_texts()) == n_layers
    else:
        assert len(fig.axes) == 2  # the layer colour bar
