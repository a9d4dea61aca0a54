"""Settings shared by several stages: frozen dataclasses with every default defined once.

Each dataclass round-trips through JSON with :func:`to_dict` / ``from_dict`` so that a cache or a
run records exactly the settings it was made with and every later command reuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from pneumo_cli.errors import ConfigError

T = TypeVar("T")


def to_dict(settings: Any) -> dict[str, Any]:
    """A JSON-ready dict of a settings dataclass (tuples become lists)."""
    return dataclasses.asdict(settings)


def from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build ``cls`` from ``data``, refusing unknown keys; missing keys take their defaults.

    Raises:
        ConfigError: naming ``source`` and the unknown keys or bad values.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; was it written by a newer pneumo?"
        )
    values = {}
    for key, value in data.items():
        default = getattr(cls, key, None)
        values[key] = tuple(value) if isinstance(default, tuple) and value is not None else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
