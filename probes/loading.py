"""Load any checkpoint into a model, a tokenizer and a description of where it came from.

One entry point, ``load_checkpoint``, for: a Hugging Face folder (sharded or not), a hub id,
a GGUF file (transformers' GGUF loader), and a bare state dict (safetensors, torch
``.bin``/``.pt``/``.pth``, nanoGPT and Lightning training checkpoints) with ``config`` or
``arch``. Nothing is unpickled beyond tensors unless ``unsafe_pickle`` is asked for, and no
code from a checkpoint runs unless ``trust_remote_code`` is asked for.

Size (~870 lines), for now: the sources share its checks (device, dtype, position limit,
vocabulary against the embedding, layers the config builds but the weights lack, offline hub,
non-finite weights) and end in the same ``LoadedModel``. Two parts could leave: the config
inferred from a bare state dict's shapes (``config_from_shapes`` and the nanoGPT key map, self-
contained) and the timm/torchvision loader (``load_vision_arch``, re-exported by ``probes.vision``;
it needs ``LoadedModel`` and the device/dtype resolution, which would first have to move below both
modules so that the loading <-> vision import cycle does not come back).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from probes.errors import CheckpointError, DataError, DeviceError, ModelError
from probes.formats import (Kind, Sniffed, check_folder_files, gguf_plain_arrays, read_json, read_state_dict,
                            require_regular, safetensors_header, sniff)

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


_POSITION_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(config: Any | None) -> tuple[str, int] | None:
    """``(config attribute, value)`` of the model's position limit, when its config states one."""
    for attr in _POSITION_ATTRS:
        v = getattr(config, attr, None) if config is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return attr, v
    return None


def check_max_length(requested: int | None, loaded: Any) -> None:
    """Refuse (exit 4, before any corpus is read or batch run) a ``--max-length`` above the position
    limit the model's config states: learned position tables index out of range there, and rotary
    models run outside what they were trained on. No clamp: the user asked for that length."""
    lim = position_limit(getattr(loaded, "config", None))
    if requested is not None and lim is not None and requested > lim[1]:
        raise DataError(f"--max-length {requested} is above the model's position limit of {lim[1]} tokens "
                        f"({lim[0]} in its config)", f"use --max-length {lim[1]} or less")


# Config sizes that must be positive where a config gives them as integers.
_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim", "d_ff",
              "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
              "n_layer", "num_layers", "vocab_size", "n_positions", "max_position_embeddings")
_ACTIVATION_KEYS = ("activation_function", "hidden_act", "hidden_activation")


def _config_dict(cfg: Any) -> dict:
    try:
        return cfg.to_dict()
    except Exception:  # noqa: BLE001 - a custom config (trust_remote_code) may not serialise: nothing to judge
        return {}


def check_config(cfg: Any, where: str) -> None:
    """Refuse (exit 2) a config size of 0 or below, which transformers crashes on while building
    the model (ZeroDivisionError and the like, exit 1 before)."""
    raw = _config_dict(cfg)
    for key in _SIZE_KEYS:
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
            raise CheckpointError(f"{where} sets {key} to {v}; sizes must be positive",
                                  "give the model's real size there, or use the config.json these weights were "
                                  "saved with")


def unknown_activation(cfg: Any, err: KeyError, where: str) -> ModelError | None:
    """The KeyError transformers raises while building a model whose config names an activation
    its ``ACT2FN`` does not have, as a ModelError (exit 3); None for any other KeyError. Judged
    from the error, not beforehand: some families read their activation key their own way."""
    raw = _config_dict(cfg)
    for key in _ACTIVATION_KEYS:
        v = raw.get(key)
        if isinstance(v, str) and err.args and err.args[0] == v:
            from transformers.activations import ACT2FN

            known = ", ".join(k for k in ("relu", "gelu", "gelu_new", "silu", "gelu_pytorch_tanh") if k in ACT2FN)
            return ModelError(f"{where} sets {key} to {v[:60]!r}, an activation transformers does not know",
                              f"use one it knows ({known}, ...), or the config.json these weights were saved with")
    return None


def check_vocab(lm: "LoadedModel", tokenizer_src: str | None = None) -> None:
    """Refuse a tokenizer whose token ids run past the model's input embedding (every such token
    would index out of range in the first forward pass)."""
    tok = lm.tokenizer
    if tok is None:
        return
    try:
        rows = lm.model.get_input_embeddings().num_embeddings
        top = max(tok.get_vocab().values(), default=-1) + 1
    except Exception:  # noqa: BLE001 - no embedding table (vision, custom modules): nothing to compare
        return
    if isinstance(rows, int) and top > rows:
        who = f"--tokenizer {tokenizer_src}" if tokenizer_src else "the checkpoint's tokenizer"
        raise CheckpointError(f"{who} has {top} token ids but the model's input embedding has only {rows} rows",
                              "give the tokenizer these weights were trained with"
                              + ("" if tokenizer_src else " (--tokenizer)"))


def _span(ids: set[int]) -> str:
    ids_s = sorted(ids)
    if ids_s == list(range(ids_s[0], ids_s[-1] + 1)):
        return str(ids_s[0]) if len(ids_s) == 1 else f"{ids_s[0]}-{ids_s[-1]}"
    return ", ".join(map(str, ids_s[:8])) + (", ..." if len(ids_s) > 8 else "")


def unbuilt_layers(model: Any, keys: Any, config_name: str) -> str | None:
    """What the weights hold beyond the model the config builds: numbered layers (``transformer.h.3``)
    past the end of a layer list, as a phrase for an error; None if there are none."""
    import torch

    lists = {n: len(m) for n, m in model.named_modules() if n and isinstance(m, torch.nn.ModuleList)}
    extra: dict[str, set[int]] = {}
    for k in keys:
        for n, size in lists.items():
            if str(k).startswith(n + "."):
                head = str(k)[len(n) + 1:].split(".", 1)[0]
                if head.isdigit() and int(head) >= size:
                    extra.setdefault(n, set()).add(int(head))
    if not extra:
        return None
    n, ids = max(extra.items(), key=lambda kv: len(kv[1]))
    return (f"the weights have {'layer' if len(ids) == 1 else 'layers'} {_span(ids)} ({n}.*) that {config_name} "
            f"does not build (it builds {lists[n]})")


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


# Files that hold a tokenizer's vocabulary (a folder with none of them has no tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def _load_tokenizer(source: str, trust_remote_code: bool, *, explicit: bool = False, **kw):
    """The tokenizer at ``source``, or None where there is none.

    ``explicit`` (the user's ``--tokenizer``): every failure is an error naming it (missing path,
    unreadable files, a hub id that cannot be fetched, no vocabulary). Otherwise (the checkpoint's
    own folder): no tokenizer files is None, but tokenizer files that fail to load are an error
    naming them, not "no tokenizer"."""
    from transformers import AutoTokenizer

    src = str(source)
    p = Path(src).expanduser()
    what = f"--tokenizer {src}" if explicit else f"the tokenizer in {src}"
    present: list[str] = []
    if explicit and not p.exists():
        if os.path.lexists(p):
            require_regular(p, "--tokenizer")  # a broken symbolic link
        hub_like = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?", src) is not None
        if not hub_like or src.startswith((".", "~")) or Path(src.split("/")[0]).exists():
            raise CheckpointError(f"--tokenizer {src} does not exist",
                                  "give the folder that holds the model's tokenizer files, or a hub id")
    elif p.is_dir():
        check_folder_files(p, "tokenizer folder")
        present = [f for f in TOKENIZER_FILES if (p / f).exists()]
    elif p.exists():
        require_regular(p, "--tokenizer" if explicit else "tokenizer")
    if explicit and not p.exists() and not kw:
        kw = _hub_access(src)  # a hub id with no hub in reach: fail now, not after the client's retries
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else src, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001 - tokenizers, sentencepiece, json, hub errors alike
        if not (explicit or present):
            return None
        if not p.exists():
            offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
            raise CheckpointError(f"--tokenizer {src!r} is no local path, and as a hub id it cannot be loaded: "
                                  + ("offline mode (HF_HUB_OFFLINE=1)" if offline else _first_line(e)),
                                  f"download it (huggingface-cli download {src} --local-dir DIR) and pass DIR") from e
        files = f" ({', '.join(present)})" if present else ""
        raise CheckpointError(f"{what} cannot be loaded{files}: {_first_line(e)}",
                              "give a folder with the model's working tokenizer files" if explicit else
                              "re-download the tokenizer files, or pass --tokenizer with the model's tokenizer") from e
    # transformers 5 builds an empty tokenizer from a folder that has no vocabulary files.
    if len(tok.get_vocab()) <= len(set(tok.all_special_tokens)):
        if explicit:
            raise CheckpointError(f"--tokenizer {src} holds no tokenizer vocabulary (looked for "
                                  f"{', '.join(TOKENIZER_FILES)})", "give the folder that holds the model's "
                                  "tokenizer files, or a hub id")
        return None
    return tok


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


HUB_CHECK_TIMEOUT = 3.0  # seconds for one TCP connection to the hub before a hub id is given up


def hub_unreachable() -> str | None:
    """None when the hub's host accepts a TCP connection within HUB_CHECK_TIMEOUT, else why not.

    One quick check instead of the hub client's retries (about 25 s without a network): a hub id
    that is not in the local cache then fails at once with the fix."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT):
            return None
    except OSError as e:
        return f"{host} cannot be reached from this machine ({e.__class__.__name__}: {e})"


def _cached_on_disk(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an odd cache layout only means "not cached"
        return False


def _hub_access(name: str) -> dict[str, Any]:
    """from_pretrained keywords for hub id ``name``: {} normally; local files only when the hub cannot
    be reached but the model is in the local cache; an error at once when it is in neither."""
    if _hub_offline():
        return {}
    why = hub_unreachable()
    if why is None:
        return {}
    if _cached_on_disk(name):
        return {"local_files_only": True}
    raise _hub_offline_error(name, OSError(why), why=why)


def _hub_offline_error(name: str, err: Exception, why: str | None = None) -> CheckpointError:
    offline = _hub_offline()
    why = why or ("offline mode (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached or has no such model")
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
    key = dict(checkpoint=checkpoint, config=config, arch=arch, device=device, dtype=dtype,
               trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, tokenizer=tokenizer,
               device_map=device_map)
    if _OFFERED:
        offered, offered_key = _OFFERED.pop()
        if _same_load(offered, offered_key, key):
            return offered
    lm = _load_any(**key)
    check_vocab(lm, tokenizer)
    return lm


# At most one model that this process has loaded already and offers to its next load_checkpoint call
# (``offer_loaded``): ``actsparse analyze`` loads the model to plan its steps, and its first step
# (``measure``) then takes that model instead of reading the checkpoint a second time.
_OFFERED: list[tuple[LoadedModel, dict[str, Any]]] = []


def _same_load(lm: LoadedModel, offered: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Would ``load_checkpoint(**wanted)`` build the model that ``load_checkpoint(**offered)`` built?
    Every argument equal, except that device and dtype are compared once resolved."""
    rest = set(wanted) - {"checkpoint", "device", "dtype"}
    if any(offered[k] != wanted[k] for k in rest) or str(offered["checkpoint"]) != str(wanted["checkpoint"]):
        return False
    if not isinstance(wanted["checkpoint"], (str, os.PathLike)) or wanted["device_map"] is not None:
        return False
    try:
        dev = resolve_device(wanted["device"])
        return dev == lm.device and resolve_dtype(wanted["dtype"], dev, lm.config) == lm.dtype
    except (DeviceError, ModelError):
        return False


class offer_loaded:
    """Context manager: inside it, the first ``load_checkpoint`` call whose arguments would build ``lm``
    (``load_args`` are the ones ``lm`` was loaded with) returns ``lm`` itself; a first call with other
    arguments loads as usual. The offer is withdrawn at that first call, and on exit, which also drops
    this object's reference to ``lm`` (so the model lives on only where a caller took it)."""

    def __init__(self, lm: LoadedModel, **load_args: Any):
        import inspect

        defaults = {k: p.default for k, p in inspect.signature(load_checkpoint).parameters.items()
                    if p.default is not p.empty}  # load_checkpoint's own, so the two cannot drift apart
        self._offer = [(lm, {**defaults, **load_args})]

    def __enter__(self) -> "offer_loaded":
        _OFFERED[:] = self._offer
        self._offer = []
        return self

    def __exit__(self, *exc: Any) -> None:
        _OFFERED.clear()
        self._offer = []


def _load_any(checkpoint, *, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
              device_map) -> LoadedModel:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI draws its own progress bar
    dev = resolve_device(device)

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
    if sn.config_path:  # our own parse first: a config.json that is no JSON, or nested too deep, named as such
        read_json(sn.config_path, "config.json")
    hub_kw = _hub_access(name) if sn.kind is Kind.HUB_ID else {}
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **hub_kw)
    except RecursionError as e:
        raise CheckpointError(f"config.json in {name} nests JSON too deeply to parse", "fix config.json") from e
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
    check_config(cfg, f"config.json in {name}" if sn.kind is Kind.HF_FOLDER else f"the config of {name}")
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
                                    tokenizer_src)  # None: the tokenizer next to config.json, as here
    try:
        placement = {"device_map": device_map} if device_map is not None else {}
        # Mismatched shapes come back in the loading info (key, file shape, config shape) so the
        # error can name them; the re-initialised weights are never used.
        model, info = cls.from_pretrained(name, config=cfg, trust_remote_code=trust_remote_code,
                                          output_loading_info=True, ignore_mismatched_sizes=True, **placement,
                                          **hub_kw, **_transformers_dtype_kw(td))
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
    except KeyError as e:
        raise unknown_activation(cfg, e, f"config.json in {name}") or e
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
    unbuilt = unbuilt_layers(model, info.get("unexpected_keys", ()), "config.json")
    if unbuilt:  # a config with fewer layers would measure only some of them
        raise CheckpointError(f"config and weights in {name} do not match: {unbuilt}",
                              "use the config.json these weights were saved with")
    tok = _load_tokenizer(tokenizer_src or name, trust_remote_code, explicit=bool(tokenizer_src),
                          **(hub_kw if not tokenizer_src else {}))
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


@contextlib.contextmanager
def _gguf_parse_once(gguf_utils) -> Iterator[None]:
    """While loading one GGUF through transformers: its metadata-only parse (``load_gguf_checkpoint(path,
    return_tensors=False)``, which the config and the tokenizer each run: 2.4 s apiece on SmolLM2-135M's
    49k-token vocabulary) is done once and handed out as deep copies, and gguf's tensor-name table for an
    (architecture, block count), which transformers rebuilds for every module of the model (397 times, ~4 s
    there), is built once. The same values either way; both are put back afterwards."""
    import copy

    import gguf

    load, name_map = getattr(gguf_utils, "load_gguf_checkpoint", None), getattr(gguf, "get_tensor_name_map", None)
    if load is None or name_map is None:  # pragma: no cover - another transformers or gguf layout
        yield
        return
    parsed: dict[str, Any] = {}
    maps: dict[tuple, Any] = {}

    def load_once(path, return_tensors=False, model_to_load=None, torch_dtype=None):
        if return_tensors or model_to_load is not None or torch_dtype is not None:
            return load(path, return_tensors=return_tensors, model_to_load=model_to_load, torch_dtype=torch_dtype)
        key = str(path)
        if key not in parsed:
            parsed[key] = load(path, return_tensors=False)
        return copy.deepcopy(parsed[key])  # callers may change what they get

    def map_once(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = name_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    gguf_utils.load_gguf_checkpoint, gguf.get_tensor_name_map = load_once, map_once
    try:
        with gguf_plain_arrays():  # the reader's metadata slices, 2.5x faster (probes.formats)
            yield
    finally:
        gguf_utils.load_gguf_checkpoint, gguf.get_tensor_name_map = load, name_map


def _load_gguf(sn: Sniffed, dev, dtype, trust_remote_code, source, tokenizer_src):
    try:
        import gguf  # noqa: F401
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # _load_gguf_parsed says what is missing
        return _load_gguf_parsed(sn, dev, dtype, trust_remote_code, source, tokenizer_src)
    with _gguf_parse_once(gguf_utils):
        return _load_gguf_parsed(sn, dev, dtype, trust_remote_code, source, tokenizer_src)


def _load_gguf_parsed(sn: Sniffed, dev, dtype, trust_remote_code, source, tokenizer_src):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(Path(sn.path).parent), Path(sn.path).name
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise CheckpointError("loading GGUF needs the 'gguf' package", "pip install 'actsparse[gguf]'") from e
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout: its bar, if any, stays
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    try:
        cfg = AutoConfig.from_pretrained(folder, gguf_file=fname)
        check_config(cfg, f"the GGUF metadata of {sn.path}")
        td = resolve_dtype(dtype, dev, cfg)
        if bar is not None:  # its own tqdm bar, which disable_progress_bar does not reach; the CLI draws one
            gguf_utils.tqdm = lambda *a, **k: bar(*a, **{**k, "disable": True})
        # config=cfg: the metadata parsed above, not parsed from the file a second time (same model)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, config=cfg,
                                                     **_transformers_dtype_kw(td))
    except (CheckpointError, ModelError):
        raise
    except Exception as e:
        # sniff walked the header and checked every tensor's bytes are in the file, so what is left is
        # mostly an architecture transformers cannot map; say both when the message does not tell.
        msg = _first_line(e)
        arch = "architecture" in msg.lower() or "not supported" in msg.lower()
        raise CheckpointError(f"transformers could not load GGUF {sn.path}: {msg}",
                              "check the GGUF architecture is one transformers supports (llama, mistral, qwen2, "
                              "gpt2, ...); `actsparse spectrum` reads any GGUF's tensors" if arch else
                              "re-download or re-convert the file (it may be corrupt), or check its architecture "
                              "is one transformers supports; `actsparse spectrum` reads any GGUF's tensors") from e
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    tok = None
    if tokenizer_src:
        tok = _load_tokenizer(tokenizer_src, trust_remote_code, explicit=True)
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
    if p.is_dir():
        check_folder_files(p, "--config folder")
        if (p / "config.json").exists():
            read_json(p / "config.json", "--config config.json")  # no JSON, nested too deep: named as such
    try:
        if p.exists() and not p.is_dir():
            data = read_json(p, "--config")
            if not isinstance(data, dict) or "model_type" not in data:
                raise ModelError(f"{config} has no model_type", "give a Hugging Face config.json")
            return AutoConfig.for_model(**data) if not trust_remote_code else AutoConfig.from_pretrained(p.parent, trust_remote_code=True)
        return AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    except (ModelError, CheckpointError):
        raise
    except RecursionError as e:
        raise CheckpointError(f"--config {config} nests JSON too deeply to parse",
                              "give a Hugging Face config.json") from e
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
    config_name = f"--config {config}" if config is not None else f"config.json in {Path(sn.path).parent}"
    if config is None and sn.config_path:
        config = sn.config_path
    if config is not None:
        cfg = _config_from(config, trust_remote_code)
        check_config(cfg, config_name)
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
    try:
        model = cls.from_config(cfg, trust_remote_code=trust_remote_code, **_transformers_dtype_kw(torch.float32))
    except KeyError as e:
        raise unknown_activation(cfg, e, config_name if config is not None else f"--arch {arch}") or e
    _load_into(model, sd, sn.path, config_name if config is not None else f"--arch {arch}")
    model.to(td)
    tok = _load_tokenizer(tokenizer_src, trust_remote_code, explicit=True) if tokenizer_src else None
    if tok is None and config is not None and not tokenizer_src:
        tok = _load_tokenizer(config if Path(config).is_dir() or not Path(config).exists() else str(Path(config).parent),
                              trust_remote_code)
    source["head"] = cls.__name__
    return _finish(model, tok, cfg, cfg.model_type, dev, td, source, None, trust_remote_code, causal=causal)


def _load_into(model, sd: dict, path: str, config_name: str = "the config") -> None:
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
    unbuilt = unbuilt_layers(model, unexpected, config_name)
    if unbuilt:  # a config with fewer layers would measure only some of them
        raise CheckpointError(f"config/weights mismatch for {path}: {unbuilt}",
                              "pass the --config or --arch that these weights were trained with")
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
        tok = _load_tokenizer(tokenizer_src, trust_remote_code, explicit=True)
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
    for name, p in model.named_parameters():
        # (meta: a --device-map module offloaded to CPU/disk; its weights load at call time)
        if p.is_floating_point() and p.numel() and p.device.type != "meta" and not _all_finite(p):
            raise ModelError(f"weight {name} contains NaN or Inf values",
                             "the checkpoint is corrupt or diverged; load an earlier checkpoint")


def _all_finite(p) -> bool:
    """``isfinite(p).all()`` from one reduction: min and max propagate NaN, and an infinity is an extreme,
    so both are finite exactly when every entry is. No boolean copy of ``p``; on a 2-core machine whose
    other core is busy, the bundled model's check took 0.3-0.8 s as ``isfinite(p).all()`` (two
    multi-threaded passes per tensor, each waiting for a descheduled thread) and 2-80 ms this way.
    Dtypes without ``aminmax`` take the old way (and its error)."""
    import torch

    try:
        lo, hi = torch.aminmax(p.detach())
    except (RuntimeError, NotImplementedError):
        return bool(torch.isfinite(p).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# ----------------------------------------------------------------------------- timm / torchvision

_HEAD_KEYS = ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight", "heads.head.weight",
              "classifier.1.weight", "classifier.3.weight", "classifier.6.weight", "last_linear.weight")


def parse_vision_arch(arch: str | None) -> tuple[str, str] | None:
    if not arch or ":" not in arch:
        return None
    lib, _, name = arch.partition(":")
    if lib not in ("timm", "torchvision"):
        return None
    if not name:
        raise ModelError(f"--arch {arch!r} names no model", f"use --arch {lib}:MODEL_NAME")
    return lib, name


def _import_lib(lib: str):
    import importlib

    try:
        return importlib.import_module("timm" if lib == "timm" else "torchvision.models")
    except Exception as e:  # ImportError, or a torchvision build that does not match torch
        why = "is not installed" if isinstance(e, ImportError) else f"failed to import ({type(e).__name__})"
        fix = ("pip install timm (it needs a torchvision that matches your torch)" if lib == "timm"
               else "pip install a torchvision build that matches your torch version")
        raise ModelError(f"--arch {lib}:... needs the '{lib}' package, which {why}", fix) from e


def num_classes_from(sd: dict) -> int | None:
    for k in _HEAD_KEYS:
        v = sd.get(k)
        if v is not None and getattr(v, "dim", lambda: 0)() == 2:
            return int(v.shape[0])
    return None


def load_vision_arch(checkpoint: str, arch: str, device: str = "auto", dtype: str = "auto",
                     unsafe_pickle: bool = False):
    """Build ``timm:NAME`` / ``torchvision:NAME`` without weights and load a local state dict."""
    from probes.formats import read_state_dict, sniff

    lib, name = parse_vision_arch(arch) or (None, None)
    if lib is None:
        raise ModelError(f"--arch {arch!r} is not a timm:/torchvision: name",
                         "use --arch timm:NAME or torchvision:NAME")
    mod = _import_lib(lib)
    sn = sniff(checkpoint)
    sd, info = read_state_dict(sn, unsafe_pickle=unsafe_pickle)
    kw: dict[str, Any] = {}
    nc = num_classes_from(sd)
    if nc is not None:
        kw["num_classes"] = nc
    try:
        if lib == "timm":
            model = mod.create_model(name, pretrained=False, **kw)
        else:
            model = mod.get_model(name, weights=None, **kw)
    except Exception as e:
        raise ModelError(f"{lib} cannot build {name!r}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
                         f"check the model name ({lib} lists them: "
                         f"{'timm.list_models()' if lib == 'timm' else 'torchvision.models.list_models()'})") from e
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {checkpoint} do not fit {arch}: {str(e).splitlines()[0][:200]}",
                              "check --arch names the architecture these weights were trained with") from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"weights in {checkpoint} do not fit {arch}: {len(missing)} parameters missing "
                              f"(e.g. {missing[0]!r})", "check --arch names the architecture of these weights")
    dev = resolve_device(device)
    td = resolve_dtype(dtype, dev)
    model.eval().to(device=dev, dtype=td)
    check_finite(model)
    source = {"kind": lib, "path": str(checkpoint), "arch": arch, "container": info.get("container"),
              "num_classes": nc}
    if unexpected:
        source["unexpected_keys"] = list(unexpected)[:20]
    return LoadedModel(model=model, tokenizer=None, config=None, family=lib, device=dev, dtype=td,
                       is_causal_lm=False, is_encoder_decoder=False, source=source)
