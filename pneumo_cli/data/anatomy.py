"""The parts of a synthetic chest radiograph that :func:`~pneumo_cli.data.synthetic.draw_phantom`
paints: thorax, lung outlines, vessel markings, ribs and clavicles, heart, spine and the final
film-like finish. Each takes OpenCV as ``cv2`` and an explicit random generator.
"""

from __future__ import annotations

import math

import numpy as np


def draw_body(cv2, rng, size, cx, anatomy, top) -> np.ndarray:
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


def lung_outline(rng, medial_x, direction, width, top, bottom) -> np.ndarray:
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


def lung_markings(cv2, rng, size, lungs, s) -> np.ndarray:
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


def draw_ribs_and_clavicles(cv2, rng, size, cx, mediastinum, top, anatomy, s) -> np.ndarray:
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


def heart_shadow(cv2, rng, size, cx, mediastinum, bottom, anatomy) -> np.ndarray:
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


def draw_spine(cv2, size, cx, mediastinum, top, bottom, s) -> np.ndarray:
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


def finish_film(cv2, rng, image, s) -> np.ndarray:
    """Detector blur, quantum noise, exposure and gamma, then quantise to uint8."""
    image = cv2.GaussianBlur(image, (0, 0), max(s / 1000, 0.3))
    noise = rng.standard_normal(image.shape).astype(np.float32) * rng.uniform(0.008, 0.02)
    image = np.clip(image + noise, 0.0, 1.0)
    gamma = rng.uniform(0.8, 1.25)
    gain = rng.uniform(0.85, 1.05)
    offset = rng.uniform(-0.02, 0.05)
    image = np.clip(gain * image**gamma + offset, 0.0, 1.0)
    return np.round(image * 255.0).astype(np.uint8)
