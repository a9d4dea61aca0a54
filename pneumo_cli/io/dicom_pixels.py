"""DICOM pixel data to 8-bit grey: the fast JPEG Baseline path, photometric interpretation,
windowing and rescaling, and small header value parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import DicomError

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def decode_grey_baseline(ds: Any, path: Path) -> np.ndarray | None:
    """Decode a one-frame, one-sample, 8-bit JPEG Baseline image with OpenCV; None otherwise.

    Baseline decoders may differ by one grey level from each other (the JPEG standard allows it);
    libjpeg-turbo differs from pylibjpeg on about 3% of a SIIM image's pixels, by exactly 1.
    A stream OpenCV cannot decode (truncated, no end-of-image marker) is corrupt: pylibjpeg would
    silently fill the missing part, so it is refused here instead.
    """
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if ds.file_meta else ""
    if (
        syntax != JPEG_BASELINE
        or (int_or_none(ds.get("SamplesPerPixel")) or 1) != 1
        or (int_or_none(ds.get("BitsAllocated")) or 8) != 8
    ):
        return None
    import cv2
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    pixels = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DicomError(
            f"{path}: JPEG pixel data is truncated or corrupt (it does not decode completely); "
            "re-export the file from the archive"
        )
    expected = (int_or_none(ds.get("Rows")), int_or_none(ds.get("Columns")))
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or pixels.shape != expected:
        raise DicomError(
            f"{path}: JPEG pixel data has shape {pixels.shape} but the header says "
            f"{expected[0]} rows x {expected[1]} columns of grey; re-export the file"
        )
    return pixels


def to_grey_uint8(ds: Any, pixels: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    samples = int_or_none(ds.get("SamplesPerPixel")) or 1
    if pixels.ndim == 3 and samples == 1:
        # pydicom gives (frames, H, W) when NumberOfFrames is absent but data holds more frames.
        raise DicomError(f"{path}: pixel data holds {pixels.shape[0]} frames; one is expected")
    if pixels.ndim == 3:
        pixels = _colour_to_grey(pixels, photometric, path)
        photometric = "MONOCHROME2"
    elif photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise DicomError(
            f"{path}: unsupported PhotometricInterpretation '{photometric}' for a grey image"
        )
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise DicomError(f"{path}: pixel data has shape {pixels.shape}, expected (rows, columns)")
    bits_stored = int_or_none(ds.get("BitsStored")) or 8
    slope = float_or_none(ds.get("RescaleSlope"))
    intercept = float_or_none(ds.get("RescaleIntercept"))
    rescaled = (slope not in (None, 1.0)) or (intercept not in (None, 0.0))
    if pixels.dtype == np.uint8 and bits_stored <= 8 and not rescaled:
        image = pixels
    else:
        image = _window_to_uint8(ds, pixels, slope, intercept)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image, dtype=np.uint8)


def _colour_to_grey(pixels: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    import cv2

    if pixels.shape[-1] != 3:
        raise DicomError(f"{path}: pixel data has shape {pixels.shape}; multi-frame is refused")
    if photometric.startswith("YBR"):
        # pydicom converts JPEG YBR to RGB by default; raw YBR keeps luma in channel 0.
        grey = pixels[..., 0]
    else:
        grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    if grey.dtype != np.uint8:
        grey = _scale_to_uint8(grey.astype(np.float64), float(grey.min()), float(grey.max()))
    return grey


def _window_to_uint8(
    ds: Any, pixels: np.ndarray, slope: float | None, intercept: float | None
) -> np.ndarray:
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope)
    values += 0.0 if intercept is None else intercept
    center = first_float(ds.get("WindowCenter"))
    width = first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear window function, output range 0..255.
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    return _scale_to_uint8(values, float(values.min()), float(values.max()))


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return float_or_none(value)


def float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def int_or_none(value: Any) -> int | None:
    number = float_or_none(value)
    return None if number is None else int(number)
