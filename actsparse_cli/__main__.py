from actsparse_cli.main import run

run(prog_name="actsparse")
