"""Data-parallel runs under ``torchrun``: split the token windows over ranks, merge the probes.

``torchrun --nproc-per-node N -m actsparse_cli measure ...`` starts N processes with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set. Each rank loads the model, builds the same window
list, measures its share of it, and the probes' streaming states are merged with
``torch.distributed`` (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``). Every rank
ends with the merged probes; rank 0 alone writes and prints.

The split is by *batches*: the windows are cut into batches of ``batch_size`` exactly as a
single process would, and rank r takes batches r, r + N, r + 2N, ... So every forward pass
sees the same batch (same padding, same shapes) as in one process, and count metrics of the
merged probes equal the single-process ones exactly (given kernels that are deterministic for a
batch); float sums differ only by summation order.

Failures: every collective is an ``exchange`` (``all_gather_object`` of an error slot and a
payload). A rank that fails inside ``session`` joins the next exchange with its error instead
of a payload, so no rank waits forever for one that has given up: all ranks stop with the
failing rank's exit code (see ``session`` for which rank prints what). A rank that dies outright
breaks the connection and the others raise ``PeerFailed``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from probes.errors import EXIT_DEVICE, ActsparseError, DeviceError

QUIET_EXIT_GRACE_S = 1.0
SHARD_SCHEME = "round robin over batches: rank r measures batches r, r+N, r+2N, ... of --batch-size windows"


def launched() -> bool:
    """True inside a multi-process ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", _env_int("RANK", 0))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


TIMEOUT_ENV = "ACTSPARSE_DIST_TIMEOUT_S"


def collective_timeout():
    """How long a rank waits at a merge for the others (a rank that hangs, rather than fails, holds
    the rest this long): ``ACTSPARSE_DIST_TIMEOUT_S`` seconds, default 1800 (torch's own default).
    Ranks finish their shares at different times, so keep it above the longest share's run time."""
    from datetime import timedelta

    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else 1800.0
    except ValueError:
        raise DeviceError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds", f"e.g. {TIMEOUT_ENV}=600") from None
    if not seconds > 0:
        raise DeviceError(f"{TIMEOUT_ENV}={raw!r} must be positive", f"e.g. {TIMEOUT_ENV}=600")
    return timedelta(seconds=seconds)


def backend_for(device) -> str:
    """nccl for CUDA devices, gloo for everything else (CPU)."""
    return "nccl" if getattr(device, "type", str(device).split(":")[0]) == "cuda" else "gloo"


class PeerFailed(ActsparseError):
    """Another rank failed (or died); this rank stops too."""

    exit_code = EXIT_DEVICE


class ReportedByRankZero(ActsparseError):
    """On a non-zero rank: a failure (this rank's or another's) that rank 0 knows of and reports, so
    this rank stops without printing."""


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (``world_size`` 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    _owns_group: bool = field(default=False, repr=False)
    _open: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True while collectives can run (a process group of more than one rank is up)."""
        return self._open and self.world_size > 1

    # ------------------------------------------------------------------ the split
    def shard(self, windows: Sequence[Any], batch_size: int) -> list[Any]:
        """This rank's windows: batches rank, rank + world, ... (see the module docstring)."""
        return shard_windows(windows, batch_size, self.rank, self.world_size)

    def split(self, windows: Sequence[Any], batch_size: int) -> list[list[Any]]:
        """Every rank's windows (all ranks build the same list, so no communication is needed)."""
        return [shard_windows(windows, batch_size, r, self.world_size) for r in range(self.world_size)]

    # ------------------------------------------------------------------ collectives
    def exchange(self, payload: Any = None) -> list[Any]:
        """Every rank's ``payload``, in rank order. If another rank failed instead (``announce_failure``),
        raises ``PeerFailed`` on rank 0 (which prints it) and ``ReportedByRankZero`` elsewhere."""
        if not self.active:
            return [payload]
        gathered = self._all_gather(None, payload)
        failed = [(r, slot) for r, (slot, _) in enumerate(gathered) if slot is not None]
        if failed:
            r, (msg, code) = failed[0]
            raise (PeerFailed if self.is_main else ReportedByRankZero)(f"rank {r} of {self.world_size} failed: {msg}",
                                                                       exit_code=code)
        return [p for _, p in gathered]

    def announce_failure(self, error: BaseException) -> bool:
        """Join the other ranks' next exchange with ``error`` instead of a payload, so they stop too.

        True when rank 0 failed with the same message: it prints it, so this rank need not."""
        if not self.active:
            return False
        line = _error_line(error)
        try:
            gathered = self._all_gather((line, int(getattr(error, "exit_code", 1))), None)
        except PeerFailed:
            return False
        first = gathered[0][0]
        return not self.is_main and first is not None and first[0] == line

    def _all_gather(self, slot: Any, payload: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, (slot, payload))
        except Exception as e:  # a rank died: the connection is gone
            self._open = False
            raise PeerFailed(f"rank {self.rank} of {self.world_size}: another rank stopped in the middle of the run "
                             f"({_first_line(e)})", "see the other ranks' messages") from e
        return gathered

    def merge_probes(self, probes: dict[str, Any], extra: Any = None) -> tuple[dict[str, Any], list[Any]]:
        """Merge this rank's probes with every other rank's (on CPU, in rank order).

        Returns the merged probes (the same on every rank) and every rank's ``extra``."""
        if not self.active:
            return probes, [extra]
        gathered = self.exchange({"probes": {k: probe_to_cpu(p) for k, p in probes.items()}, "extra": extra})
        return merge_probe_dicts([g["probes"] for g in gathered]), [g["extra"] for g in gathered]

    def close(self) -> None:
        self._open = False
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


_current: DistContext | None = None


def current() -> DistContext | None:
    """The context of the ``session`` in progress, if any (``probes.measure`` uses it by default)."""
    return _current if _current is not None and _current.active else None


def shard_windows(windows: Sequence[Any], batch_size: int, rank: int, world_size: int) -> list[Any]:
    """Windows of batches ``rank``, ``rank + world_size``, ...; re-batched with ``batch_size`` they
    give exactly those batches (only the last batch overall can be short, and it stays last)."""
    if world_size <= 1:
        return list(windows)
    bs = max(1, int(batch_size))
    out: list[Any] = []
    for b in range(rank, -(-len(windows) // bs), world_size):
        out.extend(windows[b * bs:(b + 1) * bs])
    return out


def merge_probe_dicts(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One probe per key: the first rank's that saw the site, merged with the later ranks' in rank
    order. A site some rank never saw (no windows, or a path its batches did not take) is simply
    absent from that rank's dict. Inputs are not modified."""
    merged: dict[str, Any] = {}
    for probes in per_rank:
        for key, p in probes.items():
            if key in merged:
                merged[key].merge(p)
            else:
                merged[key] = copy.deepcopy(p)
    return merged


def probe_to_cpu(probe: Any) -> Any:
    """A shallow copy of ``probe`` whose tensors (also inside dicts, lists and tuples) are on the CPU."""
    q = copy.copy(probe)
    q.__dict__.update({k: _to_cpu(v) for k, v in vars(probe).items()})
    return q


def _to_cpu(v: Any) -> Any:
    import torch

    if torch.is_tensor(v):
        return v.detach().cpu()
    if type(v) is dict:
        return {k: _to_cpu(x) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_to_cpu(x) for x in v)
    return v


def init(device=None) -> DistContext:
    """Join the ``torchrun`` process group (a no-op single-process context when not launched).

    ``device``: the resolved device of this rank; CUDA picks nccl (and ``cuda:LOCAL_RANK`` as the
    current device), anything else gloo. An already initialised group is used as it is."""
    global _current
    if not launched():
        _current = DistContext(_open=True)
        return _current
    import torch
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        backend = backend_for(device if device is not None else "cpu")
        if backend == "nccl":
            if not dist.is_nccl_available():
                raise DeviceError("torchrun on CUDA needs the nccl backend, which this torch build lacks",
                                  "run with --device cpu (gloo) or install a CUDA build of torch")
            torch.cuda.set_device(device if getattr(device, "index", None) is not None else local_rank())
        try:
            dist.init_process_group(backend=backend, timeout=collective_timeout())
        except Exception as e:
            raise DeviceError(f"cannot join the torchrun process group ({backend}): {_first_line(e)}",
                              "check the torchrun rendezvous (--standalone, or a free --master-port)") from e
        owns = True
    _current = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank(),
                           backend=dist.get_backend(), _owns_group=owns, _open=True)
    return _current


@contextlib.contextmanager
def session(device=None) -> Iterator[DistContext]:
    """``init``, then run the body; an error on this rank is announced to the others at their next
    exchange (so none of them hangs), and the process group is destroyed at the end.

    Who prints what (so that a failure is reported once, yet never lost when torchrun stops the
    other ranks as soon as one exits): a failing rank raises its own error, except a non-zero rank
    whose message is the same as rank 0's, which raises ``ReportedByRankZero`` (stop quietly);
    ranks that did not fail raise ``PeerFailed`` on rank 0 and ``ReportedByRankZero`` elsewhere."""
    global _current
    ctx = init(device)
    try:
        try:
            yield ctx
        except (PeerFailed, ReportedByRankZero):
            raise
        except Exception as e:
            if ctx.announce_failure(e):
                raise ReportedByRankZero(_error_line(e), exit_code=int(getattr(e, "exit_code", 1))) from e
            raise
    except ReportedByRankZero:
        # torchrun stops every rank as soon as one exits: give rank 0 the time to print first
        time.sleep(QUIET_EXIT_GRACE_S)
        raise
    finally:
        ctx.close()
        if _current is ctx:
            _current = None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _error_line(e: BaseException) -> str:
    if isinstance(e, ActsparseError):
        return e.one_line()
    return f"internal error: {type(e).__name__}: {_first_line(e)}"
