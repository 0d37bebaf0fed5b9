"""``actsparse sites``: list every activation site found in a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse_cli.common import (ArchOpt, Checkpoint, ConfigOpt, DebugArg, DeviceArg, DeviceMapOpt, DtypeArg,
                                  DtypeChoice, TrustArg, UnsafePickleArg, handle_errors)
from actsparse_cli.loading_opts import KindArg, SiteArg, TokenizerArg, load, resolve_kinds, shared_options


def sites_output(rows: list[dict], title: str, all_modules: bool):
    """The sites (or modules) as one table: every field as it is when it fits; when it does not, the
    canonical name becomes a short label (``L0 mlp_post``) that holds kind and layer."""
    import pandas as pd

    from actsparse_cli.display import Col, Output, View, labelled, unique_labels

    keys = list(rows[0].keys()) if rows else []
    rank = {"family": 4, "dtype": 3, "width": 2, "hook": 1}
    folded = ("kind", "layer") if not all_modules and "canonical_name" in keys else ()
    cols = [Col(k, lambda r, k=k: "" if r.get(k) is None else str(r.get(k)), left=True, drop=rank.get(k, 0),
                wide_only=k in folded) for k in keys]
    if folded:
        rows = labelled(rows, unique_labels(rows))
        cols[keys.index("canonical_name")] = Col("canonical_name", lambda r: str(r["canonical_name"]), left=True,
                                                 short=lambda r: r["_label"], short_head="site")
    name = "modules" if all_modules else "sites"
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "_label"} for r in rows])
    return Output(items=[View(title, rows, cols)], tables={name: table}, main=name)


def register(app: typer.Typer) -> None:
    @app.command("sites")
    @shared_options
    @handle_errors
    def sites(checkpoint: Checkpoint, config: ConfigOpt = None, arch: ArchOpt = None, device: DeviceArg = "cpu",
              dtype: DtypeArg = DtypeChoice.auto, trust_remote_code: TrustArg = False,
              unsafe_pickle: UnsafePickleArg = False, tokenizer: TokenizerArg = None, site: SiteArg = None,
              kind: KindArg = None, device_map: DeviceMapOpt = None,
              all_modules: Annotated[bool, typer.Option("--all-modules", help="List every module path instead "
                                                        "(to write a --site glob).")] = False,
              debug: DebugArg = False, *, output_format) -> None:
        """List the activation sites found: canonical name, module path, kind, width."""
        from probes.sites import find_sites, in_width, out_width

        kinds = resolve_kinds(kind)
        lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                  device_map=device_map)
        if all_modules:
            rows = [{"module_path": n, "class": type(m).__name__, "in": in_width(m), "out": out_width(m)}
                    for n, m in lm.model.named_modules() if n]
        else:
            rows = [s.row() for s in find_sites(lm.model, lm.family, kinds, site)]
        from actsparse_cli.display import emit, stdout_format

        out = sites_output(rows, f"{len(rows)} {'modules' if all_modules else 'sites'} in {checkpoint} "
                                 f"(family {lm.family})", all_modules)
        out.info = {"command": "sites", "checkpoint": checkpoint, "family": lm.family, "n_rows": len(rows)}
        emit(stdout_format(output_format, quiet=False), out)
