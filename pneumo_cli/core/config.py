"""Settings shared by several stages: frozen dataclasses with every default defined once.

Each dataclass round-trips through JSON with :func:`to_dict` / ``from_dict`` so that a cache or a
run records exactly the settings it was made with and every later command reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, TypeVar

from pneumo_cli.core.errors import ConfigError

T = TypeVar("T")


def to_dict(settings: Any) -> dict[str, Any]:
    """A JSON-ready dict of a settings dataclass (tuples become lists)."""
    return dataclasses.asdict(settings)


def from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build ``cls`` from ``data``, refusing unknown keys; missing keys take their defaults.

    Every value must have its field's type, as JSON gives it: a ``bool`` field takes only
    true/false, an ``int`` field an integer (not true/false), a ``float`` field any number, a
    ``str`` field a string, a tuple field a list (made a tuple), and ``X | None`` also null.
    Nothing is converted silently: ``"no"`` is not false and ``"64"`` is not 64.

    Raises:
        ConfigError: naming ``source`` and the unknown keys or the first bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, got {_json_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; was it written by a newer pneumo?"
        )
    values = {}
    for key, value in data.items():
        try:
            values[key] = _typed(value, hints[key])
        except TypeError as exc:
            raise ConfigError(f"{source}: {key} must be {exc}, got {_shown(value)}") from None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(value: Any, annotation: Any) -> Any:
    """``value`` checked against a field annotation (a list becomes a tuple).

    Raises:
        TypeError: whose message describes what the annotation accepts.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options:
            with contextlib.suppress(TypeError):
                return _typed(value, option)
        described = " or ".join(_describe(option) for option in options)
        raise TypeError(described + (" or null" if type(None) in args else ""))
    if annotation is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(item, args[0]) for item in value)
        return tuple(value)
    if annotation is Any:
        return value
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise TypeError(_describe(annotation))
    return value


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple or annotation is tuple:
        return "a list"
    return _KINDS.get(annotation, f"a {getattr(annotation, '__name__', annotation)}")


def _json_kind(value: Any) -> str:
    """How JSON would call the type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _shown(value: Any) -> str:
    """``value`` for a one-line message: JSON spelling, cut to 60 characters."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


NORMALISATION_NOTE = "none here: scaling to the network's input range is done in the data pipeline"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of ``pneumo preprocess``; stored in ``CACHE/preprocess.json`` and compared on
    every re-run (a cache is only resumed with the settings it was started with).

    Image steps, in order: crop of the uniform dark border, CLAHE, resize to ``image_size``.
    """

    image_size: int = 256
    crop_border: bool = True
    crop_threshold: int = 10  # a border row/column has 99% of its pixels at or below this level
    crop_min_keep: float = 0.5  # a detected box keeping less of a side than this is ignored
    clahe: bool = True
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    min_image_px: int = 128  # images with a side shorter than this are rejected as too small
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    folds: int = 0  # 0 = no fold column (fold = -1)
    seed: int = 42
    normalisation: str = NORMALISATION_NOTE

    def __post_init__(self) -> None:
        checks = [
            (16 <= self.image_size <= 4096, f"image_size {self.image_size} not in 16..4096"),
            (0 <= self.crop_threshold < 255, f"crop_threshold {self.crop_threshold} not in 0..254"),
            (0 < self.crop_min_keep <= 1, f"crop_min_keep {self.crop_min_keep} not in (0, 1]"),
            (self.clahe_clip > 0, f"clahe_clip {self.clahe_clip} must be > 0"),
            (1 <= self.clahe_grid <= 64, f"clahe_grid {self.clahe_grid} not in 1..64"),
            (self.min_image_px >= 1, f"min_image_px {self.min_image_px} must be >= 1"),
            (0 <= self.val_fraction < 1, f"val_fraction {self.val_fraction} not in [0, 1)"),
            (0 <= self.test_fraction < 1, f"test_fraction {self.test_fraction} not in [0, 1)"),
            (
                self.val_fraction + self.test_fraction < 1,
                "val_fraction + test_fraction must leave some training images (< 1)",
            ),
            (self.folds == 0 or 2 <= self.folds <= 100, f"folds {self.folds}: use 0 or 2..100"),
            (self.normalisation == NORMALISATION_NOTE, "normalisation is not a preprocess option"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"preprocess settings: {message}")

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.val_fraction - self.test_fraction
