from actsparse_cli.main import app

app(prog_name="actsparse")
