"""Grid search of the post-processing gate for the best mean SIIM Dice.

One pass over the probability maps collects, per image, everything the gate can depend on:
how many pixels exceed each top threshold, and for each bottom threshold the connected
components' areas and their overlap with the truth. Every grid point is then scored from these
small tables at once (numpy broadcasting), with no re-inference and no second pass over pixels.
The scores equal what :func:`pneumo_cli.postprocess.apply_gate` followed by the SIIM Dice would
give at the working resolution of the maps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.metrics import SIIM_EMPTY_SCORE, dice_from_counts, iou_from_counts
from pneumo_cli.inference.postprocess import Gate


@dataclass(frozen=True)
class GateGrid:
    """The values tried for each gate setting (areas in original pixels); 5 x 5 x 5 x 3 default."""

    top_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    min_areas_px: tuple[float, ...] = (0, 500, 1000, 2000, 4000)
    bottom_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    min_component_areas_px: tuple[float, ...] = (0, 250, 1000)

    def __post_init__(self) -> None:
        names = ("top_threshold", "min_area_px", "bottom_threshold", "min_component_area_px")
        for name, axis in zip(names, self._axes(), strict=True):
            if not axis:
                raise ConfigError(f"gate grid: no values for {name}; give at least one")
            for value in axis:
                Gate(**{name: value})  # validated by Gate's own rules

    def _axes(self) -> tuple[tuple[float, ...], ...]:
        return (
            self.top_thresholds,
            self.min_areas_px,
            self.bottom_thresholds,
            self.min_component_areas_px,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Number of values per axis (top, min area, bottom, min component area)."""
        return tuple(len(axis) for axis in self._axes())  # type: ignore[return-value]

    def gates(self) -> list[Gate]:
        """Every grid point in C order (top slowest, min component area fastest)."""
        return [Gate(*values) for values in itertools.product(*self._axes())]


@dataclass(frozen=True)
class GateScore:
    """One grid point's result over the tuning images (scores at the maps' resolution)."""

    gate: Gate
    mean_dice: float
    mean_iou: float
    positive_images_flagged: int
    negative_images_flagged: int


@dataclass(frozen=True)
class _ImageTable:
    truth_area: int
    top_counts: np.ndarray  # (T,) pixels above each top threshold
    pred_area: np.ndarray  # (B, C) mask area after bottom threshold b and component filter c
    intersection: np.ndarray  # (B, C) overlap of that mask with the truth
    scale: float


def _image_table(prob: np.ndarray, truth: np.ndarray, grid: GateGrid, scale: float) -> _ImageTable:
    import cv2

    if prob.ndim != 2 or prob.shape != truth.shape:
        raise InputError(
            f"probability map {prob.shape} and truth mask {truth.shape} must be equal 2-D shapes"
        )
    truth_bool = truth != 0
    top_counts = np.array([np.count_nonzero(prob > t) for t in grid.top_thresholds])
    comp_mins = np.asarray(grid.min_component_areas_px, dtype=np.float64) * scale
    pred_area = np.zeros((len(grid.bottom_thresholds), comp_mins.size), dtype=np.int64)
    intersection = np.zeros_like(pred_area)
    for b, threshold in enumerate(grid.bottom_thresholds):
        mask = (prob > threshold).astype(np.uint8)
        if not mask.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
        overlaps = np.bincount(labels[truth_bool], minlength=count)[1:]
        # Same rule as postprocess.remove_small_components: keep components with area >= min.
        keep = areas[None, :] >= comp_mins[:, None]  # (C, components)
        pred_area[b] = keep @ areas
        intersection[b] = keep @ overlaps
    return _ImageTable(int(truth_bool.sum()), top_counts, pred_area, intersection, scale)


def tune_gate(
    probs: Iterable[np.ndarray],
    truths: Iterable[np.ndarray],
    grid: GateGrid = GateGrid(),
    area_scale: float | Sequence[float] = 1.0,
    progress: Callable[[int], None] | None = None,
    empty_score: float = SIIM_EMPTY_SCORE,
) -> list[GateScore]:
    """Score every gate of ``grid`` on the images and return the results, best first.

    Args:
        probs: (H, W) float32 probability maps, one per image (an iterable, so maps can be
            produced lazily; only small per-image tables are kept).
        truths: the matching (H, W) uint8 {0,1} truth masks at the same resolution.
        area_scale: working pixels per original pixel, one number or one per image.
        progress: called with 1 after each image.
        empty_score: Dice/IoU of an empty prediction on an empty truth (SIIM: 1).

    Returns:
        One :class:`GateScore` per grid point, sorted by mean Dice descending; ties keep grid
        order (lower thresholds and areas first).

    Raises:
        InputError: no images, mismatched shapes, or probs/truths/scales of different lengths.
    """
    tables = []
    scales = None if np.isscalar(area_scale) else list(area_scale)  # type: ignore[arg-type]
    truth_iter = iter(truths)
    for index, prob in enumerate(probs):
        truth = next(truth_iter, None)
        if truth is None:
            raise InputError(f"{index + 1} or more probability maps but only {index} truth masks")
        if scales is None:
            scale = float(area_scale)  # type: ignore[arg-type]
        elif index < len(scales):
            scale = float(scales[index])
        else:
            raise InputError(f"only {len(scales)} area scales for more images")
        if not scale > 0:
            raise InputError(f"image {index}: area scale must be positive, got {scale}")
        tables.append(_image_table(np.asarray(prob), np.asarray(truth), grid, scale))
        if progress is not None:
            progress(1)
    if next(truth_iter, None) is not None:
        raise InputError(f"more truth masks than the {len(tables)} probability maps")
    if not tables:
        raise InputError("no images to tune the gate on")
    if scales is not None and len(scales) != len(tables):
        raise InputError(f"{len(scales)} area scales for {len(tables)} images")
    return _score_grid(tables, grid, empty_score)


def _score_grid(tables: list[_ImageTable], grid: GateGrid, empty_score: float) -> list[GateScore]:
    truth_area = np.array([t.truth_area for t in tables])  # (N,)
    top_counts = np.stack([t.top_counts for t in tables])  # (N, T)
    pred_area = np.stack([t.pred_area for t in tables])  # (N, B, C)
    intersection = np.stack([t.intersection for t in tables])  # (N, B, C)
    scale = np.array([t.scale for t in tables])  # (N,)
    min_areas = np.asarray(grid.min_areas_px, dtype=np.float64)
    # passes[n, t, a]: image n is not emptied by top threshold t and min area a.
    passes = top_counts[:, :, None] >= min_areas[None, None, :] * scale[:, None, None]
    gate = passes[:, :, :, None, None]  # (N, T, A, 1, 1)
    pred = np.where(gate, pred_area[:, None, None, :, :], 0)  # (N, T, A, B, C)
    inter = np.where(gate, intersection[:, None, None, :, :], 0)
    truth = truth_area[:, None, None, None, None]
    mean_dice = dice_from_counts(inter, truth, pred, empty_score).mean(axis=0).ravel()
    mean_iou = iou_from_counts(inter, truth, pred, empty_score).mean(axis=0).ravel()
    flagged = pred > 0
    positive = (truth_area > 0)[:, None, None, None, None]
    flagged_pos = (flagged & positive).sum(axis=0).ravel()
    flagged_neg = (flagged & ~positive).sum(axis=0).ravel()
    gates = grid.gates()
    order = np.argsort(-mean_dice, kind="stable")
    return [
        GateScore(
            gate=gates[i],
            mean_dice=float(mean_dice[i]),
            mean_iou=float(mean_iou[i]),
            positive_images_flagged=int(flagged_pos[i]),
            negative_images_flagged=int(flagged_neg[i]),
        )
        for i in order
    ]
