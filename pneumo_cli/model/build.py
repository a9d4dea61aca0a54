"""The segmentation_models U-Net and the one place that chooses the Keras engine.

pneumo runs on TensorFlow with the tf-keras engine (``TF_USE_LEGACY_KERAS=1``) and
segmentation_models in its ``tf.keras`` mode (``SM_FRAMEWORK=tf.keras``). Both variables must be
set before TensorFlow is first imported, so every module gets TensorFlow from :func:`import_tf`
and segmentation_models from :func:`import_sm`; nothing else sets them.

Images enter the network as float32 (B, H, W, 3): the grey uint8 X-ray repeated on the three
channels, then scaled the way the encoder's ImageNet weights expect (:func:`scale_input`). The
scaling's name is stored in every run so that prediction scales exactly as training did.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.choices import InputNorm, check_choice, values
from pneumo_cli.core.config import check_image_size
from pneumo_cli.core.errors import ConfigError, shorten_reason
from pneumo_cli.engine.precision import precision_policy
from pneumo_cli.engine.tf import import_sm, import_tf
from pneumo_cli.model.encoders import DEFAULT_ENCODER, available_encoders, check_encoder
from pneumo_cli.model.weights import fetch_imagenet_weights, load_encoder_weights

INPUT_NORMS = values(InputNorm)
INPUT_NORM_LAYER = "bn_data"  # the input BatchNormalization of segmentation_models' ResNets


def build_model(
    encoder: str = DEFAULT_ENCODER,
    image_size: int = 256,
    encoder_weights: str | os.PathLike[str] | None = "imagenet",
    precision: str = "fp32",
    notify: Callable[[str], None] | None = None,
    input_norm: str = "frozen",
) -> Any:
    """Build the U-Net: ``encoder`` backbone, one sigmoid output channel.

    Args:
        encoder: a segmentation_models backbone name (see :func:`available_encoders`).
        image_size: input height and width in pixels; a multiple of 32.
        encoder_weights: ``"imagenet"`` (Keras cache, downloaded if absent), ``None``/``"none"``
            (random start) or the path of an ``.h5`` file with the encoder's layer layout.
        precision: ``"fp32"``, ``"bf16"`` (mixed bfloat16) or ``"fp16"`` (mixed float16):
            the compute type of the layers; variables, the sigmoid output and hence the loss
            stay float32. Resolve ``"auto"`` first
            (:func:`pneumo_cli.engine.precision.choose_precision`).
        notify: told before ImageNet weights are downloaded.
        input_norm: ``"frozen"`` or ``"trainable"``: see :func:`set_input_norm`.

    Returns:
        A tf-keras Model mapping float32 (B, image_size, image_size, 3) scaled input
        (:func:`scale_input`) to float32 (B, image_size, image_size, 1) probabilities.

    Raises:
        ConfigError: unknown encoder or one whose U-Net holds code (:data:`CODE_ENCODERS`),
            bad size, weights that do not fit or cannot be obtained.
    """
    check_encoder(encoder)
    check_image_size(image_size)
    weights_path: Path | None = None
    if encoder_weights == "imagenet":
        weights_path = fetch_imagenet_weights(encoder, notify)
    elif encoder_weights not in (None, "none"):
        weights_path = Path(encoder_weights)
    with precision_policy(precision):
        unet = _segmentation_models_unet(encoder, image_size)
        _refuse_code_layers(unet, encoder)
        if precision != "fp32":
            unet = _with_float32_sigmoid(unet)
    if weights_path is not None:
        load_encoder_weights(unet, encoder, weights_path)
    set_input_norm(unet, input_norm, random_start=weights_path is None)
    from pneumo_cli.model import fastpaths

    fastpaths.fast_upsampling_gradients(unet)
    fastpaths.fold_zero_padding(unet)
    return unet


def _segmentation_models_unet(encoder: str, image_size: int) -> Any:
    """segmentation_models' U-Net with a random encoder (weights are loaded by pneumo)."""
    try:
        return import_sm().Unet(
            encoder,
            input_shape=(image_size, image_size, 3),
            classes=1,
            activation="sigmoid",
            encoder_weights=None,
        )
    except ValueError as exc:  # e.g. inceptionv3: "Input size must be at least 75x75"
        reason = shorten_reason(str(exc))
        raise ConfigError(
            f"encoder '{encoder}' cannot be built at {image_size} px ({reason}); "
            "preprocess at a larger --image-size or choose another encoder"
        ) from None


def _refuse_code_layers(unet: Any, encoder: str) -> None:
    """Refuse a network holding Lambda layers: pneumo never loads a model file with code."""
    code = [layer.name for layer in unet.layers if type(layer).__name__ in CODE_LAYER_TYPES]
    if code:
        raise ConfigError(
            f"encoder '{encoder}' cannot be used: its U-Net contains Lambda layers "
            f"('{code[0]}'), and pneumo refuses to load model files holding code; choose "
            f"one of: {', '.join(available_encoders())}"
        )


def _with_float32_sigmoid(unet: Any) -> Any:
    """Under a mixed policy segmentation_models' sigmoid outputs bfloat16/float16; recompute
    it in float32 from the last convolution so the loss sees float32."""
    tf = import_tf()
    logits = unet.get_layer("final_conv").output
    probabilities = tf.keras.layers.Activation(
        "sigmoid", dtype="float32", name="pneumo_sigmoid_float32"
    )(logits)
    return tf.keras.Model(unet.input, probabilities, name=unet.name)


def set_input_norm(net: Any, mode: str, random_start: bool) -> bool:
    """Freeze (``mode="frozen"``) or keep trainable the encoder's input normalisation layer.

    The ResNet/ResNeXt/SE-ResNet encoders start with a BatchNormalization of the raw 0-255 input
    (``bn_data``, a per-channel shift and scale). Trained, it costs 11% of a training step here
    (batch statistics and gradients over a 3-channel full-size image, and the gradient of the
    first convolution with respect to its input, needed only for it). Frozen it is a fixed
    affine map: ImageNet's learned statistics with pretrained weights; with a random start, the
    mean and variance of bytes spread evenly over 0-255 (127.5 and 255^2 / 12), which centres
    and scales the input. The first convolution feeds a batch normalisation, which absorbs
    any fixed scale, so the network can learn the same functions either way.

    Returns:
        True when the model has such a layer (encoders without one are left as they are).

    Raises:
        ConfigError: an unknown ``mode``.
    """
    check_choice(InputNorm, mode, "--input-norm")
    try:
        layer = net.get_layer(INPUT_NORM_LAYER)
    except ValueError:
        return False
    if mode == "frozen":
        if random_start:
            channels = layer.moving_mean.shape[-1]
            layer.moving_mean.assign(np.full(channels, 127.5, np.float32))
            layer.moving_variance.assign(np.full(channels, 255.0**2 / 12.0, np.float32))
        layer.trainable = False
        from pneumo_cli.model import fastpaths

        fastpaths.unfuse_frozen_norm(layer)
    return True


def float32_copy(model: Any) -> Any:
    """``model`` itself if every layer computes in float32, else a float32 twin of it.

    The twin has the same layers, names and weights with every layer's dtype set to float32,
    so a model trained in bf16/fp16 is saved, loaded and run in float32 (its weights are
    float32 variables already; only the compute type changes).
    """
    if all(_layer_dtype_name(layer) == "float32" for layer in model.layers):
        return model
    return precision_copy(model, "fp32")


def precision_copy(model: Any, precision: str) -> Any:
    """A twin of ``model`` computing in ``precision`` (``"fp32"``, ``"bf16"`` or ``"fp16"``).

    Same layers, names and float32 weights; only the compute type changes. Under a mixed
    precision the input layer and the last layer (the sigmoid) stay float32, so the twin maps
    float32 input to float32 probabilities like the original, and its last activation is
    computed from the logits in float32, as in training (:func:`_with_float32_sigmoid`).
    The inference fast paths that change no result are applied (frozen input norm as a
    multiply-add, zero padding folded into 'SAME' convolutions).

    Raises:
        ConfigError: unknown precision.
    """
    tf = import_tf()
    from pneumo_cli.model import fastpaths, losses

    config = model.get_config()
    last = config["output_layers"][0][0]
    for layer in config["layers"]:
        mixed = precision != "fp32" and layer["class_name"] != "InputLayer"
        if mixed and layer["config"]["name"] != last:
            layer["config"].pop("dtype", None)  # takes the policy in force below
        else:
            layer["config"]["dtype"] = "float32"
    with precision_policy(precision):
        twin = tf.keras.Model.from_config(config, custom_objects=losses.custom_objects())
    twin.set_weights(model.get_weights())
    for layer in twin.layers:
        if layer.name == INPUT_NORM_LAYER and not layer.trainable:
            fastpaths.unfuse_frozen_norm(layer)
    fastpaths.fold_zero_padding(twin)
    return twin


def _layer_dtype_name(layer: Any) -> str:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "name", None) or str(layer.dtype)


# Layers that hold Python code (bytecode or a Python callable) or call arbitrary TF ops.
CODE_LAYER_TYPES = ("Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__")
