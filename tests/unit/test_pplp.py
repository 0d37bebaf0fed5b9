"""PPL-p% sparsity (CETT) and the sparsity-vs-PPL curve (probes.pplp), METRICS.md section 6.

Tiny GPT-2 (ReLU, Conv1D weights) and tiny Llama (SwiGLU, nn.Linear weights) are trained for a
few seconds on a synthetic Markov chain, so that removing MLP neurons really costs perplexity.
Every check that compares with the tool recomputes the quantity here with plain torch/numpy.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import transformers as tf
from probes import pplp as P
from probes.errors import ModelError
from probes.loading import LoadedModel

V = 48


def markov_chain(n: int, seed: int) -> torch.Tensor:
    """Tokens where 80 % follow a fixed permutation of the previous token, 20 % are uniform noise."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(123))
    noise = torch.rand(n, generator=g) < 0.2
    rnd = torch.randint(V, (n,), generator=g)
    x = torch.empty(n, dtype=torch.long)
    x[0] = 0
    for i in range(1, n):
        x[i] = rnd[i] if noise[i] else perm[x[i - 1]]
    return x


def train(model, steps: int = 80):
    torch.manual_seed(0)
    data = markov_chain(20000, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data) - 33, (16,))
        b = torch.stack([data[i:i + 32] for i in idx])
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def loaded(model, family: str) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=None, config=model.config, family=family, device=torch.device("cpu"),
                       dtype=torch.float32, is_causal_lm=True, is_encoder_decoder=False)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                        activation_function="relu", bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return loaded(train(tf.GPT2LMHeadModel(cfg)), "gpt2")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return loaded(train(tf.LlamaForCausalLM(cfg)), "llama")


@pytest.fixture(scope="module")
def docs():
    return [markov_chain(4600, 2).tolist()]


OPTS = dict(max_length=64, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy shared CPU run far faster (and steadier) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def down_modules(lm: LoadedModel):
    m = lm.model
    if lm.family == "gpt2":
        return [blk.mlp.c_proj for blk in m.transformer.h]
    return [layer.mlp.down_proj for layer in m.model.layers]


def column_norms_by_hand(module) -> torch.Tensor:
    """||W_down[:, i]||_2 written out for both weight layouts (Conv1D [in, out], Linear [out, in])."""
    w = module.weight.detach().double()
    if type(module).__name__ == "Conv1D":
        return (w ** 2).sum(dim=1).sqrt()
    return (w ** 2).sum(dim=0).sqrt()


def output_matrix_by_hand(module) -> torch.Tensor:
    """W as [in, out] so that the MLP output is x @ W (bias left out)."""
    w = module.weight.detach().double()
    return w if type(module).__name__ == "Conv1D" else w.t()


def cett_by_hand(x: np.ndarray, w_io: np.ndarray, t: float) -> float:
    """The definition, one token at a time in float64."""
    col = np.sqrt((w_io ** 2).sum(axis=1))
    vals = []
    for tok in x:
        n = np.abs(tok) * col
        small = (tok * (n <= t)) @ w_io
        full = tok @ w_io
        d = np.linalg.norm(full)
        vals.append(np.linalg.norm(small) / d if d > 0 else 0.0)
    return float(np.mean(vals))


def untied(x: np.ndarray, w_io: np.ndarray, grid: np.ndarray) -> list[int]:
    """Grid indices whose t is not (within float32 rounding) equal to some n_i.

    Grid points are quantiles of the data, so some equal an n_i exactly, and whether n_i <= t
    then depends on the last bit of a float32 norm; the definition is compared elsewhere.
    """
    n = np.unique((np.abs(x) * np.sqrt((w_io ** 2).sum(axis=1))).ravel())
    out = []
    for k, t in enumerate(grid):
        j = np.searchsorted(n, t)
        near = [n[i] for i in (j - 1, j) if 0 <= i < len(n)]
        if t > 0 and all(abs(v - t) > 1e-5 * t for v in near):
            out.append(k)
    return out


# ------------------------------------------------------------------------------------------ formulas
def test_cett_function_and_streaming_grid_equal_the_definition():
    torch.manual_seed(1)
    lin = torch.nn.Linear(12, 5, bias=False)
    x = torch.relu(torch.randn(40, 12))  # exact zeros included
    x[3] = 0  # a token whose MLP output is exactly 0 counts as CETT 0
    w_io = P.down_weight_io(lin)
    assert torch.allclose(w_io, lin.weight.t())
    assert torch.allclose(P.down_column_norms(lin), column_norms_by_hand(lin).float())
    xn, wn = x.double().numpy(), w_io.double().numpy()
    for t in (0.0, 0.05, 0.2, 0.5, 10.0):
        assert P.cett(x, w_io, t) == pytest.approx(cett_by_hand(xn, wn, t), abs=1e-6)
    grid = P.CettGrid(n_quantiles=16)
    grid.update(x[:25], w_io, P.down_column_norms(lin))  # first batch fixes the grid
    grid.update(x[25:], w_io, P.down_column_norms(lin))
    g, v = grid.values()
    assert g[0] == 0 and np.all(np.diff(g) > 0)
    assert v[0] == 0.0
    ks = untied(xn, wn, g)
    assert len(ks) >= 5
    for k in ks:
        assert v[k] == pytest.approx(cett_by_hand(xn, wn, float(g[k])), abs=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 1000, 200_000])
def test_grid_quantiles_equal_torch_quantile_bit_for_bit(n):
    """The grid's quantiles come from a numpy sort plus torch's own interpolation: the same float64 numbers as
    torch.quantile on the values (ties, a single value and more quantiles than values included)."""
    from probes.cett import _quantiles_of_sorted, _sorted_float64

    torch.manual_seed(n)
    v = (torch.randn(n).abs() * torch.rand(n)).float()
    v[: n // 3] = v[0]  # ties
    for k in (1, 2, 16, 128):
        q = torch.linspace(0, 1, min(k, n), dtype=torch.float64)
        assert torch.equal(_quantiles_of_sorted(_sorted_float64(v), q), torch.quantile(v.double(), q))


def test_streaming_grid_same_on_a_transposed_weight_view():
    """nn.Linear's weight_io is a transposed view; the grid's sums must not depend on the layout."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(96, 24, bias=False)
    x = torch.nn.functional.silu(torch.randn(300, 96)) * torch.randn(300, 96)  # GLU-like: dense, signed
    w_view = P.down_weight_io(lin)
    assert not w_view.is_contiguous()
    out = []
    for w in (w_view, w_view.contiguous()):
        grid = P.CettGrid()
        grid.update(x[:100], w, P.down_column_norms(lin))
        grid.update(x[100:], w, P.down_column_norms(lin))
        out.append(grid.values())
    assert np.array_equal(out[0][0], out[1][0])
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6, atol=1e-9)
    xn, wn = x.double().numpy(), w_view.double().numpy()
    g, v = out[0]
    for k in untied(xn, wn, g)[::7]:
        assert v[k] == pytest.approx(cett_by_hand(xn, wn, float(g[k])), abs=1e-5)


def test_conv1d_layout_matches_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    conv = Conv1D(5, 12)  # nf=5 outputs, nx=12 inputs, weight [12, 5]
    lin = torch.nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    assert torch.allclose(P.down_weight_io(conv), P.down_weight_io(lin))
    assert torch.allclose(P.down_column_norms(conv), column_norms_by_hand(conv).float())


def test_cett_on_a_tiny_model_equals_hand_computation(gpt2, docs):
    """The streaming grid's CETT at a threshold equals the definition on the model's real activations."""
    s = P.PplpSession(gpt2, P.DataOptions(**OPTS), docs_tokens=docs)
    captured = []
    mod = down_modules(gpt2)[1]
    current = {}

    def grab(module, args):
        captured.append(args[0][current["mask"]].detach().double())

    h = mod.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for b in s.batches:
                current["mask"] = b.count_mask
                gpt2.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        h.remove()
    s.calibrate(cett=True, cett_grid=64)
    x = torch.cat(captured).numpy()
    w = output_matrix_by_hand(mod).numpy()
    g, v = s.cett_grids[1].values()
    assert s.cett_grids[1].n_tokens == x.shape[0] == s.n_tokens
    ks = untied(x, w, g)
    assert len(ks) >= 10
    for k in ks[:: max(1, len(ks) // 6)]:
        assert v[k] == pytest.approx(cett_by_hand(x, w, float(g[k])), abs=1e-5)


def test_threshold_selection_largest_t_with_cett_at_most_c():
    grid = [0.0, 1.0, 2.0, 3.0, 4.0]
    cett = [0.0, 0.1, 0.3, 0.25, 0.6]  # not monotone on purpose
    # c = 0.27: the largest grid t with CETT <= 0.27 is 3 (0.25); interpolate towards 4 (0.6).
    assert P.threshold_for_cett(grid, cett, 0.27) == pytest.approx(3 + 0.02 / 0.35, rel=1e-6)
    # c = 0.2: index 3 (0.25) and 2 (0.3) exceed it, index 1 (0.1) is the largest below.
    assert P.threshold_for_cett(grid, cett, 0.2) == pytest.approx(1.5, rel=1e-6)
    assert P.threshold_for_cett(grid, cett, 0.05) == pytest.approx(0.5, rel=1e-6)
    assert P.threshold_for_cett(grid, cett, 0.0) == 0.0
    assert P.threshold_for_cett(grid, cett, 0.7) == 4.0  # beyond the grid: its largest point
    assert P.threshold_for_cett(grid, cett, 1.0) == math.inf


def test_log_histogram_quantiles_are_close_to_exact():
    torch.manual_seed(3)
    a = torch.exp(torch.randn(20000, 1) * 2)
    a[:4000] = 0
    h = P.LogHistogram(*P.LAYER_HIST)
    h.update(a)
    for q in (0.1, 0.3, 0.5, 0.9, 0.99):
        exact = float(torch.quantile(a.flatten(), q))
        got = h.quantile(q)
        assert got == pytest.approx(exact, rel=0.02, abs=1e-12)


# ------------------------------------------------------------------------------------------- search
def power_curve(cstar: float, b: float):
    a = math.log(1.01) / cstar ** b
    return lambda c: math.exp(min(a * c ** b, 50.0))


# c* away from dyadic points, where bisection can land on the answer by luck.
@pytest.mark.parametrize("cstar,b", [(0.07, 2), (0.23, 3), (0.37, 1.5), (0.63, 2), (0.81, 6), (0.93, 4)])
def test_secant_needs_no_more_passes_than_bisection_on_monotone_curves(cstar, b):
    f = power_curve(cstar, b)
    for p in (1.0, 5.0):
        out = {m: P.search_cett(f, 1 + p / 100, 1e-3, m) for m in ("secant", "bisection")}
        for m, o in out.items():
            if o.status == "reached":
                assert abs(o.ratio - (1 + p / 100)) <= 1e-3 and o.ratio == f(o.c)
        assert out["secant"].status == out["bisection"].status
        assert out["secant"].n_evals <= out["bisection"].n_evals


def test_secant_falls_back_safely_on_non_monotone_curves():
    wavy = lambda c: 1 + 0.02 * c + 0.015 * math.sin(25 * c) + 0.2 * c ** 4  # noqa: E731
    o = P.search_cett(wavy, 1.01, 1e-3, "secant", max_evals=40)
    assert o.status == "reached" and abs(wavy(o.c) - 1.01) <= 1e-3 and o.ratio == wavy(o.c)
    assert all(r == wavy(c) for c, r in o.trace)
    # A jump over the target: no c is within tol; the closest measured ratio is reported, flagged.
    step = lambda c: 1.0 if c < 0.4321 else 1.05  # noqa: E731
    for m in ("secant", "bisection"):
        o = P.search_cett(step, 1.01, 1e-3, m, max_evals=60)
        assert o.status == "not_reached" and o.ratio in (1.0, 1.05) and abs(o.c - 0.4321) < 1e-6
    # A curve that dips below 1 first (log of the ratio undefined there) still converges.
    dip = lambda c: math.exp(-0.004 * c + 0.05 * c ** 3 + 3 * c ** 8)  # noqa: E731
    o = P.search_cett(dip, 1.01, 1e-3, "secant")
    assert o.status == "reached" and o.n_evals <= P.search_cett(dip, 1.01, 1e-3, "bisection").n_evals


def test_unreachable_targets_are_reported_not_numbers():
    flat = lambda c: 1 + 0.005 * c ** 2  # noqa: E731
    for m in ("secant", "bisection"):
        o = P.search_cett(flat, 1.01, 1e-3, m)
        assert o.status == "unreachable" and o.c is None and o.ratio is None
        assert o.bound_ratio == pytest.approx(1.005) and "c = 1" in o.reason
    o = P.search_cett(flat, 0.9, 1e-3)  # below the dense ratio of 1
    assert o.status == "unreachable" and o.c is None and o.n_evals == 0


# --------------------------------------------------------------------------------- on tiny models
def ce_by_hand(model, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            keep = b.labels != -100
            losses = F.cross_entropy(logits[keep].float(), b.labels[keep], reduction="none")
            total += float(losses.double().sum())
            n += int(keep.sum())
    return total / n


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_independent_hook_reproduces_reported_ratio(which, request, docs):
    lm = request.getfixturevalue(which)
    opts = P.PplpOptions(**OPTS, p=(1.0,))
    s = P.PplpSession(lm, opts, docs_tokens=docs)
    res = P.pplp(lm, opts, session=s)
    tgt = res.targets[0]
    assert tgt.status == "reached"
    assert abs(tgt.evaluation.ratio - 1.01) <= 1e-3
    table = res.table()
    thresholds = table.sort_values("layer").threshold.tolist()
    assert len(thresholds) == 2

    dense = ce_by_hand(lm.model, s.batches)
    zeros = [0.0, 0.0]
    entries = [0.0, 0.0]
    state = {}
    handles = []
    try:
        for i, mod in enumerate(down_modules(lm)):
            col = column_norms_by_hand(mod).float()

            def pre(module, args, i=i, col=col):
                x = args[0]
                keep = (x.abs().float() * col) >= thresholds[i]  # inactive: |x_i| * ||W[:, i]|| < t
                xs = x * keep
                m = state["mask"]
                zeros[i] += float((xs[m] == 0).sum())
                entries[i] += float(xs[m].numel())
                return (xs,)

            handles.append(mod.register_forward_pre_hook(pre))
        total, n = 0.0, 0
        with torch.no_grad():
            for b in s.batches:
                state["mask"] = b.count_mask
                logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                keep = b.labels != -100
                total += float(F.cross_entropy(logits[keep].float(), b.labels[keep], reduction="none").double().sum())
                n += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    ratio = math.exp(total / n - dense)
    assert ratio == pytest.approx(tgt.evaluation.ratio, abs=1e-6)
    assert res.dense["ce"] == pytest.approx(dense, abs=1e-9)
    assert n == res.dense["n_tokens"] == s.n_tokens
    for i in range(2):  # the same neurons were zeroed
        assert zeros[i] / entries[i] == pytest.approx(table.sort_values("layer").sparsity.iloc[i], abs=1e-12)
    summ = res.summary().iloc[0]
    assert summ.status == "reached" and summ.full_passes_total == 1 + tgt.sparse_passes
    assert summ.mean_sparsity == pytest.approx(table.sparsity.mean())


def test_pplp_several_targets_share_passes_and_report_unreachable(gpt2, docs):
    res = P.pplp(gpt2, P.PplpOptions(**OPTS, p=(1.0, 5.0, 1e5)), docs_tokens=docs)
    st = {t.p: t for t in res.targets}
    assert st[1.0].status == st[5.0].status == "reached"
    assert st[1.0].c_star < st[5.0].c_star
    assert st[1e5].status == "unreachable" and st[1e5].c_star is None and st[1e5].evaluation is None
    summ = res.summary().set_index("p_pct")
    assert math.isnan(summ.loc[1e5, "achieved_ratio"]) and "c = 1" in summ.loc[1e5, "reason"]
    assert set(res.table().p_pct) == {1.0, 5.0}  # no per-layer numbers for an unreachable target
    assert res.info["full_passes"] == 1 + sum(t.sparse_passes for t in res.targets)
    assert res.info["full_passes"] <= 1 + 3 * 8


@pytest.mark.parametrize("which,gate_label", [("gpt2", "|x|"), ("llama", "|act(gate)|")])
def test_curve_runs_every_family_on_glu_and_non_glu(which, gate_label, request, docs):
    lm = request.getfixturevalue(which)
    values = {"cett": (0.1, 0.3), "topk": (0.5, 0.2), "topk_global": (0.3,), "teal": (0.5, 0.8), "teal_greedy": (0.1,),
              "absq_down": (0.5, 0.8), "cats": (0.5, 0.8), "chess": (0.6,), "sparling_posthoc": (0.8,), "fat": (0.01, 0.1)}
    if which == "llama":  # CHESS+ needs a q projection of its own (GPT-2 fuses q, k, v)
        values["chess_plus"] = (0.6,)
    assert set(P.CURVE_METHODS) - set(values) <= {"chess_plus"}
    res = P.curve(lm, P.CurveOptions(**OPTS, methods=tuple(values), values=values), docs_tokens=docs)
    df = res.table()
    assert df.iloc[0].method == "dense" and df.iloc[0].ppl_ratio == 1.0
    assert len(df) == 1 + sum(len(v) for v in values.values())
    assert res.info["full_passes"] == len(df)
    assert df.thresholded_tensor.iloc[1:].notna().all()
    assert df[df.method == "fat"].thresholded_tensor.iloc[0].startswith(gate_label)
    assert df[df.method == "teal"].thresholded_tensor.iloc[0].startswith("|x|")
    assert ((df.mean_sparsity >= 0) & (df.mean_sparsity <= 1)).all() and (df.ppl_ratio > 0).all()
    lay = res.layer_table()
    first = lay[lay.layer == 0]
    # Layer 0 sees the dense inputs, so its quantile thresholds hit the asked sparsity (when the
    # quantile is above the natural zeros) and top-k keeps exactly the asked fraction.
    for method in ("absq_down", "cats"):
        for _, r in first[first.method == method].iterrows():
            if r.threshold > 0:
                assert r.sparsity == pytest.approx(r.value, abs=0.01)
    for _, r in first[first.method == "topk"].iterrows():  # Sparsing Law: int(C * (1 - r)) zeroed per token
        assert r.sparsity >= int(r.width * (1 - r.value)) / r.width - 1e-12
    top = df[df.method == "topk"].sort_values("value")
    assert top.mean_sparsity.is_monotonic_decreasing
    # TEAL rows carry the effective sparsity; the others do not
    assert df[df.method.isin(["teal", "teal_greedy"])].effective_sparsity.between(0, 1).all()
    assert df[~df.method.isin(["teal", "teal_greedy"])].effective_sparsity.isna().all()
    # calibration windows come before, and apart from, the evaluated ones
    split = res.info["calibration_split"]
    assert split["calibration_windows"][1] == split["evaluation_windows"][0] >= 1


def test_few_tokens_warn_loudly(gpt2):
    from reports.pplp_report import pplp_manifest_section

    res = P.pplp(gpt2, P.PplpOptions(**OPTS, p=(1.0,)), docs_tokens=[markov_chain(600, 5).tolist()])
    assert res.warnings and str(P.MIN_TOKENS) in res.warnings[0]
    assert res.summary().warning.iloc[0] == res.warnings[0]
    assert pplp_manifest_section(res)["warnings"] == res.warnings


def test_library_imports_no_cli_packages():
    import subprocess
    import sys

    code = ("import sys, probes.pplp, reports.pplp_report; "
            "bad = [m for m in ('typer', 'rich') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_model_without_lm_head_or_mlp_fails_clearly(gpt2):
    base = tf.GPT2Model(gpt2.model.config)
    lm = LoadedModel(base, None, base.config, "gpt2", torch.device("cpu"), torch.float32, False, False)
    with pytest.raises(ModelError, match="language-model head"):
        P.resolve_layers(lm)
    no_mlp = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    lm = LoadedModel(no_mlp, None, None, "module", torch.device("cpu"), torch.float32, True, False)
    with pytest.raises(ModelError) as e:
        P.resolve_layers(lm)
    assert e.value.exit_code == 3 and e.value.fix


def test_token_loss_rows_with_and_without_ignored_positions():
    """Per-row float64 cross-entropy sums over the counted positions: rows whose every position counts skip the
    boolean-index copy (kept_row) and must give the same numbers as the copied path and as a hand computation."""
    from probes.pplp_session import kept_row, token_loss_rows

    torch.manual_seed(5)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[1, 4:] = -100  # a partly counted row
    labels[2] = -100  # a row with no target
    rows = token_loss_rows(logits, labels)
    assert rows[2] == (0.0, 0) and rows[1][1] == 4 and rows[0][1] == 7
    for b in (0, 1):
        keep = labels[b] != -100
        lp = torch.log_softmax(logits[b].double(), -1)
        by_hand = -sum(float(lp[i, labels[b, i]]) for i in range(7) if keep[i])
        assert rows[b][0] == pytest.approx(by_hand, rel=1e-6)
    full = torch.ones(7, dtype=torch.bool)
    lg, lab = kept_row(logits[0], labels[0], full)
    assert lg.data_ptr() == logits[0].data_ptr()  # no copy when every position counts
    copied = torch.nn.functional.cross_entropy(logits[0][full], labels[0][full], reduction="none")
    assert torch.equal(torch.nn.functional.cross_entropy(lg, lab, reduction="none"), copied)
