"""``actsparse`` entry point. Commands live one per module and register themselves here.

Heavy imports (torch, transformers) happen inside the commands so ``--help`` is instant.

Start-up (issue 16, goal 2): ``run`` -- the console script and ``python -m actsparse_cli`` -- registers only
the invoked command when the first argument names one (``COMMANDS`` says which module holds it), so only
that module is imported and Typer converts one command's options into click objects instead of every
command's. Everything else (no arguments, ``--help``, ``--version``, an unknown name with its "did you
mean", shell completion, which needs every name) runs the full app. ``from actsparse_cli.main import app``
is always the full app (built on first access; tests/unit/test_lazy_cli.py holds ``COMMANDS`` to it).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import probes.threads  # noqa: F401  (first: its CPU sample marks the start, see probes.threads.busy_elsewhere)
import typer

from actsparse_cli.common import ActsparseCommand, ActsparseGroup
from probes import __version__

# Every command, in the order `actsparse --help` lists them, and its module in actsparse_cli, whose
# register(app) adds all of that module's commands (pplp_cmd: pplp and curve; report_cmd: report, compare
# and track). The one list of commands: a new command is added here, or it is not registered at all.
COMMANDS: dict[str, str] = {
    "analyze": "analyze_cmd", "sites": "sites_cmd", "measure": "measure_cmd", "spectrum": "spectrum_cmd",
    "massive": "massive_cmd", "pplp": "pplp_cmd", "curve": "pplp_cmd", "cliff": "cliff_cmd",
    "drift": "drift_cmd", "grad": "grad_cmd", "flatness": "flatness_cmd", "report": "report_cmd",
    "compare": "report_cmd", "track": "report_cmd", "fit-head": "fithead_cmd",
}
# Commands that run the others through the app they are registered on: always the full app.
NEEDS_EVERY_COMMAND = ("analyze",)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"actsparse {__version__}")
        raise typer.Exit()


# Commands that split their work over torchrun ranks; any other command started by torchrun
# would run in full on every rank and race to write the same output folder.
DATA_PARALLEL_COMMANDS = ("measure",)


def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """actsparse: analyse trained checkpoints."""
    from probes.distributed import launched

    if launched() and ctx.invoked_subcommand not in DATA_PARALLEL_COMMANDS:
        from probes.errors import EXIT_DEVICE

        typer.echo(f"actsparse: error: `{ctx.invoked_subcommand}` does not run data-parallel under torchrun "
                   f"(only {', '.join(DATA_PARALLEL_COMMANDS)} does) -- fix: run it as one process, without torchrun",
                   err=True)
        raise typer.Exit(EXIT_DEVICE)


def command_name(info: Any) -> str:
    """The name a registered command is called by (Typer's rule for an unnamed one: the function's, with -)."""
    from typer.main import get_command_name

    return info.name or get_command_name(info.callback.__name__)


def build_app(only: str | None = None) -> typer.Typer:
    """The ``actsparse`` Typer app: every command (``only=None``), or the callback and the command ``only``."""
    app = typer.Typer(
        name="actsparse",
        help="Activation and gradient sparsity, PPL-p% sparsity, massive activations and weight spectra "
        "for trained checkpoints.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
        cls=ActsparseGroup,
    )
    app.callback()(main)
    modules = list(dict.fromkeys(COMMANDS.values())) if only is None else [COMMANDS[only]]
    for name in modules:
        __import__(f"actsparse_cli.{name}", fromlist=["register"]).register(app)  # (seen by -X importtime)
    if only is not None:  # a module's other commands would be converted too
        app.registered_commands[:] = [c for c in app.registered_commands if command_name(c) == only]
    from typer.core import TyperCommand

    for info in app.registered_commands:  # flags without <bool>, one-line missing-argument errors
        if info.cls is None or info.cls is TyperCommand:
            info.cls = ActsparseCommand
    return app


def _completing() -> bool:
    """Shell completion asked (click's ``_ACTSPARSE_COMPLETE``, under any program name): needs every name."""
    return any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ)


def invoked_command(args: list[str]) -> str | None:
    """The command ``args`` (``sys.argv[1:]``) run, when only it needs registering; else None (full app)."""
    if not args or args[0] not in COMMANDS or args[0] in NEEDS_EVERY_COMMAND or _completing():
        return None
    return args[0]


def writes_output(args: list[str]) -> bool:
    """``args`` run a command with an output folder (``-o``/``--output``), so a manifest will be written."""
    if not args or args[0] not in COMMANDS or _completing() or "--help" in args:
        return False
    return any(a in ("-o", "--output") or a.startswith("--output=") or
               (a[:1] == "-" and a[1:2] not in ("-", "") and "o" in a[1:]) for a in args[1:])


def prefetches(args: list[str]) -> bool:
    """``run`` starts the manifest's background prefetch: a manifest will be written, and the command forks no
    worker processes (``spectrum --workers``), which must not happen while another thread may hold a lock."""
    return writes_output(args) and not any(a == "--workers" or a.startswith("--workers=") for a in args)


def run(prog_name: str | None = None) -> Any:
    """Entry point of the ``actsparse`` console script and of ``python -m actsparse_cli``."""
    if prefetches(sys.argv[1:]):  # git and the package versions for the manifest, beside the command's work
        from reports.manifest import prefetch

        prefetch()
    only = invoked_command(sys.argv[1:])
    app = build_app(only) if only is not None else _full_app()
    return app(prog_name=prog_name)


def _full_app() -> typer.Typer:
    if "app" not in globals():  # built once, on first use
        globals()["app"] = build_app()
    return globals()["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
