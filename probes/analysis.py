"""Analyses as registered plug-ins: what ``measure --X``, ``track`` and the bundle run by name.

An analysis is one metric family run over a loaded model: its options class (built on the shared
data options, ``probes.data.DataOptions``: every shared field its class declares is filled from
the command's own data options), a pre-flight check that refuses a model it cannot measure
before any batch runs, the function that runs it, and the report section (``reports/sections``)
that writes, draws and summarises its result. Results share one shape (``Result``): ``info``
for the manifest and ``tables()`` for the files.

The registry holds ``"module:attr"`` strings (lm-evaluation-harness' ``api/registry.py``), so
listing analyses (``--help``, did-you-mean) imports no torch. ``register`` adds one from outside.

The streaming probes every analysis attaches follow ``Probe``: ``update`` with one site's tensor
(``x`` [batch, pos, channels] and a count ``mask`` [batch, pos] or None), ``merge`` with a probe
of the same kind (data-parallel ranks, shards) and ``to_row`` for the table.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Probe(Protocol):
    def update(self, x: Any, mask: Any = None) -> None: ...  # x: [batch, pos, ch]; mask: [batch, pos] | None

    def merge(self, other: Any) -> Any: ...

    def to_row(self) -> dict[str, Any]: ...


@runtime_checkable
class Result(Protocol):
    info: dict[str, Any]

    def tables(self) -> dict[str, Any]: ...  # {table name: pandas DataFrame}, as written to the output folder


@dataclass(frozen=True)
class Analysis:
    name: str  # what users type: `measure --also NAME`, `track --analyses NAME`
    section: str  # its report section (reports/sections/<section>.py)
    options: str  # "module:Class" of its options
    run: str  # "module:function(loaded, options, progress=None) -> Result"
    help: str
    check: str | None = None  # "module:function(loaded, options)": refuse before any batch
    with_measure: bool = True  # may run beside activation sparsity in one `measure` bundle
    data_parallel: bool = False  # may run split over torchrun ranks
    data_exclude: tuple[str, ...] = ()  # shared data fields it sets itself (massive: its preset's batch and seed)

    def options_class(self) -> type:
        return load(self.options)

    def make_options(self, data: Mapping[str, Any], **own: Any) -> Any:
        """Its options: the shared data fields its class declares (from ``data``), plus its own."""
        cls = self.options_class()
        names = {f.name for f in dataclasses.fields(cls)}
        skip = set(own) | set(self.data_exclude)
        return cls(**{k: v for k, v in data.items() if k in names and k not in skip}, **own)

    def preflight(self, loaded: Any, options: Any) -> None:
        if self.check:
            load(self.check)(loaded, options)

    def runner(self) -> Callable[..., Any]:
        return load(self.run)


def load(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


ANALYSES: dict[str, Analysis] = {
    a.name: a for a in (
        Analysis("grad", "gradients", "probes.gradients:GradOptions", "probes.gradients:measure_gradients",
                 "gradient (derivative) sparsity and linear-input spikes, arXiv 2309.03004",
                 check="probes.gradients:check_loss", data_parallel=True),
        Analysis("pplp", "pplp", "probes.pplp:PplpOptions", "probes.pplp:pplp",
                 "PPL-p% sparsity (CETT), Sparsing Law"),
        # the preset draws its own sequences (no BOS, the family's length, its own batch size and seed) so
        # the numbers compare with the papers; the corpus, --max-length, --max-tokens and --skip-first carry over
        Analysis("massive", "massive", "probes.massive:MassiveOptions", "probes.massive:massive",
                 "massive activations on the residual stream, Sun et al. 2024",
                 data_exclude=("batch_size", "seed", "stride")),
        Analysis("cliff", "cliff", "probes.cliff:CliffOptions", "probes.cliff:cliff",
                 "the sparsity cliff, Bug-or-Feature^2, with SPARLING thresholds post hoc",
                 check="probes.cliff:check_cliff"),
        Analysis("flatness", "flatness", "probes.flatness:FlatnessOptions", "probes.flatness:flatness",
                 "flatness, gradient density and diagonality per MLP layer, arXiv 2309.03004",
                 check="probes.flatness:check_flatness"),
        # from the weights alone: no corpus, no forward pass, so never beside `measure`
        Analysis("drift", "drift", "probes.drift:DriftOptions", "probes.drift:run_drift",
                 "per-linear weight statistics, Bug-or-Feature^2", with_measure=False),
    )
}


def register(analysis: Analysis) -> None:
    """Add (or replace) an analysis; its ``section`` must be registered in ``reports.sections``."""
    ANALYSES[analysis.name] = analysis


def get(name: str) -> Analysis:
    from probes.errors import ActsparseError, did_you_mean

    if name not in ANALYSES:
        raise ActsparseError(f"no analysis {name!r}{did_you_mean(name, ANALYSES)}",
                             f"use one of {', '.join(ANALYSES)}", exit_code=2)
    return ANALYSES[name]
