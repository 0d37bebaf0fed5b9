"""Shared options are declared once (actsparse_cli.loading_opts.SHARED_OPTIONS) and given to each command."""

import inspect

import pytest
import typer
from typer.testing import CliRunner

from actsparse_cli.loading_opts import SHARED_OPTIONS, shared_options
from actsparse_cli.main import app


def test_bare_parameters_get_the_shared_type_and_default():
    def cmd(name: str = "x", *, device, batch_size, quiet):
        return device, batch_size, quiet

    sig = inspect.signature(shared_options(cmd))
    assert sig.parameters["device"].default == SHARED_OPTIONS["device"][1] == "auto"
    assert sig.parameters["batch_size"].annotation is SHARED_OPTIONS["batch_size"][0]
    assert sig.parameters["name"].default == "x"


def test_an_unknown_bare_parameter_is_a_programming_error():
    def cmd(*, devise):
        return devise

    with pytest.raises(TypeError, match="devise"):
        shared_options(cmd)


def test_a_shared_option_parses_through_typer():
    small = typer.Typer()

    @small.command()
    @shared_options
    def run(*, batch_size, device, quiet):
        typer.echo(f"{batch_size} {device} {quiet}")

    r = CliRunner().invoke(small, ["--batch-size", "7", "--quiet"])
    assert r.exit_code == 0 and r.output.strip() == "7 auto True"
    assert CliRunner().invoke(small, ["--batch-size", "0"]).exit_code == 2  # the shared min=1 applies


@pytest.mark.parametrize("command,options", [
    ("measure", ["--data", "--batch-size", "--site", "--kind", "--device-map", "--dtype", "--force", "--debug"]),
    ("pplp", ["--data", "--max-tokens", "--config", "--unsafe-pickle", "-o"]),
    ("massive", ["--site", "--tokenizer", "--trust-remote-code", "--quiet"]),
    ("spectrum", ["--unsafe-pickle", "--force"]),
])
def test_commands_list_their_shared_options(command, options):
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in options:
        assert opt in r.output, (command, opt)
