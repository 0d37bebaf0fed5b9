"""TEAL (probes.teal, ``curve --method teal|teal_greedy``) against an independent re-implementation.

The reference quantities below are written from FasterDecoding/TEAL's code, not from ours:
``utils/utils.py`` ``ActivationModule.find_histogram`` (10,000 bins, 1 % outlier bins),
``Distribution.icdf`` and ``SparsifyFn.set_threshold`` (icdf(0.5 + s/2)), ``SparsifyFn.apply``
(``x.abs().gt(t) * x``) and ``SparsifyFn.forward`` (the last ``T // 2`` positions of a prefill),
applied with plain ``register_forward_pre_hook`` on the seven Linear modules of a tiny Llama.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import transformers as tf
from probes import pplp as P
from probes import teal as T
from probes.errors import ModelError
from probes.loading import LoadedModel

V = 40
OPTS = dict(max_length=32, batch_size=4)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _loaded(model, family):
    return LoadedModel(model=model.eval(), tokenizer=None, config=model.config, family=family,
                       device=torch.device("cpu"), dtype=torch.float32, is_causal_lm=True, is_encoder_decoder=False)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return _loaded(tf.LlamaForCausalLM(cfg), "llama")


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (n,), generator=g).tolist()


# ------------------------------------------------------------------ the reference, from TEAL's code
def ref_histogram(acts):
    """``ActivationModule.find_histogram(num_bins=10000, outlier_threshold=0.01)``."""
    acts = torch.sort(acts.flatten())[0]
    lower = acts[int(0.01 * len(acts))]
    upper = acts[-int(0.01 * len(acts))]
    main_bins = torch.linspace(lower, upper, 10000 - 1)
    bins = torch.cat([torch.tensor([acts[0]]), main_bins, torch.tensor([acts[-1]])])
    counts, _ = torch.histogram(acts, bins=bins)
    return (bins[:-1] + bins[1:]) / 2, counts.float()


def ref_icdf(centers, counts, q):
    """``Distribution.icdf``."""
    total = counts.sum()
    cum = torch.cumsum(counts, dim=0)
    target = q * total
    idx = torch.searchsorted(cum, target)
    if idx == 0:
        return centers[0]
    if idx == len(centers):
        return centers[-1]
    frac = (target - cum[idx - 1]) / (cum[idx] - cum[idx - 1])
    return centers[idx - 1] + frac * (centers[idx] - centers[idx - 1])


def ref_thresholds(model, batches, s):
    """Grab h1/h2 of attention and MLP on the calibration batches (every real position), then TEAL's rule."""
    grabbed = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for key, mod in (("attn_h1", layer.self_attn.q_proj), ("attn_h2", layer.self_attn.o_proj),
                         ("mlp_h1", layer.mlp.gate_proj), ("mlp_h2", layer.mlp.down_proj)):
            def pre(m, args, i=i, key=key):
                grabbed.setdefault((i, key), []).append(args[0][cur["am"].bool()].detach().float())
            handles.append(mod.register_forward_pre_hook(pre))
    cur = {}
    with torch.no_grad():
        for b in batches:
            cur["am"] = b.attention_mask
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in handles:
        h.remove()
    out = {}
    for (i, key), xs in grabbed.items():
        c, n = ref_histogram(torch.cat(xs))
        out[(i, key)] = float(ref_icdf(c, n, 0.5 + s / 2)) if s != 0 else 0.0
    group = {"q_proj": "attn_h1", "k_proj": "attn_h1", "v_proj": "attn_h1", "o_proj": "attn_h2",
             "gate_proj": "mlp_h1", "up_proj": "mlp_h1", "down_proj": "mlp_h2"}
    return {(i, p): out[(i, group[p])] for i in range(len(model.model.layers)) for p in PROJ}


def ref_ppl_ratio(model, batches, thr, mode):
    """Dense and TEAL-sparse CE over the counted tokens, masks applied by independent pre-hooks."""
    zeros, entries = {}, {}

    def ce(sparse):
        handles = []
        if sparse:
            for i, layer in enumerate(model.model.layers):
                for p in PROJ:
                    mod = getattr(layer.self_attn, p, None) or getattr(layer.mlp, p)
                    t = thr[(i, p)]

                    def pre(m, args, t=t, key=(i, p)):
                        x = args[0]
                        am = cur["b"].attention_mask.bool()
                        n = am.sum(1, keepdim=True)
                        pos = torch.arange(x.shape[1]).unsqueeze(0)
                        region = am & ((pos >= n - n // 2) if mode == "last-half" else torch.ones_like(am))
                        y = torch.where(region.unsqueeze(-1), x.abs().gt(t) * x, x)
                        sel = region & cur["b"].count_mask.bool()
                        zeros[key] = zeros.get(key, 0) + int((y[sel] == 0).sum())
                        entries[key] = entries.get(key, 0) + y[sel].numel()
                        return (y,) + tuple(args[1:])
                    handles.append(mod.register_forward_pre_hook(pre))
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                cur["b"] = b
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                keep = b.labels != -100
                tot += float(F.cross_entropy(logits[keep].double(), b.labels[keep], reduction="sum"))
                n += int(keep.sum())
        for h in handles:
            h.remove()
        return tot / n

    cur = {}
    dense = ce(False)
    sparse = ce(True)
    return math.exp(sparse - dense), {k: zeros[k] / entries[k] for k in zeros}


# ------------------------------------------------------------------ tests
def test_teal_histogram_rule_by_hand():
    # 1000 evenly spaced values: the icdf of a fine histogram is the linear quantile to within one bin
    d = T.TealDistribution.from_values(torch.arange(1000, dtype=torch.float32))
    assert d.threshold(0.0) == 0.0
    assert d.icdf(0.5) == pytest.approx(499.5, abs=0.6)
    assert d.threshold(0.5) == pytest.approx(749.25, abs=0.6)  # icdf(0.75)
    assert d.icdf(0.0) == pytest.approx(float(d.centers[0]))  # searchsorted index 0: the first centre
    with pytest.raises(Exception, match="calibration"):
        T.TealDistribution.from_values(torch.arange(50, dtype=torch.float32))


@pytest.mark.parametrize("mode", ["last-half", "all"])
def test_teal_equals_reference_on_tiny_llama(llama, mode):
    docs = [tokens(700, 1)]
    s_val = 0.5
    sess = P.PplpSession(llama, P.CurveOptions(**OPTS), docs_tokens=docs, calib_fraction=0.25, teal_eval=mode)
    res = P.curve(llama, P.CurveOptions(**OPTS, methods=("teal",), values={"teal": (s_val,)}, teal_eval=mode),
                  docs_tokens=docs, session=sess)
    rows = res.projection_table()
    assert len(rows) == 2 * 7 and set(rows.projection) == {"q", "k", "v", "o", "gate", "up", "down"}

    # the calibration windows come first and are disjoint from the evaluated ones
    assert len(sess.calib_windows) >= 1 and len(sess.windows) >= 1
    assert not any(w is c for w in sess.windows for c in sess.calib_windows)
    split = res.info["calibration_split"]
    assert split["calibration_windows"] == [0, len(sess.calib_windows)]
    assert split["evaluation_windows"] == [len(sess.calib_windows), len(sess.calib_windows) + len(sess.windows)]

    # thresholds: TEAL's rule, computed independently, on the calibration windows only
    ref = ref_thresholds(llama.model, sess.calib_batches, s_val)
    for _, r in rows.iterrows():
        name = r.module_path.rsplit(".", 1)[-1]
        assert r.threshold == pytest.approx(ref[(r.layer, name)], rel=1e-5, abs=1e-7), (r.layer, name)

    # effective sparsity = parameter-weighted mean of the measured per-projection sparsities
    pt = res.table().set_index("method").loc["teal"]
    eff = float((rows.params * rows.sparsity).sum() / rows.params.sum())
    assert pt.effective_sparsity == pytest.approx(eff, rel=1e-12)
    assert rows.params.tolist()[:7] == [32 * 32, 16 * 32, 16 * 32, 32 * 32, 64 * 32, 64 * 32, 32 * 64]

    # the same thresholds re-applied by independent pre-hooks give the same PPL ratio and sparsities
    thr = {(int(r.layer), r.module_path.rsplit(".", 1)[-1]): float(r.threshold) for _, r in rows.iterrows()}
    ratio, sp = ref_ppl_ratio(llama.model, sess.batches, thr, mode)
    assert pt.ppl_ratio == pytest.approx(ratio, rel=1e-6)
    assert abs(pt.ppl_ratio - 1.0) > 1e-6  # the masks changed the loss (an untrained model: either way)
    for _, r in rows.iterrows():
        assert r.sparsity == pytest.approx(sp[(int(r.layer), r.module_path.rsplit(".", 1)[-1])], abs=1e-12)


def test_calibration_ignores_the_evaluation_tokens(llama):
    head = tokens(256, 3)  # 4 windows of 32 + prefix: the calibration quarter is in here
    a = P.curve(llama, P.CurveOptions(**OPTS, methods=("teal",), values={"teal": (0.4,)}),
                docs_tokens=[head + tokens(600, 4)])
    b = P.curve(llama, P.CurveOptions(**OPTS, methods=("teal",), values={"teal": (0.4,)}),
                docs_tokens=[head + tokens(600, 5)])
    assert a.info["calibration_split"]["calibration_windows"] == b.info["calibration_split"]["calibration_windows"]
    assert a.projection_table().threshold.tolist() == b.projection_table().threshold.tolist()
    assert a.table().ppl_ratio.iloc[1] != b.table().ppl_ratio.iloc[1]


def test_greedy_allocation_follows_greedyopt(llama):
    docs = [tokens(500, 6)]
    res = P.curve(llama, P.CurveOptions(**OPTS, methods=("teal_greedy",), values={"teal_greedy": (0.1, 0.2)},
                                        teal_eval="all"), docs_tokens=docs)
    rows = res.projection_table()
    unit = 32 * 32
    for v in (0.1, 0.2):
        g = rows[rows.value == v]
        for li in (0, 1):
            gl = g[g.layer == li]
            w = gl.params / unit
            # each projection moved by whole steps of 0.025 / weight (greedyopt step_sizes)
            steps = gl.target_sparsity * w / T.GREEDY_BASE_STEP
            assert (steps - steps.round()).abs().max() < 1e-9
            f = float((gl.target_sparsity * w).sum() / w.sum())
            assert abs(f - v) <= T.GREEDY_BASE_STEP / w.sum() + 1e-12  # the closest recorded step
    greedy = res.info["teal"]["greedy"]
    assert greedy["target"] == 0.2 and all(n >= 1 for n in greedy["steps_per_layer"].values())


def test_projection_sets_gpt2_bert_and_refusal():
    cfg = tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    fam, projs = T.find_projections(tf.GPT2LMHeadModel(cfg))
    assert fam == "gpt2" and [p.name for p in projs[:4]] == ["qkv", "o", "up", "down"]
    assert projs[0].params == 16 * 48 and projs[3].module_path == "transformer.h.0.mlp.c_proj"
    bcfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)
    fam, projs = T.find_projections(tf.BertModel(bcfg))
    assert fam == "bert" and len(projs) == 12
    down = [p for p in projs if p.name == "down"]
    assert [p.module_path for p in down] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    with pytest.raises(ModelError, match="linear modules found: 0, 1") as e:
        T.find_projections(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))
    assert "absq_down" in e.value.fix


def test_bundled_model_teal_rows(tmp_path):
    from probes.embedded import default_checkpoint
    from probes.loading import load_checkpoint

    lm = load_checkpoint(default_checkpoint(), device="cpu")
    res = P.curve(lm, P.CurveOptions(max_tokens=700, batch_size=3, methods=("teal", "absq_down"),
                                     values={"teal": (0.5,), "absq_down": (0.5,)}))
    df = res.table().set_index("method")
    assert df.loc["teal"].effective_sparsity > 0.4 and df.loc["teal"].ppl_ratio > 1.0
    assert math.isnan(df.loc["absq_down"].effective_sparsity)
    assert res.info["teal"]["projection_set"] == "gpt2" and res.info["teal"]["n_projections"] == 16
