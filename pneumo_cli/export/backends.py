"""Writers of the three export formats (TensorFlow, tf2onnx): a Keras U-Net -> files on disk.

Every format is written from one serving function that bakes the run's input scaling into the
graph: input ``image`` float32 (B, S, S, 1) grey 0..255, output ``probability`` float32
(B, S, S, 1) in [0, 1]. The batch axis is dynamic.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.inference.exported import INPUT_NAME, MODEL_NAMES, OUTPUT_NAME

ONNX_OPSET = 17


def serving_function(model: Any, scaling: str, image_size: int) -> Any:
    """A ``tf.function`` of the exported graph: grey 0..255 in, probabilities out (see module)."""
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model.encoders import scale_input

    tf = import_tf()
    spec = tf.TensorSpec([None, image_size, image_size, 1], tf.float32, name=INPUT_NAME)

    def serve(image: Any) -> dict[str, Any]:
        probability = tf.cast(model(scale_input(image, scaling), training=False), tf.float32)
        return {OUTPUT_NAME: probability}

    return tf.function(serve, input_signature=[spec])


@contextlib.contextmanager
def _quiet_converters() -> Iterator[None]:
    """Keep converter chatter (tf2onnx's INFO log, printed banners) off stdout."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def write_savedmodel(model: Any, scaling: str, image_size: int, folder: Path) -> Path:
    """Write a SavedModel with one ``serving_default`` signature into ``folder/saved_model``."""
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    # Track the weights, not the Keras model: saving a tf-keras model's own object graph
    # re-traces every layer and doubles the export time, and servers need only the signature.
    holder = tf.Module()
    holder.weights = list(model.variables)
    holder.serve = serving_function(model, scaling, image_size)
    target = folder / MODEL_NAMES["savedmodel"]
    with _quiet_converters():
        tf.saved_model.save(holder, str(target), signatures={"serving_default": holder.serve})
    return target


def write_tflite(
    model: Any,
    scaling: str,
    image_size: int,
    folder: Path,
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write ``folder/model.tflite``: float32, float16 weights, or int8 (``calibration`` needed).

    ``calibration`` is uint8 (N, S, S) images for the int8 activation ranges; input and output
    stay float32 so the file is fed exactly like the float32 one.

    Raises:
        ConfigError: int8 without calibration images, or an unknown quantization.
    """
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    serve = serving_function(model, scaling, image_size)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], model
    )
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if calibration is None or not len(calibration):
            raise ConfigError("int8 quantization needs calibration images; none were found")
        images = calibration.astype(np.float32)[..., np.newaxis]

        def representative() -> Iterator[list[np.ndarray]]:
            for image in images:
                yield [image[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
    elif quantize is not None:
        raise ConfigError(f"unknown quantization '{quantize}'; choose float16 or int8")
    with _quiet_converters():
        flatbuffer = converter.convert()
    target = folder / MODEL_NAMES["tflite"]
    target.write_bytes(flatbuffer)
    return target


def write_onnx(model: Any, scaling: str, image_size: int, folder: Path) -> Path:
    """Write ``folder/model.onnx`` with tf2onnx (opset :data:`ONNX_OPSET`).

    Raises:
        ConfigError: tf2onnx is not installed.
    """
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    try:
        with _quiet_converters():
            import tf2onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs tf2onnx and onnx: pip install 'pneumo-cli[onnx]'"
        ) from None
    serve = serving_function(model, scaling, image_size)
    spec = tf.TensorSpec([None, image_size, image_size, 1], tf.float32, name=INPUT_NAME)
    with _quiet_converters():
        proto, _ = tf2onnx.convert.from_function(
            serve, input_signature=[spec], opset=ONNX_OPSET, output_path=None
        )
    target = folder / MODEL_NAMES["onnx"]
    target.write_bytes(proto.SerializeToString())
    return target


def write_export(
    model: Any,
    fmt: str,
    scaling: str,
    image_size: int,
    folder: Path,
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write ``model`` in format ``fmt`` into ``folder``; return the model's path."""
    if fmt == "savedmodel":
        return write_savedmodel(model, scaling, image_size, folder)
    if fmt == "tflite":
        return write_tflite(model, scaling, image_size, folder, quantize, calibration)
    if fmt == "onnx":
        return write_onnx(model, scaling, image_size, folder)
    raise ConfigError(f"unknown export format '{fmt}'")
