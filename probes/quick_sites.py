"""The sites of a GPT-2 or Llama model folder, read from its files without building the model.

``actsparse sites`` on a Hugging Face folder would otherwise import torch and transformers' modeling code
(~3 s on a 2-core machine, before a byte of the checkpoint is read) to build a model whose module names and
widths follow from ``config.json`` alone. ``listing`` answers from the files instead, for ``GPT2LMHeadModel``
and ``LlamaForCausalLM`` folders with one ``model.safetensors``, and only where it is sure that the load
would succeed without a word on stderr and find the same sites: it repeats the load's checks on the files
themselves (the folder's files, a config it knows every key of, with positive sizes, an activation
transformers has and (Llama) default RoPE, exactly the parameter names and shapes that model builds, weights
without NaN or Inf, a tokenizer whose ids fit the input embedding) and returns None for anything outside
that, so that the caller loads the model and the user sees the load's own errors and warnings. What it lists
is what ``probes.sites.find_sites`` finds in the loaded model (``tests/unit/test_quick_sites.py`` holds the
two equal over configs, dtypes, kinds and tokenizers, and checks each way out).

Nothing here imports torch or transformers; numpy reads the weights (each tensor once, in file order), and
the ``tokenizers`` package parses ``tokenizer.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from probes.sites import MLP_GATE_ACT, MLP_KINDS, MLP_POST, MLP_PRE, RESID_POST, Site, _canonical

# config.json keys a saved GPT2LMHeadModel carries (GPT2Config.to_dict() of transformers 4.x and 5.x, and the
# hub's gpt2 files), each with the types its value may have. A key outside this table sends the folder to
# the full load, which judges it.
_NUM = (int, float)
_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "activation_function": (str,), "add_cross_attention": (bool,), "architectures": (list,),
    "attn_pdrop": _NUM, "bos_token_id": (int, type(None)), "eos_token_id": (int, type(None)),
    "pad_token_id": (int, type(None)), "dtype": (str, type(None)), "torch_dtype": (str, type(None)),
    "embd_pdrop": _NUM, "initializer_range": _NUM, "layer_norm_epsilon": _NUM, "model_type": (str,),
    "n_embd": (int,), "n_head": (int,), "n_inner": (int, type(None)), "n_layer": (int,), "n_positions": (int,),
    "n_ctx": (int,), "vocab_size": (int,), "reorder_and_upcast_attn": (bool,), "resid_pdrop": _NUM,
    "scale_attn_by_inverse_layer_idx": (bool,), "scale_attn_weights": (bool,),
    "summary_activation": (str, type(None)), "summary_first_dropout": _NUM, "summary_proj_to_labels": (bool,),
    "summary_type": (str,), "summary_use_proj": (bool,), "tie_word_embeddings": (bool,),
    "transformers_version": (str,), "use_cache": (bool,), "is_encoder_decoder": (bool,),
    "output_attentions": (bool,), "output_hidden_states": (bool,), "return_dict": (bool,),
    "chunk_size_feed_forward": (int,), "_name_or_path": (str,), "task_specific_params": (dict, type(None)),
}
_SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
# Activations transformers' ACT2FN has under these names in every version this project supports.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu", "swish",
               "tanh", "sigmoid")
_DTYPES = (None, "float32", "float16", "bfloat16")
# safetensors dtypes that float32 holds exactly (a finite stored value stays finite), with the bits of a
# non-finite value: all exponent bits set.
_FLOATS = {"F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}

# generation_config.json keys of one that save_pretrained derived from the config (sampling flags such as
# temperature without do_sample make transformers warn while loading).
_GENERATION_KEYS = {"_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                    "output_attentions", "output_hidden_states", "use_cache"}
# tokenizer_config.json keys that change nothing the load checks, and the special-token keys, whose tokens
# must already be in tokenizer.json's vocabulary (else the tokenizer would add them, with new ids).
_TOKENIZER_KEYS = {"backend", "model_max_length", "tokenizer_class", "add_prefix_space", "add_bos_token",
                   "add_eos_token", "errors", "clean_up_tokenization_spaces", "padding_side", "truncation_side",
                   "model_input_names", "added_tokens_decoder", "additional_special_tokens",
                   "extra_special_tokens"}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_TOKENIZER_CLASSES = (None, "GPT2Tokenizer", "GPT2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend")
# Files that make AutoTokenizer read something beyond tokenizer.json and tokenizer_config.json.
_OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                          "sentencepiece.bpe.model", "special_tokens_map.json", "added_tokens.json",
                          "chat_template.jinja", "chat_template.json")


def listing(checkpoint: Any, *, config=None, arch=None, device="cpu", dtype="auto", tokenizer=None,
            device_map=None, kinds=MLP_KINDS, site=None, all_modules: bool = False, **_: Any
            ) -> tuple[str, list[dict]] | None:
    """``(family, rows)`` as ``actsparse sites`` prints them (``Site.row()`` of each site), or None where
    only loading the model can tell (other options, another architecture, anything the load would refuse
    or warn about). Never raises for a bad checkpoint: that is the load's to say."""
    if config is not None or arch is not None or tokenizer is not None or device_map is not None or site \
            or all_modules or str(device) != "cpu" or str(dtype).lower() not in ("auto", "float32", "fp32") \
            or not isinstance(checkpoint, (str, os.PathLike)) or not set(kinds) <= {*MLP_KINDS, RESID_POST}:
        return None
    try:
        return _listing(Path(checkpoint).expanduser(), tuple(kinds))
    except Exception:  # noqa: BLE001 - any doubt (unreadable, corrupt, odd): the full load decides and says why
        return None


def _listing(folder: Path, kinds: tuple[str, ...]) -> tuple[str, list[dict]] | None:
    from probes.formats import Kind, is_safetensors, read_json, sniff

    if not folder.is_dir():
        return None
    sn = sniff(folder)
    weights = folder / "model.safetensors"
    if sn.kind is not Kind.HF_FOLDER or sn.index_path or sn.files != [str(weights)] or not is_safetensors(weights):
        return None
    cfg = read_json(folder / "config.json", "config.json")
    layout = _LAYOUTS.get(cfg.get("model_type")) if isinstance(cfg, dict) else None
    plan = layout(cfg) if layout is not None else None
    if plan is None:
        return None
    family, shapes, rows_of = plan
    gen = folder / "generation_config.json"
    if gen.exists():  # what save_pretrained writes from the config; other flags can make the load warn
        g = read_json(gen, "generation_config.json")
        if not isinstance(g, dict) or not set(g) <= _GENERATION_KEYS:
            return None
    rows = rows_of(kinds)
    if not rows:  # e.g. only mlp_gate_act, which GPT-2 has not: the load's "no activation sites" error
        return None
    if not _weights_fit(weights, shapes) or not _tokenizer_fits(folder, cfg["vocab_size"]):
        return None
    return family, rows


def _known_keys(cfg: dict, table: dict[str, tuple[type, ...]]) -> bool:
    """Every key of ``cfg`` in ``table``, with a value of one of its types (a bool only where bool is named)."""
    for key, value in cfg.items():
        types = table.get(key)
        if types is None or not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            return False
    return True


def _positive(cfg: dict, keys) -> bool:
    return all(isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) and cfg[k] > 0 for k in keys)


def _gpt2(cfg: dict):
    """``("gpt2", parameter shapes, rows(kinds))`` of the GPT2LMHeadModel ``cfg`` builds, or None."""
    dims = _gpt2_dims(cfg)
    if dims is None:
        return None
    shapes = _expected_shapes(cfg, dims)
    if not cfg.get("tie_word_embeddings", True):  # tied: no head in the file (one there may make the load warn)
        shapes["lm_head.weight"] = [cfg["vocab_size"], dims["n_embd"]]
    return "gpt2", shapes, lambda kinds: _site_rows("gpt2", "transformer.h", dims["n_layer"], kinds,
                                                    down="mlp.c_proj", act=None, pre="mlp.c_fc",
                                                    inner=dims["inner"], d=dims["n_embd"])


def _gpt2_dims(cfg: Any) -> dict[str, int] | None:
    """Layers and widths of the GPT2LMHeadModel ``cfg`` builds, or None for a config outside the table."""
    if cfg.get("model_type") != "gpt2" or cfg.get("architectures") != ["GPT2LMHeadModel"] \
            or not _known_keys(cfg, _CONFIG_KEYS) or not _positive(cfg, _SIZES):
        return None
    inner = cfg.get("n_inner")
    if (inner is not None and inner <= 0) or cfg.get("n_ctx", 1) <= 0:
        return None
    if cfg.get("activation_function", "gelu_new") not in ACTIVATIONS or cfg.get("add_cross_attention") \
            or cfg.get("is_encoder_decoder") or cfg["n_embd"] % cfg["n_head"] \
            or cfg.get("dtype") not in _DTYPES or cfg.get("torch_dtype") not in _DTYPES:
        return None
    if cfg.get("summary_activation") not in (None, *ACTIVATIONS) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                       for k in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout")
                       if (v := cfg.get(k, 0.1)) is not None):
        return None
    return {"n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"], "inner": inner or 4 * cfg["n_embd"]}


def _expected_shapes(cfg: dict, dims: dict[str, int]) -> dict[str, list[int]]:
    d, inner = dims["n_embd"], dims["inner"]
    shapes = {"transformer.wte.weight": [cfg["vocab_size"], d], "transformer.wpe.weight": [cfg["n_positions"], d],
              "transformer.ln_f.weight": [d], "transformer.ln_f.bias": [d]}
    for i in range(dims["n_layer"]):
        b = f"transformer.h.{i}."
        shapes.update({b + "ln_1.weight": [d], b + "ln_1.bias": [d], b + "ln_2.weight": [d], b + "ln_2.bias": [d],
                       b + "attn.c_attn.weight": [d, 3 * d], b + "attn.c_attn.bias": [3 * d],
                       b + "attn.c_proj.weight": [d, d], b + "attn.c_proj.bias": [d],
                       b + "mlp.c_fc.weight": [d, inner], b + "mlp.c_fc.bias": [inner],
                       b + "mlp.c_proj.weight": [inner, d], b + "mlp.c_proj.bias": [d]})
    return shapes


def _weights_fit(path: Path, want: dict[str, list[int]]) -> bool:
    """Exactly the parameters the model builds (``want``: name -> shape; a head of its own only where the
    config unties it), each of its shape, in a float dtype, every value finite."""
    import numpy as np

    from probes.formats import safetensors_header, safetensors_raw_tensors

    header = safetensors_header(path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != "pt":
        return False
    have = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(have) != set(want) or any(list(v.get("shape", ())) != want[k] or v.get("dtype") not in _FLOATS
                                     for k, v in have.items()):
        return False
    for _name, st_dtype, _shape, buf in safetensors_raw_tensors(str(path)):  # sizes checked by the header's reader
        view, exponent = _FLOATS[st_dtype]
        bits = np.frombuffer(buf, dtype=view)
        if bits.size and np.any((bits & np.array(exponent, dtype=view)) == exponent):
            return False
    return True


def _tokenizer_fits(folder: Path, vocab_rows: int) -> bool:
    """No tokenizer at all, or one ``tokenizer.json`` (with an optional ``tokenizer_config.json`` that adds no
    token) whose ids all fit the input embedding's ``vocab_rows``."""
    from probes.formats import read_json

    names = {p.name for p in folder.iterdir()}
    if names & set(_OTHER_TOKENIZER_FILES):
        return False
    if "tokenizer.json" not in names:
        return "tokenizer_config.json" not in names
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    specials: set[str] = set()
    if "tokenizer_config.json" in names:
        tc = read_json(folder / "tokenizer_config.json", "tokenizer_config.json")
        if not isinstance(tc, dict) or tc.get("tokenizer_class") not in _TOKENIZER_CLASSES:
            return False
        for key, value in tc.items():
            if key in _SPECIAL_KEYS:
                tokens = [value]
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                if not isinstance(value, (list, dict)):
                    return False
                tokens = list(value.values()) if isinstance(value, dict) else value
            elif key == "added_tokens_decoder":
                if not isinstance(value, dict) or any(not isinstance(v, dict) or vocab.get(v.get("content")) != int(k)
                                                      for k, v in value.items()):
                    return False
                continue
            elif key in _TOKENIZER_KEYS:
                continue
            else:
                return False
            for t in tokens:
                text = t.get("content") if isinstance(t, dict) else t
                if text is None:
                    continue
                if not isinstance(text, str) or text not in vocab:
                    return False
                specials.add(text)
    # transformers reads a vocabulary no larger than its special tokens as no tokenizer: the load's call
    return bool(vocab) and len(vocab) > len(specials) and max(vocab.values()) < vocab_rows


# config.json keys of a saved LlamaForCausalLM (LlamaConfig.to_dict() of transformers 4.4x-5.x), with their types.
_LLAMA_KEYS: dict[str, tuple[type, ...]] = {
    "architectures": (list,), "model_type": (str,), "attention_bias": (bool,), "attention_dropout": _NUM,
    "bos_token_id": (int, type(None)), "eos_token_id": (int, type(None)), "pad_token_id": (int, type(None)),
    "dtype": (str, type(None)), "torch_dtype": (str, type(None)), "head_dim": (int, type(None)),
    "hidden_act": (str,), "hidden_size": (int,), "initializer_range": _NUM, "intermediate_size": (int,),
    "max_position_embeddings": (int,), "mlp_bias": (bool,), "num_attention_heads": (int,),
    "num_hidden_layers": (int,), "num_key_value_heads": (int, type(None)), "pretraining_tp": (int,),
    "rms_norm_eps": _NUM, "rope_parameters": (dict, type(None)), "rope_theta": _NUM, "rope_scaling": (type(None),),
    "tie_word_embeddings": (bool,), "transformers_version": (str,), "use_cache": (bool,), "vocab_size": (int,),
    "_name_or_path": (str,), "output_attentions": (bool,), "output_hidden_states": (bool,), "return_dict": (bool,),
}
_LLAMA_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings")


def _llama(cfg: dict):
    """``("llama", parameter shapes, rows(kinds))`` of the LlamaForCausalLM ``cfg`` builds (default RoPE, no
    scaling), or None."""
    if cfg.get("architectures") != ["LlamaForCausalLM"] or not _known_keys(cfg, _LLAMA_KEYS) \
            or not _positive(cfg, _LLAMA_SIZES):
        return None
    d, inner, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim")
    if kv <= 0 or heads % kv or (hd is None and d % heads) or (hd is not None and hd <= 0):
        return None
    hd = hd or d // heads
    rope = cfg.get("rope_parameters")
    if rope is not None and not (set(rope) <= {"rope_theta", "rope_type"} and rope.get("rope_type", "default")
                                 == "default" and isinstance(rope.get("rope_theta", 1.0), (int, float))
                                 and rope.get("rope_theta", 1.0) > 0):
        return None
    if cfg.get("hidden_act", "silu") not in ACTIVATIONS or cfg.get("pretraining_tp", 1) != 1 \
            or not 0 <= cfg.get("attention_dropout", 0.0) <= 1 or cfg.get("rope_theta", 1.0) <= 0 \
            or cfg.get("dtype") not in _DTYPES or cfg.get("torch_dtype") not in _DTYPES:
        return None
    ab, mb = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    shapes = {"model.embed_tokens.weight": [cfg["vocab_size"], d], "model.norm.weight": [d]}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": [d], b + "post_attention_layernorm.weight": [d],
                       b + "self_attn.q_proj.weight": [heads * hd, d], b + "self_attn.k_proj.weight": [kv * hd, d],
                       b + "self_attn.v_proj.weight": [kv * hd, d], b + "self_attn.o_proj.weight": [d, heads * hd],
                       b + "mlp.gate_proj.weight": [inner, d], b + "mlp.up_proj.weight": [inner, d],
                       b + "mlp.down_proj.weight": [d, inner]})
        if ab:
            shapes.update({b + "self_attn.q_proj.bias": [heads * hd], b + "self_attn.k_proj.bias": [kv * hd],
                           b + "self_attn.v_proj.bias": [kv * hd], b + "self_attn.o_proj.bias": [d]})
        if mb:
            shapes.update({b + "mlp.gate_proj.bias": [inner], b + "mlp.up_proj.bias": [inner],
                           b + "mlp.down_proj.bias": [d]})
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [cfg["vocab_size"], d]
    n = cfg["num_hidden_layers"]
    return "llama", shapes, lambda kinds: _site_rows("llama", "model.layers", n, kinds, down="mlp.down_proj",
                                                     act="mlp.act_fn", pre="mlp.gate_proj", inner=inner, d=d)


_LAYOUTS = {"gpt2": _gpt2, "llama": _llama}


def _site_rows(family: str, blocks: str, n_layer: int, kinds, *, down: str, act: str | None, pre: str, inner: int,
               d: int) -> list[dict]:
    """``Site.row()`` of each site ``probes.sites.find_sites`` finds in such a model, in its order: per block
    the MLP activation (input of ``down``), the gate activation (output of ``act``; GLU models only, ``act``
    None otherwise), the pre-activation (output of ``pre``), the block's output."""
    rows = []
    for i in range(n_layer):
        b = f"{blocks}.{i}"
        for kind, path, hook, width in ((MLP_POST, f"{b}.{down}", "input", inner),
                                        (MLP_GATE_ACT, act and f"{b}.{act}", "output", inner),
                                        (MLP_PRE, f"{b}.{pre}", "output", inner), (RESID_POST, b, "output", d)):
            if kind in kinds and path:
                rows.append(Site(_canonical("", i, kind), path, kind, hook, i, width, family).row())
    return rows
