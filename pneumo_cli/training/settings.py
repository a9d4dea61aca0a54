"""TODO: split-out module docstring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from pneumo_cli.core.config import from_dict
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.data import sampling
from pneumo_cli.engine import precision as precisions
from pneumo_cli.model import build, encoders, losses


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting with its default (the paper's where it has one)."""

    cache: str = "cache"
    encoder: str = encoders.DEFAULT_ENCODER
    encoder_weights: str = "imagenet"
    image_size: int | None = None  # None: the cache's image size
    loss: str = "bce"
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
    precision: str = "auto"  # fp32, bf16, fp16 or auto (config.json records the resolved one)
    input_norm: str = "frozen"  # the encoder's input BatchNormalization: frozen or trainable
    scale_lr: bool = False  # lr x replicas in sync (the linear scaling rule)
    gpus: int | None = None  # None: first GPU if one is visible, else CPU
    train_split: str = "train"
    val_split: str = "val"


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) training call reports."""

    run_dir: str
    status: str
    epochs_done: int
    best_epoch: int | None
    best_val_dice: float | None
    seconds: float
    images_per_s: float | None
    weights_sha256: str | None = None  # of the final network; equal on every worker


class TrainReporter(Protocol):
    """Receives progress; the command layer renders it (library code never prints)."""

    def note(self, message: str) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step_done(self, step: int, logs: dict[str, float]) -> None: ...

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None: ...


class SilentReporter:
    """A reporter that ignores everything."""

    def note(self, message: str) -> None:
        pass

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step_done(self, step: int, logs: dict[str, float]) -> None:
        pass

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None:
        pass


def config_from_run(saved: dict[str, Any], source: str = "config.json") -> TrainConfig:
    """The :class:`TrainConfig` recorded in a run's config.json."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in names}
    values.setdefault("input_norm", "trainable")  # runs from before --input-norm existed
    return from_dict(TrainConfig, values, source)


def _check_settings(config: TrainConfig) -> None:
    encoders.check_encoder(config.encoder)
    losses.get_loss(config.loss)
    sampling.parse_pos_fraction(config.pos_fraction)
    build.check_input_norm(config.input_norm)
    if config.precision not in (*precisions.PRECISIONS, "auto"):
        raise ConfigError(
            f"--precision {config.precision}: choose one of {', '.join(precisions.PRECISIONS)}, auto"
        )
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ConfigError("--steps-per-epoch must be at least 1")
    if not config.lr > 0:
        raise ConfigError(f"--lr {config.lr} must be positive")
    for name in ("patience", "reduce_lr_patience", "seed"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 0")
