"""Tell checkpoint formats apart by content and stream their tensors.

``sniff`` looks at bytes, not suffixes: a ``.bin`` that is really safetensors, or a
``.pt`` that is a text file, is recognised for what it is. ``iter_tensors`` yields
``(name, tensor)`` one tensor at a time (memory-mapped where the format allows), which is
what weight-only analyses (spectrum, drift) need; ``read_state_dict`` gathers them for
model loading.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from probes.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"
# Largest safetensors header we accept (the format itself caps it at 100 MB).
_MAX_ST_HEADER = 100_000_000
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Kind(str, Enum):
    HF_FOLDER = "hf_folder"  # config.json + weights (maybe sharded)
    WEIGHTS_FOLDER = "weights_folder"  # weights without config.json
    HUB_ID = "hub_id"
    SAFETENSORS = "safetensors"
    SAFETENSORS_INDEX = "safetensors_index"  # model.safetensors.index.json / pytorch_model.bin.index.json
    TORCH_ZIP = "torch_zip"  # torch.save (zip container)
    TORCH_LEGACY = "torch_legacy"  # torch.save legacy pickle / plain pickle
    GGUF = "gguf"


@dataclass
class Sniffed:
    kind: Kind
    path: str
    files: list[str] = field(default_factory=list)  # weight files in load order
    config_path: str | None = None
    index_path: str | None = None


WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _read_head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied", "check the file's permissions") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}", "check the path") from e


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse and validate a safetensors header; raise CheckpointError if truncated or corrupt."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (only {size} bytes)", "re-download or re-save the file")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_ST_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (header length {n} vs file size {size}: truncated or corrupt)",
                "re-download or re-save the file",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e.__class__.__name__})",
                              "re-download or re-save the file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header", "re-download or re-save the file")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}", "re-download or re-save the file")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}",
            "re-download or re-save the file",
        )
    return header


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= _MAX_ST_HEADER and head[8:9] == b"{"


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        chunk = f.read(4096)
    if not chunk:
        return True
    if b"\x00" in chunk:
        return False
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def sniff(path: str | os.PathLike) -> Sniffed:
    """Identify a checkpoint by content. Raises CheckpointError with a fix for anything else."""
    s = str(path)
    p = Path(s).expanduser()
    if not p.exists():
        bare = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s) and not s.endswith(
            (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".json", ".txt"))
        if (bare or _HUB_ID.match(s)) and not s.startswith((".", "/", "~")) and not Path(s.split("/")[0]).exists():
            return Sniffed(Kind.HUB_ID, s)
        raise CheckpointError(f"checkpoint path {s!r} does not exist",
                              "check the path, or give a Hugging Face hub id such as 'gpt2'")
    if p.is_dir():
        return _sniff_dir(p)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{s} is an empty file", "give a checkpoint file or a model folder")
    head = _read_head(p)
    if head.startswith(GGUF_MAGIC):
        return Sniffed(Kind.GGUF, str(p), files=[str(p)])
    if head.startswith(ZIP_MAGIC):
        return Sniffed(Kind.TORCH_ZIP, str(p), files=[str(p)])
    if _looks_like_safetensors(head, size):
        safetensors_header(p)  # validates; raises if truncated/corrupt
        return Sniffed(Kind.SAFETENSORS, str(p), files=[str(p)])
    if head[:1] == b"\x80":
        return Sniffed(Kind.TORCH_LEGACY, str(p), files=[str(p)])
    if head[:1] == b"{" or head[:3] == b"\xef\xbb\xbf":
        try:
            obj = json.loads(p.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict) and "weight_map" in obj:
            return _sniff_index(p, obj)
        if isinstance(obj, dict) and "model_type" in obj:
            return _sniff_dir(p.parent) if p.name == "config.json" else Sniffed(
                Kind.HF_FOLDER, str(p.parent), config_path=str(p))
    if _looks_like_text(p):
        raise CheckpointError(
            f"{s} is a text file, not a checkpoint",
            "give a model folder, a .safetensors/.bin/.pt/.gguf file, or a hub id (corpora go to --data)")
    raise CheckpointError(
        f"{s} is not a checkpoint format actsparse knows (first bytes {head[:8]!r})",
        "give safetensors, a torch .bin/.pt/.pth, GGUF, or a Hugging Face model folder")


def _sniff_index(p: Path, obj: dict) -> Sniffed:
    shards = []
    for f in dict.fromkeys(obj["weight_map"].values()):
        fp = p.parent / f
        if not fp.exists():
            raise CheckpointError(f"shard {f} named in {p.name} is missing from {p.parent}",
                                  "download the missing shard or fix the index")
        shards.append(str(fp))
    cfg = p.parent / "config.json"
    return Sniffed(Kind.SAFETENSORS_INDEX, str(p), files=shards, index_path=str(p),
                   config_path=str(cfg) if cfg.exists() else None)


def _sniff_dir(p: Path) -> Sniffed:
    cfg = p / "config.json"
    files: list[str] = []
    index = None
    for name in WEIGHT_NAMES:
        fp = p / name
        if fp.exists():
            if name.endswith(".index.json"):
                sub = _sniff_index(fp, json.loads(fp.read_text()))
                files, index = sub.files, str(fp)
            else:
                files = [str(fp)]
            break
    if not files:
        # Any other single weight file (e.g. a training run's folder).
        cands = sorted(x for x in p.iterdir() if x.is_file() and x.suffix in {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt"})
        if len(cands) == 1 and not cfg.exists():
            return sniff(cands[0])
        files = [str(x) for x in cands if x.suffix in {".safetensors", ".bin"}]
    if not files:
        present = ", ".join(sorted(x.name for x in p.iterdir())[:12]) or "nothing"
        raise CheckpointError(
            f"folder {p} has no weights (looked for {', '.join(WEIGHT_NAMES)}; found {present})",
            "point at a folder with model.safetensors or pytorch_model.bin, or at a weight file")
    kind = Kind.HF_FOLDER if cfg.exists() else Kind.WEIGHTS_FOLDER
    return Sniffed(kind, str(p), files=files, config_path=str(cfg) if cfg.exists() else None, index_path=index)


# --------------------------------------------------------------------------- state dicts

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema", "params")
_STRIP_PREFIXES = ("_orig_mod.", "module.", "model.")


def unwrap_state_dict(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Find the state dict inside a training checkpoint.

    Returns ``(state_dict, info)``; ``info`` keeps what we learned (``container``:
    nanogpt/lightning/plain, ``model_args`` for nanoGPT, the stripped prefix).
    """
    import torch

    info: dict[str, Any] = {"container": "plain"}
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), {"container": "module", "module": obj}
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict",
                              "save model.state_dict() with torch.save or safetensors")
    if "model" in obj and "model_args" in obj:
        info["container"] = "nanogpt"
        info["model_args"] = dict(obj["model_args"])
        obj = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        info["container"] = "lightning" if "pytorch-lightning_version" in obj or "epoch" in obj else "nested"
        obj = obj["state_dict"]
    else:
        for k in _NESTED_KEYS:
            if k in obj and isinstance(obj[k], dict) and not any(torch.is_tensor(v) for v in obj.values()):
                info["container"] = f"nested[{k}]"
                obj = obj[k]
                break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError("no tensors found in the checkpoint",
                              "save model.state_dict() with torch.save or safetensors")
    # Strip wrapper prefixes (torch.compile, DDP, Lightning's attribute name) shared by every key.
    stripped = []
    changed = True
    while changed:
        changed = False
        for pre in _STRIP_PREFIXES:
            if all(k.startswith(pre) for k in sd) and (pre != "model." or info["container"] in ("lightning", "nested")):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                stripped.append(pre)
                changed = True
    if info["container"] == "lightning" and not stripped:
        heads = {k.split(".", 1)[0] for k in sd}
        if len(heads) == 1 and all("." in k for k in sd):
            pre = heads.pop() + "."
            sd = {k[len(pre):]: v for k, v in sd.items()}
            stripped.append(pre)
    if stripped:
        info["stripped_prefixes"] = stripped
    return sd, info


def _torch_load(path: str, unsafe_pickle: bool, mmap: bool) -> Any:
    import pickle

    import torch

    try:
        if unsafe_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # legacy format cannot be memory-mapped
            if mmap and "mmap" in str(e):
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains pickled objects that are not plain tensors ({str(e).splitlines()[0][:160]})",
            "re-save it as a state dict or safetensors, or pass --unsafe-pickle if you trust the file") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} could not be read as a torch checkpoint: {str(e).splitlines()[0][:160]}",
                              "the file is truncated or corrupt; re-download or re-save it") from e


def iter_tensors(sn: Sniffed, unsafe_pickle: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, torch.Tensor)`` one at a time, memory-mapped where possible."""
    if sn.kind is Kind.HUB_ID:
        raise CheckpointError(f"{sn.path!r} is a hub id; weight-only commands need local files",
                              "download the model first (huggingface-cli download) and give its folder")
    if sn.kind is Kind.GGUF:
        yield from _iter_gguf(sn.path)
        return
    for f in sn.files:
        yield from _iter_file(f, unsafe_pickle)


def _iter_file(f: str, unsafe_pickle: bool) -> Iterator[tuple[str, Any]]:
    head = _read_head(Path(f))
    if _looks_like_safetensors(head, Path(f).stat().st_size):
        yield from _iter_safetensors(f)
        return
    if head.startswith(GGUF_MAGIC):
        yield from _iter_gguf(f)
        return
    obj = _torch_load(f, unsafe_pickle, mmap=True)
    sd, _ = unwrap_state_dict(obj)
    for k in list(sd):
        yield k, sd.pop(k)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def _iter_safetensors(f: str) -> Iterator[tuple[str, Any]]:
    """Tensors of a safetensors file in file order, each read with one plain ``read``.

    No memory map: a mapped file's touched pages count as resident for the whole walk, so peak
    memory would grow with the file instead of staying near the largest tensor.
    """
    import torch

    header = safetensors_header(f)
    with open(f, "rb") as fh:
        fh.seek(0)
        (n,) = struct.unpack("<Q", fh.read(8))
        base = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            start, end = (int(x) for x in info["data_offsets"])
            dt = getattr(torch, _ST_DTYPES.get(info.get("dtype", ""), ""), None)
            if dt is None:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {info.get('dtype')!r} that torch cannot hold",
                                      "convert the checkpoint to a float dtype")
            shape = [int(x) for x in info.get("shape", [])]
            fh.seek(base + start)
            buf = bytearray(end - start)
            if fh.readinto(buf) != end - start:
                raise CheckpointError(f"{f} is truncated inside tensor {name!r}", "re-download or re-save the file")
            t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
            numel = 1
            for d in shape:
                numel *= d
            if t.numel() != numel:
                raise CheckpointError(f"{f}: tensor {name!r} has {t.numel()} values for shape {shape}",
                                      "the file is corrupt; re-download or re-save it")
            yield name, t.reshape(shape)


def _iter_gguf(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise CheckpointError("reading GGUF needs the 'gguf' package", "pip install 'actsparse[gguf]'") from e
    import numpy as np
    import torch

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}", "re-download or re-convert the file") from e
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        # GGUF stores dims fastest-first; numpy data already has the row-major shape.
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        arr = np.asarray(arr).reshape(shape)
        yield t.name, torch.from_numpy(np.array(arr, copy=True))  # the reader's memmap is read-only


def read_state_dict(sn: Sniffed, unsafe_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """All tensors of a weights checkpoint plus container info (nanoGPT args, stripped prefix)."""
    if sn.kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        obj = _torch_load(sn.path, unsafe_pickle, mmap=True)
        return unwrap_state_dict(obj)
    sd = dict(iter_tensors(sn, unsafe_pickle))
    if not sd:
        raise CheckpointError(f"no tensors found in {sn.path}", "check that this is a model checkpoint")
    return sd, {"container": sn.kind.value}
