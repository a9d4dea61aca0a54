"""Options used by several commands, declared once."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

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


class Tta(StrEnum):
    """Test-time augmentation: ``hflip`` averages a prediction with that of the mirror image."""

    none = "none"
    hflip = "hflip"
