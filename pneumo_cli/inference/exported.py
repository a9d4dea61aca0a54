"""Running an exported model: read pneumo-model.json, predict with ONNX, TFLite or SavedModel.

An export folder written by ``pneumo export`` holds the model (``model.onnx``, ``model.tflite``
or the ``saved_model/`` folder) and ``pneumo-model.json``, which says what the model expects and
how its output becomes a mask. Every exported graph takes float32 grey pixels **0..255** shaped
(B, S, S, 1) as input ``image`` (the encoder's input scaling is inside the graph) and returns
float32 probabilities (B, S, S, 1) as output ``probability``.

:func:`load_exported_predictor` gives an object with the same interface as
``predict.Predictor``, so ``pneumo predict --model`` runs the same preprocessing and
post-processing as a prediction from a run. The ONNX path imports ONNX Runtime only, never
TensorFlow; the TFLite and SavedModel paths import TensorFlow.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli import __version__
from pneumo_cli.core.choices import ExportFormat, Quantization, Tta, check_choice, values
from pneumo_cli.core.config import PreprocessConfig, from_dict
from pneumo_cli.core.errors import ConfigError, InputError, shorten_reason
from pneumo_cli.inference.postprocess import Gate

MANIFEST_FILE = "pneumo-model.json"
FORMATS = values(ExportFormat)
QUANTIZATIONS = values(Quantization)
MODEL_NAMES = {"savedmodel": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
INPUT_NAME = "image"
OUTPUT_NAME = "probability"

# A runner maps float32 (B, S, S, 1) grey 0..255 to float32 (B, S, S, 1) probabilities.
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ExportInfo:
    """A checked export folder: its manifest and where the model file is."""

    folder: Path
    format: str
    model_path: Path
    manifest: dict[str, Any]
    settings: PreprocessConfig
    gate: Gate

    @property
    def image_size(self) -> int:
        return self.settings.image_size


def find_export_folder(path: str | os.PathLike[str]) -> Path:
    """The export folder for ``path``: the folder itself, or the folder holding a model file.

    Raises:
        InputError: ``path`` does not exist, or neither it nor its parent has pneumo-model.json.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"exported model {path} does not exist; write one with `pneumo export`")
    for candidate in (path, path.parent) if path.is_dir() else (path.parent,):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    raise InputError(
        f"{path} has no {MANIFEST_FILE} beside it: give a folder written by `pneumo export` "
        "(or the model inside it)"
    )


def read_export(path: str | os.PathLike[str]) -> ExportInfo:
    """Read and check the export at ``path`` (the export folder or the model in it).

    Raises:
        InputError: no pneumo-model.json, unreadable JSON, or the model file is missing.
        ConfigError: written by another pneumo version, unknown format or incomplete settings.
    """
    folder = find_export_folder(path)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{manifest_path}: unreadable ({exc}); export the run again") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{manifest_path}: expected a JSON object; export the run again")
    version = manifest.get("pneumo_version")
    if version != __version__:
        raise ConfigError(
            f"{manifest_path} was written by pneumo {version}, this is pneumo {__version__}: "
            "export the run again with this version (`pneumo export`)"
        )
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"{manifest_path}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    missing = [key for key in ("preprocess", "postprocess", "image_size") if key not in manifest]
    if missing:
        raise ConfigError(f"{manifest_path} lacks {', '.join(missing)}; export the run again")
    settings = from_dict(PreprocessConfig, manifest["preprocess"], str(manifest_path))
    gate = from_dict(Gate, manifest["postprocess"], str(manifest_path))
    if settings.image_size != manifest["image_size"]:
        raise ConfigError(f"{manifest_path}: image_size disagrees with the preprocess settings")
    model_path = folder / MODEL_NAMES[fmt]
    if not model_path.exists():
        raise InputError(f"{folder} has no {MODEL_NAMES[fmt]}; export the run again")
    return ExportInfo(folder, fmt, model_path, manifest, settings, gate)


def load_runner(fmt: str, model_path: str | os.PathLike[str], threads: int | None = None) -> Runner:
    """A function running the exported model at ``model_path`` in its own runtime.

    ``threads`` limits the runtime's CPU threads (default: the runtime's own choice).

    Raises:
        ConfigError: unknown format, or the runtime package is not installed.
        InputError: the runtime cannot load the file.
    """
    loaders = {"onnx": _onnx_runner, "tflite": _tflite_runner, "savedmodel": _savedmodel_runner}
    if fmt not in loaders:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    return loaders[fmt](Path(model_path), threads)


def _onnx_runner(path: Path, threads: int | None) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("ONNX exports need onnxruntime: pip install 'pneumo-cli[onnx]'") from None
    # tf2onnx writes Resize nodes with an attribute ONNX Runtime warns about on every load,
    # harmlessly (parity is checked); show errors only.
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        reason = shorten_reason(str(exc), 200)
        raise InputError(f"{path}: not a loadable ONNX model ({reason})") from None
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch.astype(np.float32, copy=False)})[0]

    return run


def _tflite_runner(path: Path, threads: int | None) -> Runner:
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        try:
            interpreter = tf.lite.Interpreter(
                model_path=str(path), num_threads=threads or os.cpu_count() or 1
            )
        except ValueError as exc:
            reason = shorten_reason(str(exc), 200)
            raise InputError(f"{path}: not a loadable TFLite model ({reason})") from None
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    allocated: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        shape = tuple(batch.shape)
        if allocated != [shape]:  # re-plan the buffers only when the batch size changes
            interpreter.resize_tensor_input(input_index, list(shape))
            try:
                interpreter.allocate_tensors()
            except RuntimeError as exc:
                reason = shorten_reason(str(exc), 200)
                raise InputError(f"{path}: TFLite cannot run this model ({reason})") from None
            allocated[:] = [shape]
        interpreter.set_tensor(input_index, batch.astype(np.float32, copy=False))
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    return run


def _savedmodel_runner(path: Path, threads: int | None) -> Runner:
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
    except (OSError, ValueError, KeyError) as exc:
        reason = shorten_reason(str(exc), 200)
        raise InputError(f"{path}: not a loadable SavedModel ({reason})") from None

    def run(batch: np.ndarray) -> np.ndarray:
        output = serve(**{INPUT_NAME: tf.constant(batch, tf.float32)})
        return output[OUTPUT_NAME].numpy()

    run.keepalive = loaded  # type: ignore[attr-defined]  # the signature needs its object alive
    return run


@dataclass
class ExportedPredictor:
    """An exported model ready for inference, interchangeable with ``predict.Predictor``.

    ``probabilities(images)`` maps uint8 (B, S, S) prepared images to float32 (B, S, S)
    probabilities; ``tta="hflip"`` averages each image's prediction with that of its mirror.
    """

    info: ExportInfo
    tta: str
    _run: Runner = field(repr=False)
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def precision(self) -> str:
        """The compute type of the exported graph (``fp32`` for exports without the field; a
        float16/int8 TFLite export stores smaller weights, recorded as its ``quantize``)."""
        return str(self.info.manifest.get("precision", "fp32"))

    @property
    def engine(self) -> str:
        """The runtime of the export's format."""
        return {"onnx": "onnxruntime", "tflite": "tflite", "savedmodel": "tensorflow"}.get(
            self.info.format, self.info.format
        )

    @property
    def precision_reason(self) -> str:
        return f"the {self.info.format} export computes in {self.precision}"

    @property
    def precision_check(self) -> None:
        return None

    @property
    def source(self) -> Path:
        return self.info.folder

    @property
    def settings(self) -> PreprocessConfig:
        return self.info.settings

    @property
    def gate(self) -> Gate:
        return self.info.gate

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)[..., np.newaxis]
        probs = self._run(batch)[..., 0]
        if self.tta == "hflip":
            mirrored = self._run(np.ascontiguousarray(batch[:, :, ::-1]))[..., 0]
            probs = (probs + mirrored[:, :, ::-1]) / 2.0
        return probs.astype(np.float32, copy=False)


def load_exported_predictor(
    path: str | os.PathLike[str], tta: str = "none", threads: int | None = None
) -> ExportedPredictor:
    """Open an export written by ``pneumo export`` for prediction.

    Raises:
        ConfigError: unknown TTA, another pneumo version, missing runtime package.
        InputError: no pneumo-model.json, or a model file the runtime cannot load.
    """
    check_choice(Tta, tta, "--tta")
    info = read_export(path)
    return ExportedPredictor(info, tta, load_runner(info.format, info.model_path, threads))
