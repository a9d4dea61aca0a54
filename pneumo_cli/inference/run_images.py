"""Images a check runs a trained network on when no input is at hand: those of the run's own
cache (validation first), else synthetic chest phantoms."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import PneumoError


def cache_images(
    config: dict[str, Any], image_size: int, splits: tuple[str, ...], count: int
) -> tuple[np.ndarray, str]:
    """Up to ``count`` uint8 (N, S, S) images of the run's cache, taken from ``splits`` in order
    (sorted by ImageId within a split), and a description; an empty array when the cache is gone
    or holds images of another size."""
    from pneumo_cli.core.files import read_grey_png

    cache = config.get("cache")
    empty = np.zeros((0, image_size, image_size), np.uint8)
    if not cache or not (Path(cache) / "manifest.csv").is_file():
        return empty, ""
    from pneumo_cli.data.cache import load_manifest

    try:
        manifest = load_manifest(cache)
    except PneumoError:
        return empty, ""
    images: list[np.ndarray] = []
    taken: list[str] = []
    for split in splits:
        rows = manifest[manifest["split"] == split].sort_values("ImageId")
        before = len(images)
        for relative in rows["image"]:
            if len(images) == count:
                break
            with contextlib.suppress(PneumoError):
                image = read_grey_png(Path(cache) / relative)
                if image.shape == (image_size, image_size):
                    images.append(image)
        if len(images) > before:
            taken.append(f"{len(images) - before} {split}")
    if not images:
        return empty, ""
    return np.stack(images), f"{len(images)} images ({', '.join(taken)}) of cache {cache}"


def synthetic_images(image_size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` uint8 (N, S, S) synthetic chest phantoms, every second one with pneumothorax."""
    from pneumo_cli.data.synthetic import draw_phantom

    rng = np.random.default_rng(seed)
    size = max(image_size, 32)
    images = [draw_phantom(rng, size, pneumothorax=i % 2 == 1).image for i in range(count)]
    if size != image_size:
        import cv2

        images = [
            cv2.resize(i, (image_size, image_size), interpolation=cv2.INTER_AREA) for i in images
        ]
    return np.stack(images)
