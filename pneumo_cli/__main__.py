from pneumo_cli.cli import app

app(prog_name="pneumo")
