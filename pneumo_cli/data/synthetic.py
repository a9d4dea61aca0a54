"""Synthetic chest X-rays with pneumothorax masks, and a demo dataset in the SIIM layout.

:func:`draw_phantom` paints one frontal chest radiograph phantom from an explicit
``numpy.random.Generator``: a bright thorax on a dark background, two dark lung fields with
branching vessel markings, ribs, clavicles, spine, heart and diaphragm. A pneumothorax is drawn the
way it shows on a radiograph: the lung has collapsed away from the chest wall at the apex or the
lateral edge, leaving a darker band with **no lung markings**, bounded by a thin bright visceral
pleural line. The mask is exactly that band.

:func:`write_demo_dataset` writes many phantoms as a small SIIM-like dataset (JPEG DICOMs nested
``dicom-images-train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, a stage-1 ``train-rle.csv``, a few
MONOCHROME1 and a few deliberately corrupted files). Everything is a pure function of the seed, so
two runs with the same seed write byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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

    image = _draw_body(cv2, rng, size, cx, anatomy, top)
    # Image-left lung is the patient's right; its hemidiaphragm sits slightly higher.
    lungs = {}
    for side, direction in (("right", -1.0), ("left", 1.0)):
        medial_x = cx + direction * mediastinum
        width = anatomy.lung_width * s * rng.uniform(0.94, 1.04)
        lung_bottom = bottom - (0.025 * s if side == "right" else 0.0)
        outline = _lung_outline(rng, medial_x, direction, width, top, lung_bottom)
        lungs[side] = (outline, medial_x, direction, width, lung_bottom)

    heart = _heart_shadow(cv2, rng, size, cx, mediastinum, bottom, anatomy)
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

    texture = _lung_markings(cv2, rng, size, lungs, s)
    free = 1.0 - cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(s / 512, 0.5))
    image += texture * lung_mask * free
    if pneumothorax:
        # Free pleural air: no vessels and a little more radiolucent than aerated lung.
        image -= (1.0 - free) * rng.uniform(0.08, 0.12)
        image += _pleural_line(cv2, size, collapsed, mask) * rng.uniform(0.2, 0.28)

    ribs = _draw_ribs_and_clavicles(cv2, rng, size, cx, mediastinum, top, anatomy, s)
    # Ribs stand out against aerated lung and fade over the thick soft tissue.
    image += ribs * (0.3 + 0.7 * lung_soft)
    image += _draw_spine(cv2, size, cx, mediastinum, top, bottom, s)
    image = _finish(cv2, rng, image, s)
    return Phantom(image=image, mask=mask, side=side_hit, location=location)


def _draw_body(cv2, rng, size, cx, anatomy, top) -> np.ndarray:
    """Background air plus the soft-tissue silhouette (neck, shoulders, chest wall, abdomen)."""
    s = float(size)
    image = np.full((size, size), rng.uniform(0.02, 0.08), np.float32)
    half = anatomy.body_half_width * s
    neck = 0.08 * s
    shoulder_y = top - 0.04 * s
    points = [
        (cx - neck, -0.05 * s),
        (cx - neck * 1.1, shoulder_y - 0.08 * s),
        (cx - half * 0.85, shoulder_y - 0.03 * s),
        (cx - half * 1.08, shoulder_y + 0.06 * s),
        (cx - half * 1.05, 0.6 * s),
        (cx - half * 0.98, 1.05 * s),
        (cx + half * 0.98, 1.05 * s),
        (cx + half * 1.05, 0.6 * s),
        (cx + half * 1.08, shoulder_y + 0.06 * s),
        (cx + half * 0.85, shoulder_y - 0.03 * s),
        (cx + neck * 1.1, shoulder_y - 0.08 * s),
        (cx + neck, -0.05 * s),
    ]
    body = np.zeros((size, size), np.float32)
    cv2.fillPoly(body, [np.round(points).astype(np.int32)], 1.0, cv2.LINE_AA)
    # Arms beside the chest wall, separated from it by a thin dark gap of air.
    for direction in (-1.0, 1.0):
        arm_x = cx + direction * (half * 1.08 + 0.05 * s)
        if 0 < arm_x < s:
            cv2.ellipse(
                body,
                (round(arm_x), round(0.62 * s)),
                (round(0.035 * s), round(0.5 * s)),
                direction * 4.0,
                0,
                360,
                0.8,
                -1,
                cv2.LINE_AA,
            )
    body = cv2.GaussianBlur(body, (0, 0), s / 80)
    # Thicker tissue towards the midline and the abdomen looks brighter.
    cols = (np.arange(size, dtype=np.float32) - cx) / half
    thickness = np.clip(1.0 - 0.25 * cols**2, 0.55, 1.0)[None, :]
    image += body * anatomy.soft_tissue * thickness
    return image


def _lung_outline(rng, medial_x, direction, width, top, bottom) -> np.ndarray:
    """Polygon (N, 2) of one lung field in pixel coordinates (x, y)."""
    height = bottom - top
    points = []
    apex_s = rng.uniform(0.3, 0.4)
    bulge = rng.uniform(0.5, 0.65)
    # Lateral border from the apex down to the costophrenic angle.
    for t in np.linspace(0.0, 1.0, 24):
        reach = math.sin(0.5 * math.pi * min(1.0, t / bulge)) ** 0.6
        lateral = apex_s + (1.0 - apex_s) * reach - 0.04 * max(0.0, t - bulge)
        points.append((lateral, t))
    # Diaphragm dome from the costophrenic angle to the cardiophrenic angle.
    dome = rng.uniform(0.1, 0.16)
    corner = points[-1][0]
    for u in np.linspace(0.0, 1.0, 16)[1:]:
        lateral = corner * (1.0 - u)
        points.append((lateral, 1.0 - dome * math.sin(math.pi * min(1.0, 0.2 + 0.7 * u))))
    # Medial border up to the apex.
    for t in np.linspace(points[-1][1], 0.0, 12)[1:]:
        lateral = 0.08 * (1.0 - t) + apex_s * (1.0 - min(1.0, t / 0.2)) * 0.9
        points.append((lateral, t))
    outline = np.array(points, np.float64)
    xs = medial_x + direction * outline[:, 0] * width
    ys = top + outline[:, 1] * height
    return np.stack([xs, ys], axis=1)


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


def _lung_markings(cv2, rng, size, lungs, s) -> np.ndarray:
    """Branching vessel trees from each hilum plus fine interstitial texture (float, >= 0)."""
    layer = np.zeros((size, size), np.float32)
    for outline, medial_x, direction, width, bottom in lungs.values():
        top = outline[:, 1].min()
        hilum = (medial_x + direction * width * 0.12, top + (bottom - top) * 0.42)
        roots = 7
        for angle in np.linspace(-140.0, 140.0, roots) + rng.uniform(-8, 8, roots):
            # Angle 0 points laterally; +-140 degrees reach the apex and the base.
            theta = math.radians(angle)
            heading = (direction * math.cos(theta), -math.sin(theta))
            reach = width * (0.95 if abs(angle) < 100 else 1.25)
            _branch(cv2, rng, layer, hilum, heading, reach * 0.3, s / 110, 0, s)
    layer = cv2.GaussianBlur(layer, (0, 0), max(s / 900, 0.4))
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), s / 250)
    noise *= 0.018 / max(float(noise.std()), 1e-6)
    return layer * 0.11 + noise


def _branch(cv2, rng, layer, start, heading, length, thickness, depth, s) -> None:
    # A vessel is a slightly wavy tapering segment that forks in two; depth 6 gives about
    # 2^6 twigs per root, enough to reach the lung periphery.
    vx, vy = _turn(heading, rng.uniform(-12, 12))
    mid = (start[0] + vx * length * 0.5, start[1] + vy * length * 0.5)
    wx, wy = _turn((vx, vy), rng.uniform(-15, 15))
    end = (mid[0] + wx * length * 0.5, mid[1] + wy * length * 0.5)
    strength = 1.0 - 0.09 * depth
    points = np.round(np.array([start, mid, end]) * 16).astype(np.int32)
    cv2.polylines(layer, [points], False, strength, max(1, round(thickness)), cv2.LINE_AA, 4)
    if depth >= 6 or length < s / 150:
        return
    for sign in (-1.0, 1.0):
        child = _turn((wx, wy), sign * rng.uniform(12, 32))
        scale = rng.uniform(0.68, 0.82)
        _branch(cv2, rng, layer, end, child, length * scale, thickness * 0.75, depth + 1, s)


def _turn(vector, degrees):
    angle = math.radians(degrees)
    x, y = vector
    return (x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))


def _pleural_line(cv2, size, collapsed, mask) -> np.ndarray:
    """Thin line on the collapsed lung's edge where it borders the pneumothorax (float 0-1)."""
    line = np.zeros((size, size), np.float32)
    thickness = max(1, round(size / 400))
    cv2.polylines(line, [np.round(collapsed).astype(np.int32)], True, 1.0, thickness, cv2.LINE_AA)
    near = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=max(1, size // 256))
    return line * near


def _draw_ribs_and_clavicles(cv2, rng, size, cx, mediastinum, top, anatomy, s) -> np.ndarray:
    """Posterior and anterior rib arcs and clavicles (additive brightness, before fading)."""
    posterior = np.zeros((size, size), np.float32)
    anterior = np.zeros((size, size), np.float32)
    spacing = (anatomy.lung_bottom - anatomy.lung_top) * s / 8.0
    thickness = max(1, round(spacing * 0.3))
    span = anatomy.body_half_width * s * 0.98
    t = np.linspace(0.0, 1.0, 40)
    for direction in (-1.0, 1.0):
        for k in range(10):
            y0 = top - 0.06 * s + k * spacing
            xs = cx + direction * (0.02 * s + t * (span - 0.02 * s))
            # From the spine a posterior rib climbs a little, then curves down the lateral wall.
            ys = y0 - 0.9 * spacing * t + 2.6 * spacing * t**3
            _polyline(cv2, posterior, xs, ys, thickness)
            # Anterior ribs run from the lateral wall down towards the sternum, fainter.
            ys_front = y0 + 1.6 * spacing - 1.3 * spacing * (1.0 - t) ** 2 + 0.9 * spacing * t
            _polyline(cv2, anterior, xs[8:], ys_front[8:] + 0.9 * spacing, max(1, thickness - 1))
    clavicles = np.zeros((size, size), np.float32)
    for direction in (-1.0, 1.0):
        u = np.linspace(0.0, 1.0, 30)
        xs = cx + direction * (0.03 * s + u * 0.27 * s)
        ys = top + 0.015 * s - u * 0.06 * s + 0.02 * s * np.sin(np.pi * u)
        _polyline(cv2, clavicles, xs, ys, max(1, round(0.022 * s)))
    soft = max(s / 500, 0.5)
    posterior = cv2.GaussianBlur(posterior, (0, 0), soft)
    anterior = cv2.GaussianBlur(anterior, (0, 0), soft * 2)
    clavicles = cv2.GaussianBlur(clavicles, (0, 0), soft * 1.5)
    return (
        posterior * rng.uniform(0.045, 0.075)
        + anterior * rng.uniform(0.02, 0.04)
        + clavicles * rng.uniform(0.1, 0.15)
    )


def _polyline(cv2, layer, xs, ys, thickness) -> None:
    points = np.round(np.stack([xs, ys], axis=1) * 16).astype(np.int32)
    cv2.polylines(layer, [points], False, 1.0, thickness, cv2.LINE_AA, 4)


def _heart_shadow(cv2, rng, size, cx, mediastinum, bottom, anatomy) -> np.ndarray:
    """Soft heart and mediastinum silhouette in [0, 1], bulging into the patient's left lung."""
    s = float(size)
    layer = np.zeros((size, size), np.float32)
    radius = anatomy.heart_radius * s
    center = (round(cx + mediastinum * 0.6 + radius * 0.45), round(bottom - radius * 0.8))
    axes = (round(radius * rng.uniform(1.2, 1.35)), round(radius * rng.uniform(0.78, 0.9)))
    cv2.ellipse(layer, center, axes, rng.uniform(-28, -18), 0, 360, 1.0, -1, cv2.LINE_AA)
    # Right heart border and the aortic knob keep the mediastinum a little wider than the spine.
    cv2.ellipse(
        layer,
        (round(cx - mediastinum * 0.6), round(bottom - radius * 0.6)),
        (round(radius * 0.55), round(radius * 0.7)),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
    )
    cv2.ellipse(
        layer,
        (round(cx + mediastinum * 0.9), round(bottom - radius * 2.5)),
        (round(radius * 0.3), round(radius * 0.5)),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
    )
    # Below the diaphragm the heart merges into the equally dense abdomen.
    rows = np.arange(size, dtype=np.float32)[:, None]
    layer *= np.clip((bottom + 0.01 * s - rows) / (0.03 * s), 0.0, 1.0)
    return cv2.GaussianBlur(layer, (0, 0), s / 200)


def _draw_spine(cv2, size, cx, mediastinum, top, bottom, s) -> np.ndarray:
    """Spine column with vertebral banding and subdiaphragmatic density (additive)."""
    spine = np.zeros((size, size), np.float32)
    cv2.rectangle(
        spine, (round(cx - mediastinum * 0.5), 0), (round(cx + mediastinum * 0.5), size), 0.07, -1
    )
    step = max(2.0, (bottom - top) / 9.0)
    y = top - step
    while y < size:
        cv2.rectangle(
            spine,
            (round(cx - mediastinum * 0.45), round(y)),
            (round(cx + mediastinum * 0.45), round(y + step * 0.75)),
            0.1,
            -1,
        )
        y += step
    spine = cv2.GaussianBlur(spine, (0, 0), max(s / 300, 0.5))
    # Liver and stomach below the diaphragm, ramping in over a few pixels.
    rows = np.arange(size, dtype=np.float32)[:, None]
    return spine + np.clip((rows - bottom + 0.04 * s) / (0.08 * s), 0.0, 1.0) * 0.06


def _finish(cv2, rng, image, s) -> np.ndarray:
    """Detector blur, quantum noise, exposure and gamma, then quantise to uint8."""
    image = cv2.GaussianBlur(image, (0, 0), max(s / 1000, 0.3))
    noise = rng.standard_normal(image.shape).astype(np.float32) * rng.uniform(0.008, 0.02)
    image = np.clip(image + noise, 0.0, 1.0)
    gamma = rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.85, 1.05)
    offset = rng.uniform(-0.02, 0.05)
    image = np.clip(gain * image**gamma + offset, 0.0, 1.0)
    return np.round(image * 255.0).astype(np.uint8)
