"""Options used by several commands, declared once."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer

from pneumo_cli.core.choices import Engine, Precision
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


InferencePrecision = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Compute precision of the network: auto (default) takes bf16 on a CPU with "
        "bfloat16 instructions (avx512_bf16/amx_bf16) or fp16 on an NVIDIA GPU when its masks "
        "match float32's for this run (checked once per run and machine kind, cached in "
        "RUN/precision-parity.json), else fp32. An explicit bf16/fp16 runs as asked and warns "
        "if the check fails; fp16 without a GPU is a usage error.",
    ),
]


InferenceEngine = Annotated[
    Engine,
    typer.Option(
        "--engine",
        help="What runs the network: auto (default) times OpenVINO and Keras beside float32 "
        "Keras in the precision check and takes the fastest that matches; keras or openvino "
        "(CPU only) as asked.",
    ),
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
