"""probes.spectrum (and the numerics it re-exports from probes.spectrum_fit): hand-computed values on small
matrices, and the edge cases."""

import math

import numpy as np
import pytest
import torch

from probes import spectrum as sp
from probes import spectrum_fit
from probes.errors import DeviceError, ModelError


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small SVDs gain nothing from threads, and on a busy machine spinning OpenMP threads
    make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ power law


def test_ks_distance_by_hand():
    # tail [1, e], alpha 2: F_fit(e) = 1 - e^-1, F_emp = 1/2 -> D = 1 - 1/e - 1/2
    assert spectrum_fit._ks_distance(np.array([1.0, math.e]), 2.0) == pytest.approx(0.5 - math.exp(-1), abs=1e-15)


def test_two_eigenvalues_use_whole_sample():
    # n = 2 < 8: no tail qualifies, WW fits the whole sample: alpha = 1 + (n-1)/sum ln(x/xmin) = 2
    fit = sp.fit_power_law(np.array([1.0, math.e]))
    assert fit.alpha == pytest.approx(2.0)
    assert fit.D == pytest.approx(0.5 - math.exp(-1))
    assert fit.xmin == 1.0 and fit.xmax == pytest.approx(math.e)
    assert fit.sigma == pytest.approx(1 / math.sqrt(2))
    assert fit.num_pl_spikes == 2


def test_small_n_alphas_by_hand():
    # x_j = 2^j, j = 0..9: tails with >= 8 values give alpha_i = 1 + (m-1)/(ln2 * m(m-1)/2) = 1 + 2/(m ln 2)
    x = 2.0 ** np.arange(10)
    fit = sp.fit_power_law(x)
    for i, m in enumerate((10, 9, 8)):
        assert fit.alphas[i] == pytest.approx(1 + 2 / (m * math.log(2)), rel=1e-14)
    assert np.all(fit.alphas[3:] == 0) and np.all(fit.Ds[3:] == 1)
    Ds = [max(abs(k / m - (1 - 2.0 ** (-k * (fit.alphas[i] - 1)))) for k in range(m)) for i, m in enumerate((10, 9, 8))]
    assert fit.Ds[:3] == pytest.approx(Ds, rel=1e-12)
    i = int(np.argmin(Ds))
    assert fit.alpha == fit.alphas[i] and fit.xmin == x[i]


def test_alpha_for_every_xmin_matches_closed_form():
    # x_j = exp(j h): sum_{j>=i} ln(x_j/x_i) = h n_i (n_i - 1)/2, so alpha_i = 1 + 2/(h (n_i - 1))
    n, h = 40, 0.1
    x = np.exp(h * np.arange(n))
    fit = sp.fit_power_law(x)
    n_i = n - np.arange(n - 1)
    assert fit.alphas == pytest.approx(1 + 2 / (h * (n_i - 1)), rel=1e-12)
    # D_i = max_k |1 - exp(-k h (alpha_i - 1)) - k/n_i|
    Ds = [max(abs(1 - math.exp(-k * h * (a - 1)) - k / m) for k in range(m)) for a, m in zip(fit.alphas, n_i)]
    assert fit.Ds == pytest.approx(Ds, rel=1e-10)
    i = int(np.argmin(Ds))
    assert (fit.alpha, fit.xmin, fit.D) == (fit.alphas[i], x[i], fit.Ds[i])
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(n - i))
    assert fit.num_pl_spikes == n - i


def test_block_size_does_not_change_the_fit():
    x = np.sort(np.random.default_rng(0).pareto(2.0, 300) + 1)
    a1, d1 = spectrum_fit._pl_candidates(x, block_rows=1000)  # all rows in one block
    a2, d2 = spectrum_fit._pl_candidates(x, block_rows=1)  # one row per block
    assert np.array_equal(a1, a2) and np.array_equal(d1, d2)


def test_fit_needs_two_eigenvalues_above_threshold():
    with pytest.raises(ValueError, match="1 eigenvalue"):
        sp.fit_power_law(np.array([1e-7, 1e-6, 3.0]))


@pytest.mark.parametrize("alpha,warning", [(1.5, "over-trained"), (4.0, ""), (6.5, "under-trained")])
def test_ww_warning(alpha, warning):
    assert sp.ww_warning(alpha) == warning


# ------------------------------------------------------------------ norms, ranks, condition numbers


def test_norm_columns_by_hand():
    # W = [[3, 0], [0, 4], [0, 0]]: singular values 4, 3 -> eigenvalues 9, 16
    W = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    svals = torch.linalg.svdvals(W).numpy()[None, :]
    evals, esd = sp.esd_columns(svals, N=3, eps=np.finfo(np.float64).eps)
    assert evals.tolist() == pytest.approx([9.0, 16.0])
    assert (esd["num_evals"], esd["sv_max"], esd["sv_min"], esd["rank_loss"]) == (2, 4.0, 3.0, 0)
    cols = sp.norm_columns(evals, alpha=2.0, N=3)
    assert cols["norm"] == pytest.approx(25.0)
    assert cols["log_norm"] == pytest.approx(math.log10(25))
    assert cols["spectral_norm"] == pytest.approx(16.0)
    assert cols["log_spectral_norm"] == pytest.approx(math.log10(16))
    assert cols["alpha_weighted"] == pytest.approx(2 * math.log10(16))
    assert cols["log_alpha_norm"] == pytest.approx(math.log10(81 + 256))
    assert cols["stable_rank"] == pytest.approx(25 / 16)
    assert cols["matrix_rank"] == 2
    p = np.array([9 / 25, 16 / 25]) + 1e-10
    assert cols["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(2 + 1e-10), rel=1e-12)


def test_rank_deficient_matrix():
    u = torch.arange(1.0, 11.0, dtype=torch.float64)
    W = torch.outer(u, u)  # rank 1
    svals = torch.linalg.svdvals(W).numpy()[None, :]
    evals, esd = sp.esd_columns(svals, N=10, eps=np.finfo(np.float64).eps)
    assert esd["rank_loss"] == 9 and esd["weak_rank_loss"] == 9
    assert sp.norm_columns(evals, 2.0, 10)["matrix_rank"] == 1
    cond = sp.condition_columns(svals, 10, 10)
    assert cond["kappa"] > 1e12 and math.isnan(cond["kappa_nz"]) is False
    assert cond["kappa_nz"] == 1.0  # only one singular value above s_max * N * eps32
    assert cond["kappa_mp"] == math.inf and math.isnan(cond["cond_nz_over_mp"])


def test_condition_columns_by_hand():
    # singular values 4 and 2 of a 12 x 3 matrix with one exact zero: Q = 4
    s = np.array([[4.0, 2.0, 0.0]])
    cond = sp.condition_columns(s, 12, 3)
    assert cond["kappa"] == math.inf
    assert cond["kappa_nz"] == 2.0
    assert cond["kappa_nz_tol"] == pytest.approx(4.0 * 12 * np.finfo(np.float32).eps)
    assert cond["kappa_mp"] == pytest.approx((2 + 1) / (2 - 1))
    assert cond["cond_nz_over_mp"] == pytest.approx(2 / 3)
    assert "kappa_ratio" not in cond  # renamed: it is not arXiv 2309.03004's quantity (kappa_2309 is)


# ------------------------------------------------------------------ matrices: orientation and conv slicing


def test_dense_orientation():
    W = torch.arange(15.0).reshape(3, 5)
    slices = sp.weight_slices(W)
    assert slices.dtype == np.float64 and slices.shape == (1, 3, 5)
    assert np.array_equal(slices[0], W.double().numpy())
    assert sp.ww_dims(W.shape) == (5, 3, 1, "dense")
    assert sp.ww_dims((7, 7)) == (7, 7, 1, "dense")


def test_conv_slices_scaled_per_kernel_position():
    W = torch.randn(6, 4, 2, 3, dtype=torch.float64)
    slices = sp.weight_slices(W)
    assert slices.shape == (6, 6, 4)
    k = 0
    for i in range(2):
        for j in range(3):
            assert np.array_equal(slices[k], (W[:, :, i, j] * math.sqrt(0.5)).numpy())
            k += 1


def test_conv_slices_transposed_when_out_lt_in():
    W = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    slices = sp.weight_slices(W)
    assert slices.shape == (9, 5, 2)
    assert np.array_equal(slices[4], (W[:, :, 1, 1].T * math.sqrt(0.5)).numpy())


@pytest.mark.parametrize("shape,dims", [
    ((32, 16, 3, 3), (32, 16, 9)),
    ((16, 32, 3, 3), (32, 16, 9)),  # odd rf: WW's per-slice swaps leave N >= M
    ((16, 32, 2, 2), (16, 32, 4)),  # even rf: WW swaps back, N < M (kept to match WW)
    ((2, 3, 5, 5), (2, 3, 25)),  # kernel larger than channels: WW's flipped branch, no swap
])
def test_conv_dims_follow_ww(shape, dims):
    assert sp.ww_dims(shape)[:3] == dims


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_r_factor_keeps_singular_values(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    R = sp.r_factor(W, block_bytes=40 * 8 * 50)  # 50-row blocks
    assert R.shape == (1, 40, 40) and R.dtype == np.float64
    assert np.linalg.svd(R[0], compute_uv=False) == pytest.approx(torch.linalg.svdvals(W.double()).numpy(), rel=1e-13)


def test_tall_matrices_through_r_factor_give_the_same_row():
    w = {"embed.weight": torch.randn(500, 24, generator=torch.Generator().manual_seed(1))}
    direct = sp.analyze_tensors(w.items())
    via_r = sp.analyze_tensors(w.items(), batch_bytes=1)  # everything counts as large
    num = direct.select_dtypes("number").columns
    assert via_r[num].astype(float).to_numpy() == pytest.approx(direct[num].astype(float).to_numpy(), rel=1e-11)


def test_nan_weights_name_the_tensor():
    W = torch.ones(4, 4)
    W[1, 2] = float("nan")
    W[0, 0] = float("inf")
    with pytest.raises(ModelError, match=r"'blocks.3.mlp.weight' has 2 non-finite"):
        sp.weight_slices(W, "blocks.3.mlp.weight")


def test_huge_finite_values_are_not_flagged():
    sp.check_finite(torch.full((4, 4), 1e308, dtype=torch.float64), "big")  # the sum overflows, no entry does


def test_ww_skip_reasons():
    assert sp.ww_skip_reason("a.weight", 40, 10, 1) == ""
    assert sp.ww_skip_reason("a.weight", 40, 2, 1) == "M*rf=2 < 8"
    assert sp.ww_skip_reason("a.weight", 20000, 16000, 1) == "M*rf=16000 > 15000"
    assert sp.ww_skip_reason("wte.weight", 50257, 768, 1) == "N=50257 > 50000"
    assert sp.ww_skip_reason("lm_head", 40, 10, 1) == "name does not end in .weight"


# ------------------------------------------------------------------ Marchenko-Pastur


def test_kde_by_hand():
    # one point at 0.5: f(x) = max(0, 1 - |x - 0.5|/0.1)/0.1 on 1000 points of [0, 1]
    kde = sp.kde_on_grid(np.array([0.5]))
    xs = np.linspace(0, 1.0, 1000)
    expect = np.clip(1 - np.abs(xs - 0.5) / 0.1, 0, None) / 0.1
    assert kde.x == pytest.approx(xs[expect > 0.01])
    assert kde.y == pytest.approx(expect[expect > 0.01], rel=1e-12)
    assert kde.n_dropped == int((expect < 0.01).sum())


def test_mp_density_integrates_to_one():
    x = np.linspace(0, 4, 400001)
    for Q in (1.5, 4.0):
        rho = sp.mp_density(x, 1.0, Q)
        assert np.trapezoid(rho, x) == pytest.approx(1.0, abs=2e-3)


def test_mp_fit_of_gaussian_matrix():
    W = torch.randn(800, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    evals = np.sort(torch.linalg.svdvals(W).numpy() ** 2)
    mp = sp.fit_marchenko_pastur(evals, 800, 200)
    assert mp.W_scale == pytest.approx(math.sqrt(200 / evals.sum()))
    assert mp.sigma_mp == pytest.approx(1.0, abs=0.05)  # pure noise: unit variance after rescaling
    assert mp.num_spikes <= 2
    assert mp.bulk_max == pytest.approx(mp.sigma_mp ** 2 * 1.5 ** 2 / mp.W_scale ** 2)
    assert mp.bulk_min == pytest.approx(mp.sigma_mp ** 2 * 0.5 ** 2 / mp.W_scale ** 2)
    assert mp.mp_softrank == pytest.approx(mp.bulk_max / evals.max())


def _scipy_mp_sigma(evals, N, M):
    """The MP fit's polish as WW runs it: scipy's fmin from the best grid point (the reference)."""
    from scipy.optimize import fmin

    Q = N / M
    W_scale = np.sqrt(evals.size) / np.sqrt(np.sum(evals))  # WW's rescaling, as written in RMT_Util.py
    x = (W_scale * W_scale) * evals
    s0 = np.sqrt(x.max() / np.square(1 + 1.0 / np.sqrt(Q)))
    kde = spectrum_fit.kde_on_grid(np.sqrt(x) if Q == 1 else x)
    grid = np.mgrid[0.05 * s0:2.0 * s0:0.01 * s0]
    start = grid[int(np.argmin(spectrum_fit._mp_sse(grid, kde, Q)))]
    return float(fmin(lambda p: spectrum_fit._mp_sse(p, kde, Q)[0], start, full_output=True, disp=False)[0][0])



def test_mp_fit_rejects_zero_esd():
    with pytest.raises(ValueError, match="all eigenvalues are zero"):
        sp.fit_marchenko_pastur(np.zeros(10), 20, 10)


# ------------------------------------------------------------------ fused tensors


def test_split_gpt2_c_attn():
    W = torch.arange(4 * 12.0).reshape(4, 12)  # Conv1D [in, 3 out]
    parts = dict(sp.fused_parts("h.0.attn.c_attn.weight", W))
    assert list(parts) == ["q", "k", "v"]
    assert np.array_equal(parts["k"], W[:, 4:8].numpy())


def test_split_neox_interleaved_heads_needs_config():
    W = torch.arange(12 * 4.0).reshape(12, 4)  # 2 heads x (q, k, v) x head_dim 2
    assert "config" in sp.fused_parts("layers.0.attention.query_key_value.weight", W)
    parts = dict(sp.fused_parts("layers.0.attention.query_key_value.weight", W,
                                {"num_attention_heads": 2, "hidden_size": 4}))
    assert np.array_equal(parts["q"], W[[0, 1, 6, 7]].numpy())
    assert np.array_equal(parts["v"], W[[4, 5, 10, 11]].numpy())


def test_split_gqa_qkv_proj_with_config():
    W = torch.randn(8 + 2 * 4, 8)  # 4 heads, 2 kv heads, head_dim 2
    parts = dict(sp.fused_parts("model.layers.0.self_attn.qkv_proj.weight", W,
                                {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 8}))
    assert [p.shape[0] for p in parts.values()] == [8, 4, 4]


def test_split_gate_up_and_experts():
    W = torch.randn(3, 10, 4)  # 3 experts, [2 * intermediate, hidden]
    parts = sp.fused_parts("model.layers.0.mlp.experts.gate_up_proj", W)
    assert [p for p, _ in parts] == ["e0.gate", "e0.up", "e1.gate", "e1.up", "e2.gate", "e2.up"]
    assert np.array_equal(parts[3][1], W[1, 5:].numpy())
    down = sp.fused_parts("model.layers.0.mlp.experts.down_proj", torch.randn(3, 4, 5))
    assert [p for p, _ in down] == ["e0", "e1", "e2"]
    assert sp.fused_parts("pos_embed", torch.randn(1, 5, 4)) == []
    oss = dict(sp.fused_parts("mlp.experts.gate_up_proj", torch.arange(8.0).reshape(1, 2, 4), {"model_type": "gpt_oss"}))
    assert oss["e0.gate"].tolist() == [[0.0, 2.0], [4.0, 6.0]]


# ------------------------------------------------------------------ the streaming driver


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "blocks.0.ln.weight": torch.ones(16),
        "blocks.0.attn.weight": torch.randn(16, 16, generator=g),
        "blocks.0.attn.bias": torch.randn(16, generator=g),
        "blocks.0.mlp.weight": torch.randn(64, 16, generator=g),
        "blocks.1.mlp.weight": torch.randn(64, 16, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "tiny.weight": torch.randn(3, 2, generator=g),
        "position_ids": torch.arange(16)[None],
    }


def test_analyze_tensors_rows_and_skips():
    df = sp.analyze_tensors(_weights().items())
    assert df["name"].tolist() == ["embed.weight", "blocks.0.attn.weight", "blocks.0.mlp.weight",
                                   "blocks.1.mlp.weight", "conv.weight", "tiny.weight"]
    tiny = df.set_index("name").loc["tiny.weight"]
    assert bool(tiny["ww_skipped"]) and tiny["ww_skip_reason"] == "M*rf=2 < 8"
    conv = df.set_index("name").loc["conv.weight"]
    assert (conv["N"], conv["M"], conv["rf"], conv["num_evals"]) == (8, 4, 9, 36)
    assert (df["status"] == "success").sum() >= 4
    assert str(df["N"].dtype) == "Int64" and "rand_sigma_mp" not in df


@pytest.mark.parametrize("randomize", [False, True])
def test_batching_does_not_change_numbers(randomize):
    g = torch.Generator().manual_seed(2)
    w = {f"l{i}.weight": torch.randn(24, 20, generator=g) for i in range(3)}  # not tall: no r_factor
    w.update({"sq.weight": torch.randn(16, 16, generator=g), "conv.weight": torch.randn(8, 4, 3, 3, generator=g)})
    a = sp.analyze_tensors(w.items(), randomize=randomize)
    b = sp.analyze_tensors(w.items(), randomize=randomize, batch_bytes=1)  # every stack alone
    num = a.select_dtypes("number").columns
    assert np.array_equal(a[num].astype(float).to_numpy(), b[num].astype(float).to_numpy(), equal_nan=True)


@pytest.mark.parametrize("batch_bytes", [8 << 20, 1])  # 1: the tall matrix goes the r_factor way
def test_nan_weight_row_says_so_and_run_continues(batch_bytes):
    w = _weights()
    w["blocks.0.mlp.weight"][3, 3] = float("nan")
    df = sp.analyze_tensors(w.items(), batch_bytes=batch_bytes).set_index("name")
    row = df.loc["blocks.0.mlp.weight"]
    assert row["status"] == "non-finite" and "'blocks.0.mlp.weight' has 1 non-finite" in row["warning"]
    assert math.isnan(row["alpha"])
    assert df.loc["blocks.1.mlp.weight", "status"] == "success"


def test_failed_fit_is_nan_not_minus_one():
    u = torch.arange(1.0, 21.0)
    df = sp.analyze_tensors([("rank1.weight", torch.outer(u, u))])
    row = df.iloc[0]
    assert row["status"] == "failed" and "power-law fit failed" in row["warning"]
    assert math.isnan(row["alpha"]) and math.isnan(row["alpha_weighted"]) and pd_isna(row["num_pl_spikes"])
    assert row["matrix_rank"] == 1 and row["norm"] > 0


def pd_isna(x):
    import pandas as pd

    return bool(pd.isna(x))


def test_weightless_input_fails_clearly():
    with pytest.raises(ModelError, match="no weight matrices found among 2 tensor"):
        sp.analyze_tensors([("ln.weight", torch.ones(8)), ("scale", torch.tensor(2.0))])


def test_split_fused_rows_are_marked_non_ww():
    w = {"h.0.attn.c_attn.weight": torch.randn(16, 48), "experts.w": torch.randn(2, 12, 16)}
    df = sp.analyze_tensors(w.items(), split_fused=True)
    assert df["name"].tolist() == ["h.0.attn.c_attn.weight", "h.0.attn.c_attn.weight[q]", "h.0.attn.c_attn.weight[k]",
                                   "h.0.attn.c_attn.weight[v]", "experts.w[e0]", "experts.w[e1]"]
    assert df["non_ww"].tolist() == [False] + [True] * 5
    plain = sp.analyze_tensors(w.items())
    assert len(plain) == 1 and "3-D tensors not analysed" in plain.attrs["notes"][0]


def test_randomize_is_seeded():
    w = _weights()
    a = sp.analyze_tensors(w.items(), randomize=True, seed=3)
    b = sp.analyze_tensors(w.items(), randomize=True, seed=3)
    c = sp.analyze_tensors(w.items(), randomize=True, seed=4)
    assert a["rand_sigma_mp"].equals(b["rand_sigma_mp"])
    assert not a["max_rand_eval"].equals(c["max_rand_eval"])
    assert a["num_traps"].equals(a["rand_num_spikes"])


def test_progress_and_on_layer_callbacks():
    seen, layers = [], []
    sp.analyze_tensors(_weights().items(), total=9, progress=lambda d, t, n: seen.append((d, t, n)),
                       on_layer=lambda row, evals: layers.append((row["name"], evals.size)))
    assert [s[0] for s in seen] == list(range(1, 10)) and seen[-1][1] == 9
    assert ("conv.weight", 36) in layers


def test_summarize_is_nan_aware_over_ww_rows():
    import pandas as pd

    df = pd.DataFrame({
        "alpha": [2.0, np.nan, 4.0, 100.0], "log_norm": [1.0, 2.0, 3.0, 100.0],
        "ww_skipped": [False, False, False, True], "non_ww": [False, False, False, False],
        **{m: [1.0] * 4 for m in sp.WW_SUMMARY_METRICS if m not in ("alpha", "log_norm")},
    })
    s = sp.summarize(df)
    assert s["alpha"] == 3.0 and s["log_norm"] == 2.0 and list(s) == list(sp.WW_SUMMARY_METRICS)


def test_resolve_device():
    assert sp.resolve_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="cpu or cuda"):
        sp.resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            sp.resolve_device("cuda")


# ------------------------------------------------------------------ Gram eigenvalues vs the SVD


def test_gram_path_is_used_only_where_accurate():
    rng = np.random.default_rng(0)
    tall = rng.standard_normal((3, 200, 40))  # kappa ~ 2.6: the Gram path
    ill = tall.copy()
    ill[1] = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 40))  # rank 5: needs the SVD
    for stack in (tall, ill):
        exact = np.linalg.svd(stack, compute_uv=False)
        auto = sp.svals_cpu(stack, "auto")
        assert auto.shape == exact.shape
        assert auto[0] == pytest.approx(exact[0], rel=1e-12)
    assert sp.svals_cpu(ill, "auto")[1] == pytest.approx(np.linalg.svd(ill[1], compute_uv=False), rel=1e-12, abs=1e-12)
    lam = np.linalg.eigvalsh(np.matmul(ill.transpose(0, 2, 1), ill))
    assert sp.gram_evals_ok(lam).tolist() == [True, False, True]


def test_rank_deficient_tall_matrix_keeps_its_exact_rank():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 60, generator=g, dtype=torch.float64)
    for kw in ({}, {"batch_bytes": 1}):  # batched Gram path / row-blocked Gram path, both must fall back
        auto = sp.analyze_tensors([("low.weight", W)], **kw).iloc[0]
        exact = sp.analyze_tensors([("low.weight", W)], svd="exact", **kw).iloc[0]
        assert auto["matrix_rank"] == exact["matrix_rank"] == 6
        assert auto["kappa_nz"] == pytest.approx(exact["kappa_nz"], rel=1e-9)


def test_gram_matrix_blocks_sum_to_wtw():
    W = np.random.default_rng(1).standard_normal((130, 7)).astype(np.float32)
    G = sp.gram_matrix(W, block_bytes=7 * 8 * 20)  # 20-row blocks
    assert G.dtype == np.float64 and np.allclose(G, W.astype(np.float64).T @ W.astype(np.float64), rtol=1e-12)
    assert np.allclose(sp.gram_matrix(W.T, block_bytes=1), G, rtol=1e-12)


def test_worker_processes_give_the_same_table():
    w = _weights(5)
    w["big.weight"] = torch.randn(300, 40, generator=torch.Generator().manual_seed(9))
    seen = []
    one = sp.analyze_tensors(w.items(), randomize=True, seed=3)
    two = sp.analyze_tensors(w.items(), randomize=True, seed=3, workers=2, on_layer=lambda r, e: seen.append(r["name"]))
    assert two["name"].tolist() == one["name"].tolist() and two.attrs["svd"]["workers"] == 2
    assert sorted(seen) == sorted(two.loc[two["status"].isin(["success", "failed"]), "name"].tolist())
    num = one.select_dtypes("number").columns
    assert two[num].astype(float).to_numpy() == pytest.approx(one[num].astype(float).to_numpy(), rel=1e-12, nan_ok=True)
    assert two["status"].tolist() == one["status"].tolist()


@pytest.mark.parametrize("svd", ["auto", "exact"])
@pytest.mark.parametrize("batch_bytes", [4096, 8 << 20])
def test_compute_thread_gives_the_identical_table(svd, batch_bytes):
    """The helper thread that runs the eigenvalue/SVD calls (default on 2+ CPUs) makes the same LAPACK
    calls on the same arrays: every cell equal, bit for bit, on every path (batched stacks, the tall
    Gram / R-factor path at a small budget, an ill-conditioned tall matrix that falls back to the SVD,
    randomize), and every row reaches on_layer once."""
    import pandas as pd

    w = _weights(6)
    g = torch.Generator().manual_seed(4)
    w["big.weight"] = torch.randn(300, 40, generator=g)  # tall: row-blocked Gram at 4096 bytes
    ill = torch.randn(400, 30, generator=g)
    ill[:, 0] *= 1e5  # kappa > 1e3: the Gram check fails, the R factor's SVD is used
    w["ill.weight"] = ill
    seen = []
    one = sp.analyze_tensors(w.items(), svd=svd, batch_bytes=batch_bytes, randomize=True, seed=2, compute_thread=False)
    two = sp.analyze_tensors(w.items(), svd=svd, batch_bytes=batch_bytes, randomize=True, seed=2, compute_thread=True,
                             on_layer=lambda r, e: seen.append(r["name"]))
    assert two.attrs["compute_thread"] and not one.attrs["compute_thread"]
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert sorted(seen) == sorted(two.loc[two["status"].isin(["success", "failed"]), "name"].tolist())
    # Three threads computing at once (groups finish out of order; harvested in submission order).
    three = sp.analyze_tensors(w.items(), svd=svd, batch_bytes=batch_bytes, randomize=True, seed=2,
                               compute_thread=True, compute_threads=3)
    assert three.attrs["compute_threads"] == 3 and two.attrs["compute_threads"] == 1
    pd.testing.assert_frame_equal(one, three, check_exact=True)


def test_compute_threads_are_the_cpus_and_the_manifest_says_so(tmp_path, monkeypatch):
    """analyze_checkpoint runs as many LAPACK threads as the CPUs it may use, whatever the load (the calls
    are independent: a busy core time-slices them), records the rule and the cores other processes kept
    busy while it ran; ACTSPARSE_CPU_THREADS wins; a given count is "given". The table is the same."""
    import pandas as pd
    from safetensors.numpy import save_file

    from probes import threads

    g = np.random.default_rng(1)
    save_file({f"h.{i}.mlp.weight": g.standard_normal((96, 48)).astype(np.float32) for i in range(6)},
              str(tmp_path / "model.safetensors"))
    monkeypatch.delenv("ACTSPARSE_CPU_THREADS", raising=False)
    monkeypatch.setattr(sp, "_cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (6.5, 6.0, 5.0))  # a busy machine: still two
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: {"cores": 1.0, "window_s": 0.4})
    df = sp.analyze_checkpoint(tmp_path, batch_bytes=1)  # one group per matrix: six submissions
    pol = df.attrs["thread_policy"]
    assert pol["compute_threads"] == 2 and pol["compute_thread"] and "affinity" in pol["compute_threads_rule"]
    assert pol["busy_elsewhere"] == {"cores": 1.0, "window_s": 0.4} and pol["load_average_1min"] == 6.5
    assert "compute_threads_history" not in pol and "compute_inline_calls" not in pol
    fixed = sp.analyze_checkpoint(tmp_path, batch_bytes=1, compute_threads=1)
    assert fixed.attrs["thread_policy"]["compute_threads"] == 1
    assert fixed.attrs["thread_policy"]["compute_threads_rule"] == "given"
    pd.testing.assert_frame_equal(df, fixed, check_exact=True)
    monkeypatch.setenv("ACTSPARSE_CPU_THREADS", "3")
    pol = sp.analyze_checkpoint(tmp_path, batch_bytes=1).attrs["thread_policy"]
    assert pol["compute_threads"] == 3 and pol["compute_threads_rule"] == "ACTSPARSE_CPU_THREADS=3"


def test_compute_thread_default_follows_the_cpus(monkeypatch):
    w = list(_weights(1).items())
    monkeypatch.setattr(sp, "_cpus", lambda: 1)
    assert not sp.analyze_tensors(w).attrs["compute_thread"]
    monkeypatch.setattr(sp, "_cpus", lambda: 2)
    assert sp.analyze_tensors(w).attrs["compute_thread"]
    assert not sp.analyze_tensors(w, workers=2).attrs["compute_thread"]  # worker processes instead


def test_the_cuda_code_path_runs_end_to_end_on_a_cpu_torch_device():
    """No GPU here: drive the CUDA branch (float32 torch svdvals, R factors of tall matrices,
    float64 fits) with torch's "cpu:0" device, and compare with the float64 numpy path."""
    w = _weights(7)
    w["big.weight"] = torch.randn(700, 30, generator=torch.Generator().manual_seed(2))  # tall: R factor path
    args = dict(split_fused=False, randomize=False, seed=0, config=None, total=None, progress=None, on_layer=None,
                svd="auto", runner=None)
    gpu_like = sp._analyze(list(w.items()), "cpu:0", batch_bytes=4096, **args).to_pandas()
    exact = sp._analyze(list(w.items()), "cpu", batch_bytes=4096, **args).to_pandas()
    assert gpu_like.attrs["svd"]["dtype"] == "float32" and gpu_like["name"].tolist() == exact["name"].tolist()
    ok = exact["status"] == "success"
    assert (gpu_like.loc[ok, "status"] == "success").all()
    for col in ("lambda_max", "norm", "stable_rank", "sv_max"):
        assert gpu_like.loc[ok, col].astype(float).to_numpy() == pytest.approx(
            exact.loc[ok, col].astype(float).to_numpy(), rel=1e-4), col


def test_weights_beyond_ww_limits_are_not_read(tmp_path, monkeypatch):
    """A safetensors weight past WW's size limits (N > 50000) gets its row from the header alone: the
    same row as when it is read, and its bytes are never read (peak memory: GPT-2's 154 MB token
    embedding). With --split-fused every tensor is read. A file too short for it is still an error."""
    import pandas as pd
    from safetensors.numpy import save_file

    from probes import arrays, formats
    from probes.arrays import iter_arrays
    from probes.errors import CheckpointError

    g = np.random.default_rng(0)
    save_file({"wte.weight": g.standard_normal((50001, 2)).astype(np.float32),
               "h.0.mlp.weight": g.standard_normal((64, 16)).astype(np.float32)}, str(tmp_path / "model.safetensors"))
    read = []
    orig = formats.safetensors_raw_tensors

    def spy(f, skip=None, **kw):
        for item in orig(f, skip, **kw):
            read.append((item[0], item[3] is not None))
            yield item

    monkeypatch.setattr(formats, "safetensors_raw_tensors", spy)
    df = sp.analyze_checkpoint(tmp_path)
    assert dict(read) == {"wte.weight": False, "h.0.mlp.weight": True}
    row = df.set_index("name").loc["wte.weight"]
    assert row["status"] == "skipped" and row["shape"] == "50001x2" and row["dtype"] == "float32" and row["N"] == 50001
    with_read = sp.analyze_tensors(iter_arrays(formats.sniff(tmp_path)))
    pd.testing.assert_frame_equal(df, with_read, check_exact=True)
    read.clear()
    monkeypatch.setattr(arrays, "safetensors_raw_tensors", spy)  # iter_arrays' reader (--split-fused)
    sp.analyze_checkpoint(tmp_path, split_fused=True)
    assert dict(read) == {"wte.weight": True, "h.0.mlp.weight": True}
    # truncate inside the skipped tensor: still reported
    data = (tmp_path / "model.safetensors").read_bytes()
    hdr = 8 + int.from_bytes(data[:8], "little")
    off = formats.safetensors_header(str(tmp_path / "model.safetensors"))["wte.weight"]["data_offsets"]
    (tmp_path / "model.safetensors").write_bytes(data[:hdr + off[1] - 10])
    with pytest.raises(CheckpointError, match="truncated"):
        list(orig(str(tmp_path / "model.safetensors"), skip=lambda *a: True))
