"""ReLU sites counted on the way (``probes.relu_pass``): the count kernel computes the ReLU and counts it in one pass.

What must hold: the ReLU's output is ``torch.relu``'s very bits, the model's outputs are unchanged, and every number
of every probe (counts, float sums, window rows) is the same bits as counting at the site's hook; anything the pass
cannot take (padding, autograd, another dtype, another tensor at the hook) falls back to the plain ReLU and the
hook's count; the ReLU modules' ``forward`` is put back after the run, also on an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes import fastcount, relu_pass
from probes.runner import run_probes
from probes.sparsity import ActivationSparsityProbe

pytestmark = pytest.mark.skipif(fastcount.kernel() is None or fastcount._STATE["relu_fn"] is None,
                                reason=f"no OpenMP build of the kernel here: {fastcount.status()}")


def _awkward(shape, seed=0):
    """Normal values, exact zeros, -0, +-inf, NaN of both signs, denormals, values at the thresholds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.3] = 0.0
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    for j, v in enumerate([-0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-40, -1e-40, 1e-6,
                           -1e-6, 1e-3, -1e-2, 3e38, -3e38]):
        flat[idx[j * 5:(j + 1) * 5]] = v
    return x


def _bits(t):
    return t.contiguous().view(torch.int32)


def _same_probe(a: ActivationSparsityProbe, b: ActivationSparsityProbe) -> None:
    for k in a.state:
        ta, tb = a.state[k], b.state[k]
        assert torch.equal(ta, tb) or (torch.isnan(ta).all() and torch.isnan(tb).all()), (k, ta, tb)
    ia, va = a._window_values().arrays()
    ib, vb = b._window_values().arrays()
    assert np.array_equal(np.asarray(ia), np.asarray(ib))
    assert np.array_equal(np.asarray(va), np.asarray(vb), equal_nan=True)


@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 37, 1531), (3, 5, 7), (40, 33)])
def test_the_pass_writes_torch_relu_bits_and_counts_what_the_hook_would(shape):
    x = _awkward(shape)
    fused, plain = ActivationSparsityProbe(shape[-1]), ActivationSparsityProbe(shape[-1])
    with torch.inference_mode():
        for seed in range(3):  # three batches: the state adds up in the same order
            x = _awkward(shape, seed)
            y = fused.relu_counted(x)
            assert y is not None and torch.equal(_bits(y), _bits(torch.relu(x)))
            fused.update(y)
            plain.update(torch.relu(x))
    assert fused.relu_updates == 3 and plain.relu_updates == 0
    assert int(fused.state["nonfinite"]) > 0  # the infs and NaNs that survive a ReLU were counted
    _same_probe(fused, plain)


def test_a_pass_the_hook_does_not_see_is_dropped_and_its_job_reused():
    x = _awkward((2, 16, 40))
    p, q = ActivationSparsityProbe(40), ActivationSparsityProbe(40)
    with torch.inference_mode():
        y = p.relu_counted(x)
        other = torch.relu(_awkward((2, 16, 40), seed=9))
        p.update(other)  # not the pass's output: counted itself, the pass dropped
        q.update(other)
        y2 = p.relu_counted(x)
        p.flush()  # the forward is over: a pass nobody took is dropped
        p.update(y2.clone())  # equal values, another tensor: counted itself
        q.update(torch.relu(x))
    assert p.relu_updates == 0 and p._ticket is None
    _same_probe(p, q)
    assert y is not None and len(fastcount._RELU_JOBS[1]) >= 1  # the jobs went back to the pool


def test_what_the_pass_cannot_take_returns_none():
    p = ActivationSparsityProbe(8)
    x = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    holes = torch.ones(2, 4, dtype=torch.bool)
    holes[1, 1] = False  # a window whose counted positions are not one run
    assert p.relu_counted(x, holes) is None
    mask[1, 3] = False  # padding: one run still
    assert p.relu_counted(x.double()) is None
    assert p.relu_counted(x.transpose(0, 1)) is None  # not contiguous
    assert p.relu_counted(x[..., :4]) is None  # another width
    assert p.relu_counted(x.view(1, 2, 4, 8)) is None  # 4-D: no site gives it
    w = x.clone().requires_grad_(True)
    assert p.relu_counted(w) is None  # autograd needs torch's ReLU
    with torch.no_grad():
        assert p.relu_counted(w) is not None  # no graph is built: the pass may run
    assert p.relu_counted(x, torch.ones(2, 4, dtype=torch.bool)) is not None
    assert p.relu_counted(x.view(8, 8), torch.ones(2, 4, dtype=torch.bool)) is not None  # OPT: tokens flattened
    assert p.relu_counted(x.view(8, 8), holes) is None  # ... with a hole among them


def _relu_gpt2(n_layer=2, width=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2, n_inner=width,
                     activation_function="relu")
    return GPT2LMHeadModel(cfg).eval()


def _batches(n=3, b=2, t=24, pad_last=False):
    from probes.corpus import Batch

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, 97, (b, t), generator=g)
        att = torch.ones(b, t, dtype=torch.long)
        count = torch.ones(b, t, dtype=torch.bool)
        if pad_last and i == n - 1:
            att[1, t // 2:] = 0
            count[1, t // 2:] = False
        out.append(Batch(input_ids=ids, attention_mask=att, count_mask=count, labels=ids))
    return out


@pytest.mark.parametrize("pad_last", [False, True])
def test_run_probes_counts_relu_sites_on_the_way_with_the_same_numbers(monkeypatch, pad_last):
    from probes.sites import find_sites

    model = _relu_gpt2()
    sites = find_sites(model, "gpt2", ("mlp_post",))
    assert [relu_pass.relu_before(model, s) is model.transformer.h[i].mlp.act for i, s in enumerate(sites)] == \
        [True, True]
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ACTSPARSE_RELU_PASS", flag)
        runs[flag] = run_probes(model, _batches(pad_last=pad_last), sites, lambda s, w, d: ActivationSparsityProbe(w))
        assert all("forward" not in vars(blk.mlp.act) for blk in model.transformer.h)  # put back
    for name, p in runs["1"].items():
        assert p.relu_updates == 3  # the padded batch too: its padding is written, not counted
        assert runs["0"][name].relu_updates == 0
        _same_probe(p, runs["0"][name])


def test_the_model_gives_the_same_outputs_while_its_relus_are_taken_over():
    from probes.hooks import HookState
    from probes.sites import find_sites

    model = _relu_gpt2()
    batch = _batches(1)[0]
    sites = find_sites(model, "gpt2", ("mlp_post",))
    probes = {s.canonical_name: ActivationSparsityProbe(64) for s in sites}
    seen = []
    with torch.inference_mode():
        plain = model(input_ids=batch.input_ids).logits
        taken = relu_pass.plan(model, sites, probes.get)
        with relu_pass.counted_relus(taken, probes.get, seen.append, None, HookState()) as n:
            fused = model(input_ids=batch.input_ids).logits
    assert n == 2 and torch.equal(plain, fused)
    assert seen == [s.canonical_name for s in sites]  # each site took its ReLU's pass
    assert all(p.relu_updates == 1 for p in probes.values())


def test_the_relus_are_put_back_when_the_run_fails():
    from probes.sites import find_sites

    model = _relu_gpt2()
    sites = find_sites(model, "gpt2", ("mlp_post",))

    def boom(batch, out):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run_probes(model, _batches(), sites, lambda s, w, d: ActivationSparsityProbe(w),
                   forward=lambda m, b: (m(input_ids=b.input_ids), boom(b, None)))
    assert all("forward" not in vars(blk.mlp.act) for blk in model.transformer.h)


def test_only_known_families_and_lone_relus_are_taken(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from probes.hooks import HookState
    from probes.sites import find_sites

    torch.manual_seed(0)
    gelu = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32))
    assert all(relu_pass.relu_before(gelu, s) is None for s in find_sites(gelu, "gpt2", ("mlp_post",)))
    model = _relu_gpt2(n_layer=1)
    site = find_sites(model, "gpt2", ("mlp_post",))[0]
    assert relu_pass.relu_before(model, site) is model.transformer.h[0].mlp.act
    other = type(site)(**{**{f: getattr(site, f) for f in site.__dataclass_fields__}, "family": "bert"})
    assert relu_pass.relu_before(model, other) is None  # a family whose code was not checked
    relu = model.transformer.h[0].mlp.act
    assert relu_pass.plan(model, [site], lambda n: ActivationSparsityProbe(64)) == [(site, relu)]
    assert relu_pass.plan(model, [site, site], lambda n: None) == []  # one ReLU for two sites: left alone
    monkeypatch.setenv("ACTSPARSE_RELU_PASS", "0")
    assert relu_pass.plan(model, [site], lambda n: ActivationSparsityProbe(64)) == []
    monkeypatch.setenv("ACTSPARSE_RELU_PASS", "1")

    class Other:  # a probe of another kind: the ReLU is left alone
        def update(self, x, mask=None):
            pass

    assert relu_pass.plan(model, [site], lambda n: Other()) == []
    model.transformer.h[0].mlp.act.forward = torch.relu  # replaced by someone else: left alone
    try:
        assert relu_pass.plan(model, [site], lambda n: None) == []
    finally:
        del model.transformer.h[0].mlp.act.forward
    with relu_pass.counted_relus([], None, None, None, HookState()) as n:
        assert n == 0
    on_meta = _relu_gpt2(n_layer=1).to("meta")  # (as a model on a GPU: the pass is for the CPU)
    assert relu_pass.plan(on_meta, find_sites(on_meta, "gpt2", ("mlp_post",)), lambda n: None) == []


def test_the_portable_openmp_build_gives_the_same_bits(monkeypatch, tmp_path):
    """Without AVX-512 (and on CPUs that lack it) the ReLU pass runs the portable loop: the same bits."""
    lib = fastcount.torch_libgomp()
    if lib is None:
        pytest.skip("torch runs no GNU OpenMP runtime here")
    shape = (3, 50, 77)
    xs = [_awkward(shape, s) for s in range(2)]

    def run():
        p = ActivationSparsityProbe(shape[-1])
        outs = []
        with torch.inference_mode():
            for x in xs:
                y = p.relu_counted(x)
                assert y is not None
                outs.append(y)
                p.update(y)
        p.flush()  # the passes into the state with this build's merge
        return p, outs

    fastcount.reset_for_tests()
    best, best_out = run()
    monkeypatch.setenv("ACTSPARSE_CACHE_DIR", str(tmp_path))
    portable = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", f"-L{lib}", f"-Wl,-rpath,{lib}"]
    monkeypatch.setattr(fastcount, "_flag_sets", lambda: [portable])
    try:
        fastcount.reset_for_tests()
        assert fastcount.kernel() is not None and fastcount._STATE["relu_fn"] is not None, fastcount.status()
        assert "portable" in fastcount.status()["detail"]
        other, other_out = run()
    finally:
        monkeypatch.undo()
        fastcount.reset_for_tests()
    for a, b in zip(best_out, other_out):
        assert torch.equal(_bits(a), _bits(b))
    _same_probe(best, other)


def test_a_site_that_sees_another_tensor_counts_it_at_its_hook(monkeypatch):
    """Model code that changes the ReLU's output before the projection (here: a copy of it) gets its hook's count,
    of the tensor the projection takes; the ReLU's own counts are dropped."""
    from probes.sites import find_sites

    model = _relu_gpt2()
    sites = find_sites(model, "gpt2", ("mlp_post",))
    for blk in model.transformer.h:
        mlp = blk.mlp
        monkeypatch.setattr(mlp, "forward", lambda x, mlp=mlp: mlp.dropout(mlp.c_proj(mlp.act(mlp.c_fc(x)).clone())))
    monkeypatch.setenv("ACTSPARSE_RELU_PASS", "1")
    fused = run_probes(model, _batches(), sites, lambda s, w, d: ActivationSparsityProbe(w))
    monkeypatch.setenv("ACTSPARSE_RELU_PASS", "0")
    plain = run_probes(model, _batches(), sites, lambda s, w, d: ActivationSparsityProbe(w))
    assert sorted(fused) == sorted(plain) == sorted(s.canonical_name for s in sites)
    for name, p in fused.items():
        assert p.relu_updates == 0 and p._ticket is None
        _same_probe(p, plain[name])


def _family_model(name):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=97)
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                              word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0,
                                              bos_token_id=0, eos_token_id=0, **common)), False
    if name == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(n_positions=64, n_embd=32, n_inner=64, n_layer=2, n_head=2,
                                                rotary_dim=8, activation_function="relu", bos_token_id=0,
                                                eos_token_id=0, **common)), False
    if name == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, hidden_act="relu", bos_token_id=0,
                                                      eos_token_id=0, **common)), False
    if name == "distilbert":
        return tf.DistilBertForMaskedLM(tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                                            max_position_embeddings=64, activation="relu",
                                                            pad_token_id=0, **common)), False
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                         num_decoder_layers=2, num_heads=2, dense_act_fn="relu",
                                                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                                         **common)), True
    raise ValueError(name)


@pytest.mark.parametrize("family", ["opt", "gptj", "gpt_neox", "distilbert", "t5"])
def test_every_listed_family_gives_the_same_numbers_and_its_relus_are_found(monkeypatch, family):
    """The families ``relu_pass.FAMILIES`` lists, configured with ReLU: each site's ReLU is found, the run counts
    the same bits with and without the pass, and every site takes the pass (OPT's flattened tokens, T5's
    dropout between the ReLU and the projection included)."""
    from probes.runner import TokenBatches
    from probes.sites import find_sites

    model, enc_dec = _family_model(family)
    model.eval()
    sites = find_sites(model, model.config.model_type, ("mlp_post",))
    assert sites and all(relu_pass.relu_before(model, s) is not None for s in sites)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ACTSPARSE_RELU_PASS", flag)
        runs[flag] = run_probes(model, _batches(), sites, lambda s, w, d: ActivationSparsityProbe(w),
                                adapter=TokenBatches(is_encoder_decoder=enc_dec))
    assert sorted(runs["1"]) == sorted(runs["0"])
    for name, p in runs["1"].items():
        _same_probe(p, runs["0"][name])
        assert p.relu_updates == 3, (name, p.relu_updates)


def test_the_relu_look_up_kept_between_runs_follows_the_model():
    """``relu_before`` keeps its answer for the next run, and looks again when the module it found is gone."""
    from probes.sites import find_sites

    model = _relu_gpt2(n_layer=1)
    site = find_sites(model, "gpt2", ("mlp_post",))[0]
    first = relu_pass.relu_before(model, site)
    assert first is model.transformer.h[0].mlp.act and relu_pass.relu_before(model, site) is first
    model.transformer.h[0].mlp.act = torch.nn.ReLU()  # replaced: the new one is found
    assert relu_pass.relu_before(model, site) is model.transformer.h[0].mlp.act is not first
    model.transformer.h[0].mlp.act = torch.nn.GELU()  # no ReLU any more
    assert relu_pass.relu_before(model, site) is None


def test_a_pass_into_a_state_the_c_merge_does_not_take_gives_the_same_numbers():
    """A state whose tensors were replaced by ones the C merge cannot write (here a strided histogram) between the
    pass and ``flush``: the pass's counts are added by the numpy merge instead, with the same bits."""
    x = _awkward((3, 20, 24), seed=4)
    fused, plain = ActivationSparsityProbe(24), ActivationSparsityProbe(24)
    with torch.inference_mode():
        y = fused.relu_counted(x)
        assert fused.take_relu_pass(y)
        for p in (fused, plain):  # (fused: its state as it was, without adding the waiting pass)
            p.__dict__["_state"]["token_hist"] = torch.zeros(2 * 1000, dtype=torch.int64)[::2]
        assert fused._state_addresses() is None
        plain.update(torch.relu(x))
        fused.flush()
    _same_probe(fused, plain)


@pytest.mark.parametrize("flat", [False, True])
def test_uncounted_positions_are_written_and_not_counted(flat):
    """Padding after a window's counted run and uncounted context before it (``--skip-first``, strided windows):
    the pass writes the ReLU of every position (the same bits as torch's) and counts only the counted ones, as
    the hook's count of ``x[mask]`` does; infs and NaNs in uncounted positions count nowhere."""
    B, T, C = 5, 23, 40
    x = _awkward((B, T, C), seed=7)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (a, e) in enumerate([(0, T), (3, T), (0, 17), (4, 9), (0, 0)]):  # full, context, padding, both, none
        mask[b, a:e] = True
    x[1, 0], x[2, 20] = float("nan"), float("inf")  # in uncounted positions only
    fused, plain = ActivationSparsityProbe(C), ActivationSparsityProbe(C)
    xin = x.reshape(B * T, C) if flat else x
    with torch.inference_mode():
        for _ in range(2):
            y = fused.relu_counted(xin, mask)
            assert y is not None and torch.equal(_bits(y), _bits(torch.relu(xin)))
            assert fused.take_relu_pass(y, mask)
            plain.update(torch.relu(x), mask)
    assert fused.relu_updates == 2
    _same_probe(fused, plain)
    assert int(plain.state["nonfinite"]) == int(fused.state["nonfinite"])
