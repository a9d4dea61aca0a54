"""Metric functions against hand-computed cases and slow pixel-loop references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pneumo_cli.core import metrics

TRUTH = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=np.uint8)  # 3 px
PRED = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)  # 3 px, 2 shared
EMPTY = np.zeros((3, 3), dtype=np.uint8)
ONE_PIXEL = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=np.uint8)


def test_partial_overlap_dice_and_iou():
    assert metrics.overlap_counts(TRUTH, PRED) == (2, 3, 3)
    assert metrics.dice_score(TRUTH, PRED) == pytest.approx(2 * 2 / 6)
    assert metrics.iou_score(TRUTH, PRED) == pytest.approx(2 / 4)


def test_identical_masks_score_one():
    assert metrics.dice_score(TRUTH, TRUTH) == 1.0
    assert metrics.iou_score(TRUTH, TRUTH) == 1.0


def test_empty_vs_empty_is_the_empty_score():
    assert metrics.dice_score(EMPTY, EMPTY) == 1.0
    assert metrics.iou_score(EMPTY, EMPTY) == 1.0
    assert metrics.dice_score(EMPTY, EMPTY, empty_score=0.0) == 0.0
    assert metrics.iou_score(EMPTY, EMPTY, empty_score=0.0) == 0.0


@pytest.mark.parametrize(("truth", "pred"), [(EMPTY, ONE_PIXEL), (TRUTH, EMPTY), (EMPTY, TRUTH)])
def test_exactly_one_empty_scores_zero(truth, pred):
    assert metrics.dice_score(truth, pred) == 0.0
    assert metrics.iou_score(truth, pred) == 0.0


def test_disjoint_non_empty_masks_score_zero():
    assert metrics.dice_score(TRUTH, ONE_PIXEL) == 0.0


def test_non_binary_values_count_as_foreground():
    assert metrics.dice_score(TRUTH * 255, PRED) == pytest.approx(2 / 3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.overlap_counts(TRUTH, np.zeros((4, 4), np.uint8))


def test_batch_versions_and_means():
    truth = np.stack([TRUTH, EMPTY, EMPTY, TRUTH])
    pred = np.stack([PRED, EMPTY, ONE_PIXEL, EMPTY])
    dice = metrics.batch_dice(truth, pred)
    iou = metrics.batch_iou(truth, pred)
    np.testing.assert_allclose(dice, [2 / 3, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(iou, [0.5, 1.0, 0.0, 0.0])
    assert metrics.mean_over_images(dice) == pytest.approx((2 / 3 + 1) / 4)
    truth_areas = np.array([3, 0, 0, 3])
    assert metrics.mean_over_positives(dice, truth_areas) == pytest.approx((2 / 3) / 2)
    assert metrics.mean_over_positives(iou, truth_areas) == pytest.approx(0.25)
    assert math.isnan(metrics.mean_over_positives(dice, np.zeros(4)))
    assert math.isnan(metrics.mean_over_images(np.zeros(0)))


def _slow_dice_iou(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    inter = truth_area = pred_area = 0
    for row, col in itertools.product(range(truth.shape[0]), range(truth.shape[1])):
        t, p = bool(truth[row, col]), bool(pred[row, col])
        inter += t and p
        truth_area += t
        pred_area += p
    if truth_area + pred_area == 0:
        return 1.0, 1.0
    return 2 * inter / (truth_area + pred_area), inter / (truth_area + pred_area - inter)


masks = arrays(
    np.uint8,
    st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)),
    elements=st.integers(0, 1),
)


@settings(max_examples=150, deadline=None)
@given(masks, st.data())
def test_vectorised_matches_pixel_loop(truth, data):
    pred = data.draw(arrays(np.uint8, truth.shape, elements=st.integers(0, 1)))
    expected = [_slow_dice_iou(t, p) for t, p in zip(truth, pred, strict=True)]
    np.testing.assert_allclose(metrics.batch_dice(truth, pred), [d for d, _ in expected])
    np.testing.assert_allclose(metrics.batch_iou(truth, pred), [i for _, i in expected])
    for t, p, (d, i) in zip(truth, pred, expected, strict=True):
        assert metrics.dice_score(t, p) == pytest.approx(d)
        assert metrics.iou_score(t, p) == pytest.approx(i)


def test_merged_run_length_hand_case():
    starts, ends = np.array([7, 0, 2]), np.array([8, 3, 5])  # [0,3) + [2,5) overlap, [7,8)
    assert metrics.merged_run_length(starts, ends) == 6
    assert metrics.merged_run_length(np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0
    # A run nested inside another adds nothing.
    assert metrics.merged_run_length(np.array([0, 2]), np.array([10, 4])) == 10


runs = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(runs, runs)
def test_run_overlap_counts_match_painted_masks(truth_runs, pred_runs):
    def as_arrays(pairs):
        starts = np.array([s for s, _ in pairs], dtype=np.int64)
        return starts, starts + np.array([n for _, n in pairs], dtype=np.int64)

    def paint(pairs):
        flat = np.zeros(80, np.uint8)
        for start, length in pairs:
            flat[start : start + length] = 1
        return flat

    expected = metrics.overlap_counts(paint(truth_runs), paint(pred_runs))
    assert metrics.run_overlap_counts(as_arrays(truth_runs), as_arrays(pred_runs)) == expected


def test_confusion_and_image_level_ratios():
    truth = np.array([1, 1, 0, 0, 1], dtype=bool)
    pred = np.array([1, 0, 1, 0, 0], dtype=bool)
    confusion = metrics.confusion_matrix(truth, pred)
    assert confusion == metrics.Confusion(tp=1, fp=1, fn=2, tn=1)
    assert confusion.sensitivity == pytest.approx(1 / 3)
    assert confusion.specificity == pytest.approx(1 / 2)
    assert confusion.precision == pytest.approx(1 / 2)
    assert confusion.accuracy == pytest.approx(2 / 5)
    assert list(metrics.outcomes(truth, pred)) == ["TP", "FN", "FP", "TN", "FN"]


def test_undefined_ratios_are_nan():
    confusion = metrics.confusion_matrix(np.zeros(3, bool), np.zeros(3, bool))
    assert confusion == metrics.Confusion(0, 0, 0, 3)
    assert math.isnan(confusion.sensitivity)
    assert math.isnan(confusion.precision)
    assert confusion.specificity == 1.0
    assert confusion.accuracy == 1.0


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(metrics.average_ranks([0.8, 0.8, 0.4, 0.1]), [3.5, 3.5, 2, 1])


def test_roc_auc_hand_case_with_ties():
    # Pairs (pos, neg): (0.8, 0.8) tie = 1/2, (0.8, 0.1) = 1, (0.4, 0.8) = 0, (0.4, 0.1) = 1.
    labels, scores = [1, 0, 1, 0], [0.8, 0.8, 0.4, 0.1]
    assert metrics.roc_auc(labels, scores) == pytest.approx(2.5 / 4)
    assert metrics.roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert metrics.roc_auc([1, 1, 0], [0.9, 0.7, 0.2]) == 1.0
    assert metrics.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert math.isnan(metrics.roc_auc([1, 1], [0.1, 0.2]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30))
def test_roc_auc_matches_pair_counting_and_curve_area(pairs):
    labels = np.array([b for b, _ in pairs])
    scores = np.array([s / 5 for _, s in pairs])
    if labels.all() or not labels.any():
        assert math.isnan(metrics.roc_auc(labels, scores))
        return
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    auc = metrics.roc_auc(labels, scores)
    assert auc == pytest.approx(wins / (pos.size * neg.size))
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_roc_and_pr_curves_hand_case():
    labels, scores = [1, 0, 1, 0], [0.8, 0.8, 0.4, 0.1]
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.1])
    precision, recall, thresholds = metrics.pr_curve(labels, scores)
    np.testing.assert_allclose(precision, [1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(recall, [0.5, 1, 1])
    np.testing.assert_array_equal(thresholds, [0.8, 0.4, 0.1])
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
