from pneumo_cli.cli.main import app

app(prog_name="pneumo")
