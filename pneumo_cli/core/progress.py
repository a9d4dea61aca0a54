"""The one progress protocol of the library.

A long-running library function takes ``progress: ProgressFn | None`` and calls ``progress(n)``
after each ``n`` finished items. It never draws anything itself: the command layer passes a
callback that advances a Rich bar on stderr (or does nothing under ``--quiet``).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int], None]


def report_progress(progress: ProgressFn | None, n: int = 1) -> None:
    """Call ``progress(n)`` if a callback was given."""
    if progress is not None:
        progress(n)
