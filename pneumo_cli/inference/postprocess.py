"""Post-processing gate: probability map -> binary mask (numpy and OpenCV, no TensorFlow).

The gate is the one the 2019 SIIM winner used, in three steps:

1. the image is empty unless at least ``min_area_px`` pixels exceed ``top_threshold``;
2. otherwise the mask is every pixel above ``bottom_threshold``;
3. connected components (8-connected) smaller than ``min_component_area_px`` are removed.

The paper's single threshold is ``top_threshold == bottom_threshold`` with both areas 0. Areas
are given in **original-resolution** pixels, so one setting works at any model size; they are
multiplied by ``area_scale`` (working pixels per original pixel, see :func:`area_scale_for`)
before comparing with pixel counts at the working resolution. Counts are compared with the
scaled areas as floats, no rounding: a component is kept when ``area >= min * area_scale``.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_cli.core.config import from_dict, to_dict
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.files import atomic_write_json, read_input_bytes

POSTPROCESS_FILE = "postprocess.json"


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ConfigError(f"{name} must be {bounds}, got {value!r}")


@dataclass(frozen=True)
class Gate:
    """Post-processing settings; thresholds in [0, 1], areas in original pixels (>= 0).

    Raises:
        ConfigError: a threshold outside [0, 1], a negative area, or a non-finite number.
    """

    top_threshold: float = 0.5
    min_area_px: float = 0
    bottom_threshold: float = 0.5
    min_component_area_px: float = 0

    def __post_init__(self) -> None:
        _check_number("top_threshold", self.top_threshold, 0.0, 1.0)
        _check_number("bottom_threshold", self.bottom_threshold, 0.0, 1.0)
        _check_number("min_area_px", self.min_area_px, 0.0, math.inf)
        _check_number("min_component_area_px", self.min_component_area_px, 0.0, math.inf)


def area_scale_for(original_hw: tuple[int, int], working_hw: tuple[int, int]) -> float:
    """Working pixels per original pixel: ``(h_w * w_w) / (h_o * w_o)``.

    ``original_hw`` is the part of the original image the working image shows (after any crop).
    """
    (orig_h, orig_w), (work_h, work_w) = original_hw, working_hw
    if min(orig_h, orig_w, work_h, work_w) <= 0:
        raise ConfigError(f"image sizes must be positive, got {original_hw} and {working_hw}")
    return (work_h * work_w) / (orig_h * orig_w)


def _check_scale(area_scale: float) -> None:
    if not (isinstance(area_scale, numbers.Real) and math.isfinite(area_scale) and area_scale > 0):
        raise ConfigError(f"area_scale must be a positive number, got {area_scale!r}")


def remove_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop 8-connected components of an (H, W) {0,1} mask with fewer than ``min_area`` pixels.

    ``min_area`` is in working pixels (already scaled). Returns a new uint8 {0,1} mask.
    """
    return _drop_small_components((np.asarray(mask) != 0).astype(np.uint8), min_area)


# Up to this many components too small to keep are erased one by one within their bounding
# boxes; more (a noisy map) are erased by one lookup over the mask's occupied box.
_ERASED_ONE_BY_ONE = 64


def _drop_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """:func:`remove_small_components` of a uint8 {0,1} mask the caller owns, in place.

    The components are labelled within the box the mask occupies (a pneumothorax covers a
    small part of the X-ray, so most of a 1024 px map is never labelled), and nothing is
    rewritten when every component is kept.
    """
    if min_area <= 1 or not mask.any():
        return mask  # every component has at least one pixel
    import cv2

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # a view: writes reach mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(box), connectivity=8
    )
    areas = stats[:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(areas[1:] < min_area) + 1  # label 0 is the background
    if len(small) > _ERASED_ONE_BY_ONE:
        keep = (areas >= min_area).astype(np.uint8)
        keep[0] = 0
        box[...] = keep[labels]
        return mask
    for label in small:
        x, y, w, h = (int(v) for v in stats[label, :4])
        window = box[y : y + h, x : x + w]
        window[labels[y : y + h, x : x + w] == label] = 0
    return mask


def apply_gate(prob: np.ndarray, gate: Gate = Gate(), area_scale: float = 1.0) -> np.ndarray:
    """Turn an (H, W) float32 probability map (values in [0, 1]) into a uint8 {0,1} mask.

    ``area_scale`` converts the gate's original-pixel areas to pixels of ``prob``.

    Raises:
        InputError: ``prob`` is not 2-D.
        ConfigError: ``area_scale`` is not a positive number.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise InputError(f"probability map must be 2-D (H, W), got shape {prob.shape}")
    _check_scale(area_scale)
    if gate.min_area_px > 0:
        confident = np.count_nonzero(prob > gate.top_threshold)
        if confident < gate.min_area_px * area_scale:
            return np.zeros(prob.shape, dtype=np.uint8)
    mask = np.greater(prob, gate.bottom_threshold).view(np.uint8)  # a new array: ours to edit
    return _drop_small_components(mask, gate.min_component_area_px * area_scale)


def save_gate(path: str | Path, gate: Gate) -> None:
    """Write ``gate`` as ``postprocess.json`` (keys: the four Gate fields), atomically."""
    atomic_write_json(path, to_dict(gate))


def load_gate(path: str | Path) -> Gate:
    """Read a gate written by :func:`save_gate`.

    Raises:
        InputError: the file is missing or unreadable.
        ConfigError: not JSON, not an object, unknown keys or invalid values (file named).
    """
    data = read_input_bytes(path)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc}); rewrite it with `evaluate --tune`"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object with the gate settings")
    try:
        return from_dict(Gate, raw, str(path))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
