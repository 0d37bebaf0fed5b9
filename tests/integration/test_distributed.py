"""Data-parallel ``measure`` under torchrun (2 CPU ranks, gloo) and ``--device-map``.

The torchrun run must give the single-process tables: exactly for counts, to 1e-12 for float
means (only the order of the float64 sums differs). Each torchrun start costs a few seconds
(two torch imports on a small machine), so there are two of them in all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes import distributed
from probes.embedded import default_checkpoint
from probes.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_DEVICE
from probes.sparsity import ActivationSparsityProbe

runner = CliRunner()
# 1125 tokens in windows of 64: 18 windows (the last one short, 37 tokens), 5 batches of 4 (the last one of 2):
# the ranks get 3 and 2 batches, so the split is uneven and the short window and batch land on rank 0.
# (Windows of 64, not the default 256: the same split at a quarter of the forward and backward work.)
RUN = ["measure", "--max-tokens", "1125", "--max-length", "64", "--batch-size", "4", "--grad", "--seed", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--monitor-interval", "0.1"]
COUNT_COLUMNS = {"n_tokens", "width", "dead_neurons", "always_on_neurons", "n_chunks", "nonfinite", "layer",
                 "n_grad_tokens", "nonfinite_grad", "n_batches", "in_features"}


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("WORLD_SIZE", None)
    return env


def _assert_same_table(single: pd.DataFrame, merged: pd.DataFrame, what: str) -> None:
    assert list(single.columns) == list(merged.columns), what
    assert len(single) == len(merged), what
    for col in single.columns:
        a, b = single[col].tolist(), merged[col].tolist()
        # counts, count / count fractions, histogram quantiles and maxima: the same on both sides
        exact = col in COUNT_COLUMNS or not pd.api.types.is_float_dtype(single[col]) or col.endswith("_hist") or \
            col.startswith(("zero_frac", "near_zero_frac@", "neg_frac", "dead_frac", "always_on_frac", "max_abs",
                            "deriv_zero_frac", "deriv_small_frac", "eff_grad", "deriv_sparsity", "spike_max",
                            "eta_abs_max"))
        for x, y in zip(a, b):
            if isinstance(x, float) and math.isnan(x):
                assert isinstance(y, float) and math.isnan(y), (what, col)
            elif exact:
                assert x == y, (what, col, x, y)
            else:
                assert y == pytest.approx(x, rel=1e-12, abs=1e-15), (what, col, x, y)


@pytest.fixture(scope="module")
def single_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    r = runner.invoke(app, [*RUN, "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_torchrun_two_ranks_equals_single_process(single_out, tmp_path):
    out = tmp_path / "dp"
    r = subprocess.run([*TORCHRUN, "-m", "actsparse_cli", *RUN, "-o", str(out)], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # rank 0 alone prints the table; rank 1 is quiet
    assert r.stdout.count("activation sparsity:") == 1, r.stdout
    assert r.stdout.count("gradient sparsity") == 1, r.stdout
    for table in ("sparsity", "gradients", "spikes"):
        _assert_same_table(pd.read_parquet(single_out / f"{table}.parquet"), pd.read_parquet(out / f"{table}.parquet"),
                           table)
    m1 = json.loads((single_out / "manifest.json").read_text())["measurement"]
    m2 = json.loads((out / "manifest.json").read_text())["measurement"]
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m2["backend"] == "gloo"
    assert (m2["n_windows"], m2["n_counted_tokens"]) == (m1["n_windows"], m1["n_counted_tokens"]) == (18, 1125)
    assert m2["windows_per_rank"] == [10, 8] and sum(m2["counted_tokens_per_rank"]) == m1["n_counted_tokens"]
    assert m2["counted_tokens_per_rank"] == [9 * 64 + 37, 8 * 64]  # the short window on rank 0


def test_torchrun_rank_failure_stops_every_rank(tmp_path):
    """A rank with no windows merges fine; a rank that fails before a merge stops the others (no hang):
    the failing rank raises its own error, rank 0 a PeerFailed with that message and exit code."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import sys
        import time
        import torch
        from probes import distributed
        from probes.errors import DataError
        from probes.sparsity import ActivationSparsityProbe

        try:
            with distributed.session(torch.device("cpu")) as ctx:
                probes = {}
                if ctx.rank == 0:  # rank 1 saw no windows
                    probes["a"] = ActivationSparsityProbe(3)
                    probes["a"].update(torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]]))
                merged, extra = ctx.merge_probes(probes, extra=ctx.rank)
                print(f"rank {ctx.rank} merged n_tokens={merged['a'].to_row()['n_tokens']} extra={extra}",
                      flush=True)
                if ctx.rank == 1:
                    raise DataError("rank one has a bad shard", "fix the shard")
                ctx.merge_probes(probes)  # rank 0 waits here for a rank that has given up
                print("rank 0 merged twice", flush=True)
        except distributed.ReportedByRankZero as e:
            print(f"rank {ctx.rank} quiet exit {e.exit_code}", flush=True)
            sys.exit(e.exit_code)
        except Exception as e:
            print(f"rank {ctx.rank} error {type(e).__name__}: {e}", flush=True)
            if ctx.rank == 1:
                time.sleep(1)  # torchrun stops the other ranks once one exits: let rank 0 print first
            sys.exit(getattr(e, "exit_code", 1))
    """))
    r = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, env=_env(), timeout=120)
    out = r.stdout
    assert "rank 0 merged n_tokens=2 extra=[0, 1]" in out and "rank 1 merged n_tokens=2 extra=[0, 1]" in out, out
    assert "rank 0 error PeerFailed: rank 1 of 2 failed: rank one has a bad shard -- fix: fix the shard" in out, out
    assert "rank 1 error DataError: rank one has a bad shard" in out, out
    assert f"exitcode  : {EXIT_DATA}" in r.stderr, r.stderr  # both ranks exit with the failing rank's code
    assert "merged twice" not in out and "quiet" not in out and r.returncode != 0


# ------------------------------------------------------------------ without torchrun
def test_shard_windows_keeps_the_single_process_batches():
    windows = list(range(11))  # batches of 3: [0,1,2] [3,4,5] [6,7,8] [9,10]
    r0, r1 = (distributed.shard_windows(windows, 3, r, 2) for r in range(2))
    assert r0 == [0, 1, 2, 6, 7, 8] and r1 == [3, 4, 5, 9, 10]
    assert distributed.shard_windows(windows, 3, 0, 1) == windows
    assert distributed.shard_windows([0], 4, 1, 2) == []  # a rank with nothing to do
    assert sorted(distributed.shard_windows(windows, 2, 0, 3) + distributed.shard_windows(windows, 2, 1, 3)
                  + distributed.shard_windows(windows, 2, 2, 3)) == windows


def test_merge_probe_dicts_equals_one_pass_and_handles_missing_sites():
    torch.manual_seed(0)
    xs = [torch.relu(torch.randn(2, 9, 16)) for _ in range(5)]
    one = ActivationSparsityProbe(16)
    for x in xs:
        one.update(x)
    parts = [ActivationSparsityProbe(16) for _ in range(2)]
    for i, x in enumerate(xs):
        parts[i % 2].update(x)
    only_b = ActivationSparsityProbe(4)
    only_b.update(torch.ones(1, 8, 4))
    per_rank = [{"a": parts[0]}, {}, {"a": parts[1], "b": only_b}]  # rank 1: no windows; "b": one rank only
    before = parts[0].to_row()
    merged = distributed.merge_probe_dicts(per_rank)
    assert parts[0].to_row() == before  # inputs are not modified
    assert list(merged) == ["a", "b"]
    ra, rb = merged["a"].to_row(), one.to_row()
    for k, v in rb.items():
        assert ra[k] == pytest.approx(v, rel=1e-12), k
    assert merged["b"].to_row() == only_b.to_row()


def test_single_process_context_passes_through(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    p = ActivationSparsityProbe(4)
    with distributed.session() as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active) == (0, 1, True, False)
        assert distributed.current() is None  # probes.measure does not split anything
        merged, extra = ctx.merge_probes({"a": p}, extra=7)
        assert merged["a"] is p and extra == [7]
        assert ctx.shard([1, 2, 3], 2) == [1, 2, 3]
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    q = distributed.probe_to_cpu(p)
    assert q is not p and all(t.device.type == "cpu" for t in q.state.values())


def test_distributed_module_imports_neither_cli_packages_nor_torch():
    code = ("import sys, probes.distributed; "
            "bad = [m for m in ('typer', 'rich', 'torch') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ --device-map
def test_device_map_auto_gives_the_same_table(tmp_path):
    pytest.importorskip("accelerate")
    base, mapped = tmp_path / "base", tmp_path / "mapped"
    args = ["measure", "--max-tokens", "1024", "-q"]
    r1 = runner.invoke(app, [*args, "-o", str(base)])
    r2 = runner.invoke(app, [*args, "--device-map", "auto", "-o", str(mapped)])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    pd.testing.assert_frame_equal(pd.read_parquet(base / "sparsity.parquet"),
                                  pd.read_parquet(mapped / "sparsity.parquet"))
    man = json.loads((mapped / "manifest.json").read_text())
    assert man["model"]["source"]["device_map"] == "auto"


def test_device_map_refuses_a_bare_state_dict():
    ckpt = Path(default_checkpoint())
    r = runner.invoke(app, ["measure", str(ckpt / "model.safetensors"), "--config", str(ckpt), "--device-map", "auto"])
    assert r.exit_code == EXIT_CHECKPOINT, r.output
    assert "--device-map needs a Hugging Face model folder" in r.stderr and "Traceback" not in r.output


def test_device_map_without_accelerate_is_a_clear_error(monkeypatch):
    import importlib.util

    from probes.errors import ActsparseError
    from probes.loading import load_checkpoint

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ActsparseError) as e:
        load_checkpoint(default_checkpoint(), device="cpu", device_map="auto")
    assert e.value.exit_code == EXIT_DEVICE and "pip install accelerate" in e.value.one_line()


@pytest.mark.parametrize("command", ["grad", "spectrum", "massive"])
def test_other_commands_refuse_torchrun(monkeypatch, tmp_path, command):
    """Only measure splits its work over ranks; any other command under torchrun would run in full
    on every rank and race for the output folder, so it stops at once with exit 6 and writes nothing."""
    from typer.testing import CliRunner

    from actsparse_cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(app, [command, str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 6, r.output
    assert "torchrun" in r.output and " -- fix: " in r.output
    assert not (tmp_path / "out").exists()


def test_collective_timeout_from_the_environment(monkeypatch):
    from datetime import timedelta

    from probes.distributed import TIMEOUT_ENV, collective_timeout
    from probes.errors import DeviceError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(seconds=1800)
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(DeviceError, match=TIMEOUT_ENV):
            collective_timeout()
