"""The training losses, and the per-image Dice that picks best.keras and drives early stopping.

That Dice (``per_image_dice`` and the Keras metric around it) must be the SIIM metric the
evaluation reports (``core.metrics.dice_score`` on the mask ``pneumo predict`` writes): per image,
a pixel is positive when its probability is > 0.5, empty truth and empty prediction score 1, and
the score is the mean over images. Every expected value below is computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.core.metrics import dice_score
from pneumo_cli.engine.tf import import_tf
from pneumo_cli.inference.postprocess import Gate, apply_gate
from pneumo_cli.model import losses

TRUTH = [[1, 1, 0], [0, 1, 0], [0, 0, 0]]  # 3 px
EMPTY = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]

# name: (truth, predicted probabilities, Dice computed by hand)
CASES = {
    # > 0.5 gives exactly TRUTH: 2*3 / (3+3)
    "exact": (TRUTH, [[0.9, 0.8, 0.1], [0.2, 0.7, 0.0], [0.0, 0.0, 0.3]], 1.0),
    # > 0.5 gives [[1,0,1],[0,1,0],[0,0,0]]: 2 shared of 3 + 3 -> 2*2 / 6
    "partial": (TRUTH, [[0.9, 0.4, 0.6], [0.0, 0.7, 0.0], [0.0, 0.0, 0.0]], 2 / 3),
    # > 0.5 gives [[0,0,1],[0,0,1],[0,0,1]]: nothing shared
    "disjoint": (TRUTH, [[0.1, 0.2, 0.9], [0.0, 0.0, 0.8], [0.0, 0.0, 0.7]], 0.0),
    # both empty: the SIIM convention scores 1
    "empty-empty": (EMPTY, [[0.49, 0.1, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.2]], 1.0),
    # one false-positive pixel on a healthy image costs the whole image
    "empty-fp": (EMPTY, [[0.0, 0.0, 0.0], [0.0, 0.51, 0.0], [0.0, 0.0, 0.0]], 0.0),
    # 0.5 itself is NOT positive (the rule is > 0.5): only the 0.9 pixel is predicted, so
    # 2*1 / (3+1); counted as positive it would be 2*2 / (3+2) = 0.8
    "at-0.5": (TRUTH, [[0.5, 0.9, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.0]], 0.5),
}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def tf():
    return import_tf()


def _batch(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, probabilities)`` float32 (B, 3, 3, 1) of the named cases, in order."""
    truth = np.array([CASES[n][0] for n in names], np.float32)[..., None]
    probs = np.array([CASES[n][1] for n in names], np.float32)[..., None]
    return truth, probs


def _siim_dice(name: str) -> float:
    """The evaluation's Dice of a case: the mask predict writes (default gate) vs the truth."""
    truth, probs, _ = CASES[name]
    mask = apply_gate(np.array(probs, np.float32), Gate())
    return dice_score(np.array(truth, np.uint8), mask)


@pytest.mark.parametrize("name", NAMES)
def test_per_image_dice_equals_the_siim_dice(name: str, tf) -> None:
    expected = CASES[name][2]
    truth, probs = _batch([name])
    scores = losses.per_image_dice(tf.constant(truth), tf.constant(probs)).numpy()
    assert scores.shape == (1,) and scores.dtype == np.float32
    assert scores[0] == pytest.approx(expected, abs=1e-6)
    assert _siim_dice(name) == pytest.approx(expected, abs=1e-12)
    # (B, H, W) masks without the channel axis score the same
    flat = losses.per_image_dice(tf.constant(truth[..., 0]), tf.constant(probs[..., 0])).numpy()
    assert flat[0] == scores[0]


def test_a_probability_of_exactly_half_is_negative_in_training_and_in_evaluation(tf) -> None:
    truth = np.array([[[1.0]]], np.float32)
    half = np.array([[[0.5]]], np.float32)
    assert losses.DICE_THRESHOLD == 0.5
    assert losses.per_image_dice(tf.constant(truth), tf.constant(half)).numpy()[0] == 0.0
    assert apply_gate(half[0], Gate()).sum() == 0  # predict writes no pixel either
    above = np.nextafter(np.float32(0.5), np.float32(1.0))
    nudged = np.full_like(half, above)
    assert losses.per_image_dice(tf.constant(truth), tf.constant(nudged)).numpy()[0] == 1.0
    assert apply_gate(nudged[0], Gate()).sum() == 1


def test_per_image_dice_of_a_batch_is_each_image_in_order(tf) -> None:
    truth, probs = _batch(NAMES)
    scores = losses.per_image_dice(tf.constant(truth), tf.constant(probs)).numpy()
    np.testing.assert_allclose(scores, [CASES[n][2] for n in NAMES], atol=1e-6)
    np.testing.assert_allclose(scores, [_siim_dice(n) for n in NAMES], atol=1e-6)


def test_dice_metric_is_the_mean_over_images_not_over_batches(tf) -> None:
    metric = losses.make_dice_metric()
    assert metric.name == "dice"  # the history.csv column
    first, second = ["exact", "partial", "disjoint"], ["empty-empty"]
    for names in (first, second):
        metric.update_state(*map(tf.constant, _batch(names)))
    # (1 + 2/3 + 0 + 1) / 4 over images; the mean of the two batch means would be 0.7778
    assert float(metric.result()) == pytest.approx(2 / 3, abs=1e-6)
    metric.reset_state()
    metric.update_state(*map(tf.constant, _batch(NAMES)))
    # (1 + 2/3 + 0 + 1 + 0 + 1/2) / 6 = 19/36
    assert float(metric.result()) == pytest.approx(19 / 36, abs=1e-6)
    assert float(metric.result()) == pytest.approx(np.mean([_siim_dice(n) for n in NAMES]))


def test_positive_dice_metric_counts_only_images_with_a_true_mask(tf) -> None:
    metric = losses.make_dice_metric(positives_only=True)
    assert metric.name == "pos_dice"
    assert math.isnan(float(metric.result()))  # nothing seen yet: NaN, not a made-up score
    metric.update_state(*map(tf.constant, _batch(["empty-empty", "empty-fp"])))
    assert math.isnan(float(metric.result()))  # a batch without positives changes nothing
    metric.update_state(*map(tf.constant, _batch(NAMES)))
    # positives: exact, partial, disjoint, at-0.5 -> (1 + 2/3 + 0 + 1/2) / 4 = 13/24
    assert float(metric.result()) == pytest.approx(13 / 24, abs=1e-6)
    metric.update_state(*map(tf.constant, _batch(["empty-fp"])))
    assert float(metric.result()) == pytest.approx(13 / 24, abs=1e-6)
    assert metric.get_config()["positives_only"] is True


def test_losses_of_a_perfect_prediction_are_zero(tf) -> None:
    truth, _ = _batch(["exact", "empty-empty"])
    y_true, y_pred = tf.constant(truth), tf.constant(truth)
    # clipped to [1e-7, 1 - 1e-7], so -log(1 - 1e-7) ~ 1e-7 per pixel, not exactly 0
    np.testing.assert_allclose(losses.binary_crossentropy(y_true, y_pred).numpy(), 0, atol=1e-6)
    # (2*3 + 1) / (6 + 1) and (0 + 1) / (0 + 1): exactly 1, so the loss is exactly 0
    np.testing.assert_array_equal(losses.soft_dice_loss(y_true, y_pred).numpy(), [0.0, 0.0])
    for name in losses.LOSSES:
        values = losses.get_loss(name)(y_true, y_pred).numpy()
        assert values.shape == (2,)
        np.testing.assert_allclose(values, 0, atol=1e-5, err_msg=name)


def test_losses_of_known_wrong_predictions(tf) -> None:
    truth, _ = _batch(["exact"])
    nothing = np.zeros_like(truth)
    # soft Dice on probabilities: 1 - (2*0 + 1) / (3 + 0 + 1)
    loss = losses.soft_dice_loss(tf.constant(truth), tf.constant(nothing)).numpy()
    assert loss[0] == pytest.approx(0.75)
    # BCE: the 3 true pixels at p = 0.5 cost log 2 each, the 6 others at p = 0 cost ~0
    half = np.where(truth > 0, 0.5, 0.0).astype(np.float32)
    bce = losses.binary_crossentropy(tf.constant(truth), tf.constant(half)).numpy()
    assert bce[0] == pytest.approx(3 * math.log(2) / 9, rel=1e-5)


def test_an_unknown_loss_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="--loss 'nope'") as caught:
        losses.get_loss("nope")
    for name in losses.LOSSES:
        assert name in str(caught.value)
