"""Torch-free tensor reading for weight-only commands (probes.arrays)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from probes.arrays import bf16_to_float32, fp8_table, iter_arrays
from probes.errors import CheckpointError
from probes.formats import sniff


def test_bf16_decoding_matches_torch():
    x = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])  # zero, signed zero, inf, a subnormal
    raw = x.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_to_float32(raw), x.float().numpy())


@pytest.mark.parametrize("dtype,args", [("float8_e4m3fn", (4, 3, True)), ("float8_e5m2", (5, 2, False))])
def test_fp8_tables_match_torch(dtype, args):
    tdt = getattr(torch, dtype, None)
    if tdt is None:
        pytest.skip(f"torch has no {dtype}")
    every = torch.arange(256, dtype=torch.uint8).view(tdt).float().numpy()
    table = fp8_table(*args)
    assert np.array_equal(np.isnan(table), np.isnan(every))
    ok = ~np.isnan(every)
    assert np.array_equal(table[ok], every[ok])


def test_safetensors_arrays_equal_the_stored_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(5, 7, generator=g), "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
          "c.weight": torch.randn(6, 2, generator=g, dtype=torch.float64), "h": torch.randn(4, generator=g).half(),
          "ids": torch.arange(9).reshape(3, 3), "flag": torch.tensor([True, False])}
    if hasattr(torch, "float8_e4m3fn"):
        sd["q.weight"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    got = {name: (arr, label) for name, arr, label in iter_arrays(sniff(path))}
    assert set(got) == set(sd)
    for name, t in sd.items():
        arr, label = got[name]
        assert label == str(t.dtype).replace("torch.", "")
        want = t.float().numpy() if t.dtype in (torch.bfloat16, getattr(torch, "float8_e4m3fn", None)) else t.numpy()
        assert arr.shape == tuple(t.shape) and np.array_equal(arr, want), name


def test_torch_pickles_still_come_through_torch(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"x.weight": torch.ones(3, 2)}, path)
    [(name, t, label)] = list(iter_arrays(sniff(path)))
    assert name == "x.weight" and torch.is_tensor(t) and label == "float32"


def test_truncated_safetensors_is_a_clean_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError):
        list(iter_arrays(sniff(path)))


def test_spectrum_of_safetensors_never_imports_torch(tmp_path):
    g = torch.Generator().manual_seed(1)
    save_file({"l.weight": torch.randn(64, 16, generator=g), "m.weight": torch.randn(32, 32, generator=g).half()},
              str(tmp_path / "model.safetensors"))
    code = textwrap.dedent(f"""
        import sys
        from probes.spectrum import analyze_checkpoint
        df = analyze_checkpoint({str(tmp_path)!r})
        assert list(df["dtype"]) == ["float32", "float16"], list(df["dtype"])
        assert (df["status"] == "success").all()
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _shard(sd: dict, folder, n_shards: int):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    names, weight_map = list(sd), {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in names[s::n_shards]}
        save_file(part, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / "model.safetensors.index.json"


def test_sharded_checkpoint_gives_the_in_memory_table(tmp_path):
    from probes.spectrum import analyze_checkpoint, analyze_tensors

    g = torch.Generator().manual_seed(4)
    sd = {f"layers.{i}.{k}.weight": torch.randn(*shape, generator=g)
          for i in range(3) for k, shape in (("q", (24, 24)), ("up", (96, 24)), ("down", (24, 96)))}
    index = _shard(sd, tmp_path / "sharded", 4)
    streamed = analyze_checkpoint(index).set_index("name").sort_index()
    in_memory = analyze_tensors(sd.items()).set_index("name").sort_index()
    assert len(streamed) == 9 and streamed.index.tolist() == in_memory.index.tolist()
    num = in_memory.select_dtypes("number").columns
    assert np.array_equal(streamed[num].astype(float).to_numpy(), in_memory[num].astype(float).to_numpy(), equal_nan=True)


def test_sharded_spectrum_memory_stays_near_one_tensor(tmp_path):
    """16 shards of one 4 MiB tensor each (64 MiB): with one compute thread the peak RSS rise above the
    process's post-import baseline must stay under half the checkpoint (one tensor computing and one queued,
    each its read buffer plus float64 row blocks of at most 2 MiB, the Gram matrix and LAPACK's copy), and
    each further compute thread may add one more such job, at most 16 MiB (4 tensors' worth). The thread
    count is given: by default it follows the free cores, so the bound would depend on the machine's load."""
    g = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.w.weight": torch.randn(2048, 512, generator=g) for i in range(16)}
    index = _shard(sd, tmp_path / "big", 16)
    import json

    def rise(threads: int) -> float:
        code = textwrap.dedent(f"""
            import json
            import pandas, scipy.optimize, scipy.special  # fixed import costs belong to the baseline
            from probes.spectrum import analyze_checkpoint

            def hwm():
                with open("/proc/self/status") as f:
                    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
            base = hwm()
            df = analyze_checkpoint({str(index)!r}, compute_threads={threads})
            print(json.dumps({{"rows": len(df), "rise": hwm() - base}}))
        """)
        env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["rows"] == 16
        return res["rise"]

    one, two = rise(1), rise(2)
    assert one < 32, f"peak RSS rose {one:.0f} MiB for a 64 MiB checkpoint with one compute thread"
    assert two - one < 16, f"a second compute thread added {two - one:.0f} MiB"
