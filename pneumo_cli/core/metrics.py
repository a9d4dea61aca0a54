"""Segmentation and image-level metrics: pure numpy functions.

Masks are uint8 (or bool) arrays of shape (H, W), or stacked (N, H, W) for the ``batch_`` versions;
any non-zero pixel is foreground.

Empty-mask convention (the SIIM-ACR 2019 competition's): Dice and IoU of two empty masks is
``empty_score`` (1.0 by default) - predicting nothing on a healthy X-ray is a perfect answer.
When exactly one of the two masks is empty the score is 0, whatever its size: one false-positive
pixel on an empty image costs the whole image. Every function that scores masks takes
``empty_score`` explicitly so the choice is visible at the call site.

Image-level metrics treat an image as positive (pneumothorax present) when its mask has at least
one pixel. Ratios whose denominator is zero (e.g. sensitivity with no positive images) are NaN,
never a made-up 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIIM_EMPTY_SCORE = 1.0


# ---------------------------------------------------------------------------------------------
# Overlap counts
# ---------------------------------------------------------------------------------------------


def overlap_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """``(intersection, truth_area, pred_area)`` in pixels of two (H, W) masks of equal shape."""
    if truth.shape != pred.shape:
        raise ValueError(f"mask shapes differ: truth {truth.shape}, prediction {pred.shape}")
    truth_bool, pred_bool = truth != 0, pred != 0
    return (
        int(np.count_nonzero(truth_bool & pred_bool)),
        int(np.count_nonzero(truth_bool)),
        int(np.count_nonzero(pred_bool)),
    )


def batch_overlap_counts(
    truth: np.ndarray, pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ``(intersection, truth_area, pred_area)`` int64 arrays of shape (N,).

    ``truth`` and ``pred`` are stacked masks of shape (N, H, W).
    """
    if truth.shape != pred.shape or truth.ndim != 3:
        raise ValueError(
            f"expected two (N, H, W) stacks of equal shape, got {truth.shape} and {pred.shape}"
        )
    truth_bool, pred_bool = truth != 0, pred != 0
    axes = (1, 2)
    return (
        np.count_nonzero(truth_bool & pred_bool, axis=axes).astype(np.int64),
        np.count_nonzero(truth_bool, axis=axes).astype(np.int64),
        np.count_nonzero(pred_bool, axis=axes).astype(np.int64),
    )


def merged_run_length(starts: np.ndarray, ends: np.ndarray) -> int:
    """Number of pixels covered by the union of half-open runs ``[starts[i], ends[i])``.

    The runs may overlap and come in any order (a SIIM image's rows overlap in 262 real cases).
    """
    if starts.size == 0:
        return 0
    order = np.argsort(starts, kind="stable")
    sorted_starts, sorted_ends = starts[order], ends[order]
    reach = np.maximum.accumulate(sorted_ends)
    # A new merged run begins where a start lies beyond everything covered so far.
    begins = np.concatenate(([True], sorted_starts[1:] > reach[:-1]))
    first = np.flatnonzero(begins)
    last = np.concatenate((first[1:] - 1, [sorted_starts.size - 1]))
    return int((reach[last] - sorted_starts[first]).sum())


def run_overlap_counts(
    truth_runs: tuple[np.ndarray, np.ndarray], pred_runs: tuple[np.ndarray, np.ndarray]
) -> tuple[int, int, int]:
    """``(intersection, truth_area, pred_area)`` computed directly on run intervals.

    Each argument is ``(starts, ends)`` of half-open runs over the same flattened image (any
    order, overlaps allowed), e.g. from :func:`pneumo_cli.rle.parse_runs`. No mask is built, so
    this is fast at 1024 x 1024: |T and P| = |T| + |P| - |T or P|.
    """
    truth_area = merged_run_length(*truth_runs)
    pred_area = merged_run_length(*pred_runs)
    union = merged_run_length(
        np.concatenate((truth_runs[0], pred_runs[0])), np.concatenate((truth_runs[1], pred_runs[1]))
    )
    return truth_area + pred_area - union, truth_area, pred_area


# ---------------------------------------------------------------------------------------------
# Dice and IoU
# ---------------------------------------------------------------------------------------------


def dice_from_counts(
    intersection: np.ndarray | int,
    truth_area: np.ndarray | int,
    pred_area: np.ndarray | int,
    empty_score: float = SIIM_EMPTY_SCORE,
) -> np.ndarray:
    """Dice ``2|T and P| / (|T| + |P|)`` from pixel counts (arrays broadcast), as float64.

    Both masks empty -> ``empty_score``; exactly one empty -> 0 (the formula gives it).
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(truth_area, dtype=np.float64) + np.asarray(pred_area, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(total > 0, 2.0 * intersection / total, empty_score)
    return dice


def iou_from_counts(
    intersection: np.ndarray | int,
    truth_area: np.ndarray | int,
    pred_area: np.ndarray | int,
    empty_score: float = SIIM_EMPTY_SCORE,
) -> np.ndarray:
    """IoU ``|T and P| / |T or P|`` from pixel counts, as float64.

    Both masks empty -> ``empty_score``; exactly one empty -> 0.
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    union = (
        np.asarray(truth_area, dtype=np.float64)
        + np.asarray(pred_area, dtype=np.float64)
        - intersection
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, empty_score)
    return iou


def dice_score(truth: np.ndarray, pred: np.ndarray, empty_score: float = SIIM_EMPTY_SCORE) -> float:
    """Dice of one image's (H, W) masks; both empty -> ``empty_score``, one empty -> 0."""
    return float(dice_from_counts(*overlap_counts(truth, pred), empty_score=empty_score))


def iou_score(truth: np.ndarray, pred: np.ndarray, empty_score: float = SIIM_EMPTY_SCORE) -> float:
    """IoU of one image's (H, W) masks; both empty -> ``empty_score``, one empty -> 0."""
    return float(iou_from_counts(*overlap_counts(truth, pred), empty_score=empty_score))


def batch_dice(
    truth: np.ndarray, pred: np.ndarray, empty_score: float = SIIM_EMPTY_SCORE
) -> np.ndarray:
    """Per-image Dice (N,) of two (N, H, W) stacks; empty-mask convention as :func:`dice_score`."""
    return dice_from_counts(*batch_overlap_counts(truth, pred), empty_score=empty_score)


def batch_iou(
    truth: np.ndarray, pred: np.ndarray, empty_score: float = SIIM_EMPTY_SCORE
) -> np.ndarray:
    """Per-image IoU (N,) of two (N, H, W) stacks; empty-mask convention as :func:`iou_score`."""
    return iou_from_counts(*batch_overlap_counts(truth, pred), empty_score=empty_score)


def mean_over_images(scores: np.ndarray) -> float:
    """Mean of per-image scores (the SIIM leaderboard number); NaN for no images."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(scores.mean()) if scores.size else float("nan")


def mean_over_positives(scores: np.ndarray, truth_areas: np.ndarray) -> float:
    """Mean of per-image scores over images whose truth mask is non-empty; NaN if there are none.

    The empty-mask convention plays no part here: every image counted has a non-empty truth.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(truth_areas) > 0
    return float(scores[positive].mean()) if positive.any() else float("nan")


# ---------------------------------------------------------------------------------------------
# Image level: is there a pneumothorax?
# ---------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


@dataclass(frozen=True)
class Confusion:
    """Image-level confusion counts: an image is positive when its mask has a pixel."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def sensitivity(self) -> float:
        """TP / (TP + FN); NaN without positive images."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """TN / (TN + FP); NaN without negative images."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN when nothing was predicted positive."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def accuracy(self) -> float:
        """(TP + TN) / all; NaN for no images."""
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)


def confusion_matrix(truth_present: np.ndarray, pred_present: np.ndarray) -> Confusion:
    """Count TP/FP/FN/TN from boolean (N,) arrays: pneumothorax in the truth / the prediction."""
    truth_present = np.asarray(truth_present, dtype=bool)
    pred_present = np.asarray(pred_present, dtype=bool)
    if truth_present.shape != pred_present.shape:
        raise ValueError(f"shapes differ: {truth_present.shape} and {pred_present.shape}")
    return Confusion(
        tp=int(np.count_nonzero(truth_present & pred_present)),
        fp=int(np.count_nonzero(~truth_present & pred_present)),
        fn=int(np.count_nonzero(truth_present & ~pred_present)),
        tn=int(np.count_nonzero(~truth_present & ~pred_present)),
    )


def outcomes(truth_present: np.ndarray, pred_present: np.ndarray) -> np.ndarray:
    """Per-image outcome strings ``"TP"``, ``"FP"``, ``"FN"``, ``"TN"`` as an (N,) array."""
    truth_present = np.asarray(truth_present, dtype=bool)
    pred_present = np.asarray(pred_present, dtype=bool)
    table = np.array([["TN", "FP"], ["FN", "TP"]])
    return table[truth_present.astype(int), pred_present.astype(int)]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    return (first_rank + (counts - 1) / 2.0)[inverse]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic.

    ``labels`` are 0/1 (or bool) per image, ``scores`` e.g. each image's maximum probability. A
    positive and a negative with equal scores count as half a correctly ordered pair. NaN when
    the labels hold only one class (the AUC is undefined).
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"shapes differ: labels {labels.shape}, scores {scores.shape}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(average_ranks(scores)[labels].sum())
    u_statistic = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u_statistic / (n_pos * n_neg)


def _cumulative_counts(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP counts when predicting ``score >= t`` for each distinct ``t``, descending."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"shapes differ: labels {labels.shape}, scores {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Tied scores move together: keep only the last index of each group of equal scores.
    group_end = np.flatnonzero(np.diff(sorted_scores, append=-np.inf) != 0)
    tps = np.cumsum(sorted_labels)[group_end]
    fps = (group_end + 1) - tps
    return tps, fps, sorted_scores[group_end]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, thresholds descending, starting at (0, 0).

    Point i predicts positive for ``score >= thresholds[i]``; the first threshold is +inf. Tied
    scores give one point. fpr (tpr) is NaN when there are no negatives (positives).
    """
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    n_pos = int(np.asarray(labels, dtype=bool).sum())
    n_neg = int(np.asarray(labels).size) - n_pos
    tps = np.concatenate(([0], tps)).astype(np.float64)
    fps = np.concatenate(([0], fps)).astype(np.float64)
    thresholds = np.concatenate(([np.inf], thresholds))
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points ``(precision, recall, thresholds)``, thresholds descending.

    Point i predicts positive for ``score >= thresholds[i]`` (one point per distinct score).
    recall is NaN when there are no positive labels.
    """
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    n_pos = int(np.asarray(labels, dtype=bool).sum())
    precision = tps / (tps + fps)
    recall = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
    return precision.astype(np.float64), np.asarray(recall, dtype=np.float64), thresholds


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum of precision x recall gained per threshold; NaN without positives."""
    precision, recall, _ = pr_curve(labels, scores)
    if recall.size == 0 or np.isnan(recall).any():
        return float("nan")
    gained = np.diff(recall, prepend=0.0)
    return float((gained * precision).sum())
