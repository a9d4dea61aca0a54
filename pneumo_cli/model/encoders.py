"""Encoder backbones: which pneumo trains, and how grey pixels become each encoder's input
(the scaling segmentation_models' preprocessing applies, checked against it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumo_cli.core.choices import Encoder, check_encoder, values
from pneumo_cli.core.config import TrainConfig
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.engine.tf import import_sm, import_tf

DEFAULT_ENCODER = TrainConfig.encoder

# How grey pixel values v in [0, 255] become network inputs, per encoder family. The names are
# stored in runs; the maths must match segmentation_models' get_preprocessing(encoder), which
# tests/test_model.py checks for every encoder.
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
SCALINGS = ("raw-0-255", "imagenet-mean-std", "caffe-mean", "symmetric-1")


def available_encoders() -> list[str]:
    """Encoder (backbone) names pneumo can train (:class:`~pneumo_cli.core.choices.Encoder`)."""
    return list(values(Encoder))


def _known_encoders() -> list[str]:
    """Every backbone segmentation_models can build, those holding code included."""
    return list(import_sm().get_available_backbone_names())


def input_scaling_for(encoder: str) -> str:
    """Name of the input scaling segmentation_models' ``get_preprocessing(encoder)`` applies.

    Found by running that function on a probe of grey values and matching the result against
    :data:`SCALINGS`, so a future change in segmentation_models cannot silently diverge.

    Raises:
        ConfigError: the encoder is unknown or its preprocessing matches none of the scalings.
    """
    sm = import_sm()
    if encoder not in _known_encoders():  # any backbone: scaling is not about training
        check_encoder(encoder)
    probe = np.repeat(np.array([0.0, 17.0, 128.0, 255.0]).reshape(1, 2, 2, 1), 3, axis=3)
    expected = np.asarray(sm.get_preprocessing(encoder)(probe.copy()), dtype=np.float64)
    for name in SCALINGS:
        if np.allclose(_scale_numpy(probe, name), expected, atol=1e-4):
            return name
    raise ConfigError(f"encoder '{encoder}' uses an input scaling pneumo does not know")


def _scale_numpy(batch: np.ndarray, scaling: str) -> np.ndarray:
    if scaling == "raw-0-255":
        return batch
    if scaling == "imagenet-mean-std":
        return (batch / 255.0 - np.array(_IMAGENET_MEAN_RGB)) / np.array(_IMAGENET_STD_RGB)
    if scaling == "caffe-mean":
        return batch - np.array(_CAFFE_MEAN_BGR)
    if scaling == "symmetric-1":
        return batch / 127.5 - 1.0
    raise ConfigError(f"unknown input scaling '{scaling}'; known: {', '.join(SCALINGS)}")


def scale_input(batch: Any, scaling: str) -> Any:
    """Turn grey pixels into network input, as a TensorFlow op.

    Args:
        batch: grey pixel values in [0, 255], any numeric dtype, shaped (..., H, W) or
            (..., H, W, 1): an (H, W) image, an (H, W, 1) image or a (B, H, W, 1) batch. A
            trailing axis of size 1 is taken as the channel axis.
        scaling: one of :data:`SCALINGS` (as recorded in the run's config.json).

    Returns:
        float32 tensor ending in a channel axis of 3 (the grey value on every channel), scaled.

    Raises:
        ConfigError: unknown scaling name.
    """
    tf = import_tf()
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown input scaling '{scaling}'; known: {', '.join(SCALINGS)}")
    x = tf.cast(batch, tf.float32)
    if x.shape[-1] != 1:
        x = x[..., tf.newaxis]
    x = tf.repeat(x, 3, axis=-1)
    if scaling == "imagenet-mean-std":
        mean = tf.constant(_IMAGENET_MEAN_RGB, tf.float32)
        std = tf.constant(_IMAGENET_STD_RGB, tf.float32)
        return (x / 255.0 - mean) / std
    if scaling == "caffe-mean":
        return x - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
    if scaling == "symmetric-1":
        return x / 127.5 - 1.0
    return x
