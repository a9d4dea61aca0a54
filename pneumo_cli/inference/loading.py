"""Opening what a command predicts with: a run, an ensemble (several runs, a cross-validation
sweep, a run's top checkpoints) or an exported model, behind one interface."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, UsageError


def open_predictor(
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    model: str | os.PathLike[str] | None = None,
    tta: str = "none",
    precision: str = "auto",
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None = None,
    engine: str = "auto",
) -> Any:
    """A run's :class:`Predictor`; for several runs or a cross-validation sweep their
    :class:`~pneumo_cli.inference.ensemble.EnsemblePredictor`; with ``model`` an exported
    model's predictor.

    All offer ``settings``, ``gate``, ``tta``, ``image_size``, ``source``, ``precision``,
    ``precision_reason``, ``precision_check``, ``notes`` and
    ``probabilities(uint8 (B, S, S)) -> float32 (B, S, S)``. An ONNX export loads without
    TensorFlow; it computes in the precision it was exported in, so only ``precision`` auto
    fits it (or fp32 for a float32 export).

    Raises:
        ConfigError: both ``run`` and ``model`` given, members that disagree, or what the
            loaders raise.
        UsageError: a precision the model cannot run in.
    """
    given = [run] if isinstance(run, (str, os.PathLike)) else list(run or [])
    if model is not None:
        if given:
            raise ConfigError("give --run or --model, not both")
        from pneumo_cli.inference.exported import load_exported_predictor

        if engine != "auto":
            raise UsageError(
                f"--engine {engine} cannot apply to --model: an export runs in its format's "
                "runtime; use --run"
            )
        exported = load_exported_predictor(model, tta)
        if precision not in ("auto", exported.precision):
            raise UsageError(
                f"--precision {precision} cannot apply to --model {model}: an export runs in "
                f"the precision it was exported in ({exported.precision}); use --run, or "
                "drop --precision"
            )
        return exported
    from pneumo_cli.inference.ensemble import load_ensemble, load_run, resolve_members

    members = resolve_members(given)
    if len(members.runs) == 1 and not members.sweep:
        return load_run(members.runs[0], tta, precision, parity_inputs, engine)
    return load_ensemble(members, tta, precision, parity_inputs, engine)
