"""Attach forward hooks to sites as a context manager that always removes them.

Hooks are global state on the model (as in TransformerLens' hook_points.py), so
``attach_sites`` removes every handle in ``finally``, even on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from probes.sites import Site


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


@contextlib.contextmanager
def attach_sites(sites: Sequence[Site], callback: Callable[[Site, Any], Any]) -> Iterator[None]:
    """Call ``callback(site, tensor)`` for every call of every site's module.

    ``input`` sites see the module's first positional input (forward pre-hook); ``output``
    sites see its output (first tensor of a tuple). If the callback returns a tensor for an
    ``input`` site, it replaces the input (used by the sparse runs of PPL-p%).
    A module called several times per forward is reported once per call.
    """
    handles = []
    try:
        for site in sites:
            if site.hook == "input":
                def pre_hook(module, args, kwargs, _site=site):
                    x = args[0] if args else _first_tensor(kwargs)
                    new = callback(_site, x)
                    if new is not None and args:
                        return (new, *args[1:]), kwargs
                    return None

                handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def fwd_hook(module, args, output, _site=site):
                    callback(_site, _first_tensor(output))

                handles.append(site.module.register_forward_hook(fwd_hook))
        yield
    finally:
        for h in handles:
            h.remove()
