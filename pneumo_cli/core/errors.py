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
