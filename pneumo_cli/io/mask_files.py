"""Mask image files: which files are masks, their ImageId, and the foreground rule.

The one reader behind ``pneumo rle-encode``, ``pneumo preprocess --masks`` and ``pneumo overlay``:
a mask is a PNG, JPEG, BMP or TIFF image named ``<ImageId>.<suffix>``. A pixel is foreground
when its grey value is above the threshold: 0 for lossless files (so 0/1 and 0/255 masks both
work) and 127 for JPEG, whose compression smears grey values around every edge (the real SIIM
JPEG masks give back their labels exactly at > 127). An explicit threshold applies to every file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumo_cli.core.files import read_grey_png

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
LOSSY_THRESHOLD = 127


def is_mask_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of the :data:`MASK_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in MASK_SUFFIXES


def mask_image_id(path: str | os.PathLike[str]) -> str:
    """The ImageId a mask file is for: its name without the mask suffix."""
    path = Path(path)
    return path.stem if is_mask_file(path) else path.name


def mask_threshold(path: str | os.PathLike[str], threshold: int | None = None) -> int:
    """The grey level a pixel of ``path`` must exceed to be foreground: ``threshold`` when
    given, else 127 for JPEG and 0 for every lossless format."""
    if threshold is not None:
        return threshold
    return LOSSY_THRESHOLD if Path(path).suffix.lower() in LOSSY_SUFFIXES else 0


def read_mask_file(path: str | os.PathLike[str], threshold: int | None = None) -> np.ndarray:
    """Read a mask image as a uint8 {0,1} (H, W) array (see :func:`mask_threshold`).

    Raises:
        InputError: the file is missing or not a readable image.
    """
    return (read_grey_png(path) > mask_threshold(path, threshold)).astype(np.uint8)


def find_mask_file(folder: str | os.PathLike[str], image_id: str) -> Path | None:
    """``folder/<image_id><suffix>`` for the first of :data:`MASK_SUFFIXES` that exists."""
    for suffix in MASK_SUFFIXES:
        candidate = Path(folder) / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None
