"""Settings shared by several stages: frozen dataclasses with every default defined once.

Each dataclass round-trips through JSON with :func:`to_dict` / ``from_dict`` so that a cache or a
run records exactly the settings it was made with and every later command reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from pneumo_cli.core.choices import (
    Encoder,
    InputNorm,
    Loss,
    Precision,
    Split,
    TopUse,
    check_choice,
    check_encoder,
)
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


# The U-Net halves its input five times and doubles it back, so its side must divide by 32.
IMAGE_SIZE_STEP_PX = 32
IMAGE_SIZE_RANGE_PX = (32, 4096)


def check_image_size(size: int, what: str = "image size") -> int:
    """``size`` if it is a side the network can take: a multiple of 32 in 32..4096 pixels.

    Raises:
        ConfigError: naming ``what`` and the rule.
    """
    low, high = IMAGE_SIZE_RANGE_PX
    if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high or size % 32:
        raise ConfigError(
            f"{what} {size} px must be a multiple of {IMAGE_SIZE_STEP_PX} from {low} to {high} "
            "(the U-Net halves it five times)"
        )
    return size


def parse_pos_fraction(text: str | None) -> tuple[float, float] | None:
    """``"0.8"`` -> (0.8, 0.8); ``"0.8:0.4"`` -> linear from 0.8 (first epoch) to 0.4 (last).

    Raises:
        ConfigError: not one or two numbers in [0, 1].
    """
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(0.0 <= v <= 1.0 for v in numbers):
        raise ConfigError(
            f"--pos-fraction '{text}' must be a fraction in [0, 1] or START:END, e.g. 0.8:0.4"
        )
    return (numbers[0], numbers[-1])


NORMALISATION_NOTE = "none here: scaling to the network's input range is done in the data pipeline"


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of ``pneumo preprocess``; stored in ``CACHE/preprocess.json`` and compared on
    every re-run (a cache is only resumed with the settings it was started with).

    Image steps, in order: crop of the uniform dark border, CLAHE, resize to ``image_size``.
    With ``downscale_first`` the X-ray is first brought to between 2x and 4x ``image_size`` (a
    JPEG DICOM is decoded at 1/2, 1/4 or 1/8 scale, anything else shrunk by area averaging by
    the same power of two), the crop found there, and CLAHE applied after the resize: about 3x
    less work per image, different pixels (a run must predict with the setting it trained on).
    """

    image_size: int = 256
    crop_border: bool = True
    crop_threshold: int = 10  # a border row/column has 99% of its pixels at or below this level
    crop_min_keep: float = 0.5  # a detected box keeping less of a side than this is ignored
    clahe: bool = True
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    downscale_first: bool = False  # decode/shrink before the crop; CLAHE after the resize
    min_image_px: int = 128  # images with a side shorter than this are rejected as too small
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    folds: int = 0  # 0 = no fold column (fold = -1)
    seed: int = 42
    normalisation: str = NORMALISATION_NOTE

    def __post_init__(self) -> None:
        checks = [
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
        check_image_size(self.image_size, "--image-size")
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"preprocess settings: {message}")

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.val_fraction - self.test_fraction


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting with its default (the paper's where it has one), checked on
    creation: a run's config.json is checked by the same rules as `pneumo train`'s options."""

    cache: str = "cache"
    encoder: str = Encoder.resnet34.value
    encoder_weights: str = "imagenet"  # imagenet, none or the path of an .h5 file
    image_size: int | None = None  # None: the cache's image size
    loss: str = Loss.bce.value
    lr: float = 1e-4
    epochs: int = 50
    batch_size: int = 16  # per replica
    steps_per_epoch: int | None = None  # None: one pass over the training images
    patience: int = 10  # epochs without a better val Dice before stopping; 0 = never
    reduce_lr_patience: int = 0  # epochs without improvement before halving lr; 0 = off
    reduce_lr_factor: float = 0.5
    min_lr: float = 1e-6
    seed: int = 0
    augment: bool = True
    pos_fraction: str | None = None  # "0.8" or "0.8:0.4"; None: natural frequency
    precision: str = Precision.auto.value  # config.json records the resolved one
    input_norm: str = InputNorm.frozen.value  # the encoder's input BatchNormalization
    scale_lr: bool = False  # lr x replicas in sync (the linear scaling rule)
    gpus: int | None = None  # None: first GPU if one is visible, else CPU
    train_split: str = Split.train.value
    val_split: str = "val"  # any split name the cache holds
    # Cross-validation fold K of a cache made with --folds N: train on the other folds' train
    # and val images, validate on fold K's (test images never); None: train/val splits.
    fold: int | None = None
    # The N best epochs kept in RUN/top; 1 = best.keras only. What inference uses of them:
    # their averaged weights or their ensemble (see pneumo_cli.training.checkpoints).
    keep_top: int = 1
    top_use: str = TopUse.average.value

    def __post_init__(self) -> None:
        check_encoder(self.encoder)
        check_choice(Loss, self.loss, "--loss")
        check_choice(Precision, self.precision, "--precision")
        check_choice(InputNorm, self.input_norm, "--input-norm")
        check_choice(TopUse, self.top_use, "--top-use")
        parse_pos_fraction(self.pos_fraction)
        if self.image_size is not None:
            check_image_size(self.image_size, "--image-size")
        at_least = {"epochs": 1, "batch_size": 1, "patience": 0, "reduce_lr_patience": 0}
        at_least |= {"seed": 0, "steps_per_epoch": 1, "gpus": 0, "fold": 0, "keep_top": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be positive")
        if not 0 < self.reduce_lr_factor < 1 or not self.min_lr >= 0:
            raise ConfigError("reduce_lr_factor must be in (0, 1) and min_lr at least 0")
