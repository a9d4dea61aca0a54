"""Rendering of command results: a two-column Rich table on stdout, or JSON with ``--json``."""

from __future__ import annotations

import json
from collections.abc import Mapping


def print_json(values: Mapping[str, object]) -> None:
    """The one ``--json`` renderer: ``values`` as indented, key-sorted JSON on stdout (paths and
    other non-JSON values as strings), nothing else on stdout."""
    print(json.dumps(dict(values), indent=2, sort_keys=True, default=str))


def print_summary(title: str, values: Mapping[str, object], as_json: bool) -> None:
    """Print ``values`` with :func:`print_json` (``as_json``) or as a titled two-column table."""
    if as_json:
        print_json(values)
        return
    from rich.table import Table

    from pneumo_cli.cli.console import stdout_console

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in _flatten(values):
        table.add_row(key.replace("_", " "), str(value))
    stdout_console().print(table)


def _flatten(values: Mapping[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """Nested mappings become ``parent child`` rows, so a table stays two columns wide."""
    rows: list[tuple[str, object]] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name} "))
        else:
            rows.append((name, value))
    return rows
