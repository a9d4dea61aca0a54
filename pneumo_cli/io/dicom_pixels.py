"""DICOM pixel data to 8-bit grey: the fast JPEG Baseline path, photometric interpretation,
windowing and rescaling, and small header value parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import DicomError

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def decode_grey_baseline(ds: Any, path: Path, reduction: int = 1) -> np.ndarray | None:
    """Decode a one-frame, one-sample, 8-bit JPEG Baseline image with OpenCV; None otherwise.

    Baseline decoders may differ by one grey level from each other (the JPEG standard allows it);
    libjpeg-turbo differs from pylibjpeg on about 3% of a SIIM image's pixels, by exactly 1.
    A stream OpenCV cannot decode (truncated, no end-of-image marker) is corrupt: pylibjpeg would
    silently fill the missing part, so it is refused here instead.

    ``reduction`` 2, 4 or 8 decodes at that fraction of the size (libjpeg's DCT scaling: the
    sides divided and rounded up, each output pixel close to the mean of the block it covers).
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
    # DICOM says how the image is oriented: an EXIF Orientation tag inside the frame is ignored
    # (IMREAD_UNCHANGED ignores it by itself; the reduced modes would apply it).
    flags = {
        1: cv2.IMREAD_UNCHANGED,
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2 | cv2.IMREAD_IGNORE_ORIENTATION,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4 | cv2.IMREAD_IGNORE_ORIENTATION,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION,
    }
    pixels = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), flags[reduction])
    if pixels is None:
        raise DicomError(
            f"{path}: JPEG pixel data is truncated or corrupt (it does not decode completely); "
            "re-export the file from the archive"
        )
    rows, cols = int_or_none(ds.get("Rows")), int_or_none(ds.get("Columns"))
    expected = (-(-(rows or 0) // reduction), -(-(cols or 0) // reduction))
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or pixels.shape != expected:
        shape = pixels.shape if reduction == 1 else f"{pixels.shape} at 1/{reduction} scale"
        raise DicomError(
            f"{path}: JPEG pixel data has shape {shape} but the header says "
            f"{rows} rows x {cols} columns of grey; re-export the file"
        )
    return pixels


def to_grey_uint8(ds: Any, pixels: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    """Stored pixels to a uint8 (H, W) image with dark air (see :mod:`pneumo_cli.io.dicom_read`
    for the order of the steps).

    Pixel padding (PixelPaddingValue, up to PixelPaddingRangeLimit: stored values that mark
    pixels outside the detector's image) is background: it is left out of the value range and
    is 0 in the result whatever the photometric interpretation, so a padded band is cropped like
    a black border.

    Raises:
        DicomError: unsupported photometric interpretation or shape, or a VOI LUT Function this
            reader cannot apply as the header names it.
    """
    samples = int_or_none(ds.get("SamplesPerPixel")) or 1
    if pixels.ndim == 3 and samples == 1:
        # pydicom gives (frames, H, W) when NumberOfFrames is absent but data holds more frames.
        raise DicomError(f"{path}: pixel data holds {pixels.shape[0]} frames; one is expected")
    padding = None
    if pixels.ndim == 3:
        pixels = _colour_to_grey(pixels, photometric, path)
        photometric = "MONOCHROME2"
    elif photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise DicomError(
            f"{path}: unsupported PhotometricInterpretation '{photometric}' for a grey image"
        )
    else:
        padding = padding_mask(ds, pixels)
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise DicomError(f"{path}: pixel data has shape {pixels.shape}, expected (rows, columns)")
    bits_stored = int_or_none(ds.get("BitsStored")) or 8
    slope = float_or_none(ds.get("RescaleSlope"))
    intercept = float_or_none(ds.get("RescaleIntercept"))
    rescaled = (slope not in (None, 1.0)) or (intercept not in (None, 0.0))
    if pixels.dtype == np.uint8 and bits_stored <= 8 and not rescaled:
        image = pixels
    else:
        image = _window_to_uint8(ds, pixels, slope, intercept, padding, path)
    if photometric == "MONOCHROME1":
        image = 255 - image
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if padding is not None:
        image = image.copy() if image is pixels else image
        image[padding] = 0
    return image


def padding_mask(ds: Any, pixels: np.ndarray) -> np.ndarray | None:
    """Where the stored values are pixel padding: equal to PixelPaddingValue, or between it and
    PixelPaddingRangeLimit inclusive (PS3.3 C.7.5.1.1.2); None when there is none."""
    value = int_or_none(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = int_or_none(ds.get("PixelPaddingRangeLimit"))
    low, high = sorted((value, value if limit is None else limit))
    mask = (pixels >= low) & (pixels <= high)
    return mask if mask.any() else None


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


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def _window_to_uint8(
    ds: Any,
    pixels: np.ndarray,
    slope: float | None,
    intercept: float | None,
    padding: np.ndarray | None,
    path: Path,
) -> np.ndarray:
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope)
    values += 0.0 if intercept is None else intercept
    center = first_float(ds.get("WindowCenter"))
    width = first_float(ds.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "") or "").strip().upper() or "LINEAR"
        windowed = apply_window(values, center, width, function, path)
        if windowed is not None:
            return np.clip(np.rint(windowed), 0, 255).astype(np.uint8)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    image_values = values if padding is None else values[~padding]
    if image_values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(image_values.min()), float(image_values.max())
    return _scale_to_uint8(np.clip(values, low, high), low, high)


def apply_window(
    values: np.ndarray, center: float, width: float, function: str, path: Path
) -> np.ndarray | None:
    """The VOI window ``function`` (DICOM PS3.3 C.11.2.1.2-3) on modality values, output range
    0..255 as float64; None for a LINEAR window narrower than 1 (the full value range is used
    instead).

    Raises:
        DicomError: an unknown function, or a width the function cannot use.
    """
    if function not in VOI_FUNCTIONS:
        raise DicomError(
            f"{path}: VOI LUT Function '{function}' is not one DICOM defines "
            f"({', '.join(VOI_FUNCTIONS)}); pneumo cannot show this image as its header asks"
        )
    if function == "LINEAR":
        if width < 1:
            return None
        # C.11.2.1.2.1: a ramp from c - 0.5 - (w - 1) / 2 to c - 0.5 + (w - 1) / 2.
        ramp = ((values - (center - 0.5)) / max(width - 1, 1e-12) + 0.5) * 255.0
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        return np.where(values <= low, 0.0, np.where(values > high, 255.0, ramp))
    if width <= 0:
        raise DicomError(
            f"{path}: WindowWidth {width} is not positive, as VOI LUT Function {function} needs"
        )
    if function == "LINEAR_EXACT":
        # C.11.2.1.3.2: a ramp from c - w / 2 to c + w / 2.
        ramp = ((values - center) / width + 0.5) * 255.0
        low, high = center - width / 2, center + width / 2
        return np.where(values <= low, 0.0, np.where(values > high, 255.0, ramp))
    # C.11.2.1.3.1 SIGMOID: y = (ymax - ymin) / (1 + exp(-4 (x - c) / w)) + ymin.
    return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))


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
