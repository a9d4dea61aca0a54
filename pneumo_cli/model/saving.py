"""Saving and loading pneumo's Keras models: atomic ``.keras`` files, and a loader that
treats the file as untrusted input (no code from a model file is ever run)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError, shorten_reason
from pneumo_cli.engine.tf import import_sm, import_tf
from pneumo_cli.model.build import CODE_LAYER_TYPES, INPUT_NORM_LAYER, float32_copy


def weights_sha256(model: Any) -> str:
    """SHA-256 of every weight of ``model`` as float32 bytes, in layer order.

    Equal digests mean bit-identical networks (used to check that all workers of a
    multi-worker run end with the same model).
    """
    import hashlib

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_model(model: Any, path: str | os.PathLike[str]) -> None:
    """Save ``model`` (without optimizer) to a ``.keras`` file atomically, in float32.

    A model trained in mixed precision is saved as its :func:`float32_copy`, so every later
    command loads and predicts in float32 whatever the training precision.

    Raises:
        OutputError: the folder cannot be written.
    """
    from pneumo_cli.core.errors import OutputError
    from pneumo_cli.core.files import TEMP_PREFIX

    tf = import_tf()
    target = Path(path)
    tmp = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}")
    # A fresh, uncompiled Model over the same layers: the .keras file then holds the network
    # only (the optimizer state of a run is checkpointed separately, for --resume).
    bare = float32_copy(tf.keras.Model(model.inputs, model.outputs, name=model.name))
    try:
        bare.save(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        from pneumo_cli.core.files import describe_os_error

        raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None


# A .keras file is a zip archive; these are the members pneumo's own models have.
_KERAS_CONFIG = "config.json"
_KERAS_WEIGHTS = "model.weights.h5"
_KERAS_MEMBERS = {_KERAS_CONFIG, "metadata.json", _KERAS_WEIGHTS}
_MAX_CONFIG_BYTES = 64 << 20
# Keras imports the module a layer's config names. pneumo's U-Nets only use layers from these
# packages; any other module (os, subprocess, a planted file...) is refused before import.
_TRUSTED_MODULES = ("keras", "tf_keras", "segmentation_models", "classification_models",
                    "efficientnet")  # fmt: skip


def _code_in_model_config(node: Any, layer: str = "model") -> str | None:
    """Why the parsed ``config.json`` of a .keras file could run code when loaded, or None."""
    if isinstance(node, list):
        return next(filter(None, (_code_in_model_config(item, layer) for item in node)), None)
    if not isinstance(node, dict):
        return None
    inner = node.get("config")
    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
        layer = inner["name"]
    class_name, module = node.get("class_name"), node.get("module")
    if class_name in CODE_LAYER_TYPES or "function_type" in node:
        return f"its layer '{layer}' is a {str(class_name).strip('_')} layer, which holds code"
    if module is not None and (
        not isinstance(module, str) or module.split(".")[0] not in _TRUSTED_MODULES
    ):
        return f"its layer '{layer}' names the Python module '{module}'"
    return next(filter(None, (_code_in_model_config(v, layer) for v in node.values())), None)


def _read_keras_archive(path: Path) -> tuple[Any, bytes]:
    """The parsed ``config.json`` and the raw ``model.weights.h5`` of a ``.keras`` archive,
    refusing anything but the members pneumo writes (and a huge config)."""
    import json
    import zipfile

    if not path.is_file():
        raise InputError(f"{path}: no such model file; was it written by `pneumo train`?")
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path}: not a readable Keras model (not a .keras zip archive, the only format "
            "pneumo loads: Keras would run code stored in HDF5 or SavedModel files)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            unexpected = sorted(members - _KERAS_MEMBERS)
            if unexpected or _KERAS_CONFIG not in members or _KERAS_WEIGHTS not in members:
                detail = f"unexpected {unexpected[0]!r}" if unexpected else "missing members"
                raise InputError(f"{path}: not a model written by pneumo ({detail} in archive)")
            if archive.getinfo(_KERAS_CONFIG).file_size > _MAX_CONFIG_BYTES:
                raise InputError(f"{path}: not a model written by pneumo (huge {_KERAS_CONFIG})")
            return json.loads(archive.read(_KERAS_CONFIG)), archive.read(_KERAS_WEIGHTS)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:  # ValueError: bad JSON or UTF-8
        reason = shorten_reason(str(exc))
        raise InputError(f"{path}: not a readable Keras model ({reason})") from None


def load_model(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` model written by pneumo, for inference (not compiled).

    The file is untrusted input: nothing in it is ever run as Python code. Only the ``.keras``
    zip format is accepted (Keras would load HDF5 files and SavedModel folders without safe
    mode). Its ``config.json`` is parsed as JSON and refused if a layer holds code (``Lambda``)
    or names a module outside Keras and segmentation_models' encoders; the model is then built
    from it in Keras safe mode and its weights are read from ``model.weights.h5``.

    Raises:
        InputError: one line naming the file: missing, not a .keras archive, refused because it
            could run code, or unreadable.
    """
    import tempfile

    tf = import_tf()
    import_sm()  # registers the custom objects of segmentation_models' encoders
    from pneumo_cli.model import losses

    path = Path(path)
    refused = f"{path}: refused to load this model file"
    config, weights = _read_keras_archive(path)
    why = _code_in_model_config(config)
    if why:
        raise InputError(f"{refused}: {why}; pneumo never runs code from model files")
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a readable Keras model (config.json is not an object)")
    config["compile_config"] = None
    try:
        model = tf.keras.saving.deserialize_keras_object(
            config, custom_objects=losses.custom_objects(), safe_mode=True
        )
        # Keras reads the weights through seeks in the zip member, which costs seconds for a
        # large U-Net; a plain file in a temporary folder reads in a fraction of that.
        with tempfile.TemporaryDirectory(prefix="pneumo-model-") as folder:
            weights_path = Path(folder) / _KERAS_WEIGHTS
            weights_path.write_bytes(weights)
            model.load_weights(weights_path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = shorten_reason(str(exc))
        if "safe_mode" in reason:  # a form of code the scan above does not know
            raise InputError(f"{refused}: Keras safe mode found code in it") from None
        raise InputError(f"{path}: not a readable Keras model ({reason})") from None
    if not isinstance(model, tf.keras.Model):
        raise InputError(f"{path}: not a Keras model (it holds a {type(model).__name__})")
    norm = next((layer for layer in model.layers if layer.name == INPUT_NORM_LAYER), None)
    if norm is not None and not norm.trainable:  # computed as in training (set_input_norm)
        from pneumo_cli.model import fastpaths

        fastpaths.unfuse_frozen_norm(norm)
    return model
