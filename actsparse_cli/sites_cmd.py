"""``actsparse sites``: list every activation site found in a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse_cli.common import (ArchOpt, Checkpoint, ConfigOpt, DebugArg, DeviceArg, DeviceMapOpt, DtypeArg,
                                  DtypeChoice, TrustArg, UnsafePickleArg, handle_errors)
from actsparse_cli.loading_opts import KindArg, SiteArg, TokenizerArg, load, resolve_kinds, shared_options


def sites_output(rows: list[dict], title: str, all_modules: bool, tables: bool = True):
    """The sites (or modules) as one table: every field as it is when it fits; when it does not, the
    canonical name becomes a short label (``L0 mlp_post``) that holds kind and layer.

    ``tables``: also the DataFrame that ``--format json|csv`` print (False: no pandas import, for the
    terminal table and markdown, which print the view only)."""
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
    if not tables:
        return Output(items=[View(title, rows, cols)], main=name)
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if k != "_label"} for r in rows])
    return Output(items=[View(title, rows, cols)], tables={name: table}, main=name)


def _rows(lm, kinds, site, all_modules: bool) -> list[dict]:
    from probes.sites import find_sites, in_width, out_width

    if all_modules:
        return [{"module_path": n, "class": type(m).__name__, "in": in_width(m), "out": out_width(m)}
                for n, m in lm.model.named_modules() if n]
    return [s.row() for s in find_sites(lm.model, lm.family, kinds, site)]


def quick_listing(checkpoint, **opts) -> tuple[str, list[dict]] | None:
    """``(family, rows)`` read from the checkpoint's files without loading the model, where they tell
    (``probes.quick_sites``; the status line covers reading the weights, whose values are checked)."""
    from actsparse_cli.common import status_line
    from probes.quick_sites import listing

    with status_line(f"loading {checkpoint}"):
        return listing(checkpoint, **opts)


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
              no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read this listing from the cache "
                                                     "nor store it (cache: $ACTSPARSE_CACHE_DIR, else the user cache "
                                                     "folder).")] = False,
              load_model: Annotated[bool, typer.Option("--load-model", help="Build the model with transformers "
                                                       "even where the sites follow from config.json and the weight "
                                                       "file (GPT-2 and Llama folders).")] = False,
              debug: DebugArg = False, *, output_format) -> None:
        """List the activation sites found: canonical name, module path, kind, width."""
        import time

        from actsparse_cli import sites_cache
        from actsparse_cli.display import OutputFormat, emit, stdout_format

        kinds = resolve_kinds(kind)
        taken_at = time.time()
        opts = dict(config=config, tokenizer=tokenizer, arch=arch, device=device,
                    dtype=getattr(dtype, "value", dtype), trust_remote_code=trust_remote_code,
                    unsafe_pickle=unsafe_pickle, device_map=getattr(device_map, "value", device_map), kinds=kinds,
                    site=site, all_modules=all_modules)
        quick = None if load_model else quick_listing(checkpoint, **opts)
        key = None if no_cache or quick is not None else sites_cache.key_material(checkpoint, **opts)
        hit = quick or sites_cache.get(key)
        if hit is not None:
            family, rows = hit
        else:
            with sites_cache.watch() as quiet:
                lm = load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer,
                          device_map=device_map)
                rows = _rows(lm, kinds, site, all_modules)
            family = lm.family
            if key is not None and quiet.silent:
                sites_cache.put(key, sites_cache.key_material(checkpoint, **opts), family, rows, taken_at)
        fmt = stdout_format(output_format, quiet=False)
        out = sites_output(rows, f"{len(rows)} {'modules' if all_modules else 'sites'} in {checkpoint} "
                                 f"(family {family})", all_modules,
                           tables=fmt in (OutputFormat.json, OutputFormat.csv))
        out.info = {"command": "sites", "checkpoint": checkpoint, "family": family, "n_rows": len(rows)}
        emit(fmt, out)
