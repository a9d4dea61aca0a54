"""Write tiny caches in the documented `pneumo preprocess` format, for training tests.

Independent of pneumo's own preprocess code on purpose: the training tests check that training
reads the *documented* format (see the cache section of the README), whoever writes it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pneumo_cli.core.config import PreprocessConfig, to_dict

COLUMNS = [
    "ImageId", "image", "mask", "has_pneumothorax", "mask_area_px", "split", "fold",
    "orig_height", "orig_width", "crop_top", "crop_bottom", "crop_left", "crop_right",
    "pixel_spacing_mm", "view_position", "sex", "age", "patient_key", "source",
]  # fmt: skip


@dataclass(frozen=True)
class Sample:
    image_id: str
    image: np.ndarray  # uint8 (S, S)
    mask: np.ndarray | None  # uint8 {0,1} (S, S); None = unlabelled
    split: str
    fold: int = -1  # cross-validation fold; -1 = none (and always for test images)


def synthetic_sample(
    rng: np.random.Generator, size: int, positive: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A grey image (uint8 (S, S)) with soft texture and, when ``positive``, a dark ellipse
    bounded by a bright rim; the mask (uint8 {0,1}) is the ellipse."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    base = 110 + 60 * np.sin(3 * xs + rng.uniform(0, 3)) * np.cos(2 * ys)
    image = base + rng.normal(0, 6, (size, size))
    mask = np.zeros((size, size), np.uint8)
    if positive:
        centre = (
            int(rng.integers(size // 4, 3 * size // 4)),
            int(rng.integers(size // 4, 3 * size // 4)),
        )
        axes = (int(rng.integers(size // 10, size // 5)), int(rng.integers(size // 10, size // 5)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
        rim = np.zeros_like(mask)
        cv2.ellipse(rim, centre, axes, angle, 0, 360, 1, 2)
        image = np.where(mask > 0, image - 70, image)
        image = np.where(rim > 0, 245, image)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_cache(folder: Path, samples: list[Sample], image_size: int, folds: int = 0) -> Path:
    """Write ``samples`` as a cache folder (images/, masks/, manifest.csv, preprocess.json);
    ``folds`` is the number of cross-validation folds the samples' ``fold`` values use."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    for sample in samples:
        assert sample.image.shape == (image_size, image_size)
        cv2.imwrite(str(folder / "images" / f"{sample.image_id}.png"), sample.image)
        mask_rel, label, area = "", "", ""
        if sample.mask is not None:
            mask_rel = f"masks/{sample.image_id}.png"
            cv2.imwrite(str(folder / mask_rel), (sample.mask > 0).astype(np.uint8) * 255)
            label = "1" if sample.mask.any() else "0"
            area = str(int(sample.mask.sum()))
        rows.append(
            [sample.image_id, f"images/{sample.image_id}.png", mask_rel, label, area,
             sample.split, str(sample.fold), "1024", "1024", "0", "1024", "0", "1024", "0.14",
             "PA", "F", "50", "", f"raw/{sample.image_id}.dcm"]
        )  # fmt: skip
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    config = PreprocessConfig(image_size=image_size, folds=folds)
    settings = {"settings": to_dict(config), "versions": {},
                "counts": {"images": len(samples)}, "pneumo_version": "test",
                "complete": True}  # fmt: skip
    (folder / "preprocess.json").write_text(json.dumps(settings))
    return folder


def synthetic_cache(
    folder: Path,
    image_size: int = 64,
    n_train: int = 8,
    n_val: int = 4,
    seed: int = 0,
    train_positive_every: int = 1,
    folds: int = 0,
) -> Path:
    """A cache of synthetic images: train images positive every ``train_positive_every``-th
    (1 = all positive), val images alternating positive/negative, plus one unlabelled image.
    With ``folds``, the train and val images are dealt into folds in turn (image i to fold
    i mod folds), and one labelled test image is added."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_train):
        image, mask = synthetic_sample(rng, image_size, i % train_positive_every == 0)
        samples.append(Sample(f"train{i:03d}", image, mask, "train", i % folds if folds else -1))
    for i in range(n_val):
        image, mask = synthetic_sample(rng, image_size, i % 2 == 0)
        fold = (n_train + i) % folds if folds else -1
        samples.append(Sample(f"val{i:03d}", image, mask, "val", fold))
    if folds:
        image, mask = synthetic_sample(rng, image_size, True)
        samples.append(Sample("test000", image, mask, "test"))
    image, _ = synthetic_sample(rng, image_size, False)
    samples.append(Sample("unlabelled000", image, None, "test"))
    return write_cache(folder, samples, image_size, folds)
