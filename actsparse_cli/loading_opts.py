"""The loading options every model-running command shares, turned into a ``load_checkpoint`` call."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from actsparse_cli.common import PANEL_LOAD

TokenizerArg = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer folder or hub id, when the "
                                                     "checkpoint has none.", rich_help_panel=PANEL_LOAD)]
SiteArg = Annotated[Optional[list[str]], typer.Option("--site", help="Glob over module paths, with :input or :output, "
                                                      "e.g. 'model.layers.*.mlp.down_proj:input'. Repeatable; "
                                                      "replaces discovery.", rich_help_panel="Sites")]
KindArg = Annotated[Optional[list[str]], typer.Option("--kind", help="Site kinds to use: mlp_post, mlp_gate_act, "
                                                      "mlp_pre, resid_post. Repeatable.", rich_help_panel="Sites")]


def load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer=None, device_map=None):
    from probes.loading import load_checkpoint

    return load_checkpoint(checkpoint, config=config, arch=arch, device=device, dtype=getattr(dtype, "value", dtype),
                           trust_remote_code=trust_remote_code, unsafe_pickle=unsafe_pickle, tokenizer=tokenizer,
                           device_map=getattr(device_map, "value", device_map))


def resolve_kinds(kind: list[str] | None, valid=None, default=None) -> tuple[str, ...]:
    """``--kind`` values (repeatable, comma-separated) checked against ``valid``; ``default`` when none given."""
    import difflib

    from probes.errors import ActsparseError
    from probes.measure import DEFAULT_KINDS
    from probes.sites import MLP_KINDS, RESID_POST

    valid = tuple(valid or (*MLP_KINDS, RESID_POST))
    if not kind:
        return tuple(default or DEFAULT_KINDS)
    flat = [k.strip() for item in kind for k in item.split(",") if k.strip()]
    bad = [k for k in flat if k not in valid]
    if bad:
        close = difflib.get_close_matches(bad[0], valid, n=1)
        raise ActsparseError(f"unknown site kind {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                             f"use one of {', '.join(valid)}", exit_code=3)
    return tuple(flat)
