"""Checks that error hints name options the command has (shared by the CLI tests)."""

from __future__ import annotations


_OPT = None


def command_options() -> dict[str, set[str]]:
    """Every command's option names (``--x`` and ``-x``), read from the Typer app."""
    global _OPT
    if _OPT is None:
        import typer

        from actsparse_cli.main import app

        group = typer.main.get_command(app)
        _OPT = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}
                for name, cmd in group.commands.items()}
    return _OPT


def assert_hints_name_real_options(cmd: str, stderr: str) -> None:
    """Every option a ``-- fix:`` hint names exists on the command that printed it (or on the command
    the hint names explicitly: ``actsparse grad --loss none``). Advice naming an option the running
    command lacks sends the user in circles."""
    import re

    opts = command_options()
    for line in stderr.splitlines():
        if " -- fix: " not in line:
            continue
        fix = line.split(" -- fix: ", 1)[1]
        current = cmd
        for named, opt in re.findall(r"actsparse\s+([a-z]+)|(?<![\w-])(--[a-z][a-z0-9-]*)", fix):
            if named:
                if named in opts:
                    current = named
                continue
            assert opt in opts[current], f"`{cmd}` says: {line!r}; but `actsparse {current}` has no {opt}"
