"""Tell checkpoint formats apart by content and stream their tensors.

``sniff`` looks at bytes, not suffixes: a ``.bin`` that is really safetensors, or a
``.pt`` that is a text file, is recognised for what it is. ``iter_tensors`` yields
``(name, tensor)`` one tensor at a time (memory-mapped where the format allows), which is
what weight-only analyses (spectrum, drift) need; ``read_state_dict`` gathers them for
model loading.

Nothing is opened that is not a regular file (``require_regular``: a FIFO would block, a link to
``/dev/zero`` never end), a model folder holding any other kind of entry is refused
(``check_folder_files``), and a shard index may only name files inside its own folder
(``_shard_path``).

Size (~760 lines), on purpose: the checks and the readers of a format share its byte layout
(``safetensors_header`` and ``_check_st_entry`` / ``_check_st_size`` guard both ``sniff`` and the
raw tensor readers, ``gguf_header_check`` both ``sniff`` and ``gguf_arrays``), so a format's check
and its reader change together. If it grows, split by format (safetensors, GGUF, torch pickle),
not into checking and reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

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


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a regular file"


def require_regular(path: str | os.PathLike, what: str = "checkpoint file") -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refusing anything but a regular file before it is
    opened: a FIFO blocks the reader forever, ``/dev/zero`` never ends, a socket cannot be read."""
    p = str(path)
    try:
        st = os.stat(p)
    except ValueError:  # a NUL byte in the path
        raise CheckpointError(f"{what} {p[:120]!r} is not a valid path", "check the path") from None
    except FileNotFoundError:
        broken = os.path.islink(p)
        raise CheckpointError(f"{what} {p} does not exist" + (f" (a broken symbolic link to {os.readlink(p)})"
                                                               if broken else ""),
                              "check the path, or re-download the file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {p}: {e.strerror or e}", "check the path and its permissions") from e
    if not stat.S_ISREG(st.st_mode):
        via = f" (a symbolic link to {os.path.realpath(p)})" if os.path.islink(p) else ""
        raise CheckpointError(f"{what} {p} is {_file_kind(st.st_mode)}{via}, not a regular file",
                              "replace it with the real file; actsparse reads models only from regular files")
    return st


def check_folder_files(folder: str | os.PathLike, what: str = "model folder") -> None:
    """Refuse a model folder whose top-level entries include something other than regular files and
    folders (after following symlinks, so an HF cache's links to its blobs are fine): transformers
    opens config, weight and tokenizer files by name, and a FIFO among them would block it."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {folder}: {e.strerror or e}",
                              "check the folder's permissions") from e
    for e in entries:
        try:
            mode = os.stat(e.path).st_mode
        except OSError:
            if e.name in _READ_BY_NAME:  # a broken link where a file we open should be
                require_regular(e.path, "file")
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            require_regular(e.path, "file")


# Files that loading opens by name from a model folder.
_READ_BY_NAME = frozenset(("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                           "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                           "generation_config.json", "spiece.model", "sentencepiece.bpe.model", *WEIGHT_NAMES))
# Largest JSON file (config, shard index) read whole; real ones are kilobytes to a few megabytes.
_MAX_JSON_BYTES = 256 << 20


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a small JSON file (config.json, a shard index) with every failure a CheckpointError
    naming the file: not a regular file, too large, not UTF-8, not JSON, nested too deeply."""
    st = require_regular(path, what)
    label = str(path) if what in Path(path).name else f"{what} {path}"
    if st.st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{label} is {st.st_size} bytes, too large to be a {what}",
                              "check that this is the right file")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{label} is not UTF-8 text (byte {e.start})", "re-download the file or fix it") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {label}: {e.strerror or e}", "check the path and its permissions") from e
    try:
        return json.loads(text)
    except RecursionError as e:
        raise CheckpointError(f"{label} nests JSON arrays/objects too deeply to parse",
                              "re-download the file or fix it") from e
    except ValueError as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{label} is not valid JSON ({getattr(e, 'msg', e)}{where})",
                              "re-download the file or fix it") from e


def _read_head(path: Path, n: int = 16) -> bytes:
    require_regular(path)
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: permission denied", "check the file's permissions") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}", "check the path") from e


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # torch's messages carry ANSI bold
    return (lines[0] if lines else e.__class__.__name__)[:limit]


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """Parse and validate a safetensors header; raise CheckpointError if truncated or corrupt.

    Every entry is checked as the safetensors library checks it (dtype a string, shape a list of
    non-negative ints, ``data_offsets`` two ints with 0 <= begin <= end, byte size matching shape x
    dtype where the dtype is known, no two tensors overlapping), so a header that claims a huge
    tensor is refused before anything is allocated.
    """
    path = Path(path)
    require_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (only {size} bytes)", "re-download or re-save the file")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_ST_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file (header length {n} vs file size {size}: truncated or "
                    "corrupt)", "re-download or re-save the file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}", "check the path") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e.__class__.__name__})",
                              "re-download or re-save the file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header", "re-download or re-save the file")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = _check_st_entry(path, name, info)
        spans.append((begin, end, name))
    data_size = size - 8 - n
    end = max((e for _, e, _ in spans), default=0)
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}",
            "re-download or re-save the file",
        )
    for begin, end, name in spans:
        _check_st_size(path, name, header[name], end - begin)
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensors {a!r} and {b!r} overlap)",
                                  "re-download or re-save the file")
    return header


# Bytes per element of the safetensors dtypes torch holds (sub-byte and other dtypes are not size-checked).
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


def _check_st_entry(path: Path, name: str, info: Any) -> tuple[int, int]:
    """``(begin, end)`` of one header entry's bytes, after checking the types of dtype, shape, offsets."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r} ({why})",
                               "re-download or re-save the file")

    if not isinstance(info, dict) or "data_offsets" not in info:
        raise bad("no data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape", []), info["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {str(shape)[:60]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        raise bad(f"data_offsets {str(offsets)[:60]}")
    return offsets[0], offsets[1]


def _check_st_size(path: Path, name: str, info: dict, nbytes: int) -> None:
    dtype, shape = info["dtype"], info.get("shape", [])
    if dtype not in _ST_ITEMSIZE:
        return
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel * _ST_ITEMSIZE[dtype] > nbytes:  # stop before a corrupt shape builds a giant integer
            break
    if numel * _ST_ITEMSIZE[dtype] != nbytes:
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r} (shape "
                              f"{str(shape)[:60]} of {dtype} does not fill the {nbytes} bytes its offsets give)",
                              "re-download or re-save the file")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= _MAX_ST_HEADER and head[8:9] == b"{"


def is_safetensors(path: str | Path) -> bool:
    """Whether a file starts like safetensors (by content, not suffix); the header is not validated."""
    p = Path(path)
    return _looks_like_safetensors(_read_head(p), p.stat().st_size)


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


# GGUF metadata value types (ggml's gguf.h): fixed sizes, STRING = 8, ARRAY = 9.
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header_check(path: str | Path) -> None:
    """Walk a GGUF header (metadata and tensor infos) with bounds checks; raise CheckpointError if it
    is truncated or corrupt.

    gguf's reader trusts the counts it reads: an array whose length runs past the end of the file
    makes it loop on empty reads for as many iterations as the length says (2^40: a hang). Every
    count here is checked against the bytes left before anything loops over it.
    """
    import mmap

    path = Path(path)
    require_regular(path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid GGUF file ({why}: truncated or corrupt)",
                               "re-download or re-convert the file")

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            size = len(buf)
            if size < 24 or buf[:4] != GGUF_MAGIC:
                raise bad("header shorter than 24 bytes" if size < 24 else "bad magic")
            (version,) = struct.unpack_from("<I", buf, 4)
            end = "<"
            if version & 0xFFFF == 0:  # written big-endian (gguf's reader flips byte order the same way)
                end, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version not in (2, 3):
                raise CheckpointError(f"{path} is GGUF version {version}; only versions 2 and 3 can be read",
                                      "re-convert the file with a current llama.cpp / gguf")
            u32, u64 = struct.Struct(end + "I"), struct.Struct(end + "Q")
            pos = 8

            def take(n: int, what: str) -> int:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise bad(f"{what} runs past the end of the file")
                start, pos = pos, pos + n
                return start

            def read_u32(what: str) -> int:
                return u32.unpack_from(buf, take(4, what))[0]

            def read_u64(what: str) -> int:
                return u64.unpack_from(buf, take(8, what))[0]

            def skip_string(what: str) -> None:
                take(read_u64(what), what)

            def skip_value(vtype: int, what: str, depth: int = 0) -> None:
                if vtype in _GGUF_SCALAR_SIZE:
                    take(_GGUF_SCALAR_SIZE[vtype], what)
                elif vtype == _GGUF_STRING:
                    skip_string(what)
                elif vtype == _GGUF_ARRAY and depth < 4:
                    itype, count = read_u32(what), read_u64(what)
                    if itype in _GGUF_SCALAR_SIZE:
                        take(count * _GGUF_SCALAR_SIZE[itype], what)
                        return
                    least = 8 if itype == _GGUF_STRING else 12  # a string's length / a nested array's header
                    if count * least > size - pos:
                        raise bad(f"{what}: array of {count} entries runs past the end of the file")
                    for _ in range(count):
                        skip_value(itype, what, depth + 1)
                else:
                    raise bad(f"{what}: unknown value type {vtype}")

            n_tensors, n_kv = read_u64("tensor count"), read_u64("metadata count")
            if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:  # smallest entries: 13 and 24 bytes
                raise bad(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
            alignment = 32  # GGUF's default; general.alignment may change it
            for i in range(n_kv):
                klen = read_u64(f"metadata key {i}")
                key = bytes(buf[take(klen, f"metadata key {i}"):pos])
                vtype = read_u32(f"metadata entry {i}")
                if key == b"general.alignment" and vtype == 4:  # UINT32
                    alignment = read_u32(f"metadata entry {i}")
                else:
                    skip_value(vtype, f"metadata entry {i}")
            infos = []
            for i in range(n_tensors):
                nlen = read_u64(f"tensor info {i}")
                name = bytes(buf[take(nlen, f"tensor info {i}"):pos]).decode("utf-8", "replace")
                n_dims = read_u32(f"tensor info {i}")
                if n_dims > 8:  # ggml has at most 4
                    raise bad(f"tensor {name[:60]!r} claims {n_dims} dimensions")
                dims = struct.unpack_from(f"{end}{n_dims}Q", buf, take(8 * n_dims, f"tensor info {i}"))
                ttype, offset = read_u32(f"tensor info {i}"), read_u64(f"tensor info {i}")
                infos.append((name, dims, ttype, offset))
            if alignment == 0 or alignment & (alignment - 1):
                raise bad(f"general.alignment {alignment} is not a power of two")
            _check_gguf_data(infos, -(-pos // alignment) * alignment, size, bad)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}", "check the path") from e
    except (ValueError, struct.error) as e:  # mmap of an empty file, unpack at a bad offset
        raise bad(_first_line(e)) from e


def _check_gguf_data(infos: list, data_start: int, size: int, bad) -> None:
    """Every tensor's bytes (by its ggml type's block size, where the ``gguf`` package knows the
    type) must lie inside the file: a GGUF cut short in its data passes the header walk."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # without gguf nothing reads the data anyway
        return
    for name, dims, ttype, offset in infos:
        if ttype not in GGML_QUANT_SIZES:
            continue
        block, type_size = GGML_QUANT_SIZES[ttype]
        n = 1
        for d in dims:
            n *= d
        need = data_start + offset + n // block * type_size
        if need > size:
            raise bad(f"tensor {name[:60]!r} needs bytes up to {need}, the file has {size}")


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
        try:
            return _sniff_dir(p)
        except OSError as e:  # an unreadable folder or index
            raise CheckpointError(f"cannot read {s}: {e.strerror or _first_line(e)}",
                                  "check the folder's permissions") from e
    size = require_regular(p).st_size
    if size == 0:
        raise CheckpointError(f"{s} is an empty file", "give a checkpoint file or a model folder")
    head = _read_head(p)
    if head.startswith(GGUF_MAGIC):
        gguf_header_check(p)  # gguf's own reader can hang on a corrupt count
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
            obj = read_json(p, "JSON file")
        except CheckpointError as e:  # not JSON or not UTF-8: judged as text below; nested too deep: say so
            if isinstance(e.__cause__, RecursionError):
                raise
            obj = None
        if isinstance(obj, dict) and "weight_map" in obj:
            check_folder_files(p.parent)  # its config and tokenizer files are read too
            return _sniff_index(p, obj)
        if isinstance(obj, dict) and "model_type" in obj:
            return _sniff_dir(p.parent) if p.name == "config.json" else Sniffed(
                Kind.HF_FOLDER, str(p.parent), config_path=str(p))
    if _looks_like_text(p):
        raise CheckpointError(
            f"{s} is a text file, not a checkpoint",
            "give a model folder, a .safetensors/.bin/.pt/.gguf file, or a hub id (a text corpus goes to `actsparse measure --data`)")
    raise CheckpointError(
        f"{s} is not a checkpoint format actsparse knows (first bytes {head[:8]!r})",
        "give safetensors, a torch .bin/.pt/.pth, GGUF, or a Hugging Face model folder")


def _sniff_index(p: Path, obj: dict) -> Sniffed:
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise CheckpointError(f"{p} is not a valid shard index (weight_map must map tensor names to file names)",
                              "re-download the index or fix it")
    shards = []
    for f in dict.fromkeys(weight_map.values()):
        fp = _shard_path(p, f)
        if not os.path.lexists(fp):
            raise CheckpointError(f"shard {f} named in {p.name} is missing from {p.parent}",
                                  "download the missing shard or fix the index")
        require_regular(fp, f"shard {f!r} named in {p.name}")
        shards.append(str(fp))
    cfg = p.parent / "config.json"
    return Sniffed(Kind.SAFETENSORS_INDEX, str(p), files=shards, index_path=str(p),
                   config_path=str(cfg) if cfg.exists() else None)


def _shard_path(index: Path, entry: str) -> Path:
    """Where a shard index entry points, refused unless it stays inside the index's folder: judged on
    the path as written (no ``..`` out, not absolute), and with the folders on the way resolved (no
    symlinked folder out). The shard file itself may be a symlink (an HF cache links to its blobs);
    ``require_regular`` then checks what it points at."""
    folder = os.path.normpath(os.path.abspath(index.parent))
    joined = os.path.normpath(os.path.join(folder, entry))
    outside = CheckpointError(
        f"shard {entry[:120]!r} named in {index} lies outside the index's folder {index.parent}",
        "an index may only name shard files in its own folder; re-download the index or fix it")
    if "\0" in entry or os.path.isabs(entry) or not joined.startswith(folder + os.sep):
        raise outside
    real_folder = os.path.realpath(folder)
    real_parent = os.path.realpath(os.path.dirname(joined))
    if real_parent != real_folder and not real_parent.startswith(real_folder.rstrip(os.sep) + os.sep):
        raise outside
    return index.parent / os.path.relpath(joined, folder)


def _sniff_dir(p: Path) -> Sniffed:
    check_folder_files(p)
    cfg = p / "config.json"
    files: list[str] = []
    index = None
    for name in WEIGHT_NAMES:
        fp = p / name
        if fp.exists():
            if name.endswith(".index.json"):
                obj = read_json(fp, "shard index")
                if not isinstance(obj, dict):
                    raise CheckpointError(f"{fp} is not a valid shard index", "re-download the index or fix it")
                sub = _sniff_index(fp, obj)
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
    if "model" in obj and "model_args" in obj and isinstance(obj["model"], dict) \
            and isinstance(obj["model_args"], dict):
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
    unnamed = [k for k in sd if not isinstance(k, str)]
    if unnamed:
        raise CheckpointError(f"checkpoint holds tensors under keys that are not names (e.g. {str(unnamed[0])[:40]})",
                              "save model.state_dict() with torch.save or safetensors")
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
        if str(path).endswith(".safetensors"):
            # torch.load hands any path ending in .safetensors to safetensors; this one is a torch file
            # (sniffed by content), so it goes in as an open file, which cannot be memory-mapped.
            with open(path, "rb") as fh:
                return torch.load(fh, map_location="cpu", weights_only=not unsafe_pickle)
        if unsafe_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # legacy format cannot be memory-mapped
            if mmap and "mmap" in str(e):
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler says "Unsupported global: GLOBAL posix.system ..." for code it
        # refuses to run, and "Unsupported operand 237" (and the like) for a pickle that is simply corrupt.
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
        reason = m.group(1).strip()[:160] if m else _first_line(e)
        if m and "Unsupported global" not in reason:
            raise CheckpointError(f"{path} could not be read as a torch checkpoint: corrupt pickle ({reason})",
                                  "the file is truncated or corrupt; re-download or re-save it") from e
        raise CheckpointError(
            f"{path} contains pickled objects that are not plain tensors ({reason})",
            "re-save it as a state dict or safetensors, or pass --unsafe-pickle if you trust the file") from e
    except Exception as e:  # noqa: BLE001 - a corrupt pickle or zip fails anywhere in torch.load
        # (EOFError, UnicodeDecodeError, struct.error, IndexError, KeyError, AssertionError, MemoryError, ...)
        raise CheckpointError(f"{path} could not be read as a torch checkpoint: {_first_line(e)}",
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
    if not (head.startswith(ZIP_MAGIC) or head[:1] == b"\x80"):
        # Not a torch file either: never hand it to the pickle reader. A .safetensors name or a
        # plausible header length gets the safetensors reader's own message (truncated, corrupt header).
        if f.endswith(".safetensors") or (len(head) >= 8 and 0 < struct.unpack("<Q", head[:8])[0] <= _MAX_ST_HEADER):
            safetensors_header(f)  # raises unless the header is sound after all
            yield from _iter_safetensors(f)
            return
        raise CheckpointError(f"{f} is not a checkpoint format actsparse knows (first bytes {head[:8]!r})",
                              "re-download the file, or give safetensors, a torch .bin/.pt/.pth or GGUF")
    obj = _torch_load(f, unsafe_pickle, mmap=True)
    sd, _ = unwrap_state_dict(obj)
    for k in list(sd):
        yield k, sd.pop(k)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def count_tensors(sn: Sniffed) -> int | None:
    """Number of tensors when the headers say it cheaply (safetensors, judged by content: a torch
    zip named .safetensors is not one), else None."""
    if sn.kind is Kind.GGUF or not sn.files or not all(is_safetensors(f) for f in sn.files):
        return None
    return sum(len([k for k in safetensors_header(f) if k != "__metadata__"]) for f in sn.files)


def safetensors_raw_tensors(f: str, skip: Callable[[str, str, list[int]], bool] | None = None,
                            buffer: Callable[[int], Any] = bytearray
                            ) -> Iterator[tuple[str, str, list[int], Any]]:
    """``(name, safetensors dtype, shape, bytes)`` of each tensor in file order, each read with one
    plain ``read`` after the header is validated; truncation is a CheckpointError.

    ``skip(name, dtype, shape)``: tensors it is true for are not read (their bytes are None; the file
    must still be long enough to hold them), e.g. ``spectrum``'s weights beyond WeightWatcher's size
    limits, whose rows need only the shape. ``buffer(n)``: a writable buffer of n bytes to read into
    (default ``bytearray``, which zero-fills it first; ``spectrum`` passes an uninitialised numpy array).

    No memory map: a mapped file's touched pages count as resident for the whole walk, so peak
    memory would grow with the file instead of staying near the largest tensor.
    """
    header = safetensors_header(f)
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        base = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            start, end = (int(x) for x in info["data_offsets"])
            dtype, shape = str(info.get("dtype", "")), [int(x) for x in info.get("shape", [])]
            if skip is not None and skip(name, dtype, shape):
                if os.fstat(fh.fileno()).st_size < base + end:
                    raise CheckpointError(f"{f} is truncated inside tensor {name!r}", "re-download or re-save the file")
                yield name, dtype, shape, None
                continue
            fh.seek(base + start)
            buf = buffer(end - start)
            if fh.readinto(buf) != end - start:
                raise CheckpointError(f"{f} is truncated inside tensor {name!r}", "re-download or re-save the file")
            yield name, dtype, shape, buf


def _iter_safetensors(f: str) -> Iterator[tuple[str, Any]]:
    """Tensors of a safetensors file in file order, as torch tensors of their stored dtype."""
    import torch

    for name, st_dtype, shape, buf in safetensors_raw_tensors(f):
        dt = getattr(torch, _ST_DTYPES.get(st_dtype, ""), None)
        if dt is None:
            raise CheckpointError(f"{f}: tensor {name!r} has dtype {st_dtype!r} that torch cannot hold",
                                  "convert the checkpoint to a float dtype")
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        numel = 1
        for d in shape:
            numel *= d
        if t.numel() != numel:
            raise CheckpointError(f"{f}: tensor {name!r} has {t.numel()} values for shape {shape}",
                                  "the file is corrupt; re-download or re-save it")
        try:
            t = t.reshape(shape)
        except RuntimeError as e:  # e.g. more dimensions than torch holds
            raise CheckpointError(f"{f}: tensor {name!r} cannot take shape {str(shape)[:60]}: {_first_line(e)}",
                                  "the file is corrupt; re-download or re-save it") from e
        yield name, t


class _PlainMemmapNumpy:
    """numpy, but ``memmap`` gives a plain ndarray view of the map (same bytes, same read-only flag)."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def memmap(*args: Any, **kwargs: Any) -> Any:
        import numpy

        return numpy.memmap(*args, **kwargs).view(numpy.ndarray)


@contextlib.contextmanager
def gguf_plain_arrays() -> Iterator[None]:
    """While it is active, gguf's ``GGUFReader`` reads its file through a plain ndarray view of the memory map
    instead of the ``np.memmap`` itself: the reader slices the file once per metadata value (300k+ times for a
    49k-token vocabulary) and every slice of a memmap runs numpy's Python-level ``memmap.__array_finalize__``
    and ``__getitem__``. SmolLM2-135M's reader: 1.65 s -> 0.66 s, the same fields and tensors. Only the
    reader module's own ``np`` name is swapped, and put back when its last user leaves (threads and nested
    uses count, under a lock: one thread's exit does not pull the view from under another's reader)."""
    import numpy

    try:
        import gguf.gguf_reader as reader
    except ImportError:
        yield
        return
    with _GGUF_SWAP["lock"]:
        ours = _GGUF_SWAP["users"] > 0 or getattr(reader, "np", None) is numpy  # else: another gguf layout
        if ours:
            if _GGUF_SWAP["users"] == 0:
                reader.np = _PlainMemmapNumpy()
            _GGUF_SWAP["users"] += 1
    try:
        yield
    finally:
        if ours:
            with _GGUF_SWAP["lock"]:
                _GGUF_SWAP["users"] -= 1
                if _GGUF_SWAP["users"] == 0:
                    reader.np = numpy


_GGUF_SWAP: dict[str, Any] = {"lock": threading.Lock(), "users": 0}  # gguf_plain_arrays' users, under the lock


def gguf_arrays(path: str) -> Iterator[tuple[str, Any, str]]:
    """``(name, float numpy array, GGML type name)`` of each GGUF tensor, dequantised by the ``gguf``
    package after our bounds-checked header walk (the reader itself can loop on a corrupt header)."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise CheckpointError("reading GGUF needs the 'gguf' package", "pip install 'actsparse[gguf]'") from e
    import numpy as np

    gguf_header_check(path)
    try:
        with gguf_plain_arrays():
            reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, KeyError, IndexError, ...
        raise CheckpointError(f"{path} is not a readable GGUF file: {_first_line(e)}",
                              "re-download or re-convert the file") from e
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
            # GGUF stores dims fastest-first; numpy data already has the row-major shape.
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            arr = np.asarray(arr).reshape(shape)
        except Exception as e:  # noqa: BLE001 - an unknown quantisation, a size that does not match
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} cannot be read: {_first_line(e)}",
                                  "re-download or re-convert the file") from e
        yield t.name, arr, t.tensor_type.name.lower()


def _iter_gguf(path: str) -> Iterator[tuple[str, Any]]:
    import numpy as np
    import torch

    for name, arr, _ in gguf_arrays(path):
        yield name, torch.from_numpy(np.array(arr, copy=True))  # the reader's memmap is read-only


def read_state_dict(sn: Sniffed, unsafe_pickle: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """All tensors of a weights checkpoint plus container info (nanoGPT args, stripped prefix)."""
    if sn.kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        obj = _torch_load(sn.path, unsafe_pickle, mmap=True)
        return unwrap_state_dict(obj)
    sd = dict(iter_tensors(sn, unsafe_pickle))
    if not sd:
        raise CheckpointError(f"no tensors found in {sn.path}", "check that this is a model checkpoint")
    return sd, {"container": sn.kind.value}
