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
