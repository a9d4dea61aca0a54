"""Training augmentation in TensorFlow: flips, shift/scale/rotation, border crop, brightness
and contrast, applied to image and mask together."""

from __future__ import annotations

import math
from typing import Any

from pneumo_cli.engine.tf import import_tf

# Augmentation ranges (as fractions of the image side unless stated).
BORDER_CROP_MAX = 0.08  # each side may lose up to 8 % before resizing back
SHIFT_MAX = 0.06
SCALE_RANGE = (0.9, 1.1)
ROTATION_MAX_DEG = 10.0
CONTRAST_RANGE = (0.85, 1.15)
BRIGHTNESS_MAX = 0.08  # fraction of 255 added or removed


def augment_pair(image: Any, mask: Any, seed: Any) -> tuple[Any, Any]:
    """Augment one image and its mask with identical geometry.

    Border crop (resized back), shift/scale/rotation, horizontal flip (same for both); then
    brightness and contrast (image only). Fully determined by ``seed``.

    Args:
        image: float32 (S, S, 1) in [0, 255].
        mask: float32 (S, S, 1) in {0, 1}.
        seed: int64 (2,) stateless seed.

    Returns:
        (image float32 (S, S, 1) in [0, 255], mask float32 (S, S, 1) in {0, 1}).
    """
    tf = import_tf()
    size = image.shape[0]
    keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)

    margins = tf.random.stateless_uniform([4], keys[0], 0.0, BORDER_CROP_MAX)
    box = tf.stack([margins[0], margins[1], 1.0 - margins[2], 1.0 - margins[3]])[tf.newaxis]
    index = tf.zeros([1], tf.int32)
    image = tf.image.crop_and_resize(image[tf.newaxis], box, index, [size, size], "bilinear")
    mask = tf.image.crop_and_resize(mask[tf.newaxis], box, index, [size, size], "nearest")

    angle = tf.random.stateless_uniform([], keys[1], -1.0, 1.0) * ROTATION_MAX_DEG * math.pi / 180
    scale = tf.random.stateless_uniform([], keys[2], *SCALE_RANGE)
    shift = tf.random.stateless_uniform([2], keys[3], -SHIFT_MAX, SHIFT_MAX) * size
    # Output pixel p samples input R^-1 (p - c - t) / s + c (rotation about the centre c).
    centre = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    px, py = centre + shift[0], centre + shift[1]
    transform = tf.stack(
        [cos, sin, centre - cos * px - sin * py, -sin, cos, centre + sin * px - cos * py, 0.0, 0.0]
    )[tf.newaxis]

    def warp(x: Any, interpolation: str) -> Any:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x,
            transforms=transform,
            output_shape=[size, size],
            fill_value=0.0,
            interpolation=interpolation,
            fill_mode="CONSTANT",
        )[0]

    image, mask = warp(image, "BILINEAR"), warp(mask, "NEAREST")

    flip = tf.random.stateless_uniform([], keys[4]) < 0.5
    image = tf.where(flip, tf.reverse(image, axis=[1]), image)
    mask = tf.where(flip, tf.reverse(mask, axis=[1]), mask)

    contrast = tf.random.stateless_uniform([], keys[5], *CONTRAST_RANGE)
    brightness = tf.random.stateless_uniform([], keys[6], -BRIGHTNESS_MAX, BRIGHTNESS_MAX) * 255.0
    mean = tf.reduce_mean(image)
    image = tf.clip_by_value((image - mean) * contrast + mean + brightness, 0.0, 255.0)
    return image, mask
