"""A run ready for inference: the run folder opened and checked once, and the compiled
network (with optional flip TTA) that maps prepared images to probabilities."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.choices import Engine, Tta, check_choice
from pneumo_cli.core.config import PreprocessConfig, from_dict
from pneumo_cli.core.errors import ConfigError, InputError, UsageError
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
    "downscale_first",
)


@dataclass
class Predictor:
    """A trained run ready for inference.

    ``probabilities(images)`` maps uint8 (B, S, S) prepared images to float32 (B, S, S)
    probabilities through one compiled ``tf.function``; ``tta="hflip"`` averages each image's
    prediction with that of its mirror image. ``precision`` is what the network computes in
    (see :func:`load_predictor`), ``precision_reason`` why, ``precision_check`` the check
    against float32 behind it, and ``notes`` what the command should tell on stderr.
    """

    run_dir: Path
    config: dict[str, Any]
    settings: PreprocessConfig
    gate: Gate
    tta: str
    _forward: Any = field(repr=False)
    precision: str = "fp32"
    precision_reason: str = ""
    precision_check: dict[str, Any] | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    engine: str = "keras"
    model_path: Path | None = None  # the model file (best.keras, averaged.keras, top/...)

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def source(self) -> Path:
        return self.run_dir

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images)


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
    # Every model file inference runs (``train --keep-top ... --top-use ensemble``: the top
    # checkpoints; else one file, ``model_path``).
    model_paths: tuple[Path, ...] = ()

    @property
    def image_size(self) -> int:
        return self.settings.image_size


def open_run_for_inference(run_dir: str | os.PathLike[str]) -> RunForInference:
    """Check and read a run folder for predict, evaluate and export (the model is not loaded).

    The gate is ``postprocess.json`` when ``evaluate --tune`` wrote one, else the default. The
    model is ``best.keras``, or for a ``--keep-top`` run what its ``checkpoints.json`` says.

    Raises:
        ConfigError: not a run, or a config without the settings inference needs.
        InputError: the run has no ``best.keras`` (for example a run stopped before its first
            epoch ended).
    """
    from pneumo_cli.model.encoders import SCALINGS
    from pneumo_cli.training.checkpoints import inference_models
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
    if not (run_dir / BEST_MODEL_FILE).is_file():
        raise InputError(
            f"{run_dir} has no {BEST_MODEL_FILE}: was it written by `pneumo train` (a run "
            "stopped before its first epoch has no model)?"
        )
    paths = tuple(inference_models(run_dir, config))
    gate_path = run_dir / POSTPROCESS_FILE
    gate = load_gate(gate_path) if gate_path.is_file() else Gate()
    scaling = config["input_scaling"]
    return RunForInference(run_dir, config, settings, scaling, paths[0], gate, paths)


def load_predictor(
    run_dir: str | os.PathLike[str],
    tta: str = "none",
    precision: str = "auto",
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None = None,
    engine: str = "auto",
    model_file: Path | None = None,
) -> Predictor:
    """Load a run (:func:`open_run_for_inference`) and make its network ready for inference:
    its first model file, or ``model_file`` (one of the run's top checkpoints).

    ``precision`` ``auto`` wants the fastest precision this machine has (fp16 on an NVIDIA GPU,
    bf16 on a CPU with bfloat16 instructions, else fp32) and ``engine`` ``auto`` OpenVINO on a
    CPU where it is installed, else Keras. Every way wanted is checked against the float32 Keras
    network for this run, once per machine kind (:mod:`pneumo_cli.inference.precision_parity`,
    on the run's validation images, else on ``parity_inputs(settings, n)``: up to ``n`` inputs
    prepared with the run's settings, and their description), and timed beside it; the
    fastest whose masks match wins, float32 Keras being the fall-back. An explicit precision or
    engine is used as asked, with a warning in ``notes`` if it fails the check. The inference
    fast paths that change no result are applied.

    Raises:
        ConfigError: not a run, unknown TTA, or a config without the settings inference needs.
        UsageError: an unknown precision or engine, fp16 without a GPU, OpenVINO absent or
            asked for fp16.
        InputError: the run has no readable ``best.keras``.
    """
    from pneumo_cli.engine.precision import choose_precision, gpu_names
    from pneumo_cli.inference.precision_parity import REFERENCE, choose_network

    check_choice(Tta, tta, "--tta")
    opened = open_run_for_inference(run_dir)
    if model_file is not None:
        opened = dataclasses.replace(opened, model_path=Path(model_file))
    gpus = gpu_names()
    # OpenVINO runs on the CPU: with it asked for, `auto` is the CPU's precision, GPU or not.
    on_gpu = bool(gpus) and not (engine == "openvino" and precision == "auto")
    wanted, reason = choose_precision(precision, on_gpu, gpus if on_gpu else [], purpose="predict")
    candidates = _candidates(wanted, precision == "auto", engine, bool(gpus))
    model = _load_inference_model(opened.model_path)
    parts = dict(run_dir=opened.run_dir, config=opened.config, settings=opened.settings,
                 gate=opened.gate, tta=tta, model_path=opened.model_path)  # fmt: skip

    built: dict[Any, Callable[[np.ndarray], np.ndarray]] = {}

    def build(candidate: Any) -> Callable[[np.ndarray], np.ndarray]:
        if candidate not in built:
            built[candidate] = _build_network(model, opened, tta, candidate)
        return built[candidate]

    if candidates == [REFERENCE]:
        network = build(REFERENCE)
        return Predictor(**parts, _forward=network, precision="fp32", precision_reason=reason)
    choice = choose_network(opened, candidates, reason, build, tta, gpus, parity_inputs)
    network = build(choice.candidate)
    built.clear()  # the networks only the check needed
    return Predictor(
        **parts,
        _forward=network,
        precision=choice.candidate.precision,
        precision_reason=choice.reason,
        precision_check=choice.check.to_dict() if choice.check else None,
        notes=choice.notes,
        engine=choice.candidate.engine,
    )


def _candidates(wanted: str, auto: bool, engine: str, on_gpu: bool) -> list[Any]:
    """The ways to run the network, most wanted first (see :func:`load_predictor`).

    Raises:
        UsageError: an unknown engine, OpenVINO absent or asked for a precision it lacks.
    """
    from pneumo_cli.engine.openvino import openvino_available, openvino_precisions
    from pneumo_cli.inference.precision_parity import REFERENCE, Candidate

    try:
        check_choice(Engine, engine, "--engine")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if engine == "openvino" and not openvino_available():
        raise UsageError("--engine openvino needs the openvino package: pip install openvino")
    native = openvino_precisions() if engine != "keras" and openvino_available() else []
    if engine == "openvino" and not auto and wanted not in native:
        raise UsageError(
            f"--engine openvino cannot run {wanted} on this CPU (OpenVINO computes "
            f"{'/'.join(native)} here); use --engine keras or --precision fp32"
        )
    engines = [engine]
    if engine == "auto":
        engines = ["openvino", "keras"] if native and not on_gpu else ["keras"]
    precisions = [wanted] + (["fp32"] if auto and wanted != "fp32" else [])
    candidates = [
        Candidate(e, p) for p in precisions for e in engines if e == "keras" or p in native
    ]
    if auto and engine == "auto" and REFERENCE not in candidates:
        candidates.append(REFERENCE)
    return candidates


def _load_inference_model(path: Path) -> Any:
    from pneumo_cli.model import fastpaths
    from pneumo_cli.model.saving import load_model

    model = load_model(path)
    fastpaths.fold_zero_padding(model)
    return model


def _build_network(model: Any, opened: RunForInference, tta: str, candidate: Any) -> Any:
    """``uint8 (B, S, S) -> float32 (B, S, S)`` for a candidate way to run ``model``."""
    from pneumo_cli.model.build import precision_copy

    if candidate.engine == "openvino":
        from pneumo_cli.engine.openvino import OpenVinoNetwork

        # OpenVINO converts the float32 function and computes in the precision it is told.
        return OpenVinoNetwork(_compile_forward(model, opened, tta), candidate.precision)
    net = model if candidate.precision == "fp32" else precision_copy(model, candidate.precision)
    return _numpy(_compile_forward(net, opened, tta))


def _numpy(forward: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: forward(images).numpy()


def _compile_forward(model: Any, opened: RunForInference, tta: str) -> Any:
    """One ``tf.function``: uint8 (B, S, S) -> float32 (B, S, S) probabilities, with TTA."""
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model.encoders import scale_input

    tf = import_tf()
    size, scaling = opened.image_size, opened.input_scaling

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

    return forward


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
