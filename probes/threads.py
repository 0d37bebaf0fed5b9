"""How many CPU threads torch uses for a command's forward and backward passes.

torch's default is one intra-op thread per core. On a machine where other processes keep cores
busy (a CI runner, a shared node), its OpenMP threads wait for each other at every barrier: the
bundled model's activation-sparsity pass over 8192 tokens took 6.3 s with two threads and 1.3 s
with one on a 2-core machine at load average 6.7 (and `drift`'s reductions 4 s instead of 0.06 s).
So on CPU the count is the cores this process may use minus the cores the load average says are
taken, at least 1. A user's own ``OMP_NUM_THREADS`` or ``ACTSPARSE_CPU_THREADS`` wins. The choice
is recorded in the manifest (``model.source.cpu_threads``).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "ACTSPARSE_CPU_THREADS"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_cpu_threads(cpus: int | None = None, load: float | None = None,
                       env: dict[str, str] | None = None) -> dict[str, Any]:
    """The thread count and why: ``{"threads": n, "rule": ..., "cpus_available": c, "load_average_1min": l}``."""
    env = os.environ if env is None else env
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average (Windows): assume the cores are free
            load = 0.0
    own = env.get(ENV)
    if own:
        try:
            n = int(own)
        except ValueError:
            n = 0
        if n >= 1:
            return {"threads": n, "rule": f"{ENV}={n}", "cpus_available": cpus, "load_average_1min": round(load, 2)}
    if env.get("OMP_NUM_THREADS"):
        return {"threads": None, "rule": f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (torch's own reading)",
                "cpus_available": cpus, "load_average_1min": round(load, 2)}
    busy = min(cpus - 1, int(load + 0.5))  # cores other processes keep busy (rounded), never all of them
    n = max(1, cpus - busy)
    return {"threads": n, "rule": "available cores minus the 1-minute load average (at least 1)",
            "cpus_available": cpus, "load_average_1min": round(load, 2)}


def free_cpus(cpus: int | None = None, load: float | None = None) -> dict[str, Any]:
    """The CPUs this process may use minus those the 1-minute load average says other processes keep
    busy (rounded), at least 1: how many single-threaded compute calls can run at once without
    oversubscribing. ``ACTSPARSE_CPU_THREADS`` wins (``OMP_NUM_THREADS`` does not: it sets BLAS threads
    per call, not how many calls run). ``{"threads": n, "rule": ..., "cpus_available", "load_average_1min"}``."""
    return choose_cpu_threads(cpus, load, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})


def apply_cpu_threads() -> dict[str, Any]:
    """Choose (``choose_cpu_threads``) and set torch's intra-op thread count; returns the choice."""
    import torch

    choice = choose_cpu_threads()
    if choice["threads"] is not None:
        torch.set_num_threads(int(choice["threads"]))
    choice["threads_in_use"] = torch.get_num_threads()
    return choice
