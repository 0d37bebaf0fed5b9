"""Start-up (issue 16, goal 2): ``actsparse CMD`` registers only CMD (actsparse_cli/main.py ``run``).

The lazy table ``COMMANDS`` must match what the full registration produces (names, order, modules), a
command registered alone must be the same command (help, options, short help), and everything that
needs every command (``--help``, unknown names, completion, ``analyze``) must still get the full app.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from actsparse_cli import main as cli_main
from actsparse_cli.main import COMMANDS, NEEDS_EVERY_COMMAND, app, build_app, command_name, invoked_command

ROOT = Path(__file__).resolve().parents[2]
LAZY = [n for n in COMMANDS if n not in NEEDS_EVERY_COMMAND]


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("_") and k.endswith("_COMPLETE"))}
    env.pop("WORLD_SIZE", None)
    return dict(env, HF_HUB_OFFLINE="1", COLUMNS="80", **more)


def _py(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(**env), timeout=120)


def test_the_lazy_table_is_the_full_registration():
    """Same names in the same order (the order --help lists), each in the module COMMANDS names."""
    infos = app.registered_commands
    assert [command_name(c) for c in infos] == list(COMMANDS)
    for c in infos:
        assert c.callback.__module__ == f"actsparse_cli.{COMMANDS[command_name(c)]}", command_name(c)
    assert len(set(COMMANDS.values())) < len(COMMANDS)  # modules with several commands are covered


def test_app_is_the_full_app_and_built_once():
    assert cli_main.app is app
    assert {"sites", "spectrum", "report", "compare", "fit-head"} <= set(typer.main.get_command(app).commands)
    import actsparse_cli.analyze_cmd as analyze_cmd

    assert analyze_cmd._APP[0] is app  # analyze runs the other commands through the full app
    with pytest.raises(AttributeError):
        cli_main.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("name", LAZY)
def test_a_command_registered_alone_is_the_same_command(name):
    lazy_app = build_app(name)
    assert [command_name(c) for c in lazy_app.registered_commands] == [name]  # not its module's others
    full, alone = typer.main.get_command(app), typer.main.get_command(lazy_app)
    assert list(alone.commands) == [name]
    a, b = full.commands[name], alone.commands[name]
    assert type(a) is type(b)
    assert a.get_short_help_str(45) == b.get_short_help_str(45)
    assert [(p.name, p.opts, p.secondary_opts, getattr(p, "help", None), p.required, repr(p.default))
            for p in a.params] == [(p.name, p.opts, p.secondary_opts, getattr(p, "help", None), p.required,
                                    repr(p.default)) for p in b.params]
    runner = CliRunner()
    ra, rb = runner.invoke(app, [name, "--help"]), runner.invoke(lazy_app, [name, "--help"])
    assert ra.exit_code == rb.exit_code == 0
    assert ra.output == rb.output


def test_which_invocations_register_one_command():
    assert invoked_command(["spectrum", "/x", "-o", "y"]) == "spectrum"
    assert invoked_command(["compare", "--help"]) == "compare"
    assert invoked_command(["fit-head"]) == "fit-head"
    for args in ([], ["--help"], ["--version"], ["spectrom"], ["Spectrum"], ["--", "spectrum"],
                 ["analyze", "--quick"], ["--show-completion", "bash"]):
        assert invoked_command(args) is None, args


def test_shell_completion_gets_every_command(monkeypatch):
    monkeypatch.setenv("_ACTSPARSE_COMPLETE", "complete_bash")
    assert invoked_command(["spectrum"]) is None


def test_console_script_points_at_run():
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    scripts = toml.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["actsparse"].split(":")
    assert (module, func) == ("actsparse_cli.main", "run") and callable(getattr(cli_main, func))


# ---- whole processes: the entry point as users start it
_RUN = ("import sys; sys.argv[0] = 'actsparse'; from actsparse_cli.main import run\n"
        "try:\n    run()\nfinally:\n"
        "    print('MODULES', sorted(m for m in sys.modules if m.startswith('actsparse_cli.') and m.endswith('_cmd')),"
        " file=sys.stderr)\n")
_FULL = "import sys; sys.argv[0] = 'actsparse'; from actsparse_cli.main import app; app()"


def _split(r: subprocess.CompletedProcess) -> tuple[str, list[str]]:
    err, _, mods = r.stderr.rpartition("MODULES ")
    return err, eval(mods)  # noqa: S307 (our own print of a list of module names)


def test_run_imports_one_command_module_and_prints_the_same():
    r = _py(_RUN, "spectrum", "--help")
    err, mods = _split(r)
    assert mods == ["actsparse_cli.spectrum_cmd"]
    full = _py(_FULL, "spectrum", "--help")
    assert (r.returncode, r.stdout, err) == (full.returncode, full.stdout, full.stderr)
    assert "Usage: actsparse spectrum" in r.stdout


def test_run_errors_and_guard_as_the_full_app():
    # a usage error inside the command, and the torchrun guard (the callback), on one command's app
    for args, env in ((["report", "--bogus"], {}), (["spectrum", "/nonexist"], {"WORLD_SIZE": "2"})):
        r, full = _py(_RUN, *args, **env), _py(_FULL, *args, **env)
        err, mods = _split(r)
        assert len(mods) == 1, mods
        assert (r.returncode, r.stdout, err) == (full.returncode, full.stdout, full.stderr), args
        assert r.returncode in (2, 6) and err.strip()
    # an unknown command: the full app, with its suggestion
    r = _py(_RUN, "spectrom")
    err, mods = _split(r)
    assert r.returncode == 2 and "Did you mean 'spectrum'?" in err and len(mods) == len(set(COMMANDS.values()))


def test_run_completes_every_command_name():
    r = _py(_RUN, _ACTSPARSE_COMPLETE="complete_bash", COMP_WORDS="actsparse ", COMP_CWORD="1")
    assert r.stdout.split() == list(COMMANDS)
