"""Keep freed heap memory for reuse in a short-lived command (glibc only): ``keep_freed_memory``.

``actsparse spectrum`` allocates and frees buffers of a few MiB per weight (the bytes read, float64 row
blocks, Gram matrices, LAPACK's copies). With glibc's defaults the freed memory at the top of the heap is
returned to the system once more than the (dynamic) trim threshold is free, and the next buffer faults its
pages in again: ~64,000 minor page faults and 0.15-0.19 s of system time for GPT-2-small shapes (4 blocks),
against ~14,000 and 0.06-0.09 s when freed memory stays in the heap, 4 % of the command's time on one core
(6 interleaved pairs: 1.62 s against 1.70 s), for +25 MiB peak RSS (``benchmarks/README.md``).

The commands that run a model on the CPU (``measure``, ``pplp``, ``massive``, ``grad``, ...: through
``actsparse_cli.loading_opts.load``, once the model is loaded) set the same policy: every forward pass frees
and allocates the same activation buffers, and with glibc's defaults the bundled model's 8 x 256-token
forward took ~1,500 minor page faults (6 MB of fresh pages) and ~2 ms of system time a pass; with the policy,
none (``benchmarks/README.md``, 2026-12-04 late). Not on a GPU: there the freed host copies of the weights
would stay resident for nothing.

So the command sets ``M_MMAP_THRESHOLD`` (buffers below it come from the heap, and are reused after a free)
and ``M_TRIM_THRESHOLD`` (how much free memory at the top of the heap is kept) with ``mallopt`` at its
start. Larger buffers are mapped and unmapped as before, so a 7B model's 100 MiB tensors do not stay
resident after use. This is a process-wide setting, so it is made by the command, not by the library
functions a user's program calls; a user's own ``MALLOC_*_`` / ``GLIBC_TUNABLES`` settings win.

``actsparse spectrum`` also asks numpy not to ``madvise`` its large buffers for transparent huge pages
(``small_numpy_pages``): each first touch of a 2 MiB huge page zeroes all of it in the kernel, and on a VM
whose free memory goes back to the host that took 0.3-0.8 s of system time in one run of two (all-MiniLM-L6-v2
beside a CPU-bound process, ten interleaved pairs: wall 0.89-1.67 s with huge pages, 0.85-0.99 s without;
system time 0.07-0.76 s against 0.07-0.11 s; GPT-2-small shapes, 12 blocks: the same or faster quiet and
loaded). A user's own ``NUMPY_MADVISE_HUGEPAGE`` wins.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> dict[str, Any]:
    """Set glibc's mmap and trim thresholds for this process; returns what was done, for the manifest."""
    if not sys.platform.startswith("linux"):
        return {"set": False, "why": f"not glibc ({sys.platform})"}
    user = [k for k in _USER_SETTINGS if os.environ.get(k)]
    if user:
        return {"set": False, "why": f"left to the user's {', '.join(user)}"}
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        glibc = version().decode()
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return {"set": False, "why": "not glibc (no gnu_get_libc_version / mallopt)"}
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    out: dict[str, Any] = {"set": ok, "allocator": f"glibc {glibc}", "mmap_threshold": int(mmap_threshold),
                           "trim_threshold": int(trim_threshold)}
    if not ok:
        out["why"] = "mallopt refused a value"
    return out


def small_numpy_pages() -> dict[str, Any]:
    """Turn off numpy's ``madvise(MADV_HUGEPAGE)`` for its large buffers in this process (module docstring);
    returns what was done, for the manifest (``numpy_hugepage``)."""
    own = os.environ.get("NUMPY_MADVISE_HUGEPAGE")
    if own is not None:
        return {"numpy_hugepage": f"left to the user's NUMPY_MADVISE_HUGEPAGE={own}"}
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        try:  # numpy 1.x
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return {"numpy_hugepage": "unchanged (this numpy cannot say)"}
    _set_madvise_hugepage(False)
    return {"numpy_hugepage": False}
