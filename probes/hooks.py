"""Forward and backward hooks on sites, attached as one context manager that always removes them.

Hooks are global state on the model (as in TransformerLens' hook_points.py), so ``hooks`` removes
every handle in ``finally``, even on error or Ctrl-C. As TransformerLens' ``hooks(fwd_hooks,
bwd_hooks)``, it takes lists of ``(site, fn)`` pairs (or ``(site, where, fn)`` triples):

- a site is anything with ``.canonical_name`` and ``.module`` (a ``probes.sites.Site``, a gradient
  site, or a ``HookPoint`` for a module that is no site); ``where`` is ``"input"`` (the module's
  first positional input, seen by a forward pre-hook) or ``"output"`` (its output, the first tensor
  of a tuple); without it, the site's own ``.hook`` (default ``"output"``).
- a forward hook ``fn(x, call)`` sees the floating-point tensor ``x`` there, on every call of the
  module; a tensor it returns REPLACES ``x`` (input replacement, e.g. PPL-p%'s sparse runs; or an
  output made a leaf for gradients).
- a backward hook ``fn(grad, call)`` gets dL/dx for the tensor ``x`` there (a tensor hook registered
  on it during the forward: full module backward hooks break on in-place activations, tensor hooks
  do not). Its return value is ignored. A tensor that does not require grad while grad is enabled
  gets no hook; its site is listed in ``HookState.missing_grad``.
- ``call`` (a ``HookCall``) says which site and which call of its module within the current
  forward this is, the batch's count mask, and holds ``ctx``, a dict shared by the forward and
  backward hooks of that one call (as TransformerLens' ``hook.ctx``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

WHERE = ("input", "output")


def _first_tensor(x: Any):
    import torch

    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


@dataclass(frozen=True)
class HookPoint:
    """A module that is not a site (a linear layer's input, an embedding's output) as a place for hooks."""

    canonical_name: str
    module: Any = field(repr=False, compare=False)
    hook: str = "output"

    @property
    def where(self) -> str:
        return f"{self.canonical_name}:{self.hook}"


@dataclass
class HookCall:
    """One call of a hooked module within a forward: what a hook function gets besides the tensor."""

    site: Any
    call: int  # 0-based: the k-th call of this site's module in the current forward
    mask: Any  # [batch, pos] bool count mask of the batch in flight, or None (every position counts)
    ctx: dict[str, Any] = field(default_factory=dict)  # shared by this call's forward and backward hooks


@dataclass
class HookState:
    """What the attached hooks share: the batch's count mask, call counts and sites left without grad."""

    mask: Any = None
    counts: dict[str, int] = field(default_factory=dict)  # calls per site in the current forward
    calls: dict[str, int] = field(default_factory=dict)  # the most calls per site seen in one forward
    missing_grad: set[str] = field(default_factory=set)
    _open: dict[str, HookCall] = field(default_factory=dict, repr=False)

    def begin(self, mask: Any = None) -> None:
        """A new forward of a batch whose counted positions are ``mask``."""
        self.mask = mask
        self.counts.clear()
        self._open.clear()

    def end(self) -> None:
        """The forward is over: keep the most calls per site."""
        for name, k in self.counts.items():
            self.calls[name] = max(self.calls.get(name, 0), k)

    def _enter(self, site: Any) -> HookCall:
        name = site.canonical_name
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        hc = self._open[name] = HookCall(site, k, self.mask)
        return hc


def _normalise(spec: Sequence) -> tuple[Any, str, Callable]:
    if len(spec) == 2:
        site, fn = spec
        where = getattr(site, "hook", "output")
    else:
        site, where, fn = spec
    if where not in WHERE:
        raise ValueError(f"hook place {where!r} is neither 'input' nor 'output'")
    return site, where, fn


@contextlib.contextmanager
def hooks(fwd_hooks: Sequence[Sequence] = (), bwd_hooks: Sequence[Sequence] = (),
          state: HookState | None = None) -> Iterator[HookState]:
    """Attach ``fwd_hooks`` and ``bwd_hooks`` (see the module docstring) for the body of the ``with``."""
    import torch

    state = state if state is not None else HookState()
    # site name -> (site, {(where, kind): [fn, ...]}), in the order sites first appear
    table: dict[str, tuple[Any, dict[tuple[str, str], list[Callable]]]] = {}
    for kind, specs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
        for spec in specs:
            site, where, fn = _normalise(spec)
            entry = table.setdefault(site.canonical_name, (site, {}))
            entry[1].setdefault((where, kind), []).append(fn)

    def tensor_hooks(x, fns: list[Callable], hc: HookCall) -> None:
        if not fns:
            return
        if x.requires_grad:
            for fn in fns:
                x.register_hook(lambda g, _fn=fn: (_fn(g, hc), None)[1])
        elif torch.is_grad_enabled():
            state.missing_grad.add(hc.site.canonical_name)

    def is_float(x) -> bool:
        return x is not None and torch.is_tensor(x) and x.is_floating_point()

    handles = []
    try:
        for name, (site, fns) in table.items():
            in_fwd, in_bwd = fns.get(("input", "fwd"), []), fns.get(("input", "bwd"), [])
            out_fwd, out_bwd = fns.get(("output", "fwd"), []), fns.get(("output", "bwd"), [])

            def pre_hook(module, args, kwargs, _site=site, _fwd=in_fwd, _bwd=in_bwd):
                hc = state._enter(_site)  # every call counts, so calls line up with the output hooks
                if not (_fwd or _bwd):
                    return None
                x = args[0] if args else _first_tensor(kwargs)
                if not is_float(x):
                    return None
                replaced = False
                for fn in _fwd:
                    new = fn(x, hc)
                    if new is not None:
                        x, replaced = new, True
                tensor_hooks(x, _bwd, hc)
                if replaced and args:
                    return (x, *args[1:]), kwargs
                return None

            handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if not (out_fwd or out_bwd):
                continue

            def fwd_hook(module, args, output, _site=site, _fwd=out_fwd, _bwd=out_bwd):
                hc = state._open.get(_site.canonical_name)
                y = _first_tensor(output)
                if hc is None or not is_float(y):
                    return None
                replaced = False
                for fn in _fwd:
                    new = fn(y, hc)
                    if new is not None:
                        y, replaced = new, True
                tensor_hooks(y, _bwd, hc)
                if not replaced:
                    return None
                if torch.is_tensor(output):
                    return y
                if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
                    return type(output)((y, *output[1:]))
                raise TypeError(f"cannot replace the output of {_site.canonical_name}: "
                                f"{type(output).__name__} is not a tensor or a tuple starting with one")

            handles.append(site.module.register_forward_hook(fwd_hook))
        yield state
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def attach_sites(sites: Sequence, callback: Callable[[Any, Any], Any]) -> Iterator[HookState]:
    """Call ``callback(site, tensor)`` for every call of every site's module (``hooks`` with one
    forward hook per site, at the site's own ``input``/``output``). A tensor the callback returns
    for an ``input`` site replaces the input."""
    def fn(x, hc: HookCall):
        new = callback(hc.site, x)
        return new if getattr(hc.site, "hook", "output") == "input" else None

    with hooks([(s, fn) for s in sites]) as state:
        yield state
