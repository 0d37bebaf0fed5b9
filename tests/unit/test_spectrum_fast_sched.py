"""How ``actsparse spectrum`` schedules its LAPACK calls (issue 16, goal 1), and that no number depends on it:
large stacks are computed at once instead of waiting to be batched, a slow group does not stop the main thread
from queueing more work, the main thread fits finished rows while it would otherwise wait, and the command's
helper thread really imports pandas."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from probes import spectrum as sp

REPO = Path(__file__).resolve().parents[2]


def _job(order=0, waiting=1):
    return sp._Job((order, 0), {}, 4, 4, 1e-16, waiting=waiting)


def _mixed_weights(seed=0):
    """Shapes on every path at a 256 KiB budget with ``_ALONE_WORK`` 2^18: batched small stacks, square and
    near-square matrices over the work threshold, a stack over half the budget, the tall (row-blocked Gram)
    path, a conv kernel, a wide matrix."""
    rng = np.random.default_rng(seed)
    w = {}
    for i in range(2):
        w[f"blocks.{i}.attn.weight"] = rng.standard_normal((24, 24)).astype(np.float32)
        w[f"blocks.{i}.big.weight"] = rng.standard_normal((80, 80)).astype(np.float32)  # square: the SVD
        w[f"blocks.{i}.mlp.weight"] = rng.standard_normal((96, 24)).astype(np.float32)
        w[f"blocks.{i}.mid.weight"] = rng.standard_normal((120, 80)).astype(np.float32)  # Gram eigenvalues
        w[f"blocks.{i}.half.weight"] = rng.standard_normal((200, 100)).astype(np.float32)  # > half the budget
        w[f"blocks.{i}.tall.weight"] = rng.standard_normal((400, 100)).astype(np.float32)  # row-blocked Gram
    w["conv.weight"] = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    w["wide.weight"] = rng.standard_normal((40, 130)).astype(np.float32)
    return w


def test_work_and_the_alone_threshold():
    assert sp._work(np.empty((1, 384, 384))) == 384 ** 3 >= sp._ALONE_WORK  # MiniLM's square weights
    assert sp._work(np.empty((2, 64, 300))) == 2 * 300 * 64 ** 2  # wide: the larger side times the smaller squared
    assert sp._work(np.empty((1, 128, 128))) < sp._ALONE_WORK  # the bundled model's: still batched


def test_stacks_that_gain_nothing_from_batching_run_at_once():
    """On CPU a stack over half the budget, or with LAPACK work >= _ALONE_WORK, is its own group at once (the
    synchronous batcher returns its job from add); small ones still wait for their group; on CUDA only a stack
    over the budget goes alone, as before."""
    b = sp._SvdBatcher(budget=1 << 20)
    assert b.add(_job(), "main", np.eye(300)[None]) and not b.pending  # 720 KB > half of 1 MiB
    assert b.add(_job(), "main", np.eye(260)[None]) and not b.pending  # 260^3 >= _ALONE_WORK
    small = _job()
    assert b.add(small, "main", np.eye(16)[None]) == [] and b.pending  # batched
    assert b.flush() == [small] and small.svals["main"].shape == (1, 16)
    gpu = sp._SvdBatcher(budget=1 << 20, device="cuda")
    gpu._run = lambda group: [j for j, _, _ in group]  # nothing runs: only the grouping is looked at
    assert gpu.add(_job(), "main", np.eye(300)[None]) == [] and gpu.pending


@pytest.mark.parametrize("svd", ["auto", "exact"])
def test_no_number_depends_on_the_grouping_or_the_threads(svd, monkeypatch):
    """Every cell bit for bit the same with the old grouping (everything under the budget batched), the new one
    (large stacks alone), synchronously and in one or two compute threads, randomize included; on_layer sees
    every row once, in the same order with or without threads (large stacks now finish earlier than when they
    waited for their group, so their rows come sooner than with the old grouping)."""
    import pandas as pd

    w = list(_mixed_weights().items())
    runs, alone = {}, 1 << 18  # small matrices, so that the test is quick: 80^3 and 120 x 80^2 go alone
    for label, work, thread, threads in (("old-sync", 1 << 62, False, 1), ("new-sync", alone, False, 1),
                                         ("new-1", alone, True, 1), ("new-2", alone, True, 2)):
        monkeypatch.setattr(sp, "_ALONE_WORK", work)  # 1 << 62: every stack under half the budget batched
        seen = []
        df = sp.analyze_tensors(w, svd=svd, batch_bytes=256 << 10, randomize=True, seed=3, compute_thread=thread,
                                compute_threads=threads, on_layer=lambda r, e: seen.append(r["name"]))
        runs[label] = (df, seen)
    ref, ref_seen = runs["old-sync"]
    assert (ref["status"] == "success").sum() == 14
    for label, (df, seen) in runs.items():
        pd.testing.assert_frame_equal(ref, df, check_exact=True, obj=label)
        assert sorted(seen) == sorted(ref_seen) == sorted(ref.loc[ref["status"] == "success", "name"]), label
        assert label == "old-sync" or seen == runs["new-sync"][1], label


def test_a_slow_group_does_not_stop_the_queue():
    """Groups that finished behind a slower, older one do not count against ``in_flight``: the main thread
    keeps submitting (before: it waited for the oldest, leaving the other thread idle), and the jobs still
    come back in submission order."""
    b = sp._ThreadBatcher(budget=1 << 20, threads=2)
    gate = threading.Event()
    release = threading.Timer(10, gate.set)  # a safety net: the test fails on time instead of hanging
    release.start()
    try:
        slow = _job(0)
        assert b.direct(slow, "main", lambda: (gate.wait(), np.ones((1, 2)))[1]) == []
        quick = [_job(i) for i in range(1, 8)]
        t0 = time.perf_counter()
        for j in quick:
            assert b.direct(j, "main", lambda: np.ones((1, 2))) == []  # none harvested before the slow one
            deadline = time.perf_counter() + 5
            while sum(not f.done() for _, f in b.futures) > 1 and time.perf_counter() < deadline:
                time.sleep(0.001)
        assert time.perf_counter() - t0 < 5 and len(b.futures) == 8 > b.in_flight
        gate.set()
        assert b.flush() == [slow, *quick]
    finally:
        release.cancel()
        gate.set()
        b.close()


def test_the_main_thread_fits_while_it_would_wait():
    """While more than ``in_flight`` groups are unfinished, ``_harvest`` calls ``idle`` (the rows' fits) until it
    says there is nothing left, and only then waits; ``flush`` does the same until the last group is in."""
    b = sp._ThreadBatcher(budget=1 << 20, threads=1)
    gate = threading.Event()
    release = threading.Timer(10, gate.set)
    release.start()
    calls = []

    def idle() -> bool:
        calls.append(time.perf_counter())
        if len(calls) < 3:
            return True
        gate.set()
        return False

    b.idle = idle
    gated = lambda: (gate.wait(), np.ones((1, 2)))[1]  # noqa: E731
    try:
        jobs = [_job(i) for i in range(3)]
        assert b.direct(jobs[0], "main", gated) == [] and b.direct(jobs[1], "main", gated) == [] and not calls
        got = b.direct(jobs[2], "main", gated)  # three unfinished > in_flight 2: idle work first, then the wait
        assert len(calls) == 3 and gate.is_set()
        assert got + b.flush() == jobs
        gate.clear()
        calls.clear()
        more = [_job(i) for i in range(3, 5)]
        assert b.direct(more[0], "main", gated) == [] and b.direct(more[1], "main", gated) == [] and not calls
        assert b.flush() == more and len(calls) >= 3  # flush: idle work while any group is unfinished
    finally:
        release.cancel()
        gate.set()
        b.close()


def test_finished_groups_keep_no_stacks():
    """A queued group holds its stacks only until its call ran: the queue keeps counts, not arrays."""
    b = sp._ThreadBatcher(budget=1 << 20, threads=1)
    gate = threading.Event()
    real = b._compute
    b._compute = lambda group: (gate.wait(10), real(group))[1]
    try:
        job = _job()
        assert b.add(job, "main", np.eye(300)[None]) == []
        (group, _), = b.futures
        assert group == [(job, "main", 1)]
        gate.set()
        assert b.flush() == [job] and job.svals["main"].shape == (1, 300)
    finally:
        gate.set()
        b.close()


def test_the_command_really_prefetches_pandas():
    """``_prefetch_imports`` imports pandas in its (non-daemon) helper thread where the command needs it; it
    starts no thread when pandas is not needed or with --workers > 1 (forked worker processes). (Until
    2026-12-03 the helper died at once on an UnboundLocalError and imported nothing.)"""
    code = """
import sys, threading
from actsparse_cli.spectrum_cmd import _prefetch_imports
assert "pandas" not in sys.modules
assert _prefetch_imports(pandas=True, workers=2) is None and _prefetch_imports(pandas=False) is None
assert threading.active_count() == 1
thread = _prefetch_imports(pandas=True)
assert not thread.daemon
thread.join(60)
assert "pandas" in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_calls_start_in_submission_order_and_errors_reach_the_caller():
    """With one helper thread the calls start in submission order (results are harvested in that order, so
    an overtaken call would hold back every finished row); with two, two calls run at once (they meet at
    a barrier). An error in a call is raised to the caller."""
    b = sp._ThreadBatcher(budget=1 << 20, threads=1)
    started, main = [], threading.get_ident()

    def compute(i):
        started.append((i, threading.get_ident()))
        time.sleep(0.002)
        return np.full((1, 2), float(i))

    try:
        jobs = [_job(i) for i in range(12)]
        done = []
        for i, j in enumerate(jobs):
            done += b.direct(j, "main", lambda i=i: compute(i))
        done += b.flush()
        assert done == jobs and [float(j.svals["main"][0, 0]) for j in jobs] == list(range(12))
        assert [i for i, _ in started] == list(range(12)) and all(t != main for _, t in started)
    finally:
        b.close()

    two = sp._ThreadBatcher(budget=1 << 20, threads=2)
    both = threading.Barrier(2, timeout=5)

    def meet():
        both.wait()  # only passes when two calls run at the same time
        return np.ones((1, 2))

    try:
        jobs = [_job(i) for i in range(2)]
        done = two.direct(jobs[0], "main", meet) + two.direct(jobs[1], "main", meet) + two.flush()
        assert done == jobs and two.in_flight == 3
    finally:
        two.close()

    failing = sp._ThreadBatcher(budget=1 << 20, threads=1)
    try:
        def boom():
            raise FloatingPointError("bad matrix")

        with pytest.raises(FloatingPointError, match="bad matrix"):
            failing.direct(_job(), "main", boom)
            failing.flush()
    finally:
        failing.close()
