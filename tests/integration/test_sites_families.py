"""Site discovery (probes.sites) on tiny, randomly initialised models of every family.

For each family we check the exact canonical names, module paths, kinds, hooks and widths
that ``find_sites`` returns, and then that the hooks attached by ``probes.hooks.attach_sites``
fire once per forward with a tensor of that width. The ``mlp_post`` tensor (the input of
the MLP's output projection, METRICS.md section 1) is checked against a value computed
independently: ``act(pre)`` for plain MLPs and ``act(gate) * up`` for GLU MLPs, from the
outputs of the input projections captured by our own hooks, with the activation written
out here in plain torch rather than taken from transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformers as tf
from probes.errors import ModelError
from probes.hooks import attach_sites
from probes.sites import (CUSTOM, MLP_GATE_ACT, MLP_KINDS, MLP_POST, MLP_PRE, RESID_POST, find_sites,
                          parse_site_glob)

ALL_KINDS = MLP_KINDS + (RESID_POST,)
VOCAB = 100
BATCH, SEQ = 2, 7

# Activations written out independently of transformers' ACT2FN.
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": lambda x: F.gelu(x),  # exact erf GELU
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
    "silu": lambda x: x * torch.sigmoid(x),
}


@dataclass
class Case:
    """What a family should look like. Paths are format strings over the layer ``i``."""

    name: str
    build: Callable[[], tuple[nn.Module, str | None, dict[str, Any]]]  # -> model, model_type, forward kwargs
    family: str
    d_model: int
    d_ff: int
    post: str  # the output projection (mlp_post = its input)
    pre: str  # the (gate) input projection
    act: str  # key of ACTS
    up: str | None = None  # GLU up projection
    gate_act: str | None = None  # activation module of a GLU MLP (mlp_gate_act)
    block: str = ""  # block path (resid_post)
    stacks: tuple[str, ...] = ("",)  # canonical prefixes ("encoder.", "decoder.") for T5
    n_layers: int = 2


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _lm(config_cls: str, model_cls: str, **cfg):
    """Classes by name, looked up when the case runs: `tf.XConfig` at import would load every family's
    modelling module while pytest collects (~2 s in each xdist worker, also the one that never runs them)."""
    def build():
        torch.manual_seed(0)
        cfg.setdefault("vocab_size", VOCAB)
        c = getattr(tf, config_cls)(**cfg)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if getattr(c, k, None) is not None and getattr(c, k) >= VOCAB:
                setattr(c, k, 0)
        m = getattr(tf, model_cls)(c).eval()
        return m, c.model_type, {"input_ids": _ids()}
    return build


def _t5(**extra):
    def build():
        torch.manual_seed(0)
        c = tf.T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=2,
                        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra)
        m = tf.T5ForConditionalGeneration(c).eval()
        return m, c.model_type, {"input_ids": _ids(), "decoder_input_ids": _ids()[:, :5]}
    return build


def _vit():
    torch.manual_seed(0)
    c = tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=2)
    m = tf.ViTModel(c, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(2)
    return m, c.model_type, {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}


# --- a timm-style ViT built by hand (timm is not a dependency) -------------------------------

class TimmMlp(nn.Module):  # timm.layers.Mlp: fc1 -> act -> drop1 -> norm -> fc2 -> drop2
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(h, d)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmAttention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TimmBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = TimmAttention(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = TimmMlp(d, h)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmVit(nn.Module):
    def __init__(self, d=32, h=48, depth=2):
        super().__init__()
        self.patch_embed = nn.Linear(12, d)
        self.blocks = nn.Sequential(*[TimmBlock(d, h) for _ in range(depth)])  # timm uses nn.Sequential
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.patch_embed(x))).mean(1))


def _timm():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    return TimmVit().eval(), None, {"x": torch.randn(BATCH, 5, 12, generator=g)}


# --- an unknown custom transformer for the structural fallback -------------------------------

class MyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.wq(x) @ self.wk(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.wo(a @ self.wv(x))


class MyFeedForward(nn.Module):
    """Differently named MLP: expand -> squared ReLU module -> contract."""

    def __init__(self, d, h):
        super().__init__()
        self.expand = nn.Linear(d, h)
        self.nonlin = nn.ReLU()
        self.contract = nn.Linear(h, d)

    def forward(self, x):
        return self.contract(self.nonlin(self.expand(x)))


class MyGatedFeedForward(nn.Module):
    """Mixtral-style names: w1 (gate), w3 (up), w2 (down) with a SiLU module."""

    def __init__(self, d, h):
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=False)
        self.w3 = nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)
        self.silu = nn.SiLU()

    def forward(self, x):
        return self.w2(self.silu(self.w1(x)) * self.w3(x))


class MyLayer(nn.Module):
    def __init__(self, d, h, gated):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.mix = MyAttention(d)
        self.n2 = nn.LayerNorm(d)
        self.ff = MyGatedFeedForward(d, h) if gated else MyFeedForward(d, h)

    def forward(self, x):
        x = x + self.mix(self.n1(x))
        return x + self.ff(self.n2(x))


class MyTransformer(nn.Module):
    def __init__(self, d=32, h=56, depth=2, gated=False):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.stack = nn.ModuleList(MyLayer(d, h, gated) for _ in range(depth))
        self.out = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x = self.tok(ids)
        for layer in self.stack:
            x = layer(x)
        return self.out(x)


def _custom(gated):
    def build():
        torch.manual_seed(0)
        return MyTransformer(gated=gated).eval(), None, {"ids": _ids()}
    return build


# --- the cases ---------------------------------------------------------------------------------

CASES = [
    Case("gpt2", _lm("GPT2Config", "GPT2LMHeadModel", n_positions=32, n_embd=32, n_inner=72, n_layer=2, n_head=2),
         "gpt2", 32, 72, "transformer.h.{i}.mlp.c_proj", "transformer.h.{i}.mlp.c_fc", "gelu_tanh",
         block="transformer.h.{i}"),
    Case("llama", _lm("LlamaConfig", "LlamaForCausalLM", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1),
         "llama", 32, 48, "model.layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.gate_proj", "silu",
         up="model.layers.{i}.mlp.up_proj", gate_act="model.layers.{i}.mlp.act_fn", block="model.layers.{i}"),
    Case("mistral", _lm("MistralConfig", "MistralForCausalLM", hidden_size=32, intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
         "llama", 32, 40, "model.layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.gate_proj", "silu",
         up="model.layers.{i}.mlp.up_proj", gate_act="model.layers.{i}.mlp.act_fn", block="model.layers.{i}"),
    Case("qwen2", _lm("Qwen2Config", "Qwen2ForCausalLM", hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1),
         "llama", 32, 56, "model.layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.gate_proj", "silu",
         up="model.layers.{i}.mlp.up_proj", gate_act="model.layers.{i}.mlp.act_fn", block="model.layers.{i}"),
    Case("gpt_neox", _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2),
         "gpt_neox", 32, 64, "gpt_neox.layers.{i}.mlp.dense_4h_to_h", "gpt_neox.layers.{i}.mlp.dense_h_to_4h", "gelu",
         block="gpt_neox.layers.{i}"),
    Case("opt", _lm("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=32),
         "opt", 32, 64, "model.decoder.layers.{i}.fc2", "model.decoder.layers.{i}.fc1", "relu",
         block="model.decoder.layers.{i}"),
    Case("bert", _lm("BertConfig", "BertForMaskedLM", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=32),
         "bert", 32, 48, "bert.encoder.layer.{i}.output.dense", "bert.encoder.layer.{i}.intermediate.dense", "gelu",
         block="bert.encoder.layer.{i}"),
    Case("roberta", _lm("RobertaConfig", "RobertaForMaskedLM", hidden_size=32, intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40, pad_token_id=1),
         "bert", 32, 40, "roberta.encoder.layer.{i}.output.dense", "roberta.encoder.layer.{i}.intermediate.dense",
         "gelu", block="roberta.encoder.layer.{i}"),
    Case("distilbert", _lm("DistilBertConfig", "DistilBertForMaskedLM", dim=32, hidden_dim=48, n_layers=2,
                           n_heads=2, max_position_embeddings=32),
         "distilbert", 32, 48, "distilbert.transformer.layer.{i}.ffn.lin2",
         "distilbert.transformer.layer.{i}.ffn.lin1", "gelu", block="distilbert.transformer.layer.{i}"),
    Case("t5_relu", _t5(), "t5", 32, 48, "{stack}.block.{i}.layer.{ff}.DenseReluDense.wo",
         "{stack}.block.{i}.layer.{ff}.DenseReluDense.wi", "relu", block="{stack}.block.{i}",
         stacks=("encoder.", "decoder.")),
    Case("t5_gated_gelu", _t5(feed_forward_proj="gated-gelu"), "t5", 32, 48,
         "{stack}.block.{i}.layer.{ff}.DenseReluDense.wo", "{stack}.block.{i}.layer.{ff}.DenseReluDense.wi_0",
         "gelu_tanh", up="{stack}.block.{i}.layer.{ff}.DenseReluDense.wi_1",
         gate_act="{stack}.block.{i}.layer.{ff}.DenseReluDense.act", block="{stack}.block.{i}",
         stacks=("encoder.", "decoder.")),
    Case("falcon", _lm("FalconConfig", "FalconForCausalLM", hidden_size=32, ffn_hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=2, new_decoder_architecture=False),
         "falcon", 32, 64, "transformer.h.{i}.mlp.dense_4h_to_h", "transformer.h.{i}.mlp.dense_h_to_4h", "gelu",
         block="transformer.h.{i}"),
    Case("gptj", _lm("GPTJConfig", "GPTJForCausalLM", n_positions=32, n_embd=32, n_inner=64, n_layer=2, n_head=2,
                     rotary_dim=8),
         "gptj", 32, 64, "transformer.h.{i}.mlp.fc_out", "transformer.h.{i}.mlp.fc_in", "gelu_tanh",
         block="transformer.h.{i}"),
    # transformers 5 renamed HF ViT's MLP to layers.N.mlp.fc1/activation_fn/fc2: the "vit" registry entry.
    Case("vit", _vit, "vit", 32, 48, "layers.{i}.mlp.fc2", "layers.{i}.mlp.fc1", "gelu",
         block="layers.{i}"),
    Case("timm", _timm, "timm", 32, 48, "blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc1", "gelu", block="blocks.{i}"),
    Case("custom_structural", _custom(False), "structural", 32, 56, "stack.{i}.ff.contract", "stack.{i}.ff.expand",
         "relu", block="stack.{i}"),
    Case("custom_structural_glu", _custom(True), "structural", 32, 56, "stack.{i}.ff.w2", "stack.{i}.ff.w1", "silu",
         up="stack.{i}.ff.w3", gate_act="stack.{i}.ff.silu", block="stack.{i}"),
]
CASE_IDS = [c.name for c in CASES]


def _fmt(template: str, case: Case, i: int, stack: str) -> str:
    s = stack.rstrip(".")
    ff = "2" if s == "decoder" else "1"  # T5: decoder blocks have cross-attention before the FF layer
    return template.format(i=i, stack=s, ff=ff)


def expected_sites(case: Case) -> list[tuple]:
    rows = []
    for stack in case.stacks:
        for i in range(case.n_layers):
            rows.append((f"{stack}blocks.{i}.mlp.hook_post", _fmt(case.post, case, i, stack), MLP_POST, "input", i,
                         case.d_ff, case.family))
            if case.gate_act:
                rows.append((f"{stack}blocks.{i}.mlp.hook_gate_act", _fmt(case.gate_act, case, i, stack),
                             MLP_GATE_ACT, "output", i, case.d_ff, case.family))
            rows.append((f"{stack}blocks.{i}.mlp.hook_pre", _fmt(case.pre, case, i, stack), MLP_PRE, "output", i,
                         case.d_ff, case.family))
            rows.append((f"{stack}blocks.{i}.hook_resid_post", _fmt(case.block, case, i, stack), RESID_POST, "output",
                         i, case.d_model, case.family))
    return rows


def _row(s) -> tuple:
    return (s.canonical_name, s.module_path, s.kind, s.hook, s.layer, s.width, s.family)


def _capture(model, sites, fwd_kwargs, extra_outputs: dict[str, str]):
    """Run one forward with the sites attached; also capture ``extra_outputs`` (name -> module path) ourselves."""
    got: dict[str, list[torch.Tensor]] = {}
    mine: dict[str, list[torch.Tensor]] = {}
    handles = []
    for key, path in extra_outputs.items():
        mod = model.get_submodule(path)
        handles.append(mod.register_forward_hook(
            lambda m, a, out, key=key: mine.setdefault(key, []).append(out.detach().clone())))

    def callback(site, t):
        got.setdefault(site.canonical_name, []).append(t.detach().clone())

    try:
        with torch.no_grad(), attach_sites(sites, callback):
            out = model(**fwd_kwargs)
    finally:
        for h in handles:
            h.remove()
    return got, mine, out


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def built(request):
    case: Case = request.param
    model, model_type, kwargs = case.build()
    return case, model, model_type, kwargs


def test_sites_exact(built):
    case, model, model_type, _ = built
    sites = find_sites(model, model_type, kinds=ALL_KINDS)
    actual = sorted(_row(s) for s in sites)
    assert actual == sorted(expected_sites(case))
    # Every site's module is the module at its path.
    for s in sites:
        assert s.module is model.get_submodule(s.module_path)
    # Canonical names are unique.
    assert len({s.canonical_name for s in sites}) == len(sites)


def test_default_kinds_are_mlp_only(built):
    case, model, model_type, _ = built
    sites = find_sites(model, model_type)
    expected = {MLP_POST, MLP_PRE} | ({MLP_GATE_ACT} if case.gate_act else set())
    assert {s.kind for s in sites} == expected
    assert len([s for s in sites if s.kind == MLP_POST]) == case.n_layers * len(case.stacks)


def test_hooks_fire_with_the_right_tensors(built):
    case, model, model_type, kwargs = built
    sites = find_sites(model, model_type, kinds=ALL_KINDS)
    extra = {}
    for stack in case.stacks:
        for i in range(case.n_layers):
            extra[f"{stack}{i}.pre"] = _fmt(case.pre, case, i, stack)
            if case.up:
                extra[f"{stack}{i}.up"] = _fmt(case.up, case, i, stack)
    got, mine, _ = _capture(model, sites, kwargs, extra)

    # Every site fired exactly once, with the width find_sites promised.
    assert set(got) == {s.canonical_name for s in sites}
    for s in sites:
        (t,) = got[s.canonical_name]
        width = s.width if s.width is not None else case.d_model
        assert t.shape[-1] == width, s
        if s.kind == RESID_POST:
            assert t.shape[-1] == case.d_model

    act = ACTS[case.act]
    for stack in case.stacks:
        for i in range(case.n_layers):
            (pre,) = mine[f"{stack}{i}.pre"]
            expected_gate_act = act(pre)
            expected_post = expected_gate_act * mine[f"{stack}{i}.up"][0] if case.up else expected_gate_act
            post = got[f"{stack}blocks.{i}.mlp.hook_post"][0]
            torch.testing.assert_close(post, expected_post, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[f"{stack}blocks.{i}.mlp.hook_pre"][0], pre, rtol=0, atol=0)
            if case.gate_act and f"{stack}blocks.{i}.mlp.hook_gate_act" in got:
                torch.testing.assert_close(got[f"{stack}blocks.{i}.mlp.hook_gate_act"][0], expected_gate_act,
                                           rtol=1e-5, atol=1e-6)
            # The activation is not trivially zero/constant (a hook on the wrong tensor would often be).
            assert post.abs().sum() > 0 and post.std() > 0


def test_hooks_are_removed(built):
    case, model, model_type, kwargs = built
    sites = find_sites(model, model_type, kinds=ALL_KINDS)
    calls = []
    with torch.no_grad():
        with attach_sites(sites, lambda s, t: calls.append(s)):
            model(**kwargs)
        n = len(calls)
        model(**kwargs)
    assert n == len(sites) and len(calls) == n
    for s in sites:
        assert not s.module._forward_hooks and not s.module._forward_pre_hooks


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_resid_post_is_the_block_output(name):
    """resid_post of block 0 equals hidden_states[1] reported by the model itself."""
    case = CASES[CASE_IDS.index(name)]
    model, model_type, kwargs = case.build()
    sites = [s for s in find_sites(model, model_type, kinds=(RESID_POST,)) if s.layer == 0]
    got = {}
    with torch.no_grad(), attach_sites(sites, lambda s, t: got.setdefault(s.canonical_name, t.clone())):
        out = model(**kwargs, output_hidden_states=True)
    torch.testing.assert_close(got["blocks.0.hook_resid_post"], out.hidden_states[1])


def test_resid_post_width_known_for_registry_families():
    case = CASES[CASE_IDS.index("gpt2")]
    model, model_type, _ = case.build()
    sites = [s for s in find_sites(model, model_type, kinds=ALL_KINDS) if s.kind == RESID_POST]
    assert [s.width for s in sites] == [case.d_model] * case.n_layers




@pytest.mark.parametrize("case,kinds", [
    pytest.param(c, k, id=f"{c.name}-{k[0]}",
                 )
    for c in CASES if c.name in ("gpt2", "t5_relu", "timm", "vit", "custom_structural") for k in ((RESID_POST,),)
] + [pytest.param(CASES[0], (MLP_PRE,), id="gpt2-mlp_pre")])
def test_kind_subset_matches_full_discovery(case, kinds):
    """Asking for fewer kinds (e.g. only resid_post, as the massive-activation probe does) gives the same sites."""
    model, model_type, _ = case.build()
    full = [_row(s) for s in find_sites(model, model_type, kinds=ALL_KINDS) if s.kind in kinds]
    try:
        sub = [_row(s) for s in find_sites(model, model_type, kinds=kinds)]
    except ModelError as e:
        pytest.fail(f"find_sites(kinds={kinds}) raised: {e}")
    assert sub == full


def test_t5_gated_exposes_gate_act():
    case = CASES[CASE_IDS.index("t5_gated_gelu")]
    model, model_type, _ = case.build()
    sites = find_sites(model, model_type)
    gate = {s.canonical_name: s for s in sites if s.kind == MLP_GATE_ACT}
    assert set(gate) == {f"{st}blocks.{i}.mlp.hook_gate_act" for st in ("encoder.", "decoder.") for i in range(2)}
    assert gate["decoder.blocks.1.mlp.hook_gate_act"].module_path == "decoder.block.1.layer.2.DenseReluDense.act"


def test_family_detected_without_model_type():
    """A bare HF module with no model_type is still matched to its family by module names."""
    case = CASES[CASE_IDS.index("llama")]
    model, _, _ = case.build()
    sites = find_sites(model.model, None)  # the base LlamaModel: paths lose the "model." prefix
    post = [s for s in sites if s.kind == MLP_POST]
    assert [(s.canonical_name, s.module_path, s.family) for s in post] == [
        ("blocks.0.mlp.hook_post", "layers.0.mlp.down_proj", "llama"),
        ("blocks.1.mlp.hook_post", "layers.1.mlp.down_proj", "llama")]


# --- plain nn.Sequential MLP ---------------------------------------------------------------------

def test_plain_sequential_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    sites = find_sites(model)
    assert [_row(s) for s in sites] == [
        ("blocks.0.mlp.hook_post", "2", MLP_POST, "input", 0, 24, "mlp"),
        ("blocks.1.mlp.hook_post", "4", MLP_POST, "input", 1, 16, "mlp"),
    ]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    got = {}
    with torch.no_grad(), attach_sites(sites, lambda s, t: got.setdefault(s.canonical_name, t.clone())):
        model(x)
    h1 = torch.relu(model[0](x))
    h2 = F.gelu(model[2](h1))
    torch.testing.assert_close(got["blocks.0.mlp.hook_post"], h1)
    torch.testing.assert_close(got["blocks.1.mlp.hook_post"], h2)
    assert (got["blocks.0.mlp.hook_post"] == 0).any()  # ReLU zeros reach the probe


def test_nested_sequential_mlp_paths():
    """Sequential inside a module: paths carry the parent's name."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2))

        def forward(self, x):
            return self.body(x)

    sites = find_sites(Net())
    assert [(s.module_path, s.width) for s in sites] == [("body.2", 12)]


# --- Karpathy's "let's build GPT" layout: blocks in nn.Sequential, heads in a ModuleList ----------

class Head(nn.Module):
    def __init__(self, d, hs):
        super().__init__()
        self.key, self.query, self.value = (nn.Linear(d, hs, bias=False) for _ in range(3))

    def forward(self, x):
        w = torch.softmax(self.query(x) @ self.key(x).transpose(-2, -1) * x.shape[-1] ** -0.5, -1)
        return w @ self.value(x)


class MultiHead(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.heads = nn.ModuleList(Head(d, d // n) for _ in range(n))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(torch.cat([h(x) for h in self.heads], -1))


class KBlock(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.sa = MultiHead(d, n)
        self.ffwd = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d), nn.Dropout(0.0))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class KarpathyGPT(nn.Module):
    def __init__(self, d=32, n_head=4, n_layer=2):
        super().__init__()
        self.token_embedding_table = nn.Embedding(VOCAB, d)
        self.blocks = nn.Sequential(*[KBlock(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB)

    def forward(self, idx):
        return self.lm_head(self.ln_f(self.blocks(self.token_embedding_table(idx))))


def test_structural_fallback_with_head_modulelists():
    torch.manual_seed(0)
    model = KarpathyGPT().eval()
    sites = find_sites(model)
    post = [(s.canonical_name, s.module_path, s.width) for s in sites if s.kind == MLP_POST]
    assert post == [("blocks.0.mlp.hook_post", "blocks.0.ffwd.2", 128), ("blocks.1.mlp.hook_post", "blocks.1.ffwd.2", 128)]


# --- glob override ---------------------------------------------------------------------------------

def test_glob_override_input_and_output():
    case = CASES[CASE_IDS.index("llama")]
    model, model_type, kwargs = case.build()
    globs = ["model.layers.*.mlp.down_proj:input", "model.layers.1.mlp.up_proj:output", "model.layers.0.mlp.act_fn"]
    sites = find_sites(model, model_type, globs=globs)
    assert [_row(s) for s in sites] == [
        ("custom.model.layers.0.mlp.down_proj.hook_in", "model.layers.0.mlp.down_proj", CUSTOM, "input", 0, 48, "custom"),
        ("custom.model.layers.1.mlp.down_proj.hook_in", "model.layers.1.mlp.down_proj", CUSTOM, "input", 1, 48, "custom"),
        ("custom.model.layers.1.mlp.up_proj.hook_out", "model.layers.1.mlp.up_proj", CUSTOM, "output", 1, 48, "custom"),
        # No ":input"/":output" suffix means input; an activation module has no declared width.
        ("custom.model.layers.0.mlp.act_fn.hook_in", "model.layers.0.mlp.act_fn", CUSTOM, "input", 0, None, "custom"),
    ]
    extra = {"g0": "model.layers.0.mlp.gate_proj", "u0": "model.layers.0.mlp.up_proj",
             "g1": "model.layers.1.mlp.gate_proj", "u1": "model.layers.1.mlp.up_proj"}
    got, mine, _ = _capture(model, sites, kwargs, extra)
    assert all(len(v) == 1 for v in got.values()) and len(got) == 4
    for i in (0, 1):
        torch.testing.assert_close(got[f"custom.model.layers.{i}.mlp.down_proj.hook_in"][0],
                                   ACTS["silu"](mine[f"g{i}"][0]) * mine[f"u{i}"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["custom.model.layers.1.mlp.up_proj.hook_out"][0], mine["u1"][0])
    torch.testing.assert_close(got["custom.model.layers.0.mlp.act_fn.hook_in"][0], mine["g0"][0])


def test_glob_overrides_discovery_even_for_known_family():
    case = CASES[CASE_IDS.index("gpt2")]
    model, model_type, _ = case.build()
    sites = find_sites(model, model_type, kinds=ALL_KINDS, globs=["transformer.h.1.mlp.c_fc:output"])
    assert [_row(s) for s in sites] == [
        ("custom.transformer.h.1.mlp.c_fc.hook_out", "transformer.h.1.mlp.c_fc", CUSTOM, "output", 1, 72, "custom")]


def test_glob_no_match_suggests_close_names():
    case = CASES[CASE_IDS.index("llama")]
    model, model_type, _ = case.build()
    with pytest.raises(ModelError) as ei:
        find_sites(model, model_type, globs=["model.layers.*.mlp.down_prj:input"])
    msg = ei.value.one_line()
    assert "matches no module" in msg and "did you mean" in msg and "model.layers.0.mlp.down_proj" in msg


@pytest.mark.parametrize("spec,expected", [
    ("a.*.b:input", ("a.*.b", "input")),
    ("a.*.b:output", ("a.*.b", "output")),
    ("a.*.b", ("a.*.b", "input")),
])
def test_parse_site_glob(spec, expected):
    assert parse_site_glob(spec) == expected


# --- no site found ---------------------------------------------------------------------------------

class NoMlp(nn.Module):
    """No repeated blocks, no Sequential: nothing to find."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 40)
        self.proj_out = nn.Linear(40, 8)

    def forward(self, x):
        return self.proj_out(torch.tanh(self.proj_in(x)))


class NoExpansion(nn.Module):
    """Repeated blocks, but no linear with input wider than the model width."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(16, 16)}) for _ in range(3))

    def forward(self, x):
        for b in self.layers:
            x = torch.relu(b["lin"](x))
        return x


@pytest.mark.parametrize("cls,cand,example", [
    (NoMlp, ["proj_in (8->40)", "proj_out (40->8)"], "proj_out:input"),
    (NoExpansion, ["layers.0.lin (16->16)", "layers.2.lin (16->16)"], "layers.*.lin:input"),
])
def test_no_site_error_lists_candidates_and_example(cls, cand, example):
    model = cls()
    with pytest.raises(ModelError) as ei:
        find_sites(model, None)
    err = ei.value
    msg = err.one_line()
    assert f"no activation sites found in this {cls.__name__}" in msg
    assert "candidate modules" in msg
    for c in cand:
        assert c in msg
    assert f'--site "{example}"' in (err.fix or "")
    assert err.exit_code == 3
    assert "\n" not in msg
    # The suggested --site really resolves.
    sites = find_sites(model, None, globs=[example])
    assert sites and all(s.kind == CUSTOM for s in sites)


def test_no_site_error_names_model_type():
    with pytest.raises(ModelError, match=r"model_type 'mystery'"):
        find_sites(NoMlp(), "mystery")


def test_no_site_example_points_at_an_mlp_projection():
    with pytest.raises(ModelError) as ei:
        find_sites(KarpathyGPT(), None, kinds=(MLP_GATE_ACT,))  # no GLU here: nothing to find
    assert '--site "blocks.*.ffwd.2:input"' in (ei.value.fix or "")
