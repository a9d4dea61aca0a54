"""Options used by several commands, declared once."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer

from pneumo_cli.core.errors import ConfigError

V = TypeVar("V")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace outputs that already exist (default: keep them)."),
]
Workers = Annotated[
    int | None,
    typer.Option("--workers", "-j", min=1, help="Parallel workers (default: all CPU cores)."),
]


def checked_by(check: Callable[[Any], object]) -> Callable[[V], V]:
    """A Typer callback that runs the library's own ``check`` on an option's value, so a bad
    value is a usage error (exit 2) before anything heavy is imported, with the same words the
    library uses when it checks a stored setting."""

    def callback(value: V) -> V:
        if value is not None:
            try:
                check(value)
            except ConfigError as exc:
                raise typer.BadParameter(str(exc)) from None
        return value

    return callback


def plain(value: Any) -> Any:
    """An option's value for the library: an enum member becomes its string."""
    return value.value if isinstance(value, Enum) else value
