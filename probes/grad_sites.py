"""Where gradient sparsity is measured: one site per MLP activation (and per conv activation module).

A site is the activation module itself when the model has one (act'(h) from its input h, dL/da from
a tensor hook on its output: ``eta_method`` ``g*act'(h)``), else the pre-activation linear, whose
output h receives dL/dh directly (``dL/dh``: the activation is a function call inside forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from probes.activations import Activation, is_activation_module, resolve_activation
from probes.errors import ModelError
from probes.vision import CONV_ACT


@dataclass
class GradSite:
    canonical_name: str
    module_path: str  # the activation module (eta_method "g*act'(h)") or the pre-activation linear
    kind: str  # mlp_post (plain MLP: a is the down projection's input), mlp_gate_act (GLU), conv_act, act, custom
    layer: int | None
    family: str
    act: Activation
    eta_method: str  # "g*act'(h)" | "dL/dh"
    module: Any = field(repr=False, compare=False, default=None)
    pre_module_path: str | None = None
    down_module_path: str | None = None

    def row(self) -> dict[str, Any]:
        return {"canonical_name": self.canonical_name, "module_path": self.module_path, "kind": self.kind,
                "layer": self.layer, "family": self.family, "act": self.act.label,
                "act_analytic": self.act.analytic, "eta_method": self.eta_method,
                "pre_module_path": self.pre_module_path, "down_module_path": self.down_module_path}


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _act_child(modules: dict, parent: str) -> str | None:
    pref = parent + "." if parent else ""
    hits = [n for n, m in modules.items() if n.startswith(pref) and "." not in n[len(pref):] and n
            and is_activation_module(m)]
    return hits[0] if len(hits) == 1 else None


def _prev_sibling_act(modules: dict, path: str) -> str | None:
    import torch

    parent = _parent(path)
    pm = modules.get(parent) if parent else None
    if not isinstance(pm, torch.nn.Sequential):
        return None
    names = [n for n, _ in pm.named_children()]
    leaf = path.rsplit(".", 1)[-1]
    i = names.index(leaf) if leaf in names else -1
    for j in range(i - 1, -1, -1):
        cand = f"{parent}.{names[j]}"
        if is_activation_module(modules[cand]):
            return cand
        if type(modules[cand]).__name__ not in ("Dropout", "Identity"):
            return None
    return None


def find_grad_sites(model, family: str | None = None, config: Any = None, globs: Sequence[str] = (),
                    act_name: str | None = None) -> list[GradSite]:
    """One site per MLP activation (and per conv activation module). ModelError if none."""
    from probes.sites import MLP_GATE_ACT, MLP_POST, MLP_PRE, find_sites
    from probes.vision import find_conv_sites

    modules = dict(model.named_modules())
    if globs:
        out = []
        for s in find_sites(model, family, (MLP_POST,), globs):
            if not is_activation_module(s.module):
                raise ModelError(f"--site {s.module_path} is a {type(s.module).__name__}, not an activation module",
                                 "gradient sparsity needs the activation module itself, e.g. "
                                 "--site 'transformer.h.*.mlp.act'")
            out.append(GradSite(f"custom.{s.module_path}.hook_act", s.module_path, "custom", s.layer, "custom",
                                resolve_activation(s.module, config, act_name), "g*act'(h)", s.module))
        return out
    try:
        sites = find_sites(model, family, (MLP_POST, MLP_GATE_ACT, MLP_PRE))
    except ModelError:
        sites = []
        mlp_error = True
    else:
        mlp_error = False
    by_layer: dict[tuple[str, int | None], dict[str, Any]] = {}
    for s in sites:
        stack = s.canonical_name.split("blocks.")[0]
        by_layer.setdefault((stack, s.layer), {})[s.kind] = s
    out: list[GradSite] = []
    for (stack, layer), g in by_layer.items():
        post, gate, pre = g.get(MLP_POST), g.get(MLP_GATE_ACT), g.get(MLP_PRE)
        if post is None:
            continue
        if gate is not None:
            act_path, kind, canon = gate.module_path, MLP_GATE_ACT, gate.canonical_name
        else:
            act_path = None
            if pre is not None:
                act_path = _act_child(modules, _parent(pre.module_path))
            if act_path is None:
                act_path = (_act_child(modules, _parent(post.module_path))
                            or _prev_sibling_act(modules, post.module_path))
            kind, canon = MLP_POST, post.canonical_name
        if act_path is not None:
            m = modules[act_path]
            out.append(GradSite(canon, act_path, kind, layer, post.family, resolve_activation(m, config, act_name),
                                "g*act'(h)", m, pre.module_path if pre else None, post.module_path))
        elif pre is not None:
            # The activation is a function call inside forward: dL/dh straight from the pre-activation.
            out.append(GradSite(canon, pre.module_path, kind, layer, post.family,
                                resolve_activation(None, config, act_name), "dL/dh", pre.module,
                                pre.module_path, post.module_path))
    registry = any(s.family not in ("structural", "mlp") for s in out)
    conv = [] if registry else find_conv_sites(model)
    if conv:
        out = []  # a conv net: every activation module, per channel (a structural "MLP" guess is only its head)
        for s in conv:
            out.append(GradSite(s.canonical_name, s.module_path, CONV_ACT, s.layer, "conv",
                                resolve_activation(s.module, config, act_name), "g*act'(h)", s.module))
    if not out:
        if mlp_error:
            find_sites(model, family, (MLP_POST,))  # re-raise the registry's message with candidates
        raise ModelError(f"no activation module or pre-activation found next to the MLP sites of this "
                         f"{type(model).__name__}", "name the activation modules with --site 'PATH.*.act'")
    return out
