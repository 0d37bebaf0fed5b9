"""Checkpoint tensors as numpy arrays, without importing torch where the format allows.

Weight-only commands (``spectrum``) need the numbers, not a framework: safetensors and GGUF
are read straight into numpy, so a spectrum run stays at numpy's memory floor instead of
torch's. Pickled torch checkpoints still go through ``torch.load(weights_only=True)``.

``iter_arrays`` yields ``(name, array, stored_dtype)``: bfloat16 and float8 tensors are
widened to float32 (exact), and ``stored_dtype`` says what the file held.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from probes.errors import CheckpointError
from probes.formats import Kind, Sniffed, gguf_arrays, iter_tensors, safetensors_raw_tensors

_ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
             "U64": np.uint64, "BOOL": np.bool_}
# Widened on read: the label is what the table's dtype column says.
_ST_WIDENED = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


@lru_cache(maxsize=None)
def fp8_table(exp_bits: int, man_bits: int, finite_only: bool) -> np.ndarray:
    """float32 value of every float8 bit pattern (OCP FP8: E4M3 'fn' has no infinities and NaN
    only at S.1111.111; E5M2 follows IEEE 754 with Inf and NaN at the top exponent)."""
    bias = (1 << (exp_bits - 1)) - 1
    out = np.empty(256, dtype=np.float32)
    top = (1 << exp_bits) - 1
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & top
        m = b & ((1 << man_bits) - 1)
        if finite_only and e == top and m == (1 << man_bits) - 1:
            v = np.nan
        elif not finite_only and e == top:
            v = np.inf if m == 0 else np.nan
        elif e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[b] = sign * v
    return out


def _decode(raw: bytearray, st_dtype: str, shape: list[int], where: str) -> np.ndarray:
    if st_dtype in _ST_NUMPY:
        arr = np.frombuffer(raw, dtype=np.dtype(_ST_NUMPY[st_dtype]).newbyteorder("<"))
    elif st_dtype == "BF16":
        arr = bf16_to_float32(np.frombuffer(raw, dtype="<u2"))
    elif st_dtype == "F8_E4M3":
        arr = fp8_table(4, 3, True)[np.frombuffer(raw, dtype=np.uint8)]
    elif st_dtype == "F8_E5M2":
        arr = fp8_table(5, 2, False)[np.frombuffer(raw, dtype=np.uint8)]
    else:
        raise CheckpointError(f"{where} has dtype {st_dtype!r}, which actsparse cannot read",
                              "convert the checkpoint to a float dtype")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if arr.size != numel:
        raise CheckpointError(f"{where} has {arr.size} values for shape {shape}",
                              "the file is corrupt; re-download or re-save it")
    return arr.reshape(shape)


def iter_safetensors_arrays(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """A safetensors file's tensors in file order as numpy arrays (``probes.formats`` reads them)."""
    for name, st_dtype, shape, raw in safetensors_raw_tensors(path):
        label = _ST_WIDENED.get(st_dtype) or np.dtype(_ST_NUMPY.get(st_dtype, np.uint8)).name
        yield name, _decode(raw, st_dtype, shape, f"{path}: tensor {name!r}"), label


def iter_arrays(sn: Sniffed, unsafe_pickle: bool = False) -> Iterator[tuple[str, Any, str]]:
    """``(name, array, stored_dtype)`` for every tensor of a weights checkpoint, one at a time.

    safetensors and GGUF come as numpy arrays without importing torch; anything else (torch
    pickles) as torch tensors from ``probes.formats.iter_tensors``.
    """
    from probes.formats import is_safetensors

    if sn.kind is Kind.GGUF:
        yield from gguf_arrays(sn.path)
        return
    if sn.kind is Kind.HUB_ID or not sn.files or not all(is_safetensors(f) for f in sn.files):
        for name, t in iter_tensors(sn, unsafe_pickle):
            yield name, t, str(t.dtype).replace("torch.", "")
        return
    for f in sn.files:
        yield from iter_safetensors_arrays(f)
