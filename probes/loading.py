"""Load any checkpoint into a model, a tokenizer and a description of where it came from.

One entry point, ``load_checkpoint``, for: a Hugging Face folder (sharded or not), a hub id,
a GGUF file (transformers' GGUF loader), and a bare state dict (safetensors, torch
``.bin``/``.pt``/``.pth``, nanoGPT and Lightning training checkpoints) with ``config`` or
``arch``. Nothing is unpickled beyond tensors unless ``unsafe_pickle`` is asked for, and no
code from a checkpoint runs unless ``trust_remote_code`` is asked for.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes.errors import CheckpointError, DeviceError, ModelError
from probes.formats import Kind, Sniffed, read_state_dict, safetensors_header, sniff

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}

# Families that ``--arch`` can build from tensor shapes alone (others need --config).
SHAPE_ARCHS = ("gpt2", "nanogpt", "llama", "mistral", "qwen2")


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module, eval mode, on ``device``
    tokenizer: Any | None
    config: Any | None
    family: str | None  # config.model_type, or "module" for a bare nn.Module
    device: Any
    dtype: Any
    is_causal_lm: bool
    is_encoder_decoder: bool
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int | None:
        return resolve_max_length(self.config, self.tokenizer)


def resolve_device(device: str = "auto"):
    """``auto``: CUDA when there is a GPU, else CPU. Under ``torchrun`` (``WORLD_SIZE`` > 1), ``auto``
    and a bare ``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``; ``cuda:N`` is taken as given."""
    import torch

    from probes import distributed

    d = (device or "auto").lower()
    if d in ("auto", "cuda") and distributed.launched() and torch.cuda.is_available():
        lr, n = distributed.local_rank(), torch.cuda.device_count()
        if lr >= n:
            raise DeviceError(f"torchrun rank with LOCAL_RANK {lr} but only {n} GPU(s) on this machine",
                              f"use --nproc-per-node {n} or fewer, or --device cpu")
        return torch.device("cuda", lr)
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} requested but no CUDA GPU is available",
                              "use --device cpu or --device auto")
        dev = torch.device(d)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present",
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return dev
    if d == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError("--device mps requested but MPS is not available", "use --device cpu")
        return torch.device("mps")
    if d == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str, device, config: Any | None = None):
    """``auto``: the checkpoint's dtype on a GPU, float32 on CPU (fp16 matmuls are slow or missing there)."""
    import torch

    name = DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ModelError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def resolve_max_length(config: Any | None, tokenizer: Any | None, default: int = 2048) -> int:
    """As lm-evaluation-harness: the model's position limit, else the tokenizer's, else ``default``."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None) if config is not None else None
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000:
        return v
    return default


def _transformers_dtype_kw(dtype) -> dict[str, Any]:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _auto_class(config):
    """Pick the head: causal LM for decoders, seq2seq for T5-style, masked LM / base otherwise."""
    import transformers as tf

    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return tf.AutoModelForSeq2SeqLM, False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return tf.AutoModelForCausalLM, True
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        if any(a.endswith("ForMaskedLM") for a in archs):
            return tf.AutoModelForMaskedLM, False
        if any(a.endswith("ForImageClassification") for a in archs):
            return tf.AutoModelForImageClassification, False
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return tf.AutoModelForSequenceClassification, False
        return tf.AutoModel, False
    # No architectures recorded: a decoder-only model type gets an LM head.
    if type(config) in tf.MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False) \
            and config.model_type not in ("bert", "roberta", "xlm-roberta", "electra", "camembert"):
        return tf.AutoModelForCausalLM, True
    return tf.AutoModel, False


def _load_tokenizer(source: str, trust_remote_code: bool, **kw):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    except Exception:
        return None
    # transformers 5 builds an empty tokenizer from a folder that has no vocabulary files.
    if len(tok.get_vocab()) <= len(set(tok.all_special_tokens)):
        return None
    return tok


def _hub_offline_error(name: str, err: Exception) -> CheckpointError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached or has no such model"
    return CheckpointError(
        f"{name!r} is no local path, and as a hub id it cannot be loaded: {why}; missing config.json and model "
        f"weights (model.safetensors / pytorch_model.bin)",
        f"download it where there is a network (huggingface-cli download {name} --local-dir DIR) and pass DIR")


def load_checkpoint(checkpoint: str | os.PathLike | Any, *, config: str | None = None, arch: str | None = None,
                    device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                    unsafe_pickle: bool = False, tokenizer: str | None = None,
                    device_map: str | None = None) -> LoadedModel:
    """Load ``checkpoint`` (path, hub id or an ``nn.Module``) for measurement, in eval mode.

    ``device_map`` (``auto``, ``balanced``, ``sequential``, ``cpu``): accelerate's placement of a
    Hugging Face model over the GPUs and CPU, for models that do not fit on one device; then
    ``device`` only picks the ``auto`` dtype, and ``LoadedModel.device`` is the device of the input
    embeddings (where batches go)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own progress bar
    dev = resolve_device(device)
    from probes.vision import load_vision_arch, parse_vision_arch

    if device_map is not None:
        _check_device_map(device_map, checkpoint, config, arch)
    if parse_vision_arch(arch):  # --arch timm:NAME / torchvision:NAME plus a local state dict
        return load_vision_arch(str(checkpoint), arch, device=device, dtype=dtype, unsafe_pickle=unsafe_pickle)
    if isinstance(checkpoint, torch.nn.Module):
        return _finish(checkpoint, None, None, "module", dev, resolve_dtype(dtype, dev), {"kind": "module"},
                       tokenizer, trust_remote_code)
    sn = sniff(checkpoint)
    source: dict[str, Any] = {"kind": sn.kind.value, "path": str(checkpoint), "files": sn.files}
    if sn.kind in (Kind.HF_FOLDER, Kind.HUB_ID) and config is None and arch is None:
        return _load_pretrained(sn, dev, dtype, trust_remote_code, source, tokenizer, device_map)
    if device_map is not None:
        raise CheckpointError(f"--device-map needs a Hugging Face model folder or hub id; {checkpoint} is a "
                              f"{sn.kind.value}", "save it with save_pretrained() and pass that folder, or drop "
                              "--device-map")
    if sn.kind is Kind.GGUF:
        return _load_gguf(sn, dev, dtype, trust_remote_code, source, tokenizer)
    if sn.kind is Kind.HUB_ID:
        raise CheckpointError(f"{sn.path!r} is a hub id; --config/--arch apply to local state dicts",
                              "drop --config/--arch or give a local weight file")
    return _load_state_dict(sn, config, arch, dev, dtype, trust_remote_code, unsafe_pickle, source, tokenizer)


DEVICE_MAPS = ("auto", "balanced", "sequential", "cpu")


def _check_device_map(device_map: str, checkpoint, config, arch) -> None:
    import importlib.util

    if device_map not in DEVICE_MAPS:
        raise DeviceError(f"unknown --device-map {device_map!r}", f"use one of {', '.join(DEVICE_MAPS)}")
    if config is not None or arch is not None or not isinstance(checkpoint, (str, os.PathLike)):
        what = "--config" if config is not None else "--arch" if arch is not None else "an nn.Module"
        raise CheckpointError(f"--device-map needs a Hugging Face model folder or hub id, not a state dict with "
                              f"{what}", "save the model with save_pretrained() and pass that folder, or drop "
                              "--device-map")
    if importlib.util.find_spec("accelerate") is None:
        raise DeviceError("--device-map needs the accelerate package, which is not installed",
                          "pip install accelerate, or drop --device-map")


def _load_pretrained(sn: Sniffed, dev, dtype, trust_remote_code, source, tokenizer_src, device_map=None):
    from transformers import AutoConfig

    name = sn.path
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e).splitlines()[0][:200]
        if "trust_remote_code" in msg or "custom code" in msg:
            raise ModelError(f"{name} needs custom code to load", "pass --trust-remote-code if you trust it") from e
        raise ModelError(f"unknown architecture in {name}: {msg}",
                         "upgrade transformers, or pass --config with a known architecture") from e
    except OSError as e:
        if sn.kind is Kind.HUB_ID:
            raise _hub_offline_error(name, e) from e
        raise CheckpointError(f"cannot read config in {name}: {str(e).splitlines()[0][:200]}",
                              "check config.json") from e
    if device_map == "cpu":
        import torch

        dev = torch.device("cpu")  # dtype auto: float32, as for --device cpu
    td = resolve_dtype(dtype, dev, cfg)
    cls, causal = _auto_class(cfg)
    for f in sn.files:  # transformers picks a loader by file name; check the content first
        if f.endswith(".safetensors"):
            safetensors_header(f)
        if f.endswith(".bin") and sniff(f).kind is Kind.SAFETENSORS:
            if device_map is not None:
                raise CheckpointError(f"--device-map cannot place {f}: it is safetensors data under a .bin name",
                                      "rename it to .safetensors, or drop --device-map")
            return _load_state_dict(sniff(f), sn.config_path, None, dev, dtype, trust_remote_code, False, source,
                                    tokenizer_src or name)
    try:
        placement = {"device_map": device_map} if device_map is not None else {}
        # Mismatched shapes come back in the loading info (key, file shape, config shape) so the
        # error can name them; the re-initialised weights are never used.
        model, info = cls.from_pretrained(name, config=cfg, trust_remote_code=trust_remote_code,
                                          output_loading_info=True, ignore_mismatched_sizes=True, **placement,
                                          **_transformers_dtype_kw(td))
    except OSError as e:
        if sn.kind is Kind.HUB_ID:
            raise _hub_offline_error(name, e) from e
        raise CheckpointError(f"cannot load weights from {name}: {str(e).splitlines()[0][:200]}",
                              "check the weight files are complete") from e
    except (RuntimeError, ValueError) as e:
        if device_map is not None and "offload" in str(e):
            raise DeviceError(f"--device-map {device_map}: {name} does not fit in GPU and CPU memory "
                              f"({_first_line(e)})", "use --dtype bfloat16/float16 or a machine with more "
                              "memory") from e
        raise CheckpointError(f"config and weights in {name} do not match: {_first_line(e)}",
                              "check that config.json belongs to these weights") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{name} holds pickled objects that are not plain tensors",
                              "re-save it as safetensors") from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CheckpointError(f"cannot read weights in {name}: {_first_line(e)}",
                                  "the file is truncated or corrupt; re-download or re-save it") from e
        raise
    mismatched = sorted((str(m[0]), *(list(x) for x in m[1:3])) if isinstance(m, (tuple, list)) and len(m) >= 3
                        else (str(m), None, None) for m in info.get("mismatched_keys", ()))
    if mismatched:
        key, in_file, for_config = mismatched[0]
        shapes = f": {key} is {in_file} in the weights but {for_config} for the config" if in_file is not None else \
            f" (e.g. {key!r})"
        raise CheckpointError(f"config and weights in {name} do not match: {len(mismatched)} parameter(s) of another "
                              f"shape{shapes}", "check that config.json belongs to these weights")
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(("position_ids", "masked_bias"))]
    if missing:
        raise CheckpointError(f"config and weights in {name} do not match: {len(missing)} parameters missing "
                              f"(e.g. {sorted(missing)[:1]})", "check that config.json belongs to these weights")
    tok = _load_tokenizer(tokenizer_src or name, trust_remote_code)
    source["head"] = cls.__name__
    if device_map is not None:
        # accelerate placed every module; moving the model would undo it. Batches go where the tokens enter.
        source["device_map"] = device_map
        source["hf_device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
        dev = _input_device(model, dev)
    return _finish(model, tok, cfg, cfg.model_type, dev, td, source, None, trust_remote_code, causal=causal,
                   placed=device_map is not None)


def _input_device(model, default):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if w is not None and w.device.type != "meta":
        return w.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), default)


def _load_gguf(sn: Sniffed, dev, dtype, trust_remote_code, source, tokenizer_src):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(Path(sn.path).parent), Path(sn.path).name
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise CheckpointError("loading GGUF needs the 'gguf' package", "pip install 'actsparse[gguf]'") from e
    try:
        cfg = AutoConfig.from_pretrained(folder, gguf_file=fname)
        td = resolve_dtype(dtype, dev, cfg)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **_transformers_dtype_kw(td))
    except Exception as e:
        raise CheckpointError(f"transformers could not load GGUF {sn.path}: {_first_line(e)}",
                              "check the GGUF architecture is one transformers supports (llama, mistral, qwen2, "
                              "gpt2, ...); `actsparse spectrum` reads any GGUF's tensors") from e
    tok = None
    if tokenizer_src:
        tok = _load_tokenizer(tokenizer_src, trust_remote_code)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        except Exception:
            tok = None
    source["head"] = "AutoModelForCausalLM(gguf)"
    return _finish(model, tok, cfg, cfg.model_type, dev, td, source, None, trust_remote_code, causal=True)


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else e.__class__.__name__)[:240]


def _config_from(config: str, trust_remote_code: bool):
    from transformers import AutoConfig

    p = Path(config)
    try:
        if p.is_file():
            data = json.loads(p.read_text())
            if "model_type" not in data:
                raise ModelError(f"{config} has no model_type", "give a Hugging Face config.json")
            return AutoConfig.for_model(**data) if not trust_remote_code else AutoConfig.from_pretrained(p.parent, trust_remote_code=True)
        return AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    except ModelError:
        raise
    except json.JSONDecodeError as e:
        raise ModelError(f"--config {config} is not valid JSON", "give a Hugging Face config.json") from e
    except OSError as e:
        raise _hub_offline_error(config, e) if not p.exists() else CheckpointError(
            f"cannot read --config {config}: {_first_line(e)}", "give a folder or config.json") from e
    except (ValueError, KeyError) as e:
        raise ModelError(f"--config {config}: {_first_line(e)}", "give a config with a known model_type") from e


def _load_state_dict(sn: Sniffed, config, arch, dev, dtype, trust_remote_code, unsafe_pickle, source, tokenizer_src):
    import torch

    sd, info = read_state_dict(sn, unsafe_pickle=unsafe_pickle)
    source["container"] = info.get("container")
    if info.get("stripped_prefixes"):
        source["stripped_prefixes"] = info["stripped_prefixes"]
    if "module" in info:  # a pickled nn.Module (only reachable with --unsafe-pickle)
        return _finish(info["module"], None, None, "module", dev, resolve_dtype(dtype, dev), source,
                       tokenizer_src, trust_remote_code)
    if info.get("container") == "nanogpt" and arch is None and config is None:
        arch = "nanogpt"
    if config is None and sn.config_path:
        config = sn.config_path
    if config is not None:
        cfg = _config_from(config, trust_remote_code)
    elif arch is not None:
        cfg, sd = config_from_shapes(arch, sd, info)
        source["config_inferred_from"] = f"--arch {arch} and tensor shapes"
        if info.get("assumed"):
            source["assumed"] = info["assumed"]
    else:
        raise ModelError(f"{sn.path} holds only weights ({len(sd)} tensors) and no architecture",
                         "pass --config CONFIG (folder, config.json or hub id) or --arch FAMILY "
                         f"({', '.join(SHAPE_ARCHS)}); `actsparse spectrum` needs neither")
    td = resolve_dtype(dtype, dev, cfg)
    cls, causal = _auto_class(cfg)
    model = cls.from_config(cfg, trust_remote_code=trust_remote_code, **_transformers_dtype_kw(torch.float32))
    _load_into(model, sd, sn.path)
    model.to(td)
    tok = _load_tokenizer(tokenizer_src, trust_remote_code) if tokenizer_src else None
    if tok is None and config is not None and not tokenizer_src:
        tok = _load_tokenizer(config if Path(config).is_dir() or not Path(config).exists() else str(Path(config).parent),
                              trust_remote_code)
    source["head"] = cls.__name__
    return _finish(model, tok, cfg, cfg.model_type, dev, td, source, None, trust_remote_code, causal=causal)


def _load_into(model, sd: dict, path: str) -> None:
    """Load ``sd`` into ``model``, adding or removing the base-model prefix if that makes keys match."""
    want = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [sd]
    if prefix:
        cands.append({f"{prefix}.{k}": v for k, v in sd.items()})
        cands.append({k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v for k, v in sd.items()})
    best = max(cands, key=lambda c: len(want & set(c)))
    missing = sorted(want - set(best))
    # Tied heads and non-persistent buffers may be absent from a state dict.
    tied = {k for k in missing if k.endswith("lm_head.weight") or ".attn.bias" in k or "masked_bias" in k
            or k.endswith("position_ids")}
    missing = [k for k in missing if k not in tied]
    unexpected = sorted(set(best) - want)
    if not (want & set(best)):
        raise CheckpointError(
            f"config/weights mismatch for {path}: none of the {len(sd)} tensors match the model's parameter names "
            f"(e.g. file has {next(iter(sd))!r}, model wants {next(iter(sorted(want)))!r})",
            "pass the --config or --arch that these weights were trained with")
    if missing:
        raise CheckpointError(
            f"config/weights mismatch for {path}: {len(missing)} parameters missing from the file (e.g. {missing[0]!r})",
            "pass the --config or --arch that these weights were trained with")
    try:
        model.load_state_dict({k: v for k, v in best.items() if k in want}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"config/weights mismatch for {path}: {_first_line(e)}",
                              "pass the --config or --arch that these weights were trained with") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if unexpected:
        model._actsparse_unexpected_keys = unexpected[:20]  # reported in the manifest


def config_from_shapes(arch: str, sd: dict, info: dict):
    """Build an HF config for ``arch`` from tensor shapes (and nanoGPT's model_args)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    a = arch.lower()
    if a in ("nanogpt", "gpt2"):
        sd = dict(sd)
        if a == "nanogpt" or any(k.endswith("mlp.c_fc.weight") and v.shape[0] > v.shape[1] for k, v in sd.items()):
            sd = _nanogpt_to_hf(sd)
        args = info.get("model_args", {})
        _fill_zero_biases(sd)
        wte = _get(sd, "wte.weight")
        wpe = _get(sd, "wpe.weight")
        n_layer = 1 + max(_layer_ids(sd, r"h\.(\d+)\."))
        n_embd = wte.shape[1]
        c_fc = _get(sd, "h.0.mlp.c_fc.weight")
        n_head = int(args.get("n_head", max(1, n_embd // 64)))
        cfg = GPT2Config(vocab_size=wte.shape[0], n_positions=wpe.shape[0], n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, n_inner=c_fc.shape[1],
                         activation_function="gelu" if a == "nanogpt" else "gelu_new",
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg.architectures = ["GPT2LMHeadModel"]
        if "n_head" not in args:
            info["assumed"] = f"n_head={n_head} (head_dim 64); pass --config for the exact value"
        return cfg, sd
    if a in ("llama", "mistral", "qwen2"):
        emb = _get(sd, "embed_tokens.weight")
        hidden = emb.shape[1]
        n_layer = 1 + max(_layer_ids(sd, r"layers\.(\d+)\."))
        inter = _get(sd, "layers.0.mlp.gate_proj.weight").shape[0]
        q = _get(sd, "layers.0.self_attn.q_proj.weight")
        k = _get(sd, "layers.0.self_attn.k_proj.weight")
        # head_dim is not in the q/k shapes (heads x head_dim); some checkpoints carry it exactly:
        # a rotary inv_freq buffer has head_dim / 2 entries, a per-head q_norm (Qwen3-style) head_dim.
        exact = _head_dim_from_buffers(sd)
        head_dim = exact or next((d for d in (128, 64, 32, 16, 8) if d <= 64 + 64 * (hidden % 128 == 0)
                                  and q.shape[0] % d == 0 and k.shape[0] % d == 0), None)
        if head_dim is None or q.shape[0] % head_dim or k.shape[0] % head_dim:
            raise ModelError("cannot infer attention heads from shapes", "pass --config")
        n_heads = q.shape[0] // head_dim
        n_kv = k.shape[0] // head_dim
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[a]
        cfg = cls(vocab_size=emb.shape[0], hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layer,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                  tie_word_embeddings=not any(k.endswith("lm_head.weight") for k in sd))
        cfg.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}[a]]
        info["assumed"] = (f"head_dim={head_dim}" + (" (read from the checkpoint)" if exact else " (a guess)")
                           + ", rope and norm-eps defaults; pass --config for the exact values")
        return cfg, sd
    raise ModelError(f"--arch {arch!r} cannot be built from shapes alone",
                     f"use one of {', '.join(SHAPE_ARCHS)}, or pass --config with the model's config.json")


def _fill_zero_biases(sd: dict) -> None:
    """nanoGPT with bias=False has no biases; HF GPT-2 always has them. Zero biases are exact."""
    for k in list(sd):
        if not k.endswith(".weight"):
            continue
        bias = k[: -len(".weight")] + ".bias"
        if bias in sd:
            continue
        if any(x in k for x in ("c_attn", "c_proj", "c_fc")):  # Conv1D weight [in, out]
            sd[bias] = sd[k].new_zeros(sd[k].shape[-1])
        elif "ln_" in k:
            sd[bias] = sd[k].new_zeros(sd[k].shape[0])


def _head_dim_from_buffers(sd: dict) -> int | None:
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq") and getattr(v, "ndim", 0) == 1:
            return 2 * int(v.shape[0])
        if k.endswith("self_attn.q_norm.weight") and getattr(v, "ndim", 0) == 1:
            return int(v.shape[0])
    return None


def _get(sd: dict, suffix: str):
    for k, v in sd.items():
        if k == suffix or k.endswith("." + suffix):
            return v
    raise ModelError(f"expected a tensor named like '*{suffix}' for this --arch, found e.g. {list(sd)[:3]}",
                     "check --arch, or pass --config")


def _layer_ids(sd: dict, pattern: str) -> list[int]:
    import re

    ids = [int(m.group(1)) for k in sd for m in [re.search(pattern, k)] if m]
    if not ids:
        raise ModelError("no numbered layers found in the state dict", "check --arch, or pass --config")
    return ids


def _nanogpt_to_hf(sd: dict) -> dict:
    """nanoGPT uses nn.Linear ([out, in]); HF GPT-2 uses Conv1D ([in, out]): transpose those weights."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".attn.bias") and v.dim() == 4:  # causal-mask buffer of old nanoGPT
            continue
        if any(k.endswith(s) for s in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                        "mlp.c_proj.weight")):
            v = v.t().contiguous()
        out[k] = v
    return out


def _finish(model, tok, cfg, family, dev, td, source, tokenizer_src, trust_remote_code, causal=None,
            placed: bool = False) -> LoadedModel:
    import torch

    if tok is None and tokenizer_src:
        tok = _load_tokenizer(tokenizer_src, trust_remote_code)
    model.eval()
    try:
        if not placed:  # placed: a device_map put the modules on their devices already
            model.to(device=dev, dtype=td) if family == "module" else model.to(dev)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        raise DeviceError(f"the model does not fit on {dev}", "use --dtype bfloat16 or --device cpu") from e
    check_finite(model)
    if causal is None:
        causal = False
    if getattr(model, "_actsparse_unexpected_keys", None):
        source["unexpected_keys"] = model._actsparse_unexpected_keys
    return LoadedModel(model=model, tokenizer=tok, config=cfg, family=family, device=dev, dtype=td,
                       is_causal_lm=bool(causal), is_encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
                       source=source)


def check_finite(model) -> None:
    """Refuse NaN/Inf weights: every statistic downstream would be meaningless."""
    import torch

    for name, p in model.named_parameters():
        # (meta: a --device-map module offloaded to CPU/disk; its weights load at call time)
        if p.is_floating_point() and p.numel() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            raise ModelError(f"weight {name} contains NaN or Inf values",
                             "the checkpoint is corrupt or diverged; load an earlier checkpoint")
