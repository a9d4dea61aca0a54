"""What a training call reports, to whom, and the settings a run recorded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from pneumo_cli.core.config import TrainConfig, from_dict


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
    values.setdefault("fold", None)  # runs from before --fold existed trained on the splits
    values.setdefault("keep_top", 1)  # ... and those from before --keep-top kept best.keras
    values.setdefault("top_use", "average")
    return from_dict(TrainConfig, values, source)
