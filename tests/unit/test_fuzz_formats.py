"""Fuzzing the checkpoint readers (issue 8): mutated safetensors, GGUF, torch zip, legacy torch and plain
pickle files go through ``sniff``, spectrum's tensor count, ``iter_tensors`` and ``read_state_dict``.

Property: each call succeeds or raises an ``ActsparseError`` (the CLI turns it into one line and exit
code 2); nothing else escapes, nothing hangs (a 10 s alarm, raised as a BaseException so that no
``except Exception`` in the code under test can swallow it), and the process's peak memory does not
jump (a header claiming a 1e12-element tensor must be refused before anything is allocated).

Seeds are small valid files written by the formats' own writers (safetensors.torch.save_file,
gguf.GGUFWriter, torch.save zip and legacy, pickle.dump); hypothesis mutates them: truncation,
bit flips, overwritten bytes, "interesting" integers (0, 2^31-1, 2^40, 2^64-1 ...) written over
counts and lengths, inserted and deleted bytes, appended junk; and safetensors headers are rebuilt
with hostile JSON (bad dtypes, negative / huge / non-integer shapes, offsets out of range,
overlapping, reversed, wrong header length).
"""

from __future__ import annotations

import json
import pickle
import resource
import signal
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes.arrays import iter_arrays
from probes.errors import EXIT_CHECKPOINT, ActsparseError, CheckpointError
from probes.formats import (
    Kind,
    Sniffed,
    count_tensors,
    gguf_header_check,
    iter_tensors,
    read_state_dict,
    safetensors_header,
    sniff,
)

gguf = pytest.importorskip("gguf")

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_S = 10
PEAK_RSS_GROWTH_MB = 1024


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` in the code under test lets it through."""


@contextmanager
def alarm(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def exercise(path: Path) -> None:
    """Everything that reads a weights-only checkpoint: what `spectrum`, `drift` and state-dict loading do."""
    with alarm(HANG_S), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about odd pickle protocols before failing cleanly
        sn = sniff(path)
        count_tensors(sn)
        for name, t in iter_tensors(sn):
            assert isinstance(name, str) and isinstance(t, torch.Tensor)
            t.float().sum()  # touch every byte: a tensor pointing outside the file would fault here
        if sn.kind is not Kind.GGUF:
            read_state_dict(sn)


def assert_clean(path: Path) -> None:
    try:
        exercise(path)
    except ActsparseError as e:
        line = e.one_line()
        assert line and "\n" not in line and e.exit_code == EXIT_CHECKPOINT, (type(e), line)


# ----------------------------------------------------------------------------------------------- seeds
def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.mlp.fc.weight": torch.randn(6, 4, generator=g),
            "blocks.0.mlp.fc.bias": torch.randn(6, generator=g),
            "blocks.0.attn.c_attn.weight": torch.randn(4, 12, generator=g).half(),
            "steps": torch.arange(3, dtype=torch.int64),
            "empty": torch.zeros(0, 4)}


def _write_gguf(path: Path) -> None:
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "hello"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    w.add_array("test.ids", [1, 2, 3])
    rng = np.random.RandomState(0)
    w.add_tensor("blk.0.ffn_up.weight", rng.randn(6, 4).astype(np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", rng.randn(4).astype(np.float16))
    q = quantize(rng.randn(2, 32).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("seeds")
    sd = _tensors()
    save_file(sd, d / "st")
    torch.save(sd, d / "zip")
    torch.save(sd, d / "legacy", _use_new_zipfile_serialization=False)
    with open(d / "pickle", "wb") as f:
        pickle.dump(sd, f, protocol=2)
    _write_gguf(d / "gguf")
    out = {name: (d / name).read_bytes() for name in ("st", "zip", "legacy", "pickle", "gguf")}
    for name in out:  # every seed is read as it should be before it is mutated
        if name == "pickle":  # tensors pickled by pickle.dump need code to rebuild: refused, cleanly
            with pytest.raises(CheckpointError, match="--unsafe-pickle"):
                exercise(d / name)
        else:
            exercise(d / name)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------- mutations
INTERESTING = [0, 1, 7, 8, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
_pos = st.integers(0, 1 << 16)

mutation = st.one_of(
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), _pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("int"), st.integers(0, 512), st.sampled_from([2, 4, 8]),
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=256)),
)


def mutate(b: bytes, ops) -> bytes:
    b = bytearray(b)
    for op, *args in ops:
        n = len(b)
        if op == "truncate":
            del b[args[0] % (n + 1):]
        elif op == "flip" and n:
            b[args[0] % n] ^= 1 << args[1]
        elif op == "overwrite" and n:
            i = args[0] % n
            b[i:i + len(args[1])] = args[1]
        elif op == "int":  # an integer over a count, a length or an offset near the start (headers)
            i, width, v = args
            if i + width <= n:
                b[i:i + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
        elif op == "insert":
            i = args[0] % (n + 1)
            b[i:i] = args[1]
        elif op == "delete" and n:
            i = args[0] % n
            del b[i:i + args[1]]
        elif op == "append":
            b += args[0]
    return bytes(b)


@pytest.mark.parametrize("seed", ["st", "zip", "legacy", "pickle", "gguf"])
def test_mutated_checkpoints_fail_cleanly(seeds, work, seed):
    start = _peak_rss_mb()
    path = work / f"mutated-{seed}.bin"  # a neutral suffix: formats are told apart by content

    @FUZZ
    @given(ops=st.lists(mutation, min_size=1, max_size=4))
    def check(ops):
        path.write_bytes(mutate(seeds[seed], ops))
        assert_clean(path)

    check()
    assert _peak_rss_mb() - start < PEAK_RSS_GROWTH_MB


@pytest.mark.parametrize("seed", ["st", "zip", "gguf"])
def test_spectrum_on_mutated_checkpoints(seeds, work, seed):
    """All the way through spectrum's analysis: a file that reads can still hold odd tensors (a zero
    dimension, NaN, int8 ...); the analysis answers with a row, a note or a clean error."""
    from probes.spectrum import analyze_checkpoint

    path = work / f"spectrum-{seed}.bin"

    @settings(FUZZ, max_examples=40)
    @given(ops=st.lists(mutation, min_size=1, max_size=3))
    def check(ops):
        path.write_bytes(mutate(seeds[seed], ops))
        try:
            with alarm(HANG_S), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analyze_checkpoint(path)
        except ActsparseError as e:
            assert "\n" not in e.one_line()

    check()


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=4),
                  st.builds(torch.zeros, st.integers(0, 3)), st.builds(torch.ones, st.integers(0, 2), st.integers(0, 3)),
                  st.just(torch.tensor(1.5)))
_key = st.one_of(st.sampled_from(["model", "model_args", "state_dict", "model_state_dict", "module", "ema", "params",
                                  "epoch", "pytorch-lightning_version", "model.w", "_orig_mod.w", "module.w", ""]),
                 st.text(max_size=6), st.integers(-2, 2), st.booleans())
_container = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                                         st.dictionaries(_key, inner, max_size=4)), max_leaves=10)


@FUZZ
@given(obj=_container, legacy=st.booleans())
def test_hostile_torch_containers_fail_cleanly(work, obj, legacy):
    """Valid torch files whose content is not a state dict: nanoGPT/Lightning look-alikes with the wrong
    types, tensors under int keys, lists, tuples, scalars."""
    path = work / "container.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert_clean(path)


def test_truncation_at_every_offset(seeds, work):
    """Cheap and exhaustive where it matters: every prefix of every seed (headers included)."""
    for seed, b in seeds.items():
        path = work / f"cut-{seed}"
        for cut in sorted(set(range(0, min(len(b), 200))) | set(range(200, len(b), max(1, len(b) // 50)))):
            path.write_bytes(b[:cut])
            assert_clean(path)


def test_empty_file_and_junk_after_valid_file(seeds, work):
    path = work / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        exercise(path)
    for seed, b in seeds.items():
        path.write_bytes(b + b"\x00junk" * 100)
        assert_clean(path)


# ------------------------------------------------------------------------------ hostile safetensors headers
def _st_file(header: dict | list | str, data: bytes, length_delta: int = 0) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=8))
_dim = st.one_of(st.integers(0, 8), st.sampled_from([-1, -4, 10**6, 10**12, 2**63, 2**64 + 3]), _json_scalar)
_dtype = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "F8_E4M3", "C64",
                                    "F4", "Q4", "f32", ""]), _json_scalar)
_offset = st.one_of(st.integers(0, 256), st.sampled_from([-1, -8, 10**12, 2**63, 2**64]), _json_scalar)
_entry = st.fixed_dictionaries(
    {}, optional={"dtype": _dtype,
                  "shape": st.one_of(st.lists(_dim, max_size=4), _json_scalar),
                  "data_offsets": st.one_of(st.lists(_offset, min_size=0, max_size=3), _json_scalar)})
_header = st.dictionaries(st.text(min_size=0, max_size=6), st.one_of(_entry, _json_scalar), max_size=4)


@FUZZ
@given(header=_header, data=st.binary(max_size=300), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -20]),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), _json_scalar, max_size=2), _json_scalar))
def test_hostile_safetensors_headers_fail_cleanly(work, header, data, length_delta, metadata):
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    path = work / "hostile.safetensors"
    path.write_bytes(_st_file(header, data, length_delta))
    assert_clean(path)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}, "truncated: tensors need"),
    ({"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}, "does not fill the 16 bytes"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, "shape"),
    ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, "shape"),
    ({"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}, "dtype"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": "0-16"}, "data_offsets"),
    ({"dtype": "F32", "shape": [], "data_offsets": [0, 16]}, "does not fill"),
    ({"dtype": "Q4_K", "shape": [2, 2], "data_offsets": [0, 16]}, "torch cannot hold"),
    ({"dtype": "F32", "shape": [2**63] * 5000, "data_offsets": [0, 16]}, "does not fill"),
])
def test_hostile_safetensors_header_messages(work, entry, match):
    path = work / "one.safetensors"
    path.write_bytes(_st_file({"w": entry}, bytes(16)))
    with alarm(HANG_S), pytest.raises(CheckpointError, match=match) as ei:
        list(iter_tensors(sniff(path)))
    assert ei.value.exit_code == EXIT_CHECKPOINT


def test_overlapping_safetensors_tensors_are_refused(work):
    path = work / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(_st_file(header, bytes(24)))
    with pytest.raises(CheckpointError, match="overlap"):
        safetensors_header(path)


def test_deeply_nested_json_is_a_clean_error(work):
    for name, text in (("deep.safetensors", None), ("deep.json", "{\"a\": " + "[" * 100_000 + "]" * 100_000 + "}")):
        path = work / name
        if text is None:
            path.write_bytes(_st_file("{\"a\": " + "[" * 100_000 + "]" * 100_000 + "}", b""))
        else:
            path.write_text(text)
        with alarm(HANG_S), pytest.raises(CheckpointError):
            exercise(path)


def test_torch_zip_named_safetensors_is_read_by_content(work):
    """spectrum's tensor count looked at the suffix: a torch zip named .safetensors failed as corrupt."""
    path = work / "really-a-zip.safetensors"
    torch.save(_tensors(), path)
    assert sniff(path).kind is Kind.TORCH_ZIP and count_tensors(sniff(path)) is None
    assert set(dict(iter_tensors(sniff(path)))) == set(_tensors())


# --------------------------------------------------------------------------------------- GGUF specifics
def test_gguf_array_length_past_the_end_does_not_hang(seeds, work):
    """gguf's reader loops ``length`` times on empty reads past the end of the file: 2^40 was a hang."""
    b = bytearray(seeds["gguf"])
    i = b.find(b"test.ids") + len(b"test.ids")
    assert struct.unpack_from("<IIQ", b, i) == (9, 5, 3)  # ARRAY of INT32, 3 entries
    struct.pack_into("<IQ", b, i + 4, 0, 2**40)  # ARRAY of UINT8 with 2^40 entries
    path = work / "hang.gguf"
    path.write_bytes(bytes(b))
    with alarm(HANG_S), pytest.raises(CheckpointError, match="runs past the end of the file"):
        sniff(path)
    past_sniff = Sniffed(Kind.GGUF, str(path), files=[str(path)])  # straight into the reader
    with alarm(HANG_S), pytest.raises(CheckpointError, match="runs past the end of the file"):
        list(iter_tensors(past_sniff))
    with alarm(HANG_S), pytest.raises(CheckpointError, match="runs past the end of the file"):
        list(iter_arrays(past_sniff))  # spectrum's numpy reader takes the same checked path


def test_gguf_header_check_accepts_the_seed_and_counts_that_cannot_fit(seeds, work):
    path = work / "seed.gguf"
    path.write_bytes(seeds["gguf"])
    gguf_header_check(path)
    b = bytearray(seeds["gguf"])
    struct.pack_into("<Q", b, 16, 2**62)  # metadata count
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="cannot fit"):
        gguf_header_check(path)


# ------------------------------------------------------------------------------------------- the CLI
runner = CliRunner()


@pytest.mark.parametrize("bad", ["truncated_header", "junk_length", "hostile_shape", "cut_zip", "cut_legacy",
                                 "gguf_hang", "text", "empty"])
@pytest.mark.parametrize("command", ["spectrum", "sites"])
def test_cli_on_bad_files_exits_2_with_one_line(seeds, work, bad, command):
    path = work / "cli" / bad
    path.parent.mkdir(exist_ok=True)
    st_ = seeds["st"]
    n = struct.unpack_from("<Q", st_)[0]
    if bad == "truncated_header":
        path.write_bytes(st_[: 8 + n // 2])
    elif bad == "junk_length":
        path.write_bytes(struct.pack("<Q", 2**40) + st_[8:])
    elif bad == "hostile_shape":
        path.write_bytes(_st_file({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}},
                                  bytes(16)))
    elif bad == "cut_zip":
        path.write_bytes(seeds["zip"][: len(seeds["zip"]) // 2])
    elif bad == "cut_legacy":
        path.write_bytes(seeds["legacy"][:-40])
    elif bad == "gguf_hang":
        b = bytearray(seeds["gguf"])
        i = b.find(b"test.ids") + len(b"test.ids")
        struct.pack_into("<IQ", b, i + 4, 0, 2**40)
        path.write_bytes(bytes(b))
    elif bad == "text":
        path.write_text("not a checkpoint\n" * 10)
    else:
        path.write_bytes(b"")
    with alarm(60):
        r = runner.invoke(app, [command, str(path)])
    assert r.exit_code == EXIT_CHECKPOINT, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: "), r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert path.name in lines[0]
