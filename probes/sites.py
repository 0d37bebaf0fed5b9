"""Where activations live: canonical site names mapped onto each family's real modules.

The MLP activation is the INPUT of the MLP's output projection (TransformerLens
``hook_post``): ``act(x W_in)`` for plain MLPs, ``act(gate) * up`` for GLU MLPs. GLU models
also expose the gate activation ``act(gate)`` (kind ``mlp_gate_act``) and the gate
pre-activation (``mlp_pre``). Known families come from a registry; unknown models go
through a structural fallback; users can override with globs (``--site``).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from probes.errors import ModelError, did_you_mean

# Site kinds.
MLP_POST = "mlp_post"  # input of the output projection (the activation of METRICS.md section 1)
MLP_GATE_ACT = "mlp_gate_act"  # act(gate) in GLU MLPs
MLP_PRE = "mlp_pre"  # pre-activation (gate for GLU)
RESID_POST = "resid_post"  # block output (residual stream)
CUSTOM = "custom"
MLP_KINDS = (MLP_POST, MLP_GATE_ACT, MLP_PRE)

_CANONICAL_HOOK = {MLP_POST: "mlp.hook_post", MLP_GATE_ACT: "mlp.hook_gate_act", MLP_PRE: "mlp.hook_pre",
                   RESID_POST: "hook_resid_post"}


@dataclass
class Site:
    canonical_name: str  # e.g. blocks.3.mlp.hook_post
    module_path: str  # e.g. model.layers.3.mlp.down_proj
    kind: str
    hook: str  # "input" (forward pre-hook) or "output" (forward hook)
    layer: int | None
    width: int | None
    family: str
    module: Any = field(repr=False, compare=False, default=None)

    @property
    def where(self) -> str:
        return f"{self.module_path}:{self.hook}"

    def row(self) -> dict[str, Any]:
        return {"canonical_name": self.canonical_name, "module_path": self.module_path, "hook": self.hook,
                "kind": self.kind, "layer": self.layer, "width": self.width, "family": self.family}


@dataclass(frozen=True)
class FamilySpec:
    """Module names of one family, relative to a block (``block`` has one layer-number group)."""

    name: str
    model_types: tuple[str, ...]
    block: str
    down: str
    act: str | None = None
    pre: str | None = None
    glu: bool = False


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("gpt2", ("gpt2",), r"h\.(\d+)", r"mlp\.c_proj", r"mlp\.act", r"mlp\.c_fc"),
    FamilySpec("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "granite", "olmo",
                         "olmo2", "cohere", "starcoder2_glu"),
               r"layers\.(\d+)", r"mlp\.down_proj", r"mlp\.act_fn", r"mlp\.gate_proj", glu=True),
    FamilySpec("phi3", ("phi3",), r"layers\.(\d+)", r"mlp\.down_proj", r"mlp\.activation_fn", None, glu=True),
    FamilySpec("gpt_neox", ("gpt_neox",), r"layers\.(\d+)", r"mlp\.dense_4h_to_h", r"mlp\.act", r"mlp\.dense_h_to_4h"),
    FamilySpec("falcon", ("falcon", "bloom"), r"h\.(\d+)", r"mlp\.dense_4h_to_h", r"mlp\.(?:act|gelu_impl)",
               r"mlp\.dense_h_to_4h"),
    FamilySpec("gptj", ("gptj", "codegen"), r"h\.(\d+)", r"mlp\.fc_out", r"mlp\.act", r"mlp\.fc_in"),
    FamilySpec("opt", ("opt",), r"layers\.(\d+)", r"fc2", r"activation_fn", r"fc1"),
    FamilySpec("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra", "vit", "deit", "mpnet",
                        "data2vec-text"),
               r"layer\.(\d+)", r"output\.dense", r"intermediate\.intermediate_act_fn", r"intermediate\.dense"),
    # transformers >= 5 ViT / DeiT, and CLIP / SigLIP vision and text towers.
    FamilySpec("vit", ("vit", "deit", "clip", "clip_vision_model", "clip_text_model", "siglip",
                       "siglip_vision_model", "siglip_text_model"),
               r"layers\.(\d+)", r"mlp\.fc2", r"mlp\.activation_fn", r"mlp\.fc1"),
    FamilySpec("distilbert", ("distilbert",), r"layer\.(\d+)", r"ffn\.lin2", r"ffn\.activation", r"ffn\.lin1"),
    FamilySpec("t5", ("t5", "mt5", "umt5"), r"block\.(\d+)", r"layer\.\d+\.DenseReluDense\.wo",
               r"layer\.\d+\.DenseReluDense\.act", r"layer\.\d+\.DenseReluDense\.wi(?:_0)?"),
    FamilySpec("timm", (), r"blocks\.(\d+)", r"mlp\.fc2", r"mlp\.act", r"mlp\.fc1(?:_g)?"),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
_ACT_NAMES = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "mish", "elu", "softplus", "activation",
              "quickgelu", "act")


def _is_linear(m) -> bool:
    import torch

    if isinstance(m, torch.nn.Linear):
        return True
    # transformers' Conv1D (GPT-2): weight [in, out], attribute nf = out.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def in_width(m) -> int | None:
    if hasattr(m, "in_features"):
        return int(m.in_features)
    if type(m).__name__ == "Conv1D":
        return int(m.weight.shape[0])
    return None


def out_width(m) -> int | None:
    if hasattr(m, "out_features"):
        return int(m.out_features)
    if type(m).__name__ == "Conv1D":
        return int(m.nf)
    return None


def _is_activation(m) -> bool:
    import torch

    n = type(m).__name__.lower()
    if len(list(m.children())) > 0 or _is_linear(m) or isinstance(m, (torch.nn.LayerNorm, torch.nn.Dropout,
                                                                        torch.nn.Embedding)):
        return False
    return any(a in n for a in _ACT_NAMES) or m.__class__.__module__.startswith("torch.nn.modules.activation")


def _canonical(prefix: str, layer: int, kind: str) -> str:
    return f"{prefix}blocks.{layer}.{_CANONICAL_HOOK[kind]}"


def _stack_prefix(block_path: str, family: FamilySpec) -> str:
    # Encoder-decoder models have two block stacks; keep them apart in canonical names.
    if family.name == "t5":
        return "encoder." if ".encoder." in f".{block_path}." else "decoder."
    return ""


def _family_sites(model, spec: FamilySpec, kinds: Iterable[str]) -> list[Site]:
    kinds = set(kinds)
    modules = dict(model.named_modules())
    block_re = re.compile(rf"^(?P<block>(?:.*\.)?{spec.block})$")
    blocks = [(name, int(m.group(2))) for name in modules for m in [block_re.match(name)] if m]
    sites: list[Site] = []
    for bpath, layer in blocks:
        pre_stack = _stack_prefix(bpath, spec)

        def find(rel: str | None):
            if rel is None:
                return None
            r = re.compile(rf"^{re.escape(bpath)}\.{rel}$")
            hits = [n for n in modules if r.match(n)]
            return hits[0] if hits else None

        down = find(spec.down)
        if down is None or not _is_linear(modules[down]):
            continue
        width = in_width(modules[down])
        if MLP_POST in kinds:
            sites.append(Site(_canonical(pre_stack, layer, MLP_POST), down, MLP_POST, "input", layer, width,
                              spec.name, modules[down]))
        act = find(spec.act)
        glu = spec.glu or (spec.name == "t5" and find(r"layer\.\d+\.DenseReluDense\.wi_1") is not None)
        if glu and act is not None and MLP_GATE_ACT in kinds:
            sites.append(Site(_canonical(pre_stack, layer, MLP_GATE_ACT), act, MLP_GATE_ACT, "output", layer, width,
                              spec.name, modules[act]))
        pre = find(spec.pre)
        if pre is not None and MLP_PRE in kinds and _is_linear(modules[pre]):
            sites.append(Site(_canonical(pre_stack, layer, MLP_PRE), pre, MLP_PRE, "output", layer,
                              out_width(modules[pre]), spec.name, modules[pre]))
        if RESID_POST in kinds:
            sites.append(Site(_canonical(pre_stack, layer, RESID_POST), bpath, RESID_POST, "output", layer,
                              out_width(modules[down]),
                              spec.name, modules[bpath]))
        # T5 decoder blocks: same prefix for both stacks handled by _stack_prefix.
    return sites


def _structural_sites(model, kinds: Iterable[str]) -> list[Site]:
    """Fallback: the repeated block list, then the linear whose input is the intermediate width."""
    import torch

    kinds = set(kinds)
    cands = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) >= 2 \
                and len({type(c) for c in m}) == 1 and any(True for _ in m[0].children()):
            cands.append(((len(m), sum(p.numel() for p in m.parameters())), name, m))
    for _, list_path, blocks in sorted(cands, key=lambda c: c[0], reverse=True):
        sites = _blocks_sites(list_path, blocks, kinds)
        if sites:
            return sites
    return _sequential_sites(model, kinds)


def _blocks_sites(list_path, blocks, kinds):
    block0 = blocks[0]
    lins = [(n, m) for n, m in block0.named_modules() if n and _is_linear(m)]
    if not lins:
        return []
    d_model = Counter(in_width(m) for _, m in lins).most_common(1)[0][0]
    downs = [(n, m) for n, m in lins if out_width(m) == d_model and (in_width(m) or 0) > d_model]
    if not downs:
        return []
    down_rel, down_m = max(downs, key=lambda nm: in_width(nm[1]) or 0)
    inter = in_width(down_m)
    pres = [n for n, m in lins if in_width(m) == d_model and out_width(m) in (inter, 2 * inter)]
    glu = len([n for n, m in lins if in_width(m) == d_model and out_width(m) == inter]) >= 2
    pre_rel = next((n for n in pres if "gate" in n), pres[0] if pres else None)
    acts = [n for n, m in block0.named_modules() if n and _is_activation(m)]
    act_rel = acts[0] if len(acts) == 1 else None
    sites = []
    for i in range(len(blocks)):
        bpath = f"{list_path}.{i}" if list_path else str(i)
        mods = dict(blocks[i].named_modules())
        if down_rel not in mods:
            continue
        if MLP_POST in kinds:
            sites.append(Site(f"blocks.{i}.mlp.hook_post", f"{bpath}.{down_rel}", MLP_POST, "input", i, inter,
                              "structural", mods[down_rel]))
        if glu and act_rel and MLP_GATE_ACT in kinds and act_rel in mods:
            sites.append(Site(f"blocks.{i}.mlp.hook_gate_act", f"{bpath}.{act_rel}", MLP_GATE_ACT, "output", i, inter,
                              "structural", mods[act_rel]))
        if pre_rel and MLP_PRE in kinds and pre_rel in mods:
            sites.append(Site(f"blocks.{i}.mlp.hook_pre", f"{bpath}.{pre_rel}", MLP_PRE, "output", i,
                              out_width(mods[pre_rel]), "structural", mods[pre_rel]))
        if RESID_POST in kinds:
            sites.append(Site(f"blocks.{i}.hook_resid_post", bpath, RESID_POST, "output", i, d_model, "structural",
                              blocks[i]))
    return sites


def _sequential_sites(model, kinds: Iterable[str]) -> list[Site]:
    """Plain MLPs: every linear that directly follows an activation module in an nn.Sequential."""
    import torch

    if MLP_POST not in set(kinds):
        return []
    sites: list[Site] = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Sequential):
            continue
        children = list(m.named_children())
        for (pn, prev), (cn, cur) in zip(children, children[1:]):
            if _is_activation(prev) and _is_linear(cur):
                path = f"{name}.{cn}" if name else cn
                i = len(sites)
                sites.append(Site(f"blocks.{i}.mlp.hook_post", path, MLP_POST, "input", i, in_width(cur), "mlp", cur))
    return sites


def _candidates(model, n: int = 10) -> list[str]:
    lins = [(name, in_width(m), out_width(m)) for name, m in model.named_modules() if name and _is_linear(m)]
    lins.sort(key=lambda t: -(t[1] or 0))
    return [f"{name} ({i}->{o})" for name, i, o in lins[:n]]


def _example_glob(model) -> str:
    lins = [(name, m) for name, m in model.named_modules() if name and _is_linear(m)]
    if not lins:
        return "PATH.TO.MODULE:input"
    numbered = [(n, m) for n, m in lins if re.search(r"\.\d+\.", n) and (in_width(m) or 0) > (out_width(m) or 0)]
    pick = max(numbered, key=lambda nm: in_width(nm[1]) or 0)[0] if numbered else lins[-1][0]
    return re.sub(r"\.\d+\.", ".*.", pick, count=1) + ":input"


def parse_site_glob(spec: str) -> tuple[str, str]:
    pattern, _, io = spec.rpartition(":") if spec.endswith((":input", ":output")) else (spec, "", "input")
    return pattern, io


def sites_from_globs(model, globs: Iterable[str]) -> list[Site]:
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    sites: list[Site] = []
    seen: set[tuple[str, str]] = set()
    for g in globs:
        pattern, io = parse_site_glob(g)
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ModelError(f"--site {g!r} matches no module"
                             + did_you_mean(pattern.replace("*", "0"), names, n=3, cutoff=0.4),
                             "list module paths with `actsparse sites CHECKPOINT --all-modules`")
        for n in hits:
            if (n, io) in seen:  # two globs naming one module: one site, not two feeding one probe
                continue
            seen.add((n, io))
            m = re.search(r"\.(\d+)(?:\.|$)", n)
            layer = int(m.group(1)) if m else None
            width = in_width(modules[n]) if io == "input" else out_width(modules[n])
            sites.append(Site(f"custom.{n}.hook_{'in' if io == 'input' else 'out'}", n, CUSTOM, io, layer, width,
                              "custom", modules[n]))
    return sites


def detect_family(model, model_type: str | None = None) -> FamilySpec | None:
    """The family whose names match: specs listing ``model_type`` first (module names change
    across transformers versions, so a spec must also find sites), then the best match by names."""
    by_type = [spec for spec in FAMILIES if model_type and model_type in spec.model_types]
    for spec in by_type:
        if _family_sites(model, spec, (MLP_POST,)):
            return spec
    best, best_n = None, 0
    for spec in FAMILIES:
        n = len(_family_sites(model, spec, (MLP_POST,)))
        if n > best_n:
            best, best_n = spec, n
    return best


def find_sites(model, model_type: str | None = None, kinds: Iterable[str] = MLP_KINDS,
               globs: Iterable[str] | None = None) -> list[Site]:
    """All sites of ``kinds`` in ``model``; globs override discovery. Raises ModelError if none."""
    globs = list(globs or [])
    if globs:
        return sites_from_globs(model, globs)
    kinds = tuple(kinds)
    spec = detect_family(model, model_type)
    matched = spec is not None and bool(_family_sites(model, spec, (MLP_POST,)))
    sites = _family_sites(model, spec, kinds) if matched else _structural_sites(model, kinds)
    if not sites:
        cands = _candidates(model)
        raise ModelError(
            f"no activation sites found in this {type(model).__name__}"
            f"{f' (model_type {model_type!r})' if model_type else ''}; candidate modules: "
            + ("; ".join(cands) if cands else "none with a linear layer"),
            f"name the MLP output projection's input yourself, e.g. --site \"{_example_glob(model)}\"")
    return sites
