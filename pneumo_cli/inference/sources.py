"""Inputs of a prediction: X-ray files or a cache split, each with a loader that prepares an
image exactly as the run's training cache was prepared."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import InputError


@dataclass(frozen=True)
class Item:
    """One image to predict: id, prepared uint8 (S, S) image, crop box, original (H, W) and the
    file it came from (None for a cache image)."""

    image_id: str
    image: np.ndarray
    crop: tuple[int, int, int, int]
    original_shape: tuple[int, int]
    source: Path | None = None


@dataclass(frozen=True)
class Rejected:
    """An input that could not be predicted: what it was and why."""

    source: str
    reason: str


def batches(items: Iterator[Item | Rejected], size: int) -> Iterator[list[Item | Rejected]]:
    batch: list[Item | Rejected] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def file_sources(paths: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """ImageId for each input file, formed as `preprocess` forms it
    (:class:`~pneumo_cli.io.dicom_read.XRayNamer`: the file name, or the SOPInstanceUID for
    DICOMDIR members and taken names); duplicates and unsafe names are rejected with the reason."""
    from pneumo_cli.io.dicom_read import XRayNamer

    namer = XRayNamer()
    sources, rejected = [], []
    for path in paths:
        try:
            sources.append((namer.name(path), path))
        except InputError as exc:
            rejected.append((str(path), str(exc)))
    return sources, rejected


def file_loader(
    settings: PreprocessConfig, sources: Sequence[tuple[str, Path]] | None = None
) -> Any:
    """``load(path) -> Item``: read an X-ray and prepare it as the run's cache was prepared.

    The Item's ImageId is the one :func:`file_sources` gave the path (``sources``), else the one
    :func:`~pneumo_cli.io.dicom_read.read_xray` forms for the file on its own.
    """
    from pneumo_cli.data.imaging import decoded_min_side, prepare_image
    from pneumo_cli.io.dicom_read import read_xray

    image_ids = {path: image_id for image_id, path in sources or ()}
    min_side = decoded_min_side(settings)

    def load(path: Path) -> Item:
        xray = read_xray(path, min_side=min_side)
        prepared = prepare_image(
            xray.image, settings, reduction=xray.reduction, original_shape=xray.original_shape
        )
        image_id = image_ids.get(path, xray.image_id)
        return Item(image_id, prepared.image, prepared.crop, prepared.original_shape, path)

    return load


def cache_sources(cache: Path, split: str) -> tuple[list[tuple[str, Any]], Any]:
    """``(image_id, manifest row)`` pairs of one split of a cache, and a loader for them."""
    from pneumo_cli.core.files import read_grey_png
    from pneumo_cli.data.cache import load_manifest

    manifest = load_manifest(cache)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        present = ", ".join(sorted(set(manifest["split"]))) or "none"
        raise InputError(
            f"{cache}/manifest.csv has no images in split '{split}' (splits: {present})"
        )

    def load(row: Any) -> Item:
        image = read_grey_png(cache / row["image"])
        crop = (
            int(row["crop_top"]),
            int(row["crop_bottom"]),
            int(row["crop_left"]),
            int(row["crop_right"]),
        )
        shape = (int(row["orig_height"]), int(row["orig_width"]))
        return Item(row["ImageId"], image, crop, shape)

    return [(row["ImageId"], row) for _, row in rows.iterrows()], load


def first_images(sources: Sequence[tuple[str, Any]], make_loader: Any) -> Any:
    """``take(settings, n) -> (uint8 (k, S, S) images, description)``: the first ``n`` sources
    that load (``make_loader(settings)`` gives the loader), for a check that needs inputs."""
    from pneumo_cli.core.errors import PneumoError

    def take(settings: PreprocessConfig, count: int) -> tuple[np.ndarray, str]:
        load = make_loader(settings)
        images = []
        for _, handle in sources:
            if len(images) == count:
                break
            try:
                images.append(load(handle).image)
            except PneumoError:
                continue
        size = settings.image_size
        stack = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
        return stack, f"the first {len(images)} inputs"

    return take
