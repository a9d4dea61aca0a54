"""A run ready for inference: the run folder opened and checked once, and the compiled
network (with optional flip TTA) that maps prepared images to probabilities."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.choices import Tta, check_choice
from pneumo_cli.core.config import PreprocessConfig, from_dict
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.inference.postprocess import POSTPROCESS_FILE, Gate, load_gate

# Preprocessing settings that change the pixels the network sees; a cache used for prediction
# must agree with the run's training cache on all of them.
PIXEL_SETTINGS = (
    "image_size",
    "crop_border",
    "crop_threshold",
    "crop_min_keep",
    "clahe",
    "clahe_clip",
    "clahe_grid",
)


@dataclass
class Predictor:
    """A trained run ready for inference.

    ``probabilities(images)`` maps uint8 (B, S, S) prepared images to float32 (B, S, S)
    probabilities through one compiled ``tf.function``; ``tta="hflip"`` averages each image's
    prediction with that of its mirror image.
    """

    run_dir: Path
    config: dict[str, Any]
    settings: PreprocessConfig
    gate: Gate
    tta: str
    _forward: Any = field(repr=False)

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def source(self) -> Path:
        return self.run_dir

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()


@dataclass(frozen=True)
class RunForInference:
    """What inference needs from a run folder, checked: its recorded preprocessing, the input
    scaling of its encoder, its best model file and its post-processing gate."""

    run_dir: Path
    config: dict[str, Any]
    settings: PreprocessConfig
    input_scaling: str
    model_path: Path
    gate: Gate

    @property
    def image_size(self) -> int:
        return self.settings.image_size


def open_run_for_inference(run_dir: str | os.PathLike[str]) -> RunForInference:
    """Check and read a run folder for predict, evaluate and export (the model is not loaded).

    The gate is ``postprocess.json`` when ``evaluate --tune`` wrote one, else the default.

    Raises:
        ConfigError: not a run, or a config without the settings inference needs.
        InputError: the run has no ``best.keras`` (for example a run stopped before its first
            epoch ended).
    """
    from pneumo_cli.model.encoders import SCALINGS
    from pneumo_cli.training.runs import BEST_MODEL_FILE, load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    missing = [key for key in ("preprocess", "input_scaling", "image_size") if key not in config]
    if missing:
        raise ConfigError(f"{run_dir}/config.json lacks {', '.join(missing)}; retrain the run")
    settings = from_dict(PreprocessConfig, config["preprocess"], f"{run_dir}/config.json")
    if config["input_scaling"] not in SCALINGS:
        raise ConfigError(
            f"{run_dir}/config.json: unknown input_scaling {config['input_scaling']!r}; "
            f"expected one of {', '.join(SCALINGS)}"
        )
    model_path = run_dir / BEST_MODEL_FILE
    if not model_path.is_file():
        raise InputError(
            f"{run_dir} has no {BEST_MODEL_FILE}: was it written by `pneumo train` (a run "
            "stopped before its first epoch has no model)?"
        )
    gate_path = run_dir / POSTPROCESS_FILE
    gate = load_gate(gate_path) if gate_path.is_file() else Gate()
    return RunForInference(run_dir, config, settings, config["input_scaling"], model_path, gate)


def load_predictor(run_dir: str | os.PathLike[str], tta: str = "none") -> Predictor:
    """Load a run (:func:`open_run_for_inference`) and compile its network for inference.

    Raises:
        ConfigError: not a run, unknown TTA, or a config without the settings inference needs.
        InputError: the run has no readable ``best.keras``.
    """
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model.encoders import scale_input
    from pneumo_cli.model.saving import load_model

    check_choice(Tta, tta, "--tta")
    opened = open_run_for_inference(run_dir)
    model = load_model(opened.model_path)
    config, settings, gate = opened.config, opened.settings, opened.gate

    tf = import_tf()
    size, scaling = settings.image_size, opened.input_scaling

    # No autograph: the function has no tensor-dependent control flow, and autograph would write
    # generated code into /tmp.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size], tf.uint8)], autograph=False)
    def forward(images: Any) -> Any:
        inputs = scale_input(images[..., tf.newaxis], scaling)
        probs = tf.cast(model(inputs, training=False), tf.float32)[..., 0]
        if tta == "hflip":
            mirrored = tf.cast(model(tf.reverse(inputs, axis=[2]), training=False), tf.float32)
            probs = (probs + tf.reverse(mirrored[..., 0], axis=[2])) / 2.0
        return probs

    return Predictor(opened.run_dir, config, settings, gate, tta, forward)


def check_cache_matches(cache_settings: PreprocessConfig, run: Any, cache: Path) -> None:
    """Refuse a cache whose pixel settings differ from those the run (or export) was made with.

    ``run`` is a :class:`Predictor` or an ``inference.exported.ExportedPredictor``.
    """
    differing = [
        f"{name} {getattr(cache_settings, name)} vs {getattr(run.settings, name)}"
        for name in PIXEL_SETTINGS
        if getattr(cache_settings, name) != getattr(run.settings, name)
    ]
    if differing:
        raise ConfigError(
            f"{cache} was preprocessed differently from {run.source} "
            f"(cache vs run: {'; '.join(differing)}); preprocess again with the run's settings"
        )


def open_predictor(
    run: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | None = None,
    tta: str = "none",
) -> Any:
    """A run's :class:`Predictor`, or with ``model`` an exported model's predictor.

    Both offer ``settings``, ``gate``, ``tta``, ``image_size``, ``source`` and
    ``probabilities(uint8 (B, S, S)) -> float32 (B, S, S)``. An ONNX export loads without
    TensorFlow.

    Raises:
        ConfigError: both ``run`` and ``model`` given, or what the loaders raise.
    """
    if model is not None:
        if run is not None:
            raise ConfigError("give --run or --model, not both")
        from pneumo_cli.inference.exported import load_exported_predictor

        return load_exported_predictor(model, tta)
    from pneumo_cli.training.runs import resolve_run

    return load_predictor(resolve_run(run), tta)
