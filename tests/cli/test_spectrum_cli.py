"""`actsparse spectrum` through typer's CliRunner: files written, refusals, GGUF."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from actsparse_cli.main import app
from probes import spectrum as sp
from probes.errors import EXIT_DEVICE, EXIT_MODEL, EXIT_OUTPUT

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small SVDs gain nothing from threads, and on a busy machine spinning OpenMP threads
    make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "h.0.attn.c_attn.weight": torch.randn(16, 48, generator=g),
        "h.0.attn.c_attn.bias": torch.randn(48, generator=g),
        "h.0.ln_1.weight": torch.ones(16),
        "h.0.mlp.c_fc.weight": torch.randn(16, 64, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
    }


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state_dict(), str(path))
    return path


def test_spectrum_writes_table_summary_manifest(ckpt, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "spectrum.parquet")
    assert sorted(df["name"]) == ["conv.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]
    assert {"alpha", "D", "sigma_mp", "num_spikes", "kappa_nz", "status", "ww_skipped", "non_ww"} <= set(df.columns)
    assert (df["status"] == "success").all()
    assert len(pd.read_csv(out / "spectrum.csv")) == 3
    ref = sp.analyze_tensors(_state_dict().items()).set_index("name")
    assert df.set_index("name")["alpha"].to_dict() == pytest.approx(ref["alpha"].to_dict(), rel=1e-12)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "spectrum" and manifest["options"]["device"] == "cpu"
    assert {k: manifest["svd"][k] for k in ("device", "dtype", "method")} == {"device": "cpu", "dtype": "float64",
                                                                            "method": "auto"}
    assert manifest["checkpoint"]["format"] == "safetensors"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["means_over_ww_layers"]) == set(sp.WW_SUMMARY_METRICS)
    assert summary["counts"]["rows"] == 3


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q"])
    assert r.exit_code == EXIT_OUTPUT
    assert "--force" in r.output and (out / "keep.txt").exists()
    r = runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q", "--force"])
    assert r.exit_code == EXIT_OUTPUT and "did not write" in r.output and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q"]).exit_code == 0
    r = runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q", "--force"])
    assert r.exit_code == 0, r.output
    assert (out / "spectrum.parquet").exists()


def test_split_fused_rows(ckpt, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q", "--split-fused"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "spectrum.parquet")
    parts = df[df["non_ww"]]
    assert parts["part"].tolist() == ["q", "k", "v"] and (parts["N"] == 16).all()
    assert json.loads((out / "summary.json").read_text())["counts"]["non_ww"] == 3


def test_plots(tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({k: v for k, v in _state_dict().items() if k in ("h.0.mlp.c_fc.weight", "conv.weight")}, str(path))
    out = tmp_path / "out"
    r = runner.invoke(app, ["spectrum", str(path), "-o", str(out), "-q", "--plot", "esd"])
    assert r.exit_code == 0, r.output
    for stem in ("alpha_by_layer", "esd/h.0.mlp.c_fc.weight", "esd/conv.weight"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    assert "esd/conv.weight.png" in json.loads((out / "manifest.json").read_text())["files"]


def test_terminal_table_without_output(ckpt):
    r = runner.invoke(app, ["spectrum", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "h.0.mlp.c_fc.weight" in r.output and "WW summary" in r.output


def test_gguf_checkpoint(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w_q = rng.standard_normal((32, 16)).astype(np.float32)
    w_up = rng.standard_normal((64, 16)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", w_q)
    writer.add_tensor("blk.0.ffn_up.weight", w_up)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    r = runner.invoke(app, ["spectrum", str(path), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "spectrum.parquet").set_index("name")
    assert list(df.index) == ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"]
    assert df.loc["blk.0.ffn_up.weight", "shape"] == "64x16"
    ref = sp.analyze_tensors([("blk.0.attn_q.weight", torch.from_numpy(w_q)),
                              ("blk.0.ffn_up.weight", torch.from_numpy(w_up))]).set_index("name")
    assert df["alpha"].to_dict() == pytest.approx(ref["alpha"].to_dict(), rel=1e-12)
    assert json.loads((out / "manifest.json").read_text())["checkpoint"]["format"] == "gguf"


def test_nan_weights_are_reported_and_the_run_continues(tmp_path):
    sd = _state_dict()
    sd["h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    r = runner.invoke(app, ["spectrum", str(path), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "out" / "spectrum.parquet").set_index("name")
    assert df.loc["h.0.mlp.c_fc.weight", "status"] == "non-finite"
    assert df.loc["conv.weight", "status"] == "success"


def test_weightless_file_fails_clearly(tmp_path):
    path = tmp_path / "norms.safetensors"
    save_file({"ln.weight": torch.ones(8), "ln.bias": torch.zeros(8)}, str(path))
    r = runner.invoke(app, ["spectrum", str(path), "-q", "-o", str(tmp_path / "out")])  # -q alone: refused
    assert r.exit_code == EXIT_MODEL
    assert "no weight matrices found among 2 tensor" in r.output


def test_bad_device_and_plot_without_output(ckpt, tmp_path):
    r = runner.invoke(app, ["spectrum", str(ckpt), "--device", "mps", "-q"])
    assert r.exit_code == EXIT_DEVICE and "cpu or cuda" in r.output
    r = runner.invoke(app, ["spectrum", str(ckpt), "--plot", "esd", "-q"])
    assert r.exit_code == 2 and "-o" in r.output


def test_ctrl_c_with_worker_processes_stops_everything_cleanly(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it, the main process stops them,
    exits 130 with one line, and leaves no output folder and no process behind."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import threading
    import time

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    (tmp_path / "model").mkdir()
    save_file({f"l{i}.weight": torch.randn(64, 32, generator=g) for i in range(6)},
              str(tmp_path / "model" / "model.safetensors"))
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, not a background job
        import probes.spectrum as sp
        real = sp.svals_cpu
        def slow(*a, **k):
            print("in-worker", flush=True)
            time.sleep(60)
            return real(*a, **k)
        sp.svals_cpu = slow  # forked workers inherit the patch
        from actsparse_cli.main import app
        app(["spectrum", {str(tmp_path / "model")!r}, "--workers", "2", "-o", {str(out)!r}, "--quiet"])
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # Ctrl-C as soon as a worker computes, while the main process may still be submitting rows: forked
    # workers ignore SIGINT from birth (probes.spectrum._child_ignores_sigint), and the main process never
    # ignores it, so the one Ctrl-C is never dropped.
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    seen = ""
    try:
        while "in-worker" not in seen:
            line = proc.stdout.readline()
            assert line, f"the driver ended before a worker ran: {seen!r}"
            seen += line
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["actsparse: error: interrupted; no output was written"]
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("worker processes outlived the main process")


def test_forked_workers_ignore_ctrl_c_from_birth_while_a_pool_is_open():
    """The at-fork hooks: a child forked while a fork pool is open ignores SIGINT before running any code of
    its own, with SIGINT blocked until then; one forked after the pool closed keeps the default; the parent's
    handler and mask never change. (In a
    fresh interpreter: this one has torch loaded, which makes the pool spawn instead of fork.)"""
    import os
    import subprocess
    import sys
    import textwrap

    if not hasattr(os, "register_at_fork") or not hasattr(os, "fork"):
        pytest.skip("no fork here")
    script = textwrap.dedent("""
        import os, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (xdist workers ignore it)
        def blocked():
            return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        early = []  # an at-fork hook that runs before probes.spectrum's (registered first): is SIGINT blocked?
        os.register_at_fork(after_in_child=lambda: early.append(blocked()))
        import probes.spectrum as sp
        assert "torch" not in sys.modules
        def child_disposition():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, (b"ign" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else b"other")
                         + (b" blocked-early" if early[-1] else b"") + (b" blocked-now" if blocked() else b""))
                os._exit(0)
            os.close(w)
            got = os.read(r, 64).decode()
            os.close(r)
            os.waitpid(pid, 0)
            return got
        before = signal.getsignal(signal.SIGINT)
        runner = sp._PoolRunner(1, "auto", False)
        print("fork" if runner.fork else "spawn")
        print(child_disposition(), signal.getsignal(signal.SIGINT) is before, blocked())
        runner.close()
        print(child_disposition())
        runner.close()
        print(sp._FORK_POOLS[0])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # while the pool is open, SIGINT is blocked across the fork, so a Ctrl-C cannot interrupt the at-fork hooks
    # that run before ours in the child (random's reseeding); after them it is ignored and the mask restored,
    # and the parent's mask is restored too
    assert r.stdout.split("\n")[:4] == ["fork", "ign blocked-early True False", "other", "0"]


def test_a_ctrl_c_during_submit_waits_until_the_pool_has_recorded_its_workers():
    """A Ctrl-C that comes while ``submit`` starts a forked worker is raised once ``submit`` has returned, so
    ``close(abort=True)`` knows every worker it must stop (and the Ctrl-C is not dropped)."""
    import os
    import subprocess
    import sys
    import textwrap

    if not hasattr(os, "register_at_fork") or not hasattr(os, "fork"):
        pytest.skip("no fork here")
    script = textwrap.dedent("""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (xdist workers ignore it)
        import probes.spectrum as sp
        runner = sp._PoolRunner(2, "auto", False)
        assert runner.fork
        real = runner.pool.submit
        def submit(*a, **k):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives while submit is under way
            return real(*a, **k)
        runner.pool.submit = submit
        try:
            runner._submit(pow, 2, 10)
            print("no interrupt")
        except KeyboardInterrupt:
            print("interrupted after submit, workers recorded:", len(runner.pool._processes))
        runner.close(abort=True)
        print("closed")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("interrupted after submit, workers recorded: ") and int(lines[0].split()[-1]) >= 1
    assert lines[1] == "closed"


def test_thread_policy_is_one_blas_thread_and_recorded(ckpt, tmp_path, monkeypatch):
    """One BLAS thread in the main process by default (robust when other jobs share the cores);
    --blas-threads 0 leaves the library default; the manifest says which."""
    import json

    from threadpoolctl import threadpool_info

    import probes.spectrum as sp

    seen = []
    real = sp.analyze_tensors

    def spy(*a, **k):
        seen.append({i["num_threads"] for i in threadpool_info()})
        return real(*a, **k)

    monkeypatch.setattr(sp, "analyze_tensors", spy)
    monkeypatch.delenv("ACTSPARSE_CPU_THREADS", raising=False)
    out = tmp_path / "one"
    assert runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q"]).exit_code == 0
    pol = json.loads((out / "manifest.json").read_text())["thread_policy"]
    assert pol["blas_threads_main"] == 1 and pol["blas_threads_per_worker"] == 1 and pol["cpus_available"] >= 1
    assert pol["compute_thread"] == (pol["cpus_available"] >= 2)  # LAPACK in a helper thread on 2+ CPUs
    # as many LAPACK threads as the CPUs it may use, and the rule that chose them
    assert pol["compute_threads"] == (pol["cpus_available"] if pol["compute_thread"] else 0)
    assert "affinity" in pol["compute_threads_rule"] and set(pol["busy_elsewhere"]) == {"cores", "window_s"}
    assert seen[0] == {1} or not seen[0]  # every BLAS/OpenMP pool at one thread during the analysis
    out = tmp_path / "lib"
    assert runner.invoke(app, ["spectrum", str(ckpt), "-o", str(out), "-q", "--blas-threads", "0"]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["thread_policy"]["blas_threads_main"] == "library default"
