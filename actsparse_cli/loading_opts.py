"""The loading options every model-running command shares, turned into a ``load_checkpoint`` call."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Optional

import typer

from actsparse_cli import common as c
from actsparse_cli.common import PANEL_LOAD

TokenizerArg = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer folder or hub id, when the "
                                                     "checkpoint has none.", rich_help_panel=PANEL_LOAD)]
SiteArg = Annotated[Optional[list[str]], typer.Option("--site", help="Glob over module paths, with :input or :output, "
                                                      "e.g. 'model.layers.*.mlp.down_proj:input'. Repeatable; "
                                                      "replaces discovery.", rich_help_panel="Sites")]
KindArg = Annotated[Optional[list[str]], typer.Option("--kind", help="Site kinds to use: mlp_post, mlp_gate_act, "
                                                      "mlp_pre, resid_post. Repeatable.", rich_help_panel="Sites")]


# Every shared option, by parameter name: (annotated type, default). A command lists the ones it
# takes as bare keyword-only parameters (``*, device, dtype, output, ...``) and ``shared_options``
# gives them their type, help and default, so each option is declared once for every command.
SHARED_OPTIONS: dict[str, tuple[Any, Any]] = {
    # loading
    "config": (c.ConfigOpt, None), "arch": (c.ArchOpt, None), "tokenizer": (TokenizerArg, None),
    "device": (c.DeviceArg, "auto"), "device_map": (c.DeviceMapOpt, None), "dtype": (c.DtypeArg, c.DtypeChoice.auto),
    "trust_remote_code": (c.TrustArg, False), "unsafe_pickle": (c.UnsafePickleArg, False),
    # data
    "data": (c.DataOpt, None), "text_field": (c.TextFieldOpt, "text"), "encoding": (c.EncodingOpt, "utf-8"),
    "batch_size": (c.BatchOpt, 4),
    "max_length": (c.MaxLenOpt, None), "max_tokens": (c.MaxTokOpt, None), "stride": (c.StrideOpt, None),
    "seed": (c.SeedOpt, 0), "skip_first": (c.SkipOpt, 0),
    # sites
    "site": (SiteArg, None), "kind": (KindArg, None),
    # output
    "output": (c.OutArg, None), "force": (c.ForceArg, False), "quiet": (c.QuietArg, False),
    "debug": (c.DebugArg, False), "output_format": (c.FormatOpt, None),
}


def shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give each bare keyword-only parameter of a Typer command named in ``SHARED_OPTIONS`` its
    annotated type and default (through ``__signature__``, which Typer reads)."""
    sig = inspect.signature(fn, eval_str=True)  # real annotations: Typer reads them from __signature__ as given
    params = []
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.annotation is p.empty and p.default is p.empty:
            if p.name not in SHARED_OPTIONS:
                raise TypeError(f"{fn.__name__}: bare parameter {p.name!r} is not a shared option")
            annotation, default = SHARED_OPTIONS[p.name]
            p = p.replace(annotation=annotation, default=default)
            fn.__annotations__[p.name] = annotation
        params.append(p)
    fn.__signature__ = sig.replace(parameters=params)
    return fn


def load(checkpoint, config, arch, device, dtype, trust_remote_code, unsafe_pickle, tokenizer=None, device_map=None):
    from probes.loading import load_checkpoint

    with c.status_line(f"loading {checkpoint}"):
        lm = load_checkpoint(checkpoint, config=config, arch=arch, device=device,
                             dtype=getattr(dtype, "value", dtype), trust_remote_code=trust_remote_code,
                             unsafe_pickle=unsafe_pickle, tokenizer=tokenizer,
                             device_map=getattr(device_map, "value", device_map))
    if getattr(lm.device, "type", str(lm.device)) == "cpu":
        from probes.threads import apply_cpu_threads

        lm.source["cpu_threads"] = apply_cpu_threads()  # few threads when other processes hold the cores
        from probes.malloc_policy import keep_freed_memory

        # freed activations stay in the heap for the next batch instead of being faulted in again (a CPU run
        # only: on a GPU it would keep the host copies of weights moved to the device)
        lm.source["memory_policy"] = keep_freed_memory()
    if lm.source.get("assumed"):  # a config built from shapes: say what was guessed (also in the manifest)
        c.stderr_console().print(f"note: --arch {arch}: {lm.source['assumed']}", highlight=False)
    return lm


def run_options(checkpoint, config, arch, tokenizer, device, dtype, trust_remote_code, unsafe_pickle, output, force,
                **extra: Any) -> dict[str, Any]:
    """The manifest's ``options`` of a command that loads a model: the loading options as given, the output
    folder, ``--force``, then the command's own ``extra``."""
    return {"checkpoint": checkpoint, "config": config, "arch": arch, "tokenizer": tokenizer, "device": device,
            "dtype": getattr(dtype, "value", dtype), "trust_remote_code": trust_remote_code,
            "unsafe_pickle": unsafe_pickle, "output": str(output) if output else None, "force": force, **extra}


def choices(items: list[str] | None, valid, default, what: str, option: str) -> tuple[str, ...]:
    """A repeatable, comma-separated choice option (``--method a,b --method c``), lower-cased, in order without
    repeats; ``default`` when none is given; an unknown name is a usage error naming ``option``."""
    if not items:
        return tuple(default)
    flat = [v.strip().lower() for item in items for v in item.split(",") if v.strip()]
    bad = [v for v in flat if v not in valid]
    if bad:
        from probes.errors import unknown_name

        raise typer.BadParameter(unknown_name(what, bad[0], valid).one_line(), param_hint=option)
    return tuple(dict.fromkeys(flat))


def resolve_kinds(kind: list[str] | None, valid=None, default=None) -> tuple[str, ...]:
    """``--kind`` values (repeatable, comma-separated) checked against ``valid``; ``default`` when none given."""
    from probes.errors import unknown_name
    from probes.measure import DEFAULT_KINDS
    from probes.sites import MLP_KINDS, RESID_POST

    valid = tuple(valid or (*MLP_KINDS, RESID_POST))
    if not kind:
        return tuple(default or DEFAULT_KINDS)
    flat = [k.strip() for item in kind for k in item.split(",") if k.strip()]
    bad = [k for k in flat if k not in valid]
    if bad:
        raise unknown_name("site kind", bad[0], valid, exit_code=3)
    return tuple(flat)
