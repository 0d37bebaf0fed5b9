"""ReLU sites counted on the way (issue 16 goal 3): the count kernel computes the ReLU itself.

A ``mlp_post`` site of a ReLU model (the bundled model, OPT, GPT-2 / GPT-J / GPT-NeoX / T5 / DistilBERT configured
with ReLU) is the input of the MLP's output projection, which is the output of a ``torch.nn.ReLU`` module. Counting
it in the site's hook reads the whole activation back from memory after the ReLU wrote it. For the duration of
``probes.runner.run_probes`` such a ReLU module's ``forward`` is replaced by one that calls the site probe's
``relu_counted`` (``probes.sparsity.ActivationSparsityProbe``): the fused kernel (``probes.fastcount.relu_pass``)
reads the ReLU's input once, writes ``torch.relu``'s very bits (0 for a negative number; -0 and NaN as they are)
and counts each row while it is in cache. The counts wait on the probe until the site's hook sees that very
tensor, and are added then instead of counting it again. Positions the batch's count mask leaves out (padding
after a window's counted run, uncounted context before it) are written and not counted. Anything else (another
tensor at the hook, a count mask that is not one run per window, autograd, a dtype or device the kernel does not
take, no OpenMP build) runs the ReLU as before and counts at the hook. The model's outputs and every number are
the same bits as without it (``tests/unit/test_relu_pass.py``); the ``forward`` is put back when the run ends,
also on an error. ``ACTSPARSE_RELU_PASS=0`` turns it off.

Only families whose model code passes the ReLU module's output straight to the output projection (T5: through its
dropout, which returns its input in eval mode) take part (``FAMILIES``; checked against transformers' modeling
files), and only a ReLU module that is the one ``torch.nn.ReLU`` child of the projection's parent, not in place,
and used by one site. Measured in ``benchmarks/README.md`` (2026-12-05, second session).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Callable, Iterator, Sequence

# probes.sites family names whose MLP code is down(act(up(x))), the act a module (t5: down(dropout(act(up(x))))).
FAMILIES = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "distilbert", "t5"})


def enabled_by_env() -> bool:
    return os.environ.get("ACTSPARSE_RELU_PASS", "1").strip().lower() not in ("0", "false", "no", "off")


def relu_before(model, site) -> Any:
    """The ``torch.nn.ReLU`` module whose output ``site`` (a ``mlp_post`` input) takes, or None."""
    import torch

    from probes.sites import MLP_POST

    if (getattr(site, "kind", None) != MLP_POST or getattr(site, "hook", None) != "input"
            or getattr(site, "family", None) not in FAMILIES or not isinstance(model, torch.nn.Module)):
        return None
    parent_path, _, name = str(getattr(site, "module_path", "")).rpartition(".")
    key = (id(model), parent_path, name)
    kept = _FOUND.get(key)  # (the model, the site module's parent, its ReLU), weakly: one run's look-up for the next
    if kept is not None:
        m, parent, relu = (r() for r in kept)
        if (m is model and parent is not None and parent._modules.get(name) is site.module
                and (relu is None or any(c is relu for c in parent._modules.values()))
                and (relu is None or not relu.inplace)):
            return relu
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return None
    relus = [m for m in parent.children() if type(m) is torch.nn.ReLU and not m.inplace]
    relu = relus[0] if len(relus) == 1 else None
    if len(_FOUND) > 4096:
        _FOUND.clear()
    _FOUND[key] = (weakref.ref(model), weakref.ref(parent), (lambda: None) if relu is None else weakref.ref(relu))
    return relu


_FOUND: dict[tuple, tuple] = {}


def plan(model, sites: Sequence, probe_for: Callable[[str], Any]) -> list[tuple[Any, Any]]:
    """``(site, ReLU module)`` for each of ``sites`` whose ReLU the run takes over (``relu_before``; a ReLU used by
    one site only, whose ``forward`` nobody replaced, a site on the CPU, and whose site probe ``probe_for(canonical
    name)``, where it is made beforehand, counts ReLU passes). Empty without an OpenMP kernel or with
    ``ACTSPARSE_RELU_PASS=0``."""
    from probes import fastcount

    if not (sites and enabled_by_env() and fastcount.kernel() is not None and fastcount._STATE["relu_fn"] is not None):
        return []
    found = [(s, relu_before(model, s)) for s in sites]
    uses: dict[int, int] = {}
    for _, m in found:
        if m is not None:
            uses[id(m)] = uses.get(id(m), 0) + 1
    out = []
    for site, m in found:
        if m is None or uses[id(m)] != 1 or "forward" in vars(m):
            continue  # shared by sites, or its forward already replaced by someone else (accelerate's hooks)
        weight = next(site.module.parameters(), None) if hasattr(site.module, "parameters") else None
        if weight is not None and weight.device.type != "cpu":
            continue  # the pass runs on the CPU only
        p = probe_for(site.canonical_name)
        if p is None or hasattr(p, "relu_counted"):  # (None: made at the first call, by the same make_probe)
            out.append((site, m))
    return out


@contextlib.contextmanager
def counted_relus(taken: Sequence[tuple[Any, Any]], probe_for: Callable[[str], Any], claim: Callable[[str], Any],
                  observe: Callable[[Any, Any], Any], state) -> Iterator[int]:
    """For the ``with`` body, each ``(site, relu)`` of ``taken`` (``plan``): the ReLU computes its output with the
    site probe's ``relu_counted`` (``probe_for(name)``: the probe the site will update, or None), under the batch's
    count mask (``state.mask``, a ``probes.hooks.HookState``); and a forward pre-hook on the site's module hands
    the probe that very tensor (``take_relu_pass``; ``claim(name)`` then makes the probe the site's, as the run's
    first call of the site does), or anything else to ``observe(x, HookCall)`` (the run's hook, which counts it).
    The site gets no other hook from the run: this one does less Python inside the forward (measured in
    ``benchmarks/README.md``). Yields how many ReLU modules it took over; everything is put back on exit."""
    from probes.hooks import _first_tensor

    installed: list = []
    handles: list = []
    try:
        for site, m in taken:
            name = site.canonical_name
            m.forward = _fused_forward(m, name, probe_for, state)
            installed.append(m)
            handles.append(site.module.register_forward_pre_hook(
                _site_hook(site, probe_for, claim, observe, state, _first_tensor), with_kwargs=True))
        yield len(installed)
    finally:
        for h in handles:
            h.remove()
        for m in installed:
            vars(m).pop("forward", None)


def _fused_forward(module, name: str, probe_for: Callable[[str], Any], state) -> Callable:
    plain = type(module).forward.__get__(module)

    def forward(x, *args, **kwargs):
        counted = getattr(probe_for(name), "relu_counted", None)  # probes of other kinds: the plain ReLU
        if counted is not None and not args and not kwargs:
            y = counted(x, state.mask)
            if y is not None:
                return y
        return plain(x, *args, **kwargs)

    return forward


def _site_hook(site, probe_for, claim, observe, state, first_tensor) -> Callable:
    import torch

    from probes.hooks import HookCall

    name = site.canonical_name

    def hook(module, args, kwargs):
        x = args[0] if args else first_tensor(kwargs)
        take = getattr(probe_for(name), "take_relu_pass", None)
        if take is not None and take(x, state.mask):
            claim(name)
        elif torch.is_tensor(x) and x.is_floating_point():
            observe(x, HookCall(site, 0, state.mask))
        return None

    return hook
