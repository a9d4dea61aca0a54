"""Rendering of command results: a two-column Rich table on stdout, or JSON with ``--json``."""

from __future__ import annotations

import json
from collections.abc import Mapping


def print_summary(title: str, values: Mapping[str, object], as_json: bool) -> None:
    """Print ``values`` as indented, key-sorted JSON (``as_json``) or as a titled table."""
    if as_json:
        print(json.dumps(dict(values), indent=2, sort_keys=True, default=str))
        return
    from rich.table import Table

    from pneumo_cli.console import stdout_console

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key.replace("_", " "), str(value))
    stdout_console().print(table)
