"""Training losses and the per-image Dice that training reports.

Losses take ``y_true`` {0,1} and ``y_pred`` probabilities, both (B, H, W, 1), and are computed
in float32 whatever the model's compute precision.

The Dice reported during training is the SIIM metric: computed **per image** at a fixed 0.5
threshold, an image whose true and predicted masks are both empty scores 1, and the score is the
mean over images. segmentation_models' f1-score pools all pixels of a batch, which lets one large
pneumothorax hide every missed small one, so it is never reported as Dice here.
"""

from __future__ import annotations

from typing import Any

from pneumo_cli.core.choices import Loss, check_choice, values
from pneumo_cli.engine.tf import import_tf

LOSSES = values(Loss)
DICE_THRESHOLD = 0.5
_EPS = 1e-7


def _as_float32(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    tf = import_tf()
    return tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)


def binary_crossentropy(y_true: Any, y_pred: Any) -> Any:
    """Mean pixel binary cross-entropy per image: (B,) float32."""
    tf = import_tf()
    y_true, y_pred = _as_float32(y_true, y_pred)
    p = tf.clip_by_value(y_pred, _EPS, 1.0 - _EPS)
    bce = -(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))
    return tf.reduce_mean(bce, axis=[1, 2, 3])


def soft_dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """1 - soft Dice per image on probabilities: (B,) float32 (``smooth`` in pixels)."""
    tf = import_tf()
    y_true, y_pred = _as_float32(y_true, y_pred)
    intersection = tf.reduce_sum(y_true * y_pred, axis=[1, 2, 3])
    total = tf.reduce_sum(y_true + y_pred, axis=[1, 2, 3])
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def focal_loss(y_true: Any, y_pred: Any, gamma: float = 2.0, alpha: float = 0.25) -> Any:
    """Mean pixel binary focal loss per image (Lin et al. 2017): (B,) float32."""
    tf = import_tf()
    y_true, y_pred = _as_float32(y_true, y_pred)
    p = tf.clip_by_value(y_pred, _EPS, 1.0 - _EPS)
    p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
    alpha_t = y_true * alpha + (1.0 - y_true) * (1.0 - alpha)
    return tf.reduce_mean(-alpha_t * (1.0 - p_t) ** gamma * tf.math.log(p_t), axis=[1, 2, 3])


def bce_loss(y_true: Any, y_pred: Any) -> Any:
    """``bce``: binary cross-entropy (the paper's loss)."""
    return binary_crossentropy(y_true, y_pred)


def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """``bce-dice``: binary cross-entropy + (1 - soft Dice)."""
    return binary_crossentropy(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


def focal_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """``focal-dice``: 10 x focal loss + (1 - soft Dice); the factor brings focal (~0.02 at
    the start) to the scale of the Dice term."""
    return 10.0 * focal_loss(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


_LOSS_FUNCTIONS = {"bce": bce_loss, "bce-dice": bce_dice_loss, "focal-dice": focal_dice_loss}


def get_loss(name: str) -> Any:
    """The loss function called ``name`` (one of :data:`LOSSES`).

    Raises:
        ConfigError: unknown name.
    """
    return _LOSS_FUNCTIONS[check_choice(Loss, name, "--loss")]


def per_image_dice(y_true: Any, y_pred: Any, threshold: float = DICE_THRESHOLD) -> Any:
    """SIIM Dice of each image: (B,) float32.

    Args:
        y_true: {0,1} masks, (B, H, W, 1) or (B, H, W).
        y_pred: probabilities of the same shape; a pixel is positive when ``> threshold``.

    Returns:
        2|A∩B| / (|A| + |B|) per image, and exactly 1.0 where both masks are empty.
    """
    tf = import_tf()
    y_true, y_pred = _as_float32(y_true, y_pred)
    truth = tf.cast(y_true > 0.5, tf.float32)
    guess = tf.cast(y_pred > threshold, tf.float32)
    axes = list(range(1, len(truth.shape)))
    intersection = tf.reduce_sum(truth * guess, axis=axes)
    total = tf.reduce_sum(truth, axis=axes) + tf.reduce_sum(guess, axis=axes)
    return tf.where(total > 0, 2.0 * intersection / tf.maximum(total, 1.0), 1.0)


def _metric_base() -> Any:
    return import_tf().keras.metrics.Metric


def make_dice_metric(positives_only: bool = False, name: str | None = None) -> Any:
    """A Keras metric averaging :func:`per_image_dice` over every image seen.

    With ``positives_only`` only images whose true mask is not empty count (the Dice on
    pneumothorax cases alone); a batch without such images leaves the metric unchanged.
    """
    tf = import_tf()

    class PerImageDice(_metric_base()):
        def __init__(self, positives_only: bool = False, name: str = "dice", **kwargs: Any):
            super().__init__(name=name, **kwargs)
            self.positives_only = positives_only
            self.total = self.add_weight("total", initializer="zeros", dtype=tf.float32)
            self.count = self.add_weight("count", initializer="zeros", dtype=tf.float32)

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
            scores = per_image_dice(y_true, y_pred)
            if self.positives_only:
                has_mask = tf.reduce_max(tf.cast(y_true, tf.float32), axis=[1, 2, 3]) > 0.5
                keep = tf.cast(has_mask, tf.float32)
            else:
                keep = tf.ones_like(scores)
            self.total.assign_add(tf.reduce_sum(scores * keep))
            self.count.assign_add(tf.reduce_sum(keep))

        def result(self) -> Any:
            # No positive image seen yet: report NaN rather than a made-up score.
            return tf.math.divide_no_nan(self.total, self.count) + tf.where(
                self.count > 0, 0.0, float("nan")
            )

        def reset_state(self) -> None:
            self.total.assign(0.0)
            self.count.assign(0.0)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "positives_only": self.positives_only}

    default = "pos_dice" if positives_only else "dice"
    return PerImageDice(positives_only=positives_only, name=name or default)


def custom_objects() -> dict[str, Any]:
    """pneumo's own objects a saved model may reference (its losses)."""
    return {
        "bce_loss": bce_loss,
        "bce_dice_loss": bce_dice_loss,
        "focal_dice_loss": focal_dice_loss,
    }
