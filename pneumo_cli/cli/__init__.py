"""The command line: the Typer app and one module per command (parse, call one library function,
render). Nothing else in the package imports from here."""

from pneumo_cli.cli.main import app

__all__ = ["app"]
