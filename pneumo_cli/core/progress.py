"""The one progress protocol of the library.

A long-running library function takes ``progress: ProgressFactory | None``. For each stage of
its work it opens ``with stage(progress, "predicting", total) as advance:`` and calls
``advance(n)`` after every ``n`` finished items; ``total`` is None when it is not known in
advance. The library never draws anything itself: the command layer passes a factory that shows
a Rich bar on stderr (nothing under ``--quiet`` or when stderr is not a terminal), and a notebook
or test can pass its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

ProgressFn = Callable[[int], None]
ProgressFactory = Callable[[str, int | None], AbstractContextManager[ProgressFn]]


@contextlib.contextmanager
def no_progress(description: str, total: int | None) -> Iterator[ProgressFn]:
    """A stage that reports to nobody."""
    yield lambda n=1: None


def stage(
    progress: ProgressFactory | None, description: str, total: int | None
) -> AbstractContextManager[ProgressFn]:
    """Open one stage of work on ``progress`` (or on nobody when it is None)."""
    return (progress or no_progress)(description, total)
