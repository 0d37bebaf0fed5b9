"""How many CPU threads torch uses for a command's forward and backward passes.

torch's default is one intra-op thread per core. On a machine where other processes keep cores
busy (a CI runner, a shared node), its OpenMP threads wait for each other at every barrier: the
bundled model's activation-sparsity pass over 8192 tokens took 6.3 s with two threads and 1.3 s
with one on a 2-core machine at load average 6.7 (and `drift`'s reductions 4 s instead of 0.06 s).
So on CPU the count is the cores this process may use minus the cores the load average says are
taken, at least 1. A user's own ``OMP_NUM_THREADS`` or ``ACTSPARSE_CPU_THREADS`` wins. The choice
is recorded in the manifest (``model.source.cpu_threads``).

Calls that never wait for each other (the spectrum's single-threaded LAPACK calls) have no barrier to stall
at, so ``independent_threads`` gives them every CPU this process may use, whatever the load.
"""

from __future__ import annotations

import math
import os
from typing import Any

ENV = "ACTSPARSE_CPU_THREADS"


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a CPU quota of its cgroup (a container started
    with ``--cpus 2`` on a 64-core host may run on all 64 but gets two cores' worth of time; 64 threads there
    would wait for each other at every barrier). The quota is rounded up, at least 1."""
    n = affinity_cpus()
    quota = cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota is not None else n


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time this process's cgroup may use (quota / period), or None without a quota: cgroup v2's
    ``cpu.max`` ("max 100000" = none), else v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none), in the
    process's own cgroup folder (from ``/proc/self/cgroup``) or, inside a container that shows its cgroup as the
    root, the top one. The smallest quota found wins."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    v1 = [line.split(":", 2)[2] for line in lines
          if len(line.split(":", 2)) == 3 and "cpu" in line.split(":", 2)[1].split(",")]
    found: list[float] = []

    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    for rel in v2:
        for folder in dict.fromkeys((os.path.join(root, rel.lstrip("/")), root)):
            text = read(os.path.join(folder, "cpu.max"))
            if text:
                quota, _, period = text.partition(" ")
                try:
                    if quota != "max" and float(period) > 0:
                        found.append(float(quota) / float(period))
                except ValueError:
                    pass
                break
    for rel in v1:
        for folder in dict.fromkeys((os.path.join(root, "cpu", rel.lstrip("/")), os.path.join(root, "cpu"),
                                     os.path.join(root, "cpu,cpuacct", rel.lstrip("/")),
                                     os.path.join(root, "cpu,cpuacct"))):
            quota = read(os.path.join(folder, "cpu.cfs_quota_us"))
            period = read(os.path.join(folder, "cpu.cfs_period_us"))
            if quota and period:
                try:
                    if float(quota) > 0 and float(period) > 0:
                        found.append(float(quota) / float(period))
                except ValueError:
                    pass
                break
    return min(found) if found else None


def user_count(env: dict[str, str] | None = None) -> int | None:
    """The count the user set in ``ACTSPARSE_CPU_THREADS`` (a whole number >= 1), else None."""
    own = (os.environ if env is None else env).get(ENV)
    try:
        n = int(own) if own else 0
    except ValueError:
        n = 0
    return n if n >= 1 else None


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
    n = user_count(env)
    if n:
        return {"threads": n, "rule": f"{ENV}={n}", "cpus_available": cpus, "load_average_1min": round(load, 2)}
    if env.get("OMP_NUM_THREADS"):
        return {"threads": None, "rule": f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (torch's own reading)",
                "cpus_available": cpus, "load_average_1min": round(load, 2)}
    busy = min(cpus - 1, int(load + 0.5))  # cores other processes keep busy (rounded), never all of them
    n = max(1, cpus - busy)
    return {"threads": n, "rule": "available cores minus the 1-minute load average (at least 1)",
            "cpus_available": cpus, "load_average_1min": round(load, 2)}


def _cpu_sample() -> tuple | None:
    """``(monotonic seconds, busy jiffies, total jiffies, this process's CPU seconds)`` over the CPUs this
    process may run on (``/proc/stat``'s per-CPU lines; busy = all but idle and iowait), or None where there
    is no ``/proc/stat``."""
    import time

    try:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        busy = total = 0
        with open("/proc/stat", "rb") as f:
            for line in f:
                if not line.startswith(b"cpu"):
                    break
                head, *vals = line.split()
                if head == b"cpu" or (allowed is not None and int(head[3:]) not in allowed):
                    continue
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
        t = os.times()
        return time.monotonic(), busy, total, t.user + t.system
    except (OSError, ValueError, IndexError):
        return None


_MARK = _cpu_sample()  # taken when this module is first imported: the CLI imports it as it starts
MIN_WINDOW_S = 0.15  # /proc/stat counts in 10 ms ticks: a shorter window says little


def busy_elsewhere(since: tuple | None = None, now: tuple | None = None) -> dict[str, Any] | None:
    """How many cores other processes kept busy between ``since`` (default: this module's import) and now:
    the busy share of the allowed CPUs' time in ``/proc/stat`` minus this process's own CPU time, in cores.
    Unlike the 1-minute load average, which still counts a job that ended a minute ago (or a benchmark's
    previous run), this is what the cores did just now. None without ``/proc/stat`` or a window under
    ``MIN_WINDOW_S``."""
    start = _MARK if since is None else since
    now = _cpu_sample() if now is None else now
    if start is None or now is None or now[0] - start[0] < MIN_WINDOW_S or now[2] <= start[2]:
        return None
    wall = now[0] - start[0]
    cores = affinity_cpus()  # /proc/stat's ticks are those of the affinity CPUs
    busy_cores = (now[1] - start[1]) / (now[2] - start[2]) * cores
    own = (now[3] - start[3]) / wall
    return {"cores": round(max(0.0, busy_cores - own), 2), "window_s": round(wall, 3)}


def independent_threads(cpus: int | None = None) -> dict[str, Any]:
    """How many independent single-threaded compute calls to run at once (the spectrum's LAPACK calls):
    ``ACTSPARSE_CPU_THREADS`` when set, else the CPUs this process may use, whatever other processes do.
    Unlike torch's OpenMP team (``choose_cpu_threads``), such calls never wait for each other, so a core
    that another process keeps busy only time-slices them: one thread more than the free cores gets this
    process its fair share instead of spinning (``OMP_NUM_THREADS`` sets BLAS threads per call, not how
    many calls run, and is not read here). ``{"threads": n, "rule": ...}``."""
    cpus = available_cpus() if cpus is None else cpus
    n = user_count()
    if n:
        return {"threads": n, "rule": f"{ENV}={n}"}
    return {"threads": max(1, int(cpus)),
            "rule": "the CPUs this process may use (its affinity mask), whatever other processes do: the calls are "
                    "independent and single-threaded, so a busy core time-slices them instead of making them spin"}


def apply_cpu_threads() -> dict[str, Any]:
    """Choose (``choose_cpu_threads``) and set torch's intra-op thread count; returns the choice. Unless the
    user fixed the count (``ACTSPARSE_CPU_THREADS``, ``OMP_NUM_THREADS``), ``follow_cpu_threads`` re-reads it
    between forward passes; ``history`` lists ``[seconds, threads]`` as it changes."""
    import time

    import torch

    choice = choose_cpu_threads()
    if choice["threads"] is not None:
        torch.set_num_threads(int(choice["threads"]))
    choice["threads_in_use"] = torch.get_num_threads()
    choice["history"] = [[0.0, choice["threads_in_use"]]]
    _FOLLOW.clear()
    if choice["threads"] is not None and not os.environ.get(ENV):
        choice["rule"] += "; re-read between forward passes from /proc/stat (the last second or more)"
        _FOLLOW.update(choice=choice, last=_cpu_sample(), t0=time.monotonic())
    return choice


FOLLOW_WINDOW_S = 1.0  # follow_cpu_threads reads /proc/stat at most this often
_FOLLOW: dict[str, Any] = {}


def stop_following() -> None:
    """Leave torch's thread count as it is from now on (the CLI calls this when a command ends)."""
    _FOLLOW.clear()


def follow_cpu_threads() -> None:
    """Between forward passes: the CPUs available minus the cores other processes kept busy since the last
    reading (at least ``FOLLOW_WINDOW_S`` ago), at least 1, as torch's thread count. The first count comes
    from the 1-minute load average, which still counts a job that ended a minute ago (a CI step just before:
    one thread for the whole run) or misses one that just started. A no-op unless ``apply_cpu_threads`` chose
    the count itself, and on machines without ``/proc/stat``."""
    choice, last = _FOLLOW.get("choice"), _FOLLOW.get("last")
    if choice is None or last is None:
        return
    now = _cpu_sample()
    if now is None or now[0] - last[0] < FOLLOW_WINDOW_S:
        return
    seen = busy_elsewhere(last, now)
    if seen is None:
        return
    import torch

    cpus = choice.get("cpus_available") or available_cpus()
    n = max(1, cpus - min(cpus - 1, int(seen["cores"] + 0.5)))
    _FOLLOW["last"] = now
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        choice["threads_in_use"] = n
        choice["history"].append([round(now[0] - _FOLLOW["t0"], 2), n])
