"""``actsparse`` entry point. Commands live one per module and register themselves here.

Heavy imports (torch, transformers) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import probes.threads  # noqa: F401  (first: its CPU sample marks the start, see probes.threads.busy_elsewhere)
import typer

from actsparse_cli.common import ActsparseCommand, ActsparseGroup
from probes import __version__

app = typer.Typer(
    name="actsparse",
    help="Activation and gradient sparsity, PPL-p% sparsity, massive activations and weight spectra "
    "for trained checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    cls=ActsparseGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"actsparse {__version__}")
        raise typer.Exit()


# Commands that split their work over torchrun ranks; any other command started by torchrun
# would run in full on every rank and race to write the same output folder.
DATA_PARALLEL_COMMANDS = ("measure",)


@app.callback()
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


def _register() -> None:
    from actsparse_cli import (analyze_cmd, cliff_cmd, drift_cmd, flatness_cmd, grad_cmd, massive_cmd, measure_cmd,
                               pplp_cmd, report_cmd, sites_cmd, spectrum_cmd)

    for mod in (analyze_cmd, sites_cmd, measure_cmd, spectrum_cmd, massive_cmd, pplp_cmd, cliff_cmd, drift_cmd,
                grad_cmd, flatness_cmd, report_cmd):
        mod.register(app)
    from actsparse_cli import fithead_cmd

    fithead_cmd.register(app)
    from typer.core import TyperCommand

    for info in app.registered_commands:  # flags without <bool>, one-line missing-argument errors
        if info.cls is None or info.cls is TyperCommand:
            info.cls = ActsparseCommand


_register()
