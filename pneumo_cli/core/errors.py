"""The exceptions users see.

Library code raises a :class:`PneumoError` (or a subclass) whose message names the file, row or
value at fault and how to fix it. The command layer turns it into one red line on stderr and exit
code 1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PneumoError(Exception):
    """A user or data error: bad input, a missing file, an impossible setting."""


class InputError(PneumoError):
    """An input file or folder is missing, unreadable or malformed."""


class RleError(InputError):
    """A run-length encoded mask is malformed or does not fit the image."""


class DicomError(InputError):
    """A DICOM file cannot be read or decoded into a 2-D grey image."""


class OutputError(PneumoError):
    """An output cannot be written (exists already, read-only folder, disk full, unsafe name)."""


class ConfigError(PneumoError):
    """A setting is invalid, or a run/cache was written with settings that do not fit."""


class ClusterLostError(ConfigError):
    """A multi-worker run lost a peer; its state is saved. TensorFlow's collective and
    coordination teardown can then block at interpreter exit waiting for the dead peer, so the
    command line ends the process at once after printing this (exit code 1)."""


class UsageError(ConfigError):
    """An option value this machine or command cannot honour (exit code 2, like Typer's usage
    errors), found only once the library looks (``--precision fp16`` without a GPU)."""


_OPENERS, _CLOSERS = "([{", ")]}"


def shorten_reason(text: str, limit: int = 160) -> str:
    """``text`` (e.g. a library's exception message) as one line of at most ``limit``
    characters, to quote inside a pneumo message.

    A longer text is cut at a word boundary and ends with an ellipsis, never inside a bracket
    it opened (a cut "... or (" inside the caller's own parentheses would read "... or )"), so
    the quoting message keeps balanced parentheses.
    """
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if text[len(cut)] != " " and space >= limit // 2:  # not at a word's end: drop its start
        cut = cut[:space]
    unclosed: list[int] = []
    for index, char in enumerate(cut):
        if char in _OPENERS:
            unclosed.append(index)
        elif char in _CLOSERS and unclosed:
            unclosed.pop()
    if unclosed:
        cut = cut[: unclosed[0]]
    return cut.rstrip(" ,;:-'\"") + "…"
