"""``actsparse sites``: list every activation site found in a checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from actsparse_cli.common import (ArchOpt, Checkpoint, ConfigOpt, DebugArg, DeviceArg, DeviceMapOpt, DtypeArg,
                                  DtypeChoice, TrustArg, UnsafePickleArg, handle_errors, stdout_console)
from actsparse_cli.loading_opts import KindArg, SiteArg, TokenizerArg, load, resolve_kinds


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def register(app: typer.Typer) -> None:
    @app.command("sites")
    @handle_errors
    def sites(checkpoint: Checkpoint, config: ConfigOpt = None, arch: ArchOpt = None, device: DeviceArg = "cpu",
              dtype: DtypeArg = DtypeChoice.auto, trust_remote_code: TrustArg = False,
              unsafe_pickle: UnsafePickleArg = False, tokenizer: TokenizerArg = None, site: SiteArg = None,
              kind: KindArg = None, device_map: DeviceMapOpt = None,
              all_modules: Annotated[bool, typer.Option("--all-modules", help="List every module path instead "
                                                        "(to write a --site glob).")] = False,
              fmt: Annotated[Format, typer.Option("--format", help="table, csv or json on stdout.")] = Format.table,
              debug: DebugArg = False) -> None:
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
        if fmt is Format.json:
            typer.echo(json.dumps(rows, indent=2))
        elif fmt is Format.csv:
            import pandas as pd

            typer.echo(pd.DataFrame(rows).to_csv(index=False), nl=False)
        else:
            from rich.table import Table

            t = Table(title=f"{len(rows)} {'modules' if all_modules else 'sites'} in {checkpoint} "
                            f"(family {lm.family})")
            for c in rows[0].keys() if rows else []:
                t.add_column(c, overflow="fold")
            for r in rows:
                t.add_row(*["" if v is None else str(v) for v in r.values()])
            stdout_console().print(t)
