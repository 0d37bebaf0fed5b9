"""Weight spectra: WeightWatcher 0.7.7's ``analyze(mp_fit=True)`` columns, streamed.

Definitions follow WeightWatcher 0.7.7 (CalculatedContent/WeightWatcher: weightwatcher.py,
RMT_Util.py, WW_powerlaw.py; Martin & Mahoney, JMLR 2021, arXiv 1810.01075) so that every
column can be put next to WW's; see docs METRICS.md section 7. The numerics of one weight (its
matrices, the ESD, the power-law and Marchenko-Pastur fits, norms) are ``probes.spectrum_fit``,
re-exported here; this module is the driver: which tensors to read and split, the batching, the
worker pool, and the table.

``analyze_checkpoint`` reads each tensor once (safetensors and GGUF straight into numpy, no torch),
upcasts it alone, and batches same-shape matrices into one batched eigenvalue or SVD call
under a byte budget, so peak memory follows the largest tensor rather than the model. On two or
more CPUs those LAPACK calls run in one helper thread (``_ThreadBatcher``) while the main thread
reads the next tensors and fits the finished rows; the numbers are bit-for-bit the same.
Failed fits are NaN (WW writes -1).
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from probes.errors import DeviceError, ModelError
from probes.arrays import iter_arrays
from probes.formats import Sniffed, count_tensors, sniff
# The numerics of one weight, re-exported: tests, benchmarks and reports call them as probes.spectrum.X.
from probes.spectrum_fit import (  # noqa: F401
    CONV2D_SCALE, ENTROPY_EPS, EPS32, EVALS_THRESH, GRAM_MIN_Q, GRAM_MIN_RATIO, KDE_BANDWIDTH, KDE_MIN_DENSITY,
    KDE_POINTS, MAX_EVALS, MAX_N, MIN_EVALS, MP_PENALTY, OVER_TRAINED, SMALL_N, SMALL_N_MIN_TAIL, UNDER_TRAINED,
    KKT_COLUMNS, KKT_RATIO_THRESHOLD, KKT_RATIO_THRESHOLD_DEFAULT, WEAK_RANK_TOL, MPFit, PowerLawFit, _is_float,
    _to_numpy, _too_large, check_finite, condition_columns, dtype_name, kkt_columns, kkt_eigenvalues,
    esd_columns, fit_marchenko_pastur, fit_power_law, gram_eigvalsh, gram_evals_ok, gram_matrix,
    jensen_shannon_distance, kde_on_grid, mp_density, norm_columns, r_factor, svals_cpu, weight_slices, ww_dims,
    ww_skip_reason, ww_warning)

WW_SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm",
                      "stable_rank", "mp_softrank")
INT_COLUMNS = ("N", "M", "rf", "kkT_rows", "num_evals", "rank_loss", "weak_rank_loss", "num_pl_spikes", "matrix_rank",
               "num_spikes", "rand_num_spikes", "num_traps")
# Column order of the table: identity, WW's details columns, then ours.
COLUMNS = (
    "name", "module", "part", "layer_type", "shape", "dtype", "N", "M", "rf", "Q", "num_evals",
    "sv_max", "sv_min", "rank_loss", "weak_rank_loss", "lambda_max",
    "alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes",
    "num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min",
    "norm", "log_norm", "spectral_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm",
    "stable_rank", "matrix_rank", "entropy",
    "kappa", "kappa_nz", "kappa_nz_tol", "kappa_mp", "cond_nz_over_mp", "kkT_rows", *KKT_COLUMNS,
    "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_num_spikes", "num_traps",
    "rand_sigma_mp", "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min",
    "status", "warning", "ww_skipped", "ww_skip_reason", "non_ww",
)
RANDOM_COLUMNS = COLUMNS[COLUMNS.index("max_rand_eval"):COLUMNS.index("status")]


# --------------------------------------------------------------------------- fused tensors

_QKV_SUFFIXES = ("c_attn.weight", "query_key_value.weight", "qkv_proj.weight", "Wqkv.weight",
                 "attn_qkv.weight", "qkv.weight")


def _qkv_labels(name: str, out: int, config: dict[str, Any]) -> np.ndarray | str:
    """Label (0=q, 1=k, 2=v) of every output row of a fused QKV weight, or why there is none."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("n_embed")
    head_dim = config.get("head_dim") or (hidden // heads if heads and hidden else None)
    if name.endswith("query_key_value.weight"):
        # GPT-NeoX, Bloom and Falcon interleave heads, so the layout needs the config.
        if not head_dim:
            return "query_key_value needs num_attention_heads and hidden_size from config.json"
        if config.get("new_decoder_architecture"):  # Falcon-40B: per KV head, its q heads then k, v
            kv = config.get("num_kv_heads") or config.get("n_head_kv") or heads
            labels = np.repeat(np.tile([0] * (heads // kv) + [1, 2], kv), head_dim)
        elif config.get("multi_query"):  # Falcon-7B: all q heads, one k head, one v head
            labels = np.repeat([0] * heads + [1, 2], head_dim)
        else:  # NeoX, Bloom: q, k, v per head
            labels = np.repeat(np.tile([0, 1, 2], heads), head_dim)
        return labels if labels.size == out else f"{out} rows do not match the config's head layout"
    if head_dim:  # contiguous [q | k | v], k and v possibly grouped (GQA)
        q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
        if q + 2 * kv == out:
            return np.repeat([0, 1, 2], [q, kv, kv])
    if out % 3 == 0:
        return np.repeat([0, 1, 2], out // 3)
    return f"cannot split {out} rows into q, k, v without config.json"


def fused_parts(name: str, W, config: dict[str, Any] | None = None) -> list[tuple[str, Any]] | str:
    """Split a fused weight into the matrices it concatenates, or say why it cannot.

    Fused QKV (GPT-2 ``c_attn`` [in, 3 out], NeoX/Bloom/Falcon ``query_key_value``, Phi-3
    ``qkv_proj``, MPT ``Wqkv``, GGUF ``attn_qkv``) -> q, k, v; ``gate_up_proj`` -> gate, up
    (output halves; GPT-OSS interleaves them); 3-D MoE expert stacks (names with ``expert``
    or GGUF ``_exps``) -> one matrix per expert, then gate/up. Returns ``[(part, matrix)]``,
    ``[]`` when the name is not a fused one. Parts are numpy arrays.
    """
    W = _to_numpy(W)
    cfg = config or {}
    if W.ndim == 3:
        if "expert" not in name and "_exps" not in name:
            return []
        parts: list[tuple[str, Any]] = []
        for e in range(W.shape[0]):
            sub = fused_parts(name, W[e], cfg) if "gate_up" in name else [("", W[e])]
            if isinstance(sub, str):
                return sub
            parts.extend((f"e{e}.{p}" if p else f"e{e}", m) for p, m in sub)
        return parts
    if W.ndim != 2:
        return []
    if "gate_up" in name:
        # Output axis: rows of an nn.Linear weight, unless the rows are the hidden size (GPT-OSS).
        hidden = cfg.get("hidden_size")
        axis = 1 if (cfg.get("model_type") == "gpt_oss" or (hidden and W.shape[0] == hidden != W.shape[1])) else 0
        size = W.shape[axis]
        if size % 2:
            return f"gate_up has an odd size {size}"
        if cfg.get("model_type") == "gpt_oss":  # gate = even, up = odd outputs
            return [(p, np.take(W, np.arange(i, size, 2), axis=axis)) for i, p in enumerate(("gate", "up"))]
        half = size // 2
        return [("gate", np.take(W, np.arange(half), axis=axis)), ("up", np.take(W, np.arange(half, size), axis=axis))]
    if not name.endswith(_QKV_SUFFIXES):
        return []
    # GPT-2's Conv1D stores [in, 3 out]; nn.Linear stores [out, in].
    a, b = W.shape
    axis = 1 if b == 3 * a else 0
    labels = _qkv_labels(name, W.shape[axis], cfg)
    if isinstance(labels, str):
        return labels
    return [(p, np.take(W, np.flatnonzero(labels == i), axis=axis)) for i, p in enumerate("qkv")]


# --------------------------------------------------------------------------- streaming driver

@dataclass
class _Job:
    """One row being computed: identity columns plus the matrix stacks waiting for their SVD."""

    order: tuple[int, int]
    row: dict[str, Any]
    N: int
    M: int
    eps: float
    waiting: int  # stacks still without singular values; the row is finished at 0
    svals: dict[str, np.ndarray] = field(default_factory=dict)
    evals: np.ndarray | None = None  # set when a worker process already finished the row


def _finish_in_worker(job: _Job, stacks: dict[str, np.ndarray], method: str, randomize: bool) -> _Job:
    """A pool worker's task: the spectrum of every stack of one row, then the row itself."""
    for key, stack in stacks.items():
        job.svals[key] = svals_cpu(stack.transpose(0, 2, 1) if stack.shape[1] < stack.shape[2] else stack, method)
    kept: list[np.ndarray] = []
    _finish(job, randomize, lambda row, evals: kept.append(evals))
    job.evals, job.svals, job.waiting = kept[0], {}, 0
    return job


def _one_blas_thread() -> None:
    """Pool worker start-up: one BLAS/OpenMP thread per worker process (no oversubscription), and
    Ctrl-C left to the main process, which stops the pool (no traceback from every worker); SIGTERM
    ends a worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler (fork copies it): just end
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    threadpool_limits(1)


_FORK_POOLS = [0]  # fork-based pools open in this process: their workers ignore Ctrl-C from birth
_FORK_MASK: list = [None]  # the forking thread's signal mask, saved while SIGINT is blocked around a fork


def _block_sigint_for_fork() -> None:
    """``os.register_at_fork`` *before* hook: while a fork pool is open, SIGINT is blocked in the forking thread
    from before ``fork`` until each side's own hook, so a Ctrl-C that comes during the fork can never raise
    KeyboardInterrupt in the child while other at-fork hooks run before ours (``random``'s reseeding, for one:
    a child interrupted there could die holding the pool's queue lock and hang the main process's shutdown).
    In the parent the signal stays pending and is delivered when the mask is restored: it is never dropped."""
    if _FORK_POOLS[0] and hasattr(signal, "pthread_sigmask"):
        _FORK_MASK[0] = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _restore_mask() -> None:
    if _FORK_MASK[0] is not None:
        mask, _FORK_MASK[0] = _FORK_MASK[0], None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _child_ignores_sigint() -> None:
    """``os.register_at_fork`` hook, run in a forked child before any Python code of its own: while a fork
    pool is open, the child ignores SIGINT from its first instruction (Ctrl-C is the main process's, which
    stops the pool), with no window in which the parent itself ignores it; then the mask blocked around the
    fork is restored (a Ctrl-C pending in the child by then is ignored)."""
    if _FORK_POOLS[0]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _restore_mask()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_block_sigint_for_fork, after_in_parent=_restore_mask,
                        after_in_child=_child_ignores_sigint)


class _PoolRunner:
    """The ``_SvdBatcher`` interface over a process pool: each row (its stacks' spectra and its
    fits) is computed in a worker while the main process reads the next tensors. Workers use
    one BLAS thread each, and at most two rows per worker are in flight, so memory stays near a
    few tensors. Workers are forked where that is safe (POSIX, torch not loaded: the numpy path
    for safetensors and GGUF), else spawned (which needs a ``__main__`` guard in scripts)."""

    def __init__(self, workers: int, method: str, randomize: bool):
        import multiprocessing
        import os
        import sys
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        self.workers, self.method, self.randomize = workers, method, randomize
        fork = os.name == "posix" and "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        self.fork = fork
        if fork:
            _FORK_POOLS[0] += 1
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_blas_thread)
        self.pending: dict[int, tuple[_Job, dict[str, np.ndarray]]] = {}
        self.futures = deque()

    def add(self, job: _Job, key: str, stack) -> list[_Job]:
        _, stacks = self.pending.setdefault(id(job), (job, {}))
        stacks[key] = stack
        done = []
        if len(stacks) == job.waiting:
            del self.pending[id(job)]
            self.futures.append(self._submit(_finish_in_worker, job, stacks, self.method, self.randomize))
            while len(self.futures) > 2 * self.workers:
                done.append(self.futures.popleft().result())
        return done

    def _submit(self, *args):
        """``pool.submit``, which may start workers, never interrupted half-way by a Ctrl-C in this process: a
        KeyboardInterrupt between a worker's fork and the pool recording it would leave a worker that
        ``close`` does not know, which can take another worker's stop sentinel and hang the shutdown.

        Forked workers ignore SIGINT from birth (``_child_ignores_sigint``, SIGINT blocked across the fork).
        In this process a Ctrl-C during ``submit`` is only noted, and raised again (``signal.raise_signal``,
        to the handler in place before) once ``submit`` has returned: never dropped. Spawned workers (torch
        loaded, or no fork) start a new interpreter, which keeps an inherited ignore but not a Python
        handler: for them SIGINT is ignored in this process while ``submit`` runs, and a Ctrl-C inside that
        short window is dropped."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self.pool.submit(*args)
        got: list[int] = []
        prev = signal.signal(signal.SIGINT, (lambda signum, frame: got.append(signum)) if self.fork
                             else signal.SIG_IGN)
        try:
            return self.pool.submit(*args)
        finally:
            signal.signal(signal.SIGINT, prev)
            if got:
                signal.raise_signal(signal.SIGINT)  # the Ctrl-C, to the handler it was meant for

    def flush(self) -> list[_Job]:
        done = [f.result() for f in self.futures]
        self.futures.clear()
        return done

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort`` (an error or Ctrl-C in the main process) stops the workers
        at once instead of letting running rows finish."""
        try:
            if abort:
                for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                    proc.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if self.fork and _FORK_POOLS[0] > 0:
                _FORK_POOLS[0] -= 1
                self.fork = False  # counted once, however often close is called


# A stack whose LAPACK work (``_work``: k a b^2 for k matrices a x b, a >= b) is at least this is not
# batched with others on CPU (a 256 x 256 matrix, ~3 ms; numpy's per-call overhead is ~0.02 ms).
_ALONE_WORK = 1 << 24


def _work(stack) -> int:
    k, a, b = stack.shape
    return int(k) * max(int(a), int(b)) * min(int(a), int(b)) ** 2


class _SvdBatcher:
    """Collects [k, a, b] matrix stacks and computes one batched spectrum per shape when the budget fills.

    Pending stacks never exceed ``budget`` bytes (a larger stack runs on its own), so memory
    stays near one tensor. Wide slices are transposed (same singular values, faster LAPACK).
    On CPU: numpy float64 (Gram eigenvalues where accurate, else the SVD; see ``svals_cpu``);
    on CUDA: one float32 ``torch.linalg.svdvals`` call per group.
    """

    def __init__(self, budget: int, device: str = "cpu", method: str = "auto"):
        self.budget = budget
        self.device = device
        self.method = method
        self.pending: dict[tuple[int, int], list[tuple[_Job, str, Any]]] = {}
        self.bytes = 0

    def add(self, job: _Job, key: str, stack) -> list[_Job]:
        """Queue one stack; returns the jobs whose last stack got its singular values.

        On CPU a stack is computed at once, as a group of its own, when batching it brings nothing: when
        two of its size exceed the budget (the next stack of its shape would flush it anyway), or when its
        LAPACK work is large beside the ~0.02 ms a call costs (``_ALONE_WORK``; MiniLM's 384 x 384
        matrices took ~9 ms each, and 5-7 of them batched into one call kept one compute thread busy while
        the other waited). numpy's batched LAPACK/BLAS calls compute each matrix of a stack on its own, so
        no number depends on when or with what a group runs. (On CUDA, where a batched kernel may round
        differently from a single one, the groups stay as they were.)"""
        size = stack.nbytes
        if size >= self.budget or (self.device == "cpu" and (2 * size > self.budget or _work(stack) >= _ALONE_WORK)):
            return self._run([(job, key, stack)])
        done = self.flush() if self.bytes + size > self.budget else []
        self.pending.setdefault(tuple(stack.shape[1:]), []).append((job, key, stack))
        self.bytes += size
        return done

    def flush(self) -> list[_Job]:
        groups, self.pending, self.bytes = self.pending, {}, 0
        return [job for group in groups.values() for job in self._run(group)]

    def _run(self, group: list[tuple[_Job, str, Any]]) -> list[_Job]:
        return self._assign(group, self._compute(group))

    def _compute(self, group: list[tuple[_Job, str, Any]]) -> np.ndarray:
        stack = group[0][2] if len(group) == 1 else np.concatenate([s for _, _, s in group])
        if stack.shape[1] < stack.shape[2]:
            stack = stack.transpose(0, 2, 1)
        if self.device == "cpu":
            return svals_cpu(stack, self.method)
        import torch

        t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device, torch.float32)
        return torch.linalg.svdvals(t).to("cpu", torch.float64).numpy()

    def direct(self, job: _Job, key: str, compute: Callable[[], np.ndarray]) -> list[_Job]:
        """A job's singular values from ``compute()`` (a tall matrix's own path), not batched."""
        return self._assign([(job, key, None)], compute())

    @staticmethod
    def _assign(group: list[tuple[_Job, str, Any]], svals: np.ndarray) -> list[_Job]:
        """Hand each job its slices of ``svals``: ``group`` lists (job, key, its stack, or the stack's
        number of matrices, or None for all of ``svals``)."""
        done, start = [], 0
        for job, key, s in group:
            k = svals.shape[0] if s is None else s if isinstance(s, int) else s.shape[0]
            job.svals[key] = svals[start:start + k]
            start += k
            job.waiting -= 1
            if job.waiting == 0:
                done.append(job)
        return done

    def close(self, abort: bool = False) -> None:
        return None


class _ThreadBatcher(_SvdBatcher):
    """``_SvdBatcher`` whose LAPACK calls run in ``threads`` helper threads (CPU only), overlapping the
    main thread's reading, fits and imports, and each other: numpy releases the GIL inside LAPACK, so on
    two cores two eigenvalue solvers and the Python-level work run at the same time. The same calls
    on the same arrays as ``_SvdBatcher`` (each call single-threaded BLAS, so its result does not depend
    on which thread runs it), started in submission order (the pool's queue) and harvested in that order,
    so the numbers are identical. One group per thread computes and one more waits queued while the main
    thread fits finished rows and reads the next tensor; groups that finished behind a slower, older one
    keep only their singular values (their stacks are released) and do not count, so a long call (MiniLM's
    30522 x 384 embedding) does not leave the other threads idle (memory: about ``threads + 1`` tensors
    more than without the threads; ``tests/unit/test_arrays.py`` bounds it).

    The calls share nothing while they run (no barrier, no spin-wait), so a core that another process keeps
    busy only time-slices them: the threads then get their fair share of the cores instead of waiting for
    each other (``analyze_checkpoint``'s default count, the CPUs this process may use, rests on this).
    """

    workers = 1

    def __init__(self, budget: int, method: str = "auto", threads: int = 1):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(budget, "cpu", method)
        self.threads = max(1, int(threads))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="actsparse-spectrum")
        self.futures: deque = deque()
        # The main thread's own work while it would wait for a group (fitting finished rows): called until
        # it returns False, before each wait.
        self.idle: Callable[[], bool] | None = None

    @property
    def in_flight(self) -> int:
        # One group per thread computing and one more queued, so that a thread that finishes starts the next
        # group at once instead of idling while the main thread fits the finished rows and reads the next
        # tensor (GPT-2-small shapes: ~15-25 ms per matrix, between matrices of 40-75 ms each).
        return self.threads + 1

    def _run(self, group):
        counts = [(job, key, s.shape[0]) for job, key, s in group]  # the stacks go with the call only
        self.futures.append((counts, self.pool.submit(self._compute, group)))
        return self._harvest()

    def direct(self, job, key, compute):
        self.futures.append(([(job, key, None)], self.pool.submit(compute)))
        return self._harvest()

    def _harvest(self, wait_all: bool = False) -> list[_Job]:
        """The jobs of the finished groups at the front of the queue, in submission order. While more
        than ``in_flight`` groups are unfinished (with ``wait_all``: any), does the main thread's ``idle``
        work, else waits until one of them finishes."""
        from concurrent.futures import FIRST_COMPLETED, wait

        done: list[_Job] = []
        while self.futures:
            group, future = self.futures[0]
            if not future.done():
                running = [f for _, f in self.futures if not f.done()]
                if not wait_all and len(running) <= self.in_flight:
                    break
                if self.idle is not None and self.idle():
                    continue
                wait(running, return_when=FIRST_COMPLETED)
                continue
            self.futures.popleft()
            done += self._assign(group, future.result())
        return done

    def flush(self) -> list[_Job]:
        done = super().flush()  # submits the pending groups
        return done + self._harvest(wait_all=True)

    def close(self, abort: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=abort)


def _tall_svals(W, block_bytes: int, method: str) -> np.ndarray:
    """Singular values ``[1, M]`` of a large tall (or wide) 2-D weight without a float64 copy of it:
    Gram eigenvalues accumulated over row blocks where accurate (``method`` auto), else the SVD of its
    R factor (TSQR)."""
    if method == "auto":
        lam = gram_eigvalsh(W, block_bytes)
        if gram_evals_ok(lam):
            return np.sqrt(lam[::-1])[None]
    return svals_cpu(r_factor(W, block_bytes), method)


def _gram_rule() -> str:
    """What ``svd="auto"`` did on CPU, in words, for the table's attrs and the manifest."""
    from probes import gram_refine, lapack

    two = ("; from M = %d, LAPACK's two-stage tridiagonal reduction (dsytrd_sy2sb, dsytrd_sb2st, dsterf)"
           % lapack.TWO_STAGE_MIN if lapack.two_stage() is not None else "")
    if not gram_refine.available():
        return ("eigenvalues of W^T W where N >= %.1f M and lambda_min >= %g lambda_max, else the SVD (no LAPACK "
                "potrf/potrs found to recompute small eigenvalues)" % (GRAM_MIN_Q, GRAM_MIN_RATIO))
    return ("eigenvalues of W^T W where N >= %.1f M or M >= %d; those >= %g lambda_max as they are; smaller ones: "
            "where N < %.1f M, recomputed to %g relative (block inverse iteration and Rayleigh-Ritz on W, "
            "residual-certified), else (or where that fails) the SVD of the matrix; any other matrix: the SVD%s"
            % (GRAM_MIN_Q, gram_refine.REFINE_MIN, GRAM_MIN_RATIO, GRAM_MIN_Q, gram_refine.REFINE_RTOL, two))


def _cpus() -> int:
    """The CPUs this process may use (its affinity mask, capped by a cgroup CPU quota; not the machine's count)."""
    from probes.threads import available_cpus

    return available_cpus()


def resolve_device(device: str | None) -> str:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` -> ``"cpu"`` or ``"cuda:N"``; DeviceError if unavailable.

    Only a CUDA request (or ``auto``) imports torch: the CPU path is numpy and scipy alone.
    """
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu"
    if d != "auto" and not d.startswith("cuda"):
        raise DeviceError(f"spectrum runs on cpu or cuda, not {device!r}", "use --device cpu or --device cuda")
    from probes.loading import resolve_device as resolve_model_device  # the same CUDA checks as model loading

    dev = resolve_model_device(d)
    return "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"


def _is_bias(name: str) -> bool:
    return "bias" in name.rsplit(".", 1)[-1]


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _empty_row(**identity: Any) -> dict[str, Any]:
    row = {c: math.nan for c in COLUMNS}
    row.update(part="", status="", warning="", ww_skipped=False, ww_skip_reason="", non_ww=False)
    row.update(identity)
    return row


def _finish(job: _Job, randomize: bool, on_layer: Callable[[dict, np.ndarray], None] | None) -> dict[str, Any]:
    """Turn a job's singular values into its row: WW's columns, then ours."""
    row, N, M = job.row, job.N, job.M
    evals, esd = esd_columns(job.svals["main"], N, job.eps)
    row.update(esd)
    notes = []
    try:
        fit = fit_power_law(evals)
        row.update(alpha=fit.alpha, xmin=fit.xmin, xmax=fit.xmax, D=fit.D, sigma=fit.sigma,
                   num_pl_spikes=fit.num_pl_spikes, status="success")
        alpha = fit.alpha
    except ValueError as e:
        row["status"], alpha = "failed", math.nan
        notes.append(f"power-law fit failed: {e}")
    try:
        mp = fit_marchenko_pastur(evals, N, M)
        row.update(num_spikes=mp.num_spikes, sigma_mp=mp.sigma_mp, mp_softrank=mp.mp_softrank,
                   W_scale=mp.W_scale, bulk_max=mp.bulk_max, bulk_min=mp.bulk_min)
    except (ValueError, FloatingPointError) as e:
        notes.append(f"MP fit failed: {e}")
    with np.errstate(divide="ignore", invalid="ignore"):
        row.update(norm_columns(evals, alpha, N))
        row.update(condition_columns(job.svals["main"], N, M))
        if row["layer_type"] == "dense":  # arXiv 2309.03004's K K^T statistics, K [neurons, inputs]
            row.update(kkt_columns(job.svals["main"], int(row["kkT_rows"])))
    if randomize:
        row.update(_random_columns(evals, job, N, M, notes))
    row["warning"] = "; ".join(notes) if notes else ww_warning(alpha)
    if on_layer is not None:
        on_layer(row, evals)
    return row


def _random_columns(evals: np.ndarray, job: _Job, N: int, M: int, notes: list[str]) -> dict[str, Any]:
    """WW's randomize=True columns: the ESD of W with its entries shuffled, and its MP fit."""
    rand = np.sort(np.square(job.svals["rand"]).ravel())
    rand2 = np.sort(np.square(job.svals["rand2"]).ravel())
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero matrix: NaN, as WW reports it, no warning
        out = {"max_rand_eval": float(rand.max()), "rand_distance": jensen_shannon_distance(evals, rand2),
               "ww_softrank": float(rand2.max() / evals.max()), "ww_maxdist": float(evals.max() - rand2.max())}
    try:
        mp = fit_marchenko_pastur(rand, N, M)
        out.update(rand_num_spikes=mp.num_spikes, num_traps=mp.num_spikes, rand_sigma_mp=mp.sigma_mp,
                   rand_mp_softrank=mp.mp_softrank, rand_W_scale=mp.W_scale, rand_bulk_max=mp.bulk_max,
                   rand_bulk_min=mp.bulk_min)
    except ValueError as e:
        notes.append(f"randomized MP fit failed: {e}")
    return out


def _shuffled(stack: np.ndarray, reps: int, rng: np.random.RandomState) -> np.ndarray:
    """``reps`` copies of every slice with its entries permuted (np.random.shuffle's draws, in order)."""
    out = []
    for _ in range(reps):
        for s in stack:
            out.append(s.reshape(-1)[rng.permutation(s.size)].reshape(s.shape))
    return np.stack(out)


def analyze_tensors(
    tensors: Iterable[tuple[str, Any]],
    *,
    device: str = "cpu",
    split_fused: bool = False,
    randomize: bool = False,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    total: int | None = None,
    progress: Callable[[int, int | None, str], None] | None = None,
    on_layer: Callable[[dict, np.ndarray], None] | None = None,
    batch_bytes: int = 8 << 20,
    svd: str = "auto",
    workers: int = 1,
    compute_thread: bool | None = None,
    compute_threads: int | None = None,
    frame: bool = True,
):
    """Spectrum table for ``(name, tensor)`` pairs (torch tensors or numpy arrays); see
    :func:`analyze_checkpoint`. ``compute_thread``: run the CPU eigenvalue/SVD calls in helper
    threads that overlap reading and fitting (None: when this process may use 2 or more CPUs and
    ``workers`` is 1), ``compute_threads`` of them (None: 1); the numbers are the same either way.
    ``frame=False`` returns the :class:`SpectrumTable` (no pandas import) instead of the DataFrame."""
    if svd not in ("auto", "exact"):
        raise ValueError(f"svd must be 'auto' or 'exact', not {svd!r}")
    dev = resolve_device(device)
    if workers > 1 and dev != "cpu":
        raise DeviceError(f"--workers {workers} runs CPU processes, but the SVDs are on {dev}",
                          "use --workers 1 with --device cuda")
    if workers > 1:
        runner = _PoolRunner(workers, svd, randomize)
    elif dev == "cpu" and (compute_thread if compute_thread is not None else _cpus() >= 2):
        runner = _ThreadBatcher(batch_bytes, svd, compute_threads or 1)
    else:
        runner = None
    try:
        table = _analyze(tensors, dev, split_fused, randomize, seed, config, total, progress, on_layer, batch_bytes,
                         svd, runner)
    except BaseException:
        if runner is not None:
            runner.close(abort=True)
        raise
    if runner is not None:
        runner.close()
    return table.to_pandas() if frame else table


def _analyze(tensors, dev, split_fused, randomize, seed, config, total, progress, on_layer, batch_bytes, svd, runner):
    from collections import deque

    svd_dtype = np.dtype(np.float64 if dev == "cpu" else np.float32)
    eps = float(np.finfo(svd_dtype).eps)
    item_bytes = svd_dtype.itemsize
    # WW draws from the global numpy RNG for the layers it analyses; the same stream in the
    # same order reproduces its rand_* columns after np.random.seed(seed). Rows WW does not
    # analyse draw from a second stream so they leave that one untouched.
    rng_ww, rng_extra = np.random.RandomState(seed), np.random.RandomState(seed + 1)
    batcher = runner or _SvdBatcher(batch_bytes, dev, svd)
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    notes: dict[str, list[str]] = {}
    seen = 0

    def submit(order, name, part, W, source_dtype, non_ww):
        N, M, rf, layer_type = ww_dims(W.shape)
        reason = "" if non_ww else ww_skip_reason(name, N, M, rf)
        row = _empty_row(name=name + (f"[{part}]" if part else ""), module=_module(name), part=part,
                         layer_type=layer_type, shape="x".join(map(str, W.shape)), dtype=source_dtype,
                         N=N, M=M, rf=rf, Q=N / M, ww_skipped=bool(reason), ww_skip_reason=reason, non_ww=non_ww,
                         kkT_rows=neuron_rows(name, W.shape, config) if W.ndim == 2 else math.nan)
        rows[order] = row
        if _too_large(N, M, rf):
            row.update(status="skipped", warning="not computed: beyond WeightWatcher's size limits "
                                                 f"(M*rf <= {MAX_EVALS}, N <= {MAX_N})")
            return []
        job = _Job(order, row, N, M, eps, waiting=3 if randomize else 1)
        try:
            # A large tall or wide matrix is reduced to its Gram matrix or R factor one row block
            # at a time (same spectrum, far less memory); randomize needs the entries themselves,
            # so it keeps the full slices.
            tall = W.ndim == 2 and N >= 2 * M and N * M * item_bytes >= batch_bytes and not randomize
            if tall:
                check_finite(W, name)
                if isinstance(batcher, _SvdBatcher) and dev == "cpu":  # in the helper thread if there is one
                    return batcher.direct(job, "main", lambda: _tall_svals(W, batch_bytes, svd))
                if dev == "cpu" and svd == "auto":
                    lam = gram_eigvalsh(W, batch_bytes)
                    if gram_evals_ok(lam):
                        job.svals["main"] = np.sqrt(lam[::-1])[None]
                        job.waiting = 0
                        return [job]
            slices = r_factor(W, batch_bytes) if tall else weight_slices(W, name, svd_dtype)
        except ModelError as e:
            row.update(status="non-finite", warning=e.problem)
            return []
        done = batcher.add(job, "main", slices)
        if randomize:
            rng = rng_extra if (non_ww or reason) else rng_ww
            reps = 5 if M * rf < 100 else 1  # WW: five replicas when there are few eigenvalues
            done += batcher.add(job, "rand", _shuffled(slices, reps, rng))
            done += batcher.add(job, "rand2", _shuffled(slices, 1, rng))
        return done

    def complete_one(job):
        if job.evals is None:
            rows[job.order] = _finish(job, randomize, on_layer)
        else:  # finished by a pool worker
            rows[job.order] = job.row
            if on_layer is not None:
                on_layer(job.row, job.evals)

    # With compute threads, finished rows wait in ``backlog`` and are fitted when the main thread would
    # otherwise wait for them (``_ThreadBatcher.idle``): reading and queueing the next tensor comes first,
    # so a burst of finished rows never leaves the threads without work. Same rows, same order.
    backlog: deque = deque()

    def fit_next() -> bool:
        if not backlog:
            return False
        complete_one(backlog.popleft())
        return True

    threaded = isinstance(batcher, _ThreadBatcher)
    if threaded:
        batcher.idle = fit_next

    def complete(jobs):
        backlog.extend(jobs)
        while not threaded and fit_next():  # without compute threads, at once
            pass

    for t_index, item in enumerate(tensors):
        name, t = item[0], item[1]
        seen += 1
        dtype = item[2] if len(item) > 2 else dtype_name(t)  # readers that upcast say what was stored
        # Scalars, norms, biases and integer buffers (position ids) are skipped silently, as WW does.
        weight = t.ndim >= 2 and _is_float(t) and not _is_bias(name)
        if weight and 0 in t.shape:  # a checkpoint can hold an empty one
            notes.setdefault("empty tensors (a dimension of 0) not analysed", []).append(name)
        elif weight:
            t = _to_numpy(t)
            parts = fused_parts(name, t, config) if split_fused and t.ndim in (2, 3) else []
            if isinstance(parts, str):
                notes.setdefault(f"not split: {parts}", []).append(name)
                parts = []
            if t.ndim in (2, 4):
                complete(submit((t_index, 0), name, "", t, dtype, False))
            elif not parts:
                hint = " (--split-fused splits MoE expert stacks)" if t.ndim == 3 and not split_fused else ""
                notes.setdefault(f"{t.ndim}-D tensors not analysed{hint}", []).append(name)
            for p_index, (part, W) in enumerate(parts, start=1):
                complete(submit((t_index, p_index), name, part, W, dtype, True))
        del t
        if progress is not None:
            progress(t_index + 1, total, name)
    complete(batcher.flush())
    while fit_next():
        pass

    if not rows:
        raise ModelError(f"no weight matrices found among {seen} tensor(s)",
                         "spectrum needs 2-D or 4-D weights (or 3-D MoE experts with --split-fused)")
    table = SpectrumTable([rows[k] for k in sorted(rows)], randomize)
    table.attrs["notes"] = [f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''} ({len(v)})"
                            for k, v in notes.items()]
    table.attrs["compute_thread"] = isinstance(runner, _ThreadBatcher)
    table.attrs["compute_threads"] = runner.threads if isinstance(runner, _ThreadBatcher) else 0
    table.attrs["svd"] = {"device": dev, "dtype": str(svd_dtype), "method": svd,
                          "workers": runner.workers if runner else 1,
                          "gram": _gram_rule() if svd == "auto" and dev == "cpu" else "SVD"}
    return table


class SpectrumTable:
    """The spectrum table without pandas: one dict per row (every key of ``COLUMNS``; ``columns`` are the
    ones in the table: without ``RANDOM_COLUMNS`` unless ``randomize``) and ``attrs`` (notes, svd, thread
    policy). ``to_pandas()`` is the DataFrame :func:`analyze_checkpoint` returns, built exactly as before
    (``INT_COLUMNS`` as ``Int64``); ``reports.spectrum_table`` writes the same CSV and Parquet bytes as that
    DataFrame's ``reports.tables.write_table`` without importing pandas (0.25-0.45 s of a 2 s command)."""

    def __init__(self, rows: list[dict[str, Any]], randomize: bool):
        self.rows = rows
        self.randomize = randomize
        self.columns = [c for c in COLUMNS if randomize or c not in RANDOM_COLUMNS]
        self.attrs: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self.rows]

    def ww_rows(self) -> list[dict[str, Any]]:
        """The rows WeightWatcher itself would report (not skipped, not split parts), as ``ww_rows``."""
        return [r for r in self.rows if not r["ww_skipped"] and not r["non_ww"]]

    def to_pandas(self):
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=list(COLUMNS))
        if not self.randomize:
            df = df.drop(columns=list(RANDOM_COLUMNS))
        for c in INT_COLUMNS:
            if c in df:
                df[c] = df[c].astype("Int64")
        df.attrs.update(self.attrs)
        return df


# GPT-2-style checkpoints store these weights as transformers' Conv1D, [in, out]: the neurons (the rows of
# K in an nn.Linear [out, in]) are their columns.
_CONV1D_MODEL_TYPES = ("gpt2", "imagegpt", "decision_transformer")
_CONV1D_SUFFIXES = ("c_fc.weight", "c_proj.weight", "c_attn.weight", "q_attn.weight")


def neuron_rows(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> int:
    """How many neurons (output units) a 2-D weight has: its rows as an ``nn.Linear`` ``[out, in]``; its
    columns for GPT-2's Conv1D ``[in, out]`` (config.json ``model_type`` gpt2 and a ``c_fc``/``c_proj``/
    ``c_attn`` name). K K^T of arXiv 2309.03004 is neurons x neurons."""
    base = name.split("[", 1)[0]
    if (config or {}).get("model_type") in _CONV1D_MODEL_TYPES and base.endswith(_CONV1D_SUFFIXES):
        return int(shape[1])
    return int(shape[0])


def load_config(sn: Sniffed) -> dict[str, Any] | None:
    """The checkpoint's config.json (to split fused tensors, and GPT-2's Conv1D orientation), if there is one."""
    if not sn.config_path:
        return None
    try:
        cfg = json.loads(Path(sn.config_path).read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 / JSON, nested too deep: no split
        return None
    return cfg if isinstance(cfg, dict) else None


def _uninitialised(n: int) -> np.ndarray:
    """A read buffer of ``n`` bytes that is not zero-filled first (``bytearray`` is): the read writes every
    byte (a short read is an error). 0.35 ms less per 768 x 3072 float32 tensor."""
    return np.empty(n, np.uint8)


def _checkpoint_arrays(sn: Sniffed, unsafe_pickle: bool, split_fused: bool):
    """``probes.arrays.iter_arrays``, except that 2-D/4-D float weights of safetensors files beyond
    WeightWatcher's size limits (e.g. GPT-2's 50257 x 768 token embedding) are not read: their rows
    need only the shape (status ``skipped``), so they come as a zero-strided placeholder of that shape.
    That is 150 MB of GPT-2's 500 MB not read, and not held (peak memory). With ``split_fused`` every
    tensor is read (a fused tensor's parts can be within the limits)."""
    from probes import arrays
    from probes.formats import Kind, is_safetensors, safetensors_raw_tensors

    if (split_fused or sn.kind in (Kind.GGUF, Kind.HUB_ID) or not sn.files
            or not all(is_safetensors(f) for f in sn.files)):
        yield from iter_arrays(sn, unsafe_pickle=unsafe_pickle)
        return

    def beyond_limits(name: str, st_dtype: str, shape: list[int]) -> bool:
        if len(shape) not in (2, 4) or 0 in shape or not st_dtype.startswith(("F", "BF")) or _is_bias(name):
            return False
        N, M, rf, _ = ww_dims(shape)
        return _too_large(N, M, rf)

    for f in sn.files:
        for name, st_dtype, shape, raw in safetensors_raw_tensors(f, skip=beyond_limits, buffer=_uninitialised):
            label = arrays._ST_WIDENED.get(st_dtype) or np.dtype(arrays._ST_NUMPY.get(st_dtype, np.uint8)).name
            if raw is None:
                yield name, np.broadcast_to(np.zeros((), np.float32), shape), label
            else:
                yield name, arrays._decode(raw, st_dtype, shape, f"{f}: tensor {name!r}"), label


def analyze_checkpoint(
    source: str | Path | Sniffed,
    *,
    device: str = "cpu",
    split_fused: bool = False,
    randomize: bool = False,
    seed: int = 0,
    unsafe_pickle: bool = False,
    progress: Callable[[int, int | None, str], None] | None = None,
    on_layer: Callable[[dict, np.ndarray], None] | None = None,
    batch_bytes: int = 8 << 20,
    svd: str = "auto",
    workers: int = 1,
    blas_threads: int | None = 1,
    compute_thread: bool | None = None,
    compute_threads: int | None = None,
    frame: bool = True,
):
    """One row per weight matrix of a checkpoint, with WW's column names and ours (a DataFrame; with
    ``frame=False`` the same table as a :class:`SpectrumTable`, without importing pandas).

    Reads every tensor once through ``probes.arrays.iter_arrays`` (numpy, no torch, for
    safetensors and GGUF). Rows WW would skip
    (size limits, names not ending in ``.weight``) are kept with ``ww_skipped``; those past
    WW's size limits are not computed (status ``skipped``). ``split_fused`` adds ``non_ww``
    rows for the parts of fused tensors. ``randomize`` adds WW's rand_* columns, seeded.
    On CPU everything is numpy float64 (``svd="auto"``: Gram eigenvalues where they are as
    accurate as the SVD, see ``svals_cpu``; ``"exact"``: the SVD everywhere); on CUDA the SVD is
    float32; fits are always float64. ``workers > 1`` computes rows in that many processes.
    ``progress(done, total, name)`` is called per tensor, ``on_layer(row, evals)`` per row.
    Notes on tensors not analysed are in ``df.attrs['notes']``.

    ``blas_threads`` (default 1) caps the BLAS/OpenMP threads of this process (workers always use
    one each): on a 2-core machine with another CPU-bound job, MiniLM took 1.8-1.9 s with one
    thread and 2.9-3.9 s with the default two (OpenMP threads spin-waiting for a busy core); the
    batched eigen/SVD calls gain little from a second thread when the machine is quiet. None: the
    library default. ``compute_thread`` (default: when 2 or more CPUs are available and ``workers`` is
    1) runs those calls in helper threads, overlapping reading, fits and imports; the numbers are
    identical. ``compute_threads`` (default: ``probes.threads.independent_threads()``, the CPUs this process
    may use, or ``ACTSPARSE_CPU_THREADS``) is how many such threads run at once, whatever other processes
    do: the calls are single-threaded BLAS and share nothing while they run, so a core another job keeps
    busy time-slices them (each thread gets its fair share) instead of making threads spin-wait for each
    other, and no more threads run than the CPUs this process may use. (Beside one CPU-bound process on a
    2-core machine, 12 blocks of GPT-2-small shapes: 2.76-3.27 s with two threads against 3.43-3.82 s with
    one; beside two, 3.65-3.87 s against 5.13-5.46 s.) The policy, and the cores other processes kept busy
    while the command ran, are recorded in ``df.attrs['thread_policy']``.
    """
    import contextlib

    from probes.threads import busy_elsewhere, independent_threads

    sn = source if isinstance(source, Sniffed) else sniff(source)
    chosen = independent_threads(_cpus()) if compute_threads is None else {"threads": compute_threads,
                                                                          "rule": "given"}
    limit: contextlib.AbstractContextManager = contextlib.nullcontext()
    if blas_threads:
        try:
            from threadpoolctl import threadpool_limits

            limit = threadpool_limits(blas_threads)
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            pass
    with limit:
        df = analyze_tensors(
            _checkpoint_arrays(sn, unsafe_pickle, split_fused), device=device, split_fused=split_fused,
            randomize=randomize, seed=seed, config=load_config(sn),  # fused splits, and Conv1D's orientation
            total=count_tensors(sn), progress=progress, on_layer=on_layer, batch_bytes=batch_bytes, svd=svd,
            workers=workers, compute_thread=compute_thread, compute_threads=chosen["threads"], frame=frame)
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # no load average (Windows)
        load = None
    df.attrs["thread_policy"] = {"blas_threads_main": blas_threads or "library default",
                                 "blas_threads_per_worker": 1, "workers": workers, "cpus_available": _cpus(),
                                 "compute_thread": bool(df.attrs.get("compute_thread")),
                                 "compute_threads": int(df.attrs.get("compute_threads", 0)),
                                 "compute_threads_rule": chosen["rule"], "load_average_1min": load,
                                 "busy_elsewhere": busy_elsewhere() or {"cores": None, "window_s": None}}
    return df


def ww_rows(df):
    """The rows WeightWatcher itself would report (not skipped, not split parts): a DataFrame's rows, or a
    :class:`SpectrumTable`'s as a list of dicts."""
    if isinstance(df, SpectrumTable):
        return df.ww_rows()
    return df[~df["ww_skipped"].astype(bool) & ~df["non_ww"].astype(bool)]


def summarize(df) -> dict[str, float | None]:
    """WW's get_summary: means over WW's layers of its seven metrics, skipping NaN (failed fits).

    For a :class:`SpectrumTable` the same numbers without pandas: pandas' ``Series.mean`` of a float64
    column without NaN is numpy's (pairwise) sum divided by the count, which is what is computed here
    (``tests/unit/test_spectrum_fast.py`` compares the two)."""
    if isinstance(df, SpectrumTable):
        rows = df.ww_rows()
        out: dict[str, float | None] = {}
        for metric in WW_SUMMARY_METRICS:
            vals = np.array([r[metric] for r in rows], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            out[metric] = float(vals.sum() / np.float64(vals.size)) if vals.size else None
        return out
    rows = ww_rows(df)
    out = {}
    for metric in WW_SUMMARY_METRICS:
        vals = rows[metric].astype(float)
        vals = vals[np.isfinite(vals)]
        out[metric] = float(vals.mean()) if len(vals) else None
    return out


def table_counts(df) -> dict[str, int]:
    """The counts of ``summary.json`` and the manifest: rows, WW's rows, ``ww_skipped``, ``non_ww`` and one
    ``status_<s>`` per status, most frequent first (ties in order of first appearance, as pandas'
    ``value_counts``), for a DataFrame or a :class:`SpectrumTable`."""
    if isinstance(df, SpectrumTable):
        statuses = df.column("status")
        ww_skipped, non_ww = sum(bool(v) for v in df.column("ww_skipped")), sum(bool(v) for v in df.column("non_ww"))
    else:
        statuses = list(df["status"])
        ww_skipped, non_ww = int(df["ww_skipped"].sum()), int(df["non_ww"].sum())
    seen: dict[Any, int] = {}
    for v in statuses:
        seen[v] = seen.get(v, 0) + 1
    by_count = sorted(seen.items(), key=lambda kv: -kv[1])  # stable: ties keep their first appearance
    return {"rows": len(df), "ww_rows": len(ww_rows(df)), "ww_skipped": int(ww_skipped), "non_ww": int(non_ww),
            **{f"status_{k}": int(v) for k, v in by_count}}
