"""Residual-stream sites, where massive activations live (METRICS.md sections 1 and 5).

For each block stack: the embedding output (the input of the first block, kind ``embed``),
each block's output after both residual adds (``resid_post``, Max_act_llm's
``layer_i_hidden``), the attention and MLP outputs before they are added to the stream
(``attn_out``, ``mlp_out``), the GLU gate pre-activation (``mlp_pre``) and the final norm's
output (``final_norm``). Canonical names follow TransformerLens (``blocks.{i}.hook_resid_post``,
``blocks.{i}.hook_attn_out``, ``ln_final.hook_normalized``); ``blocks.0.hook_resid_pre`` is the
embedding output (token + position embeddings, plus the embedding LayerNorm for BERT).

Known families reuse the block regexes of ``probes.sites.FAMILIES``; anything else goes through
a structural fallback (the repeated block list, its ``*attn*`` / ``*mlp*`` children and the
norm next to it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from probes.errors import ModelError
from probes.sites import (FAMILIES, MLP_POST, MLP_PRE, RESID_POST, FamilySpec, Site, detect_family,
                          find_sites, in_width, out_width, sites_from_globs)

EMBED = "embed"
ATTN_OUT = "attn_out"
MLP_OUT = "mlp_out"
FINAL_NORM = "final_norm"
# Every kind this module finds, in the order a block's tensors are computed.
RESIDUAL_KINDS = (EMBED, ATTN_OUT, MLP_PRE, MLP_OUT, RESID_POST, FINAL_NORM)
# Kinds on the residual stream's scale: where `global_max` is looked for (Max_act_llm's
# embedding / hidden / attn / mlp / final-norm set). The gate pre-activation is not one.
STREAM_KINDS = (EMBED, RESID_POST, ATTN_OUT, MLP_OUT, FINAL_NORM)


@dataclass(frozen=True)
class ResidualSpec:
    """Module names relative to a block (``attn``, ``mlp``) and to the stack's parent (``final``)."""

    attn: str | None
    mlp: str | None
    final: tuple[str, ...] = ()


# The attention / MLP output is taken BEFORE its residual add. BERT-like layers add the
# residual inside ``attention.output`` / ``output`` (post-LN), and Bloom inside
# ``self_attention`` / ``mlp``, so there the output projection is the site.
RESIDUAL_SPECS: dict[str, ResidualSpec] = {
    "gpt2": ResidualSpec(r"attn", r"mlp", ("ln_f",)),
    "llama": ResidualSpec(r"(?:self_attn|linear_attn)", r"mlp", ("norm",)),  # hybrids: linear attention
    "phi3": ResidualSpec(r"self_attn", r"mlp", ("norm",)),
    "gpt_neox": ResidualSpec(r"attention", r"mlp", ("final_layer_norm",)),
    "falcon": ResidualSpec(r"self_attention\.dense", r"mlp\.dense_4h_to_h", ("ln_f",)),
    "gptj": ResidualSpec(r"attn", r"mlp", ("ln_f",)),
    "opt": ResidualSpec(r"self_attn", r"fc2", ("final_layer_norm",)),
    "bert": ResidualSpec(r"attention\.output\.dense", r"output\.dense", ("layernorm",)),  # ViT has one
    # transformers >= 5 ViT / DeiT and CLIP / SigLIP towers (Llama-like layers, pre-residual outputs).
    "vit": ResidualSpec(r"(?:attention|self_attn)", r"mlp", ("layernorm", "post_layernorm", "final_layer_norm")),
    "distilbert": ResidualSpec(r"attention", r"ffn", ()),
    "t5": ResidualSpec(r"layer\.0\.SelfAttention", r"layer\.\d+\.DenseReluDense", ("final_layer_norm",)),
    "timm": ResidualSpec(r"attn", r"mlp", ("norm", "fc_norm")),
}

_CANON = {EMBED: "hook_resid_pre", ATTN_OUT: "hook_attn_out", MLP_OUT: "hook_mlp_out", RESID_POST: "hook_resid_post"}


def _canonical(prefix: str, layer: int | None, kind: str) -> str:
    if kind == FINAL_NORM:
        return f"{prefix}ln_final.hook_normalized"
    if kind == EMBED:
        return f"{prefix}blocks.0.hook_resid_pre"
    return f"{prefix}blocks.{layer}.{_CANON[kind]}"


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _stack_prefix(stack_path: str, n_stacks: int) -> str:
    """Models with two stacks (T5's encoder and decoder, CLIP's towers) keep them apart in canonical names."""
    if n_stacks < 2:
        return ""
    parent = _parent(stack_path)  # "encoder.block" -> "encoder.", "text_model.encoder.layers" -> "text_model.encoder."
    return f"{parent or stack_path}."


def _final_norm(modules: dict, stack_path: str, names: Sequence[str]) -> str | None:
    """A final norm next to the block list: in the stack's parent, else in its grandparent."""
    parent = _parent(stack_path)
    for base in (parent, _parent(parent) if parent else None):
        if base is None:
            continue
        for n in names:
            path = f"{base}.{n}" if base else n
            m = modules.get(path)
            if m is not None and not _is_identity(m):
                return path
        if not base:
            break
    return None


def _is_identity(m) -> bool:
    return type(m).__name__ in ("Identity",)


def _d_model(block) -> int | None:
    """The residual width: the most common input width of the block's linears."""
    from collections import Counter

    widths = [in_width(m) for _, m in block.named_modules() if in_width(m)]
    return Counter(widths).most_common(1)[0][0] if widths else None


def _stacks_from_family(model, spec: FamilySpec) -> list[tuple[str, list[tuple[int, str]]]]:
    """[(stack_path, [(layer, block_path), ...]), ...] for blocks matching the family's regex."""
    block_re = re.compile(rf"^(?:(?P<stack>.*)\.)?{spec.block}$")
    stacks: dict[str, list[tuple[int, str]]] = {}
    for name, _ in model.named_modules():
        m = block_re.match(name)
        if m:
            stack = _parent(name)
            stacks.setdefault(stack, []).append((int(m.group(2)), name))
    # A regex like ``layers\.(\d+)`` also matches nested lists inside blocks: keep outermost stacks.
    outer = [s for s in stacks if not any(o != s and s.startswith(o + ".") and o in stacks for o in stacks)]
    return [(s, sorted(stacks[s])) for s in outer]


def _block_list(model) -> tuple[str, list] | None:
    """The repeated block list: the largest ``nn.ModuleList`` / ``nn.Sequential`` of two or more
    same-class children that have submodules of their own (as probes.sites)."""
    import torch

    cands = {name: m for name, m in model.named_modules()
             if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) >= 2
             and len({type(c) for c in m}) == 1 and any(True for _ in m[0].children())}
    # Lists nested in another candidate (the experts of an MoE block) are parts of blocks, not blocks.
    inside = lambda n, o: o != n and (o == "" or n.startswith(f"{o}."))  # noqa: E731
    outer = [n for n in cands if not any(inside(n, o) for o in cands)]
    if not outer:
        return None
    best = max(outer, key=lambda n: (sum(p.numel() for p in cands[n].parameters()), len(cands[n])))
    return best, list(cands[best])


def _shallowest(block, pattern: str) -> str | None:
    """Relative name of the shallowest submodule whose own name matches ``pattern``."""
    rx = re.compile(pattern, re.I)
    hits = [n for n, _ in block.named_modules() if n and rx.search(n.rpartition(".")[2])]
    return min(hits, key=lambda n: (n.count("."), len(n))) if hits else None


def _structural_spec(model) -> tuple[list[tuple[str, list[tuple[int, str]]]], ResidualSpec] | None:
    found = _block_list(model)
    if found is None:
        return None
    list_path, blocks = found
    block0 = blocks[0]
    attn = _shallowest(block0, r"attn|attention")
    mlp = _shallowest(block0, r"mlp|ffn|feed_?forward|^ff$|moe")
    modules = dict(model.named_modules())
    parent = _parent(list_path)
    finals = []
    for base in (parent, _parent(parent) if parent else None):
        if base is None:
            continue
        prefix = f"{base}." if base else ""
        kids = [(n, m) for n, m in modules.items() if n.startswith(prefix) and "." not in n[len(prefix):] and n]
        norms = [n[len(prefix):] for n, m in kids if "norm" in type(m).__name__.lower()
                 or re.search(r"(^|_)(ln|norm)", n[len(prefix):], re.I)]
        if norms:
            finals = [norms[-1]]
            break
        if not base:
            break
    spec = ResidualSpec(re.escape(attn) if attn else None, re.escape(mlp) if mlp else None, tuple(finals))
    stack = [(i, f"{list_path}.{i}" if list_path else str(i)) for i in range(len(blocks))]
    return [(list_path, stack)], spec


def find_residual_sites(model, model_type: str | None = None, kinds: Iterable[str] = RESIDUAL_KINDS,
                        globs: Iterable[str] | None = None) -> list[Site]:
    """Residual-stream sites of ``kinds`` in ``model``; ``globs`` (``--site``) replace discovery.

    Raises ModelError when the model has no repeated block list (no residual stream to speak of).
    """
    globs = list(globs or [])
    if globs:
        return sites_from_globs(model, globs)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in RESIDUAL_KINDS]
    if bad:
        raise ModelError(f"unknown residual site kind {bad[0]!r}", f"use one of {', '.join(RESIDUAL_KINDS)}")
    modules = dict(model.named_modules())
    fam = detect_family(model, model_type)
    stacks, rspec, family = [], None, "structural"
    if fam is not None and fam.name in RESIDUAL_SPECS:
        stacks = _stacks_from_family(model, fam)
        rspec, family = RESIDUAL_SPECS[fam.name], fam.name
    if not stacks:
        st = _structural_spec(model)
        if st is None:
            cands = [n for n, m in model.named_modules() if n and type(m).__name__ == "ModuleList"][:8]
            raise ModelError(f"no residual stream found in this {type(model).__name__}: no repeated block list"
                             + (f" (module lists: {', '.join(cands)})" if cands else ""),
                             "name the block outputs yourself, e.g. --site \"PATH.TO.BLOCKS.*:output\"")
        stacks, rspec = st
        family = "structural"
    sites: list[Site] = []
    glu_pre = _glu_pre_sites(model, model_type, fam) if MLP_PRE in kinds else {}
    for stack_path, blocks in stacks:
        prefix = _stack_prefix(stack_path, len(stacks))
        d_model = _d_model(modules[blocks[0][1]]) if blocks else None
        if EMBED in kinds and blocks:
            first = blocks[0][1]
            sites.append(Site(_canonical(prefix, None, EMBED), first, EMBED, "input", None, d_model, family,
                              modules[first]))
        for layer, bpath in blocks:
            def find(rel: str | None) -> str | None:
                if rel is None:
                    return None
                r = re.compile(rf"^{re.escape(bpath)}\.{rel}$")
                hits = [n for n in modules if r.match(n)]
                return min(hits, key=len) if hits else None

            if ATTN_OUT in kinds:
                a = find(rspec.attn)
                if a is not None:
                    sites.append(Site(_canonical(prefix, layer, ATTN_OUT), a, ATTN_OUT, "output", layer,
                                      out_width(modules[a]) or d_model, family, modules[a]))
            if MLP_PRE in kinds:
                for s in glu_pre.get(bpath, []):
                    sites.append(Site(f"{prefix}blocks.{layer}.mlp.hook_pre", s.module_path, MLP_PRE, "output",
                                      layer, s.width, family, s.module))
            if MLP_OUT in kinds:
                mo = find(rspec.mlp)
                if mo is not None:
                    sites.append(Site(_canonical(prefix, layer, MLP_OUT), mo, MLP_OUT, "output", layer,
                                      out_width(modules[mo]) or d_model, family, modules[mo]))
            if RESID_POST in kinds:
                sites.append(Site(_canonical(prefix, layer, RESID_POST), bpath, RESID_POST, "output", layer, d_model,
                                  family, modules[bpath]))
        if FINAL_NORM in kinds:
            fn = _final_norm(modules, stack_path, rspec.final)
            if fn is not None:
                sites.append(Site(_canonical(prefix, None, FINAL_NORM), fn, FINAL_NORM, "output", None, d_model,
                                  family, modules[fn]))
    if not sites:
        raise ModelError(f"no residual-stream site of kinds {', '.join(kinds)} found in {type(model).__name__}",
                         "use --kind resid_post, or --site \"PATH.TO.BLOCKS.*:output\"")
    return sites


def _glu_pre_sites(model, model_type: str | None, fam: FamilySpec | None) -> dict[str, list[Site]]:
    """GLU gate pre-activations (``gate_proj`` outputs) keyed by their block's path; none for plain MLPs."""
    try:
        pre = [s for s in find_sites(model, model_type, (MLP_POST, MLP_PRE)) if s.kind == MLP_PRE]
    except ModelError:
        return {}
    glu = fam is not None and fam.glu
    out: dict[str, list[Site]] = {}
    for s in pre:
        if not (glu or "gate" in s.module_path.rpartition(".")[2]):
            continue
        m = re.match(r"^(.*?\.\d+)\.", s.module_path)
        if m:
            out.setdefault(m.group(1), []).append(s)
    return out


def family_names() -> list[str]:
    """Families whose residual layout is registered (the rest use the structural fallback)."""
    return [f.name for f in FAMILIES if f.name in RESIDUAL_SPECS]


__all__ = ["EMBED", "ATTN_OUT", "MLP_OUT", "FINAL_NORM", "MLP_PRE", "RESID_POST", "RESIDUAL_KINDS", "STREAM_KINDS",
           "RESIDUAL_SPECS", "find_residual_sites", "family_names"]
