"""Where output goes: results on stdout, progress and messages on stderr.

Library code never prints. It takes an optional ``progress`` callback (``advance(n)``) and the
command layer connects that callback to a Rich progress bar from :func:`progress_bar`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pneumo_cli.core.progress import ProgressFactory, ProgressFn


def stdout_console() -> Console:
    """Console for results (tables, JSON); never wraps JSON, no colour when piped."""
    return Console(soft_wrap=True)


def stderr_console() -> Console:
    """Console for messages and progress bars."""
    return Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    """Print one red line ``error: <message>`` on stderr (newlines folded to keep it one line)."""
    one_line = " ".join(str(message).split())
    stderr_console().print(f"[bold red]error:[/] {escape(one_line)}", highlight=False)


def print_warning(message: str) -> None:
    """Print one yellow ``warning:`` line on stderr."""
    one_line = " ".join(str(message).split())
    stderr_console().print(f"[yellow]warning:[/] {escape(one_line)}", highlight=False)


def print_note(message: str) -> None:
    """Print an informational line on stderr (kept off stdout so scripts can parse results)."""
    stderr_console().print(escape(message), highlight=False)


def print_notes(notes: list[tuple[str, str]], quiet: bool) -> None:
    """Print a library's ``(kind, text)`` notes: warnings always, notes unless ``quiet``."""
    for kind, text in notes:
        if kind == "warning":
            print_warning(text)
        elif not quiet:
            print_note(f"note: {' '.join(str(text).split())}")


def bars_enabled(quiet: bool) -> bool:
    """Progress bars show only on an interactive stderr and without ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def progress_factory(quiet: bool) -> ProgressFactory:
    """The library's progress protocol (:mod:`pneumo_cli.core.progress`) drawn as Rich bars."""
    return functools.partial(progress_bar, quiet=quiet)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, quiet: bool = False) -> Iterator[ProgressFn]:
    """Context manager yielding ``advance(n)`` that drives a Rich bar on stderr.

    With ``quiet`` or a non-terminal stderr the bar is not drawn and ``advance`` does nothing, so
    scripts and CI logs stay clean.
    """
    if not bars_enabled(quiet):
        yield lambda n=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f}/s")

        yield advance
