"""Synthetic chest X-rays with pneumothorax masks, and a demo dataset in the SIIM layout.

:func:`draw_phantom` paints one frontal chest radiograph phantom from an explicit
``numpy.random.Generator``: a bright thorax on a dark background, two dark lung fields with
branching vessel markings, ribs, clavicles, spine, heart and diaphragm. A pneumothorax is drawn the
way it shows on a radiograph: the lung has collapsed away from the chest wall at the apex or the
lateral edge, leaving a darker band with **no lung markings**, bounded by a thin bright visceral
pleural line. The mask is exactly that band.

The anatomy is painted by :mod:`pneumo_cli.data.anatomy`; :mod:`pneumo_cli.data.demo` writes many
phantoms as a small SIIM-like dataset. Everything is a pure function of the generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumo_cli.data.anatomy import (
    draw_body,
    draw_ribs_and_clavicles,
    draw_spine,
    finish_film,
    heart_shadow,
    lung_markings,
    lung_outline,
)

# The pneumothorax band must stay visible after downscaling to 64-128 px, so it covers at least
# this fraction of the image. Real SIIM positives are smaller (stage-2 train-rle.csv: median
# 0.8%, 90th percentile 3.2% of the image); the demo is deliberately easier so that a few CPU
# epochs learn it.
MIN_PTX_FRACTION = 0.025
MAX_PTX_FRACTION = 0.09


@dataclass(frozen=True)
class Anatomy:
    """Patient-level shape parameters, shared by every image of one synthetic patient.

    Lengths are fractions of the image side; intensities are in [0, 1] (1 = bright = dense).
    """

    body_half_width: float
    center_x: float
    lung_top: float
    lung_bottom: float
    lung_width: float
    mediastinum_half_width: float
    heart_radius: float
    soft_tissue: float
    lung_level: float


@dataclass(frozen=True)
class Phantom:
    """One synthetic radiograph.

    ``image`` is uint8 (size, size), MONOCHROME2 convention (air dark, bone bright). ``mask`` is
    uint8 {0, 1} (size, size), the pneumothorax region (all zero for a negative). ``side`` is the
    patient's side of the pneumothorax (``"right"`` is on the image's left) and ``location`` is
    ``"apex"`` or ``"lateral"``; both are ``""`` for a negative.
    """

    image: np.ndarray
    mask: np.ndarray
    side: str
    location: str


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw the patient-level shape and density parameters of a phantom."""
    lung_top = rng.uniform(0.12, 0.2)
    return Anatomy(
        body_half_width=rng.uniform(0.4, 0.47),
        center_x=0.5 + rng.uniform(-0.03, 0.03),
        lung_top=lung_top,
        lung_bottom=lung_top + rng.uniform(0.55, 0.66),
        lung_width=rng.uniform(0.28, 0.33),
        mediastinum_half_width=rng.uniform(0.05, 0.07),
        heart_radius=rng.uniform(0.12, 0.16),
        soft_tissue=rng.uniform(0.55, 0.68),
        lung_level=rng.uniform(0.16, 0.26),
    )


def draw_phantom(
    rng: np.random.Generator,
    size: int = 512,
    *,
    pneumothorax: bool = False,
    anatomy: Anatomy | None = None,
) -> Phantom:
    """Draw one chest-X-ray phantom of ``size`` x ``size`` pixels.

    ``anatomy`` fixes the patient-level shape (from :func:`draw_anatomy`); by default a new one is
    drawn. With ``pneumothorax=True`` one lung is partly collapsed at its apex or lateral edge and
    the mask covers 2.5-9% of the image. The result depends only on the generator's state.

    Raises:
        ValueError: ``size`` is below 32 (too small to draw the anatomy).
    """
    import cv2

    if size < 32:
        raise ValueError(f"phantom size must be at least 32 px, got {size}")
    if anatomy is None:
        anatomy = draw_anatomy(rng)
    s = float(size)
    # Per-image jitter of the patient's anatomy (inspiration depth, positioning).
    dx = rng.uniform(-0.015, 0.015)
    dy = rng.uniform(-0.02, 0.02)
    cx = (anatomy.center_x + dx) * s
    top = (anatomy.lung_top + dy) * s
    bottom = (anatomy.lung_bottom + dy + rng.uniform(-0.02, 0.02)) * s
    mediastinum = anatomy.mediastinum_half_width * s

    image = draw_body(cv2, rng, size, cx, anatomy, top)
    lungs = _lung_outlines(rng, anatomy, s, cx, mediastinum, top, bottom)

    heart = heart_shadow(cv2, rng, size, cx, mediastinum, bottom, anatomy)
    mask = np.zeros((size, size), np.uint8)
    side_hit, location = "", ""
    collapsed = None
    if pneumothorax:
        side_hit = "right" if rng.random() < 0.5 else "left"
        location = "apex" if rng.random() < 0.45 else "lateral"
        outline, medial_x, _, _, lung_bottom = lungs[side_hit]
        collapsed, mask = _collapse_lung(
            cv2, rng, size, outline, medial_x, lung_bottom, location, heart < 0.05
        )

    lung_mask, lung_soft = _shade_lungs(cv2, image, lungs, heart, anatomy, cx, s)

    texture = lung_markings(cv2, rng, size, lungs, s)
    free = 1.0 - cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(s / 512, 0.5))
    image += texture * lung_mask * free
    if pneumothorax:
        # Free pleural air: no vessels and a little more radiolucent than aerated lung.
        image -= (1.0 - free) * rng.uniform(0.08, 0.12)
        image += _pleural_line(cv2, size, collapsed, mask) * rng.uniform(0.2, 0.28)

    ribs = draw_ribs_and_clavicles(cv2, rng, size, cx, mediastinum, top, anatomy, s)
    # Ribs stand out against aerated lung and fade over the thick soft tissue.
    image += ribs * (0.3 + 0.7 * lung_soft)
    image += draw_spine(cv2, size, cx, mediastinum, top, bottom, s)
    image = finish_film(cv2, rng, image, s)
    return Phantom(image=image, mask=mask, side=side_hit, location=location)


def _lung_outlines(
    rng: np.random.Generator,
    anatomy: Anatomy,
    s: float,
    cx: float,
    mediastinum: float,
    top: float,
    bottom: float,
) -> dict[str, tuple]:
    """Both lungs' outlines: side -> (outline, medial x, direction, width, bottom). The
    image-left lung is the patient's right; its hemidiaphragm sits slightly higher."""
    lungs = {}
    for side, direction in (("right", -1.0), ("left", 1.0)):
        medial_x = cx + direction * mediastinum
        width = anatomy.lung_width * s * rng.uniform(0.94, 1.04)
        lung_bottom = bottom - (0.025 * s if side == "right" else 0.0)
        outline = lung_outline(rng, medial_x, direction, width, top, lung_bottom)
        lungs[side] = (outline, medial_x, direction, width, lung_bottom)
    return lungs


def _shade_lungs(
    cv2: Any,
    image: np.ndarray,
    lungs: dict[str, tuple],
    heart: np.ndarray,
    anatomy: Anatomy,
    cx: float,
    s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Darken the lung fields of ``image`` in place; returns the lung mask (without the heart)
    and its blurred version."""
    size = image.shape[0]
    lung_mask = np.zeros((size, size), np.float32)
    for outline, *_ in lungs.values():
        cv2.fillPoly(lung_mask, [np.round(outline).astype(np.int32)], 1.0, cv2.LINE_AA)
    # The heart lies in front of the left lung: its silhouette replaces the lung's darkness.
    lung_mask *= 1.0 - heart
    lung_soft = cv2.GaussianBlur(lung_mask, (0, 0), s / 110)
    image -= lung_soft * (anatomy.soft_tissue - anatomy.lung_level)
    # Lung density rises towards the bases and the chest wall (more tissue in the beam path).
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    cols = np.abs(np.arange(size, dtype=np.float32) - cx)[None, :] / (0.45 * s)
    image += lung_soft * (0.08 * rows + 0.07 * cols**2)
    image += heart * 0.06
    return lung_mask, lung_soft


def _collapse_lung(cv2, rng, size, outline, medial_x, bottom, location, allowed):
    """Shrink the lung towards the hilum; return (collapsed outline, pneumothorax mask).

    The mask is the lung minus its collapsed copy, cleaned of thin slivers along the diaphragm
    and kept to its largest piece, so it is one band along the apex or the lateral chest wall.
    """
    lung = np.zeros((size, size), np.uint8)
    cv2.fillPoly(lung, [np.round(outline).astype(np.int32)], 1)
    lung &= allowed.astype(np.uint8)
    radius = max(1, round(size / 80))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    fraction = 0.0
    for attempt in range(8):
        extra = 0.04 * attempt
        if location == "apex":
            fx, fy = rng.uniform(0.8, 0.92) - extra, rng.uniform(0.6, 0.76) - extra
        else:
            fx, fy = rng.uniform(0.55, 0.75) - extra, rng.uniform(0.9, 0.98)
        collapsed = outline.copy()
        collapsed[:, 0] = medial_x + (outline[:, 0] - medial_x) * fx
        collapsed[:, 1] = bottom - (bottom - outline[:, 1]) * fy
        inner = np.zeros((size, size), np.uint8)
        cv2.fillPoly(inner, [np.round(collapsed).astype(np.int32)], 1)
        mask = cv2.morphologyEx(lung & (1 - inner), cv2.MORPH_OPEN, kernel)
        mask = _largest_component(cv2, mask)
        fraction = float(mask.mean())
        if fraction >= MIN_PTX_FRACTION:
            break
    if fraction > MAX_PTX_FRACTION:
        mask = _trim_to_fraction(mask, MAX_PTX_FRACTION)
    return collapsed, mask


def _largest_component(cv2, mask):
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 2:
        return mask
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == biggest).astype(np.uint8)


def _trim_to_fraction(mask, fraction):
    """Drop the band's far end (the base, or the inner part) until it covers ``fraction``."""
    rows = np.flatnonzero(mask.any(axis=1))
    limit = int(fraction * mask.size)
    area = np.cumsum(mask.sum(axis=1))
    last = int(np.searchsorted(area, limit))
    trimmed = mask.copy()
    trimmed[max(last, rows[0] + 1) :] = 0
    return trimmed


def _pleural_line(cv2, size, collapsed, mask) -> np.ndarray:
    """Thin line on the collapsed lung's edge where it borders the pneumothorax (float 0-1)."""
    line = np.zeros((size, size), np.float32)
    thickness = max(1, round(size / 400))
    cv2.polylines(line, [np.round(collapsed).astype(np.int32)], True, 1.0, thickness, cv2.LINE_AA)
    near = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=max(1, size // 256))
    return line * near
