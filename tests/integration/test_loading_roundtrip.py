"""Write-then-load round trips for every checkpoint format ``probes.loading`` accepts.

Each test writes a tiny, seeded model in one format, loads it with ``load_checkpoint`` and
checks that the loaded weights equal the written ones and that the logits on a fixed input
match the original model's. Then the bad inputs: pickles that would run code, hub ids
offline, truncated or corrupt files, text and empty files, folders without weights,
config/weights mismatches and NaN weights, each with the error class and message a user
should see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import transformers as tf
from probes.errors import CheckpointError, ModelError
from probes.formats import Kind, iter_tensors, read_state_dict, sniff
from probes.loading import load_checkpoint

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(123))
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


def load(path, **kw):
    return load_checkpoint(str(path), device="cpu", dtype="float32", **kw)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def assert_same_weights(loaded: nn.Module, ref_sd: dict[str, torch.Tensor]):
    got = loaded.state_dict()
    missing = [k for k in ref_sd if k not in got]
    assert not missing, f"loaded model lacks {missing[:5]}"
    for k, v in ref_sd.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), f"{k} differs"


def assert_same_model(lm, ref: nn.Module):
    assert_same_weights(lm.model, ref.state_dict())
    assert not lm.model.training
    torch.testing.assert_close(logits(lm.model), logits(ref), rtol=0, atol=1e-6)


def tiny_gpt2(n_embd=32, n_head=2, seed=0, **kw) -> tf.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=n_embd, n_layer=2, n_head=n_head, bos_token_id=0,
                        eos_token_id=0, **kw)
    cfg.architectures = ["GPT2LMHeadModel"]
    return tf.GPT2LMHeadModel(cfg).eval()


def tiny_llama(hidden=64, heads=1, kv=1, inter=96, tie=False, seed=0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg.architectures = ["LlamaForCausalLM"]
    return tf.LlamaForCausalLM(cfg).eval()


def weights_only_sd(model) -> dict[str, torch.Tensor]:
    """State dict as a trainer would write it to safetensors: no tied duplicate, contiguous."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", True) and "lm_head.weight" in sd:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_config_dir(tmp_path_factory, gpt2):
    d = tmp_path_factory.mktemp("gpt2_config")
    gpt2.config.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- HF folders

def test_hf_folder_safetensors(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert sniff(tmp_path).kind is Kind.HF_FOLDER
    lm = load(tmp_path)
    assert_same_model(lm, gpt2)
    assert lm.family == "gpt2" and lm.is_causal_lm and not lm.is_encoder_decoder
    assert lm.source["kind"] == "hf_folder" and lm.source["files"] == [str(tmp_path / "model.safetensors")]
    assert lm.max_length == 32
    # config.json given directly points at its folder
    assert_same_model(load(tmp_path / "config.json"), gpt2)


def test_hf_folder_sharded_safetensors(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists() and not (tmp_path / "model.safetensors").exists()
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    sn = sniff(tmp_path)
    assert sn.index_path == str(index) and sorted(sn.files) == [str(s) for s in shards]
    lm = load(tmp_path)
    assert_same_model(lm, gpt2)
    # The index file itself is also a valid checkpoint argument, and the tensors stream from every shard.
    assert sniff(index).kind is Kind.SAFETENSORS_INDEX
    streamed = dict(iter_tensors(sniff(index)))
    assert set(streamed) == set(json.loads(index.read_text())["weight_map"])


def test_hf_folder_sharded_index_with_missing_shard(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {victim.name} .* is missing"):
        load(tmp_path)


def test_hf_folder_pytorch_model_bin(tmp_path, gpt2):
    # transformers 5 ignores safe_serialization=False, so write the legacy layout ourselves.
    gpt2.config.save_pretrained(tmp_path)
    torch.save(gpt2.state_dict(), tmp_path / "pytorch_model.bin")
    assert sniff(tmp_path).files == [str(tmp_path / "pytorch_model.bin")]
    assert_same_model(load(tmp_path), gpt2)


def test_hf_folder_sharded_pytorch_model_bin(tmp_path, gpt2):
    gpt2.config.save_pretrained(tmp_path)
    sd = gpt2.state_dict()
    keys = list(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in parts.items():
        torch.save({k: sd[k].clone() for k in ks}, tmp_path / fname)
        weight_map.update({k: fname for k in ks})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sn = sniff(tmp_path)
    assert sorted(sn.files) == sorted(str(tmp_path / f) for f in parts)
    assert_same_model(load(tmp_path), gpt2)


# ----------------------------------------------------------------------------- bare state dicts + --config

@pytest.mark.parametrize("config_as", ["folder", "config.json"])
def test_single_safetensors_with_config(tmp_path, gpt2, gpt2_config_dir, config_as):
    f = tmp_path / "weights.safetensors"
    save_file(weights_only_sd(gpt2), f)
    cfg = gpt2_config_dir if config_as == "folder" else gpt2_config_dir / "config.json"
    lm = load(f, config=str(cfg))
    assert_same_model(lm, gpt2)
    assert lm.source["kind"] == "safetensors" and lm.family == "gpt2"


def test_state_dict_without_config_or_arch_asks_for_one(tmp_path, gpt2):
    f = tmp_path / "weights.safetensors"
    save_file(weights_only_sd(gpt2), f)
    with pytest.raises(ModelError) as ei:
        load(f)
    assert "--config" in ei.value.one_line() and "--arch" in ei.value.one_line()
    assert ei.value.exit_code == 3


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_torch_state_dict_with_config(tmp_path, gpt2, gpt2_config_dir, name):
    torch.save(gpt2.state_dict(), tmp_path / name)
    assert sniff(tmp_path / name).kind is Kind.TORCH_ZIP
    lm = load(tmp_path / name, config=str(gpt2_config_dir))
    assert_same_model(lm, gpt2)


def test_legacy_torch_serialization(tmp_path, gpt2, gpt2_config_dir):
    f = tmp_path / "old.bin"
    torch.save(gpt2.state_dict(), f, _use_new_zipfile_serialization=False)
    assert sniff(f).kind is Kind.TORCH_LEGACY
    assert_same_model(load(f, config=str(gpt2_config_dir)), gpt2)


def test_bin_that_is_really_safetensors(tmp_path, gpt2, gpt2_config_dir):
    f = tmp_path / "pytorch_model.bin"
    save_file(weights_only_sd(gpt2), f)
    assert sniff(f).kind is Kind.SAFETENSORS  # by content, not by suffix
    assert_same_model(load(f, config=str(gpt2_config_dir)), gpt2)


def _safetensors_with_header_len_low_byte_0x80(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Save ``sd`` so that the 8-byte header length starts with byte 0x80 (e.g. 384 = 0x180), like a pickle."""
    for pad in range(0, 2048):
        save_file(sd, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            return
    raise AssertionError("could not produce the header length")


def test_safetensors_whose_header_length_starts_with_0x80(tmp_path, gpt2, gpt2_config_dir):
    f = tmp_path / "w.safetensors"
    _safetensors_with_header_len_low_byte_0x80(f, weights_only_sd(gpt2))
    assert sniff(f).kind is Kind.SAFETENSORS
    assert_same_model(load(f, config=str(gpt2_config_dir)), gpt2)


def test_hf_folder_bin_that_is_really_safetensors(tmp_path, gpt2):
    save_file(weights_only_sd(gpt2), tmp_path / "pytorch_model.bin")
    gpt2.config.save_pretrained(tmp_path)
    try:
        lm = load(tmp_path)
    except CheckpointError:
        return  # a clear one-line error would do
    assert_same_model(lm, gpt2)


def test_weights_folder_without_config_uses_single_file(tmp_path, gpt2, gpt2_config_dir):
    d = tmp_path / "run"
    d.mkdir()
    torch.save(gpt2.state_dict(), d / "last.pt")
    assert sniff(d).kind is Kind.TORCH_ZIP
    assert_same_model(load(d, config=str(gpt2_config_dir)), gpt2)


# ----------------------------------------------------------------------------- nanoGPT

class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        # Old nanoGPT (no flash attention) keeps the causal mask as a persistent buffer named "bias".
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))


class NanoMLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()  # exact erf GELU, as nanoGPT
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias):
        super().__init__()
        self.ln_1 = NanoLayerNorm(n_embd, bias)
        self.attn = NanoAttention(n_embd, n_head, block_size, bias)
        self.ln_2 = NanoLayerNorm(n_embd, bias)
        self.mlp = NanoMLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """karpathy/nanoGPT model.py's layout (nn.Linear weights [out, in], tied lm_head)."""

    def __init__(self, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, bias=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(NanoBlock(n_embd, n_head, block_size, bias) for _ in range(n_layer)),
            ln_f=NanoLayerNorm(n_embd, bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():  # non-trivial LayerNorm params so a dropped one shows
            if "ln" in name:
                with torch.no_grad():
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def write_nanogpt(path: Path, bias: bool) -> NanoGPT:
    torch.manual_seed(7)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=VOCAB, dropout=0.0)
    net = NanoGPT(**{k: v for k, v in args.items() if k != "dropout"}).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(IDS).sum().backward()
    opt.step()  # a real optimizer state in the checkpoint, as nanoGPT's train.py saves it
    opt.zero_grad()
    compiled_sd = {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}  # torch.compile's prefix
    torch.save({"model": compiled_sd, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 250,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "shakespeare_char", "compile": True}}, path)
    return net


def _check_nanogpt(lm, net: NanoGPT):
    assert type(lm.model).__name__ == "GPT2LMHeadModel"
    assert lm.source["container"] == "nanogpt" and "_orig_mod." in lm.source["stripped_prefixes"]
    got = lm.model.state_dict()
    for k, v in net.state_dict().items():
        if k.endswith(".attn.bias"):
            continue  # causal-mask buffer, not a weight
        w = got[k]
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.t()  # HF Conv1D is [in, out], nn.Linear [out, in]
        assert torch.equal(w, v), k
    with torch.no_grad():
        expected = net(IDS)
    torch.testing.assert_close(logits(lm.model), expected, rtol=1e-5, atol=1e-5)


def test_nanogpt_checkpoint_with_bias(tmp_path):
    net = write_nanogpt(tmp_path / "ckpt.pt", bias=True)
    lm = load(tmp_path / "ckpt.pt")  # no --config/--arch: model_args say it all
    _check_nanogpt(lm, net)
    assert lm.config.n_head == 2 and lm.config.n_positions == 16 and lm.config.n_inner == 128


def test_nanogpt_checkpoint_without_bias(tmp_path):
    net = write_nanogpt(tmp_path / "ckpt.pt", bias=False)
    _check_nanogpt(load(tmp_path / "ckpt.pt"), net)


# ----------------------------------------------------------------------------- Lightning

def _lightning_ckpt(path: Path, model: nn.Module, attr: str):
    torch.save({"state_dict": {f"{attr}.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
                "global_step": 120, "pytorch-lightning_version": "2.0",
                "optimizer_states": [], "lr_schedulers": [], "callbacks": {}}, path)


def test_lightning_checkpoint(tmp_path, gpt2, gpt2_config_dir):
    _lightning_ckpt(tmp_path / "epoch=3.ckpt", gpt2, "model")
    lm = load(tmp_path / "epoch=3.ckpt", config=str(gpt2_config_dir))
    assert_same_model(lm, gpt2)
    assert lm.source["container"] == "lightning" and lm.source["stripped_prefixes"] == ["model."]


def test_lightning_checkpoint_of_llama_keeps_inner_model_prefix(tmp_path):
    """LightningModule.model = LlamaForCausalLM: keys are model.model.layers...; strip exactly one level."""
    ref = tiny_llama()
    ref.config.save_pretrained(tmp_path / "cfg")
    _lightning_ckpt(tmp_path / "l.ckpt", ref, "model")
    assert_same_model(load(tmp_path / "l.ckpt", config=str(tmp_path / "cfg")), ref)


def test_lightning_checkpoint_other_attribute_name(tmp_path, gpt2, gpt2_config_dir):
    _lightning_ckpt(tmp_path / "l.ckpt", gpt2, "net")
    assert_same_model(load(tmp_path / "l.ckpt", config=str(gpt2_config_dir)), gpt2)


# ----------------------------------------------------------------------------- --arch from shapes

def test_arch_gpt2_from_shapes(tmp_path):
    ref = tiny_gpt2(n_embd=64, n_head=1, n_inner=96)  # the shape rule assumes head_dim 64
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(ref), f)
    lm = load(f, arch="gpt2")
    assert_same_model(lm, ref)
    c = lm.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions, c.vocab_size) == (2, 64, 1, 96, 32, VOCAB)
    assert lm.source["config_inferred_from"] == "--arch gpt2 and tensor shapes"


def test_arch_llama_from_shapes(tmp_path):
    ref = tiny_llama(hidden=64, heads=1, kv=1, inter=96)
    f = tmp_path / "llama.safetensors"
    save_file(weights_only_sd(ref), f)
    lm = load(f, arch="llama")
    assert_same_model(lm, ref)
    c = lm.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads) == (2, 64, 96, 1, 1)
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.family == "llama"


def test_arch_llama_tied_embeddings_from_shapes(tmp_path):
    ref = tiny_llama(hidden=64, heads=1, kv=1, inter=96, tie=True)
    f = tmp_path / "llama.safetensors"
    save_file(weights_only_sd(ref), f)  # no lm_head.weight in the file
    lm = load(f, arch="llama")
    assert lm.config.tie_word_embeddings
    assert_same_model(lm, ref)


def test_arch_assumption_is_reported(tmp_path):
    ref = tiny_gpt2(n_embd=64, n_head=1)
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(ref), f)
    assert "n_head" in load(f, arch="gpt2").source.get("assumed", "")


def test_arch_llama_small_gqa_fails_cleanly_or_loads(tmp_path):
    ref = tiny_llama(hidden=32, heads=2, kv=1, inter=48)
    f = tmp_path / "llama.safetensors"
    save_file(weights_only_sd(ref), f)
    try:
        lm = load(f, arch="llama")
    except ModelError:
        return  # a clear "pass --config" is acceptable: heads cannot always be read from shapes
    assert_same_model(lm, ref)


def test_arch_mismatching_shapes_is_a_model_error(tmp_path, gpt2):
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(gpt2), f)
    with pytest.raises(ModelError, match=r"embed_tokens\.weight"):
        load(f, arch="llama")
    with pytest.raises(ModelError, match=r"cannot be built from shapes"):
        load(f, arch="bert")


# ----------------------------------------------------------------------------- GGUF

def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotary pairs interleaved, per head.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokens():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "l l", "o r", "Ġ w", "Ġw or", "Ġwor l", "Ġworl d", "e ll", "h ell", "hell o"]
    tokens = [b2u[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    return tokens, merges


def write_llama_gguf(path: Path, model: tf.LlamaForCausalLM) -> dict[str, "np.ndarray"]:  # noqa: F821
    """A llama-architecture GGUF as llama.cpp's converter lays it out, with a byte-level BPE tokenizer."""
    import gguf

    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tokens, merges = _gguf_tokens()
    assert len(tokens) == c.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("actsparse-tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None)
                         else float(c.rope_theta))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    written = {}

    def put(name, arr):
        written[name] = arr
        w.add_tensor(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight",
            _permute_for_gguf(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), c.num_attention_heads).numpy())
        put(f"blk.{i}.attn_k.weight",
            _permute_for_gguf(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), c.num_key_value_heads).numpy())
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    tokens, _ = _gguf_tokens()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=len(tokens) - 1,
                         eos_token_id=len(tokens) - 1)
    model = tf.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    written = write_llama_gguf(path, model)
    return path, model, written


def test_gguf_tensors_round_trip(llama_gguf):
    path, _, written = llama_gguf
    sn = sniff(path)
    assert sn.kind is Kind.GGUF
    got = dict(iter_tensors(sn))
    assert list(got) == list(written)
    for name, arr in written.items():
        assert tuple(got[name].shape) == arr.shape, name
        assert torch.equal(got[name], torch.from_numpy(arr)), name


def test_gguf_quantized_tensors_dequantize(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    a = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)).numpy()
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("f16", a.astype("float16"))
    q = quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8_0", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = dict(iter_tensors(sniff(tmp_path / "q.gguf")))
    ref = torch.from_numpy(a)
    assert got["f16"].shape == got["q8_0"].shape == (4, 64)
    torch.testing.assert_close(got["f16"].float(), ref.half().float(), rtol=0, atol=0)
    assert (got["q8_0"].float() - ref).abs().max() <= ref.abs().max() / 127 + 1e-6  # Q8_0: 1/127 of block max


@pytest.mark.xfail(not HAS_ACCELERATE, strict=True,
                   reason="transformers' GGUF loader needs `accelerate`, which pyproject's gguf/test extras lack")
def test_gguf_through_transformers(llama_gguf):
    path, ref, _ = llama_gguf
    lm = load(path)
    assert lm.source["kind"] == "gguf" and lm.family == "llama" and lm.is_causal_lm
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) \
        == (32, 2, 4, 2, 48)
    assert_same_model(lm, ref)  # q/k un-permuted back to HF layout
    tok = lm.tokenizer
    assert tok is not None
    ids = tok("hello the world").input_ids
    assert ids and max(ids) < ref.config.vocab_size and tok.decode(ids) == "hello the world"


@pytest.mark.xfail(not HAS_ACCELERATE, strict=True,
                   reason="transformers' GGUF loader needs `accelerate`, which pyproject's gguf/test extras lack")
def test_gguf_metadata_is_parsed_once_and_the_model_is_the_same(llama_gguf, monkeypatch):
    """transformers parses a GGUF's metadata for the config and again for the tokenizer, and rebuilds gguf's
    tensor-name table for every module: while actsparse loads, each happens once (``_gguf_parse_once``), the
    functions are put back afterwards, and the model and tokenizer are those of a load without it."""
    import contextlib

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gu

    from probes import loading

    real_load, real_map = gu.load_gguf_checkpoint, gguf.get_tensor_name_map
    calls = {"metadata": 0, "tensors": 0, "name_maps": 0}

    def counting_load(path, return_tensors=False, **kw):
        calls["tensors" if return_tensors else "metadata"] += 1
        return real_load(path, return_tensors=return_tensors, **kw)

    def counting_map(*a):
        calls["name_maps"] += 1
        return real_map(*a)

    monkeypatch.setattr(gu, "load_gguf_checkpoint", counting_load)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    once = load(llama_gguf[0])
    assert calls == {"metadata": 1, "tensors": 1, "name_maps": 1}
    assert gu.load_gguf_checkpoint is counting_load and gguf.get_tensor_name_map is counting_map
    calls.update(metadata=0, tensors=0, name_maps=0)
    monkeypatch.setattr(loading, "_gguf_parse_once", lambda _: contextlib.nullcontext())
    every = load(llama_gguf[0])
    assert calls["metadata"] == 2 and calls["tensors"] == 1 and calls["name_maps"] > 1
    a, b = once.model.state_dict(), every.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert once.config.to_dict() == every.config.to_dict()
    text = "hello the world"
    assert once.tokenizer(text).input_ids == every.tokenizer(text).input_ids


def test_gguf_reader_through_plain_arrays_reads_the_same(llama_gguf):
    """``gguf_plain_arrays``: the reader over a plain ndarray view of its memory map gives the same fields and
    tensors (read-only, as before), and the reader module's numpy is put back, also after an error."""
    gguf = pytest.importorskip("gguf")
    import gguf.gguf_reader as reader_module
    import numpy as np

    from probes.formats import gguf_plain_arrays

    path = llama_gguf[0]
    plain = gguf.GGUFReader(path)
    with gguf_plain_arrays():
        fast = gguf.GGUFReader(path)
        with gguf_plain_arrays():  # nested: nothing more is swapped
            assert gguf.GGUFReader(path).fields.keys() == plain.fields.keys()
    assert reader_module.np is np and type(fast.data) is np.ndarray and not fast.data.flags.writeable
    assert list(fast.fields) == list(plain.fields)
    for k in plain.fields:
        a, b = plain.fields[k], fast.fields[k]
        assert a.types == b.types and a.data == b.data
        assert all(np.array_equal(x, y) for x, y in zip(a.parts, b.parts))
    assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(fast.tensors, plain.tensors))
    with pytest.raises(RuntimeError), gguf_plain_arrays():
        raise RuntimeError("boom")
    assert reader_module.np is np


def test_gguf_plain_arrays_across_threads_keeps_the_view_until_the_last_user_leaves():
    """Two threads inside ``gguf_plain_arrays`` at once: the first to leave must not put numpy back under the
    other (before, the second thread's reader ran on the memmap again, at the old speed); the last one out
    does; a gguf layout without the module's ``np`` is left alone."""
    pytest.importorskip("gguf")
    import threading

    import gguf.gguf_reader as reader_module
    import numpy as np

    from probes import formats
    from probes.formats import gguf_plain_arrays

    inside, first_left, seen = threading.Barrier(2, timeout=10), threading.Event(), {}

    def first():
        with gguf_plain_arrays():
            inside.wait()
        first_left.set()

    def second():
        with gguf_plain_arrays():
            inside.wait()
            first_left.wait(10)
            seen["after_first_left"] = reader_module.np

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert isinstance(seen["after_first_left"], formats._PlainMemmapNumpy)
    assert reader_module.np is np and formats._GGUF_SWAP["users"] == 0
    sentinel = object()
    reader_module.np = sentinel  # another layout: not swapped, not put back
    try:
        with gguf_plain_arrays():
            assert reader_module.np is sentinel
        assert reader_module.np is sentinel and formats._GGUF_SWAP["users"] == 0
    finally:
        reader_module.np = np


def test_gguf_without_accelerate_is_a_checkpoint_error(llama_gguf):
    if HAS_ACCELERATE:
        pytest.skip("accelerate is installed")
    with pytest.raises(CheckpointError, match="accelerate"):
        load(llama_gguf[0])


def test_gguf_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv6")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as ei:
        load(tmp_path / "odd.gguf")
    assert "spectrum" in (ei.value.fix or "")
    assert dict(iter_tensors(sniff(tmp_path / "odd.gguf")))["token_embd.weight"].shape == (4, 8)


# ----------------------------------------------------------------------------- pickle safety

class _RunsCode:
    """Unpickling this calls os.system: exactly what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, gpt2_config_dir, writer):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.pt"
    payload = {"transformer.wte.weight": torch.zeros(2, 2), "x": _RunsCode(marker)}
    if writer == "torch_zip":
        torch.save(payload, f)
    elif writer == "torch_legacy":
        torch.save(payload, f, _use_new_zipfile_serialization=False)
    else:
        with open(f, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    for call in (lambda: load(f, config=str(gpt2_config_dir)), lambda: load(f, arch="gpt2"),
                 lambda: dict(iter_tensors(sniff(f))), lambda: read_state_dict(sniff(f))):
        with pytest.raises(CheckpointError) as ei:
            call()
        assert "--unsafe-pickle" in (ei.value.fix or "")
        assert ei.value.exit_code == 2
    assert not marker.exists()


def test_pickle_payload_in_hf_folder_bin_never_runs(tmp_path, gpt2):
    marker = tmp_path / "PWNED"
    gpt2.config.save_pretrained(tmp_path)
    sd = dict(gpt2.state_dict())
    sd["x"] = _RunsCode(marker)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception):  # transformers' own weights_only load refuses it
        load(tmp_path)
    assert not marker.exists()


def test_pickle_payload_in_hf_folder_bin_is_a_checkpoint_error(tmp_path, gpt2):
    gpt2.config.save_pretrained(tmp_path)
    sd = dict(gpt2.state_dict())
    sd["x"] = _RunsCode(tmp_path / "PWNED")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        load(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_pickled_module_needs_unsafe_pickle(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    f = tmp_path / "whole_model.pt"
    torch.save(net, f)
    with pytest.raises(CheckpointError) as ei:
        load(f)
    assert "--unsafe-pickle" in ei.value.one_line()
    lm = load(f, unsafe_pickle=True)
    assert lm.family == "module" and lm.source["container"] == "module"
    assert_same_weights(lm.model, net.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(lm.model(x), net(x))


# ----------------------------------------------------------------------------- hub ids offline

def test_hub_id_offline_names_missing_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "nobody-xyz" is not a local folder
    with pytest.raises(CheckpointError) as ei:
        load("nobody-xyz/no-such-model")
    msg = ei.value.one_line()
    assert "nobody-xyz/no-such-model" in msg and ("offline" in msg or "could not be reached" in msg)
    assert "config.json" in msg and "model.safetensors" in msg
    assert "huggingface-cli download nobody-xyz/no-such-model" in (ei.value.fix or "")
    assert ei.value.exit_code == 2


def test_bare_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'gpt2' is no local path, and as a hub id it cannot be loaded.*config\.json"):
        load("gpt2")


def test_missing_local_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope" / "model.safetensors")


# ----------------------------------------------------------------------------- corrupt / wrong files

@pytest.fixture()
def st_bytes(tmp_path, gpt2):
    f = tmp_path / "w.safetensors"
    save_file(weights_only_sd(gpt2), f)
    return f.read_bytes()


def _header_len(b: bytes) -> int:
    return int.from_bytes(b[:8], "little")


@pytest.mark.parametrize("damage,match", [
    ("cut_tail", r"truncated: tensors need \d+ bytes, the file has \d+"),
    ("cut_in_header", r"not a valid safetensors file .*truncated or corrupt"),
    ("only_length", r"is truncated \(only 5 bytes\)|not a checkpoint format|text file|not a valid safetensors"),
    ("flip_header_json", r"corrupt safetensors header"),
    ("garbage_json", r"corrupt safetensors header"),
    ("bad_length_prefix", r"not a checkpoint format actsparse knows"),
    ("bad_offsets", r"truncated: tensors need"),
])
def test_corrupt_safetensors(tmp_path, st_bytes, gpt2_config_dir, damage, match):
    b = bytearray(st_bytes)
    n = _header_len(b)
    if damage == "cut_tail":
        b = b[:-100]
    elif damage == "cut_in_header":
        b = b[: 8 + n // 2]
    elif damage == "only_length":
        b = b[:5]
    elif damage == "flip_header_json":
        for i in (9, 10, 20, 8 + n // 2):
            b[i] ^= 0xFF
    elif damage == "garbage_json":
        b[8 + n // 2: 8 + n // 2 + 4] = b"}}}}"
    elif damage == "bad_length_prefix":
        b[0] ^= 0xFF
        b[7] ^= 0x01
    elif damage == "bad_offsets":
        header = json.loads(bytes(b[8: 8 + n]))
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        raw = json.dumps(header).encode()
        raw += b" " * (n - len(raw)) if len(raw) <= n else b""
        b = bytearray(len(raw).to_bytes(8, "little")) + raw + b[8 + n:]
    f = tmp_path / "bad.safetensors"
    f.write_bytes(bytes(b))
    for call in (lambda: load(f, config=str(gpt2_config_dir)), lambda: dict(iter_tensors(sniff(f)))):
        with pytest.raises(CheckpointError, match=match) as ei:
            call()
        assert ei.value.exit_code == 2 and "\n" not in ei.value.one_line()


def test_truncated_safetensors_in_hf_folder(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path)


def test_truncated_torch_file(tmp_path, gpt2, gpt2_config_dir):
    f = tmp_path / "w.pt"
    torch.save(gpt2.state_dict(), f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not be read as a torch checkpoint") as ei:
        load(f, config=str(gpt2_config_dir))
    assert "truncated or corrupt" in ei.value.fix


@pytest.mark.parametrize("name", ["corpus.txt", "model.pt", "weights.safetensors"])
def test_text_file_as_checkpoint(tmp_path, name):
    f = tmp_path / name
    f.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    with pytest.raises(CheckpointError, match="is a text file, not a checkpoint") as ei:
        load(f)
    assert "--data" in ei.value.fix


def test_json_that_is_not_a_config(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps({"text": "hello"}))
    with pytest.raises(CheckpointError, match="text file"):
        load(f)


def test_binary_junk_file(tmp_path):
    f = tmp_path / "junk.bin"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a checkpoint format"):
        load(f)


def test_empty_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.touch()
    with pytest.raises(CheckpointError, match="is an empty file") as ei:
        load(f)
    assert ei.value.exit_code == 2


def test_directory_without_weights(tmp_path, gpt2):
    gpt2.config.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("a model card")
    with pytest.raises(CheckpointError) as ei:
        load(tmp_path)
    msg = ei.value.one_line()
    assert "has no weights" in msg and "model.safetensors" in msg and "config.json" in msg and "README.md" in msg


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no weights .*found nothing"):
        load(tmp_path)


# ----------------------------------------------------------------------------- config / weights mismatch

def test_config_of_another_family(tmp_path, gpt2):
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(gpt2), f)
    tiny_llama().config.save_pretrained(tmp_path / "llama_cfg")
    with pytest.raises(CheckpointError, match="config/weights mismatch") as ei:
        load(f, config=str(tmp_path / "llama_cfg"))
    assert "--config or --arch" in ei.value.fix


def test_config_of_another_width(tmp_path, gpt2):
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(gpt2), f)
    tiny_gpt2(n_embd=64).config.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match="config/weights mismatch"):
        load(f, config=str(tmp_path / "wide"))


def test_config_with_more_layers_than_weights_state_dict(tmp_path, gpt2):
    f = tmp_path / "gpt2.safetensors"
    save_file(weights_only_sd(gpt2), f)
    cfg = gpt2.config.to_dict()
    cfg["n_layer"] = 3
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"parameters missing from the file \(e\.g\. 'transformer\.h\.2\."):
        load(f, config=str(tmp_path / "cfg"))


def test_hf_folder_config_of_another_width(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load(tmp_path)


def test_hf_folder_config_with_more_layers_than_weights(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.h.2"):
        load(tmp_path)


# ----------------------------------------------------------------------------- NaN / Inf weights

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_weights_state_dict(tmp_path, gpt2, gpt2_config_dir, bad):
    sd = weights_only_sd(gpt2)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"].clone()
    sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
    f = tmp_path / "w.safetensors"
    save_file(sd, f)
    with pytest.raises(ModelError, match=r"weight transformer\.h\.1\.mlp\.c_fc\.weight contains NaN or Inf") as ei:
        load(f, config=str(gpt2_config_dir))
    assert ei.value.exit_code == 3


def test_nan_weights_hf_folder(tmp_path):
    ref = tiny_llama()
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    ref.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        load(tmp_path)


# ----------------------------------------------------------------------------- tokenizer

def test_folder_without_tokenizer_files_has_no_tokenizer(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    tok = load(tmp_path).tokenizer
    assert tok is None or len(tok("hello world").input_ids) > 0


def test_dtype_option(tmp_path, gpt2):
    gpt2.save_pretrained(tmp_path)
    lm = load_checkpoint(str(tmp_path), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    torch.testing.assert_close(lm.model.transformer.wte.weight.float(),
                               gpt2.transformer.wte.weight.bfloat16().float(), rtol=0, atol=0)


def test_arch_llama_reads_head_dim_from_a_rotary_buffer(tmp_path):
    """hidden 64 with 2 heads of 32: the shape guess would say head_dim 64; a checkpoint that kept
    rotary_emb.inv_freq (head_dim / 2 entries) gives the exact value, and the model matches."""
    ref = tiny_llama(hidden=64, heads=2, kv=2, inter=96)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)
    f = tmp_path / "llama.safetensors"
    save_file(sd, str(f))
    lm = load(f, arch="llama")
    assert lm.config.head_dim == 32 and lm.config.num_attention_heads == 2
    assert "read from the checkpoint" in lm.source["assumed"]
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, ref(ids).logits, atol=1e-5)
