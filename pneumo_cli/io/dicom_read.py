"""Reading chest X-rays (DICOM, PNG, JPEG) into 8-bit grey images; writing test DICOMs.

This is the only module that imports pydicom. :func:`read_xray` turns any supported file into an
:class:`XRay`: a uint8 (H, W) image in which air is dark, plus a small dict of non-identifying
header fields. Patient names, IDs, birth dates, institutions and accession numbers never leave this
module; a non-empty PatientID only comes out as a salted hash (``patient_key``) used to keep one
patient's images in one split.

Pixel conversion, in DICOM order:

1. decode: single-frame grey JPEG Baseline (every SIIM file) through OpenCV's libjpeg-turbo, 6x
   faster than pylibjpeg here and refusing truncated streams; every other compressed syntax through
   pydicom's plugins (pylibjpeg); uncompressed natively; multi-frame files are refused;
2. colour (RGB/YBR) is converted to grey;
3. for images stored with more than 8 bits, or with a RescaleSlope/Intercept: the modality rescale,
   then the first VOI window (WindowCenter/WindowWidth) or the VOI LUT, else the full value range,
   mapped to 0..255;
4. MONOCHROME1 (bright air) is inverted so that air is dark in every output.

The SIIM files are 8-bit MONOCHROME2 JPEGs: for them step 3 is the identity.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import DicomError, InputError
from pneumo_cli.core.files import read_grey_png
from pneumo_cli.io.dicom_pixels import (
    decode_grey_baseline,
    first_float,
    int_or_none,
    to_grey_uint8,
)
from pneumo_cli.io.xrays import DICOM_SUFFIXES, RASTER_SUFFIXES, has_dicom_preamble, image_id_of

# The salt makes patient_key useless for looking up a known PatientID in a table of plain hashes.
# It is fixed (not per cache) so that a patient keeps one key when RAW_DIR grows or is re-cached.
PATIENT_SALT = "pneumo-patient-key-v1"


@dataclass
class XRay:
    """A decoded X-ray.

    Attributes:
        image: uint8 (H, W) grey, 0..255, air dark.
        image_id: the file stem (the SOPInstanceUID in the Kaggle layout).
        meta: non-identifying fields: ``pixel_spacing_mm`` (float | None), ``view_position``,
            ``sex`` (str, "" when absent), ``age`` (int | None), ``photometric``, ``bits_stored``,
            ``rows``, ``cols`` (int) and ``patient_key`` (salted hash, "" without a PatientID).
    """

    image: np.ndarray
    image_id: str
    meta: dict[str, Any] = field(default_factory=dict)


def patient_key_of(patient_id: str, salt: str = PATIENT_SALT) -> str:
    """A 16-hex-digit salted SHA-256 of ``patient_id``; "" for an empty or blank id."""
    patient_id = patient_id.strip()
    if not patient_id:
        return ""
    digest = hashlib.sha256(f"{salt}\x00{patient_id}".encode())
    return digest.hexdigest()[:16]


def read_xray(path: str | os.PathLike[str], *, salt: str = PATIENT_SALT) -> XRay:
    """Read a DICOM, PNG or JPEG chest X-ray as an :class:`XRay` (uint8 (H, W), air dark).

    DICOM is recognised by a ``.dcm``/``.dicom`` suffix or by the ``DICM`` preamble.

    Raises:
        DicomError: the DICOM has no pixel data, cannot be decoded, is multi-frame, or has an
            unsupported photometric interpretation; the message names the file.
        InputError: the file is missing, or is not a readable PNG/JPEG, or has an unknown type.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return _read_raster(path)
    if suffix in DICOM_SUFFIXES or has_dicom_preamble(path):
        return _read_dicom(path, salt)
    raise InputError(f"{path}: not a DICOM, PNG or JPEG file (no DICM preamble, unknown suffix)")


# Header fields that identify a patient. pneumo never writes them anywhere, except into
# CACHE/phi.csv when the user asks for it with `pneumo preprocess --keep-phi`.
PHI_FIELDS = ("PatientID", "PatientName", "PatientBirthDate", "InstitutionName", "AccessionNumber")


def read_phi(path: str | os.PathLike[str]) -> dict[str, str]:
    """The patient-identifying header fields (:data:`PHI_FIELDS`) of an X-ray file, as text
    ("" when absent; all "" for PNG/JPEG). Only ``pneumo preprocess --keep-phi`` calls this.

    Raises:
        DicomError, InputError: as :func:`read_header`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in RASTER_SUFFIXES:
        return dict.fromkeys(PHI_FIELDS, "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(path, stop_before_pixels=True)
        return {name: str(ds.get(name, "") or "").strip() for name in PHI_FIELDS}


@dataclass(frozen=True)
class XRayHeader:
    """What can be learnt without decoding pixels: ``instance_uid`` (SOPInstanceUID, "" for
    PNG/JPEG), ``rows`` and ``cols``."""

    image_id: str
    instance_uid: str
    rows: int
    cols: int


def read_header(path: str | os.PathLike[str]) -> XRayHeader:
    """Read the identity and size of an X-ray without decoding a DICOM's pixels.

    Raises:
        DicomError, InputError: as :func:`read_xray`, for files that cannot even be opened.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in RASTER_SUFFIXES:
        rows, cols = _raster_size(path)
        return XRayHeader(image_id_of(path), "", rows, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(path, stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        rows = int_or_none(ds.get("Rows"))
        cols = int_or_none(ds.get("Columns"))
    if not rows or not cols:
        if not has_dicom_preamble(path) and "Rows" not in ds:
            raise DicomError(f"{path}: not a DICOM file (no DICM preamble, no image header)")
        raise DicomError(f"{path}: DICOM header has no image size (Rows/Columns); not an image")
    return XRayHeader(image_id_of(path), uid, rows, cols)


def _raster_size(path: Path) -> tuple[int, int]:
    """(rows, cols) of a PNG from its IHDR chunk, or of any other raster by decoding it."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    image = read_grey_png(path)
    return int(image.shape[0]), int(image.shape[1])


def _read_raster(path: Path) -> XRay:
    image = read_grey_png(path)
    meta = _empty_meta()
    meta.update(photometric="MONOCHROME2", bits_stored=8, rows=image.shape[0], cols=image.shape[1])
    return XRay(image=image, image_id=image_id_of(path), meta=meta)


def _empty_meta() -> dict[str, Any]:
    return {
        "pixel_spacing_mm": None,
        "view_position": "",
        "sex": "",
        "age": None,
        "photometric": "",
        "bits_stored": None,
        "rows": None,
        "cols": None,
        "patient_key": "",
    }


def _read_dicom(path: Path, salt: str) -> XRay:
    # Stage-2 SIIM files carry invalid UIDs ("ID_0011fe81e"); pydicom warns, we read on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(path, stop_before_pixels=False)
        if "PixelData" not in ds:
            if not has_dicom_preamble(path) and "Rows" not in ds:
                raise DicomError(f"{path}: not a DICOM file (no DICM preamble, no image header)")
            raise DicomError(
                f"{path}: DICOM has no pixel data (truncated file, or a report, not an image)"
            )
        frames = int_or_none(ds.get("NumberOfFrames")) or 1
        if frames > 1:
            raise DicomError(
                f"{path}: multi-frame DICOM ({frames} frames); pneumo needs one 2-D radiograph "
                "per file, so split the frames first"
            )
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        try:
            pixels = decode_grey_baseline(ds, path)
            if pixels is None:
                pixels = ds.pixel_array
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many unrelated types
            raise DicomError(f"{path}: pixel data cannot be decoded ({_short(exc)})") from None
        image = to_grey_uint8(ds, pixels, photometric, path)
        meta = _dicom_meta(ds, photometric, image.shape, salt)
    return XRay(image=image, image_id=image_id_of(path), meta=meta)


def open_dataset(path: Path, stop_before_pixels: bool) -> Any:
    """Parse a DICOM file completely (every element converted, nested ones too).

    pydicom converts element values lazily, so a corrupt header would otherwise fail later, at
    the first access, with whatever exception its value converter raises (NotImplementedError
    for an unknown VR, struct.error, UnicodeDecodeError...). Converting everything here turns
    every such failure into one :class:`DicomError` naming the file.
    """
    import pydicom

    # Real SIIM stage-2 headers carry invalid values (SOPInstanceUID 'ID_...'): tolerate them
    # silently instead of logging a warning per file.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        for _ in ds.file_meta.iterall() if ds.file_meta is not None else ():
            pass
        for _ in ds.iterall():
            pass
    except MemoryError:
        raise DicomError(f"{path}: not a readable DICOM file (an element is too large)") from None
    except Exception as exc:  # noqa: BLE001 - the parser meets untrusted bytes; any type is possible
        raise DicomError(f"{path}: not a readable DICOM file ({_short(exc)})") from None
    return ds


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def _dicom_meta(ds: Any, photometric: str, shape: tuple[int, ...], salt: str) -> dict[str, Any]:
    meta = _empty_meta()
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    spacing_mm = first_float(spacing)
    meta["pixel_spacing_mm"] = None if spacing_mm is None else round(spacing_mm, 6)
    meta["view_position"] = str(ds.get("ViewPosition", "") or "").strip().upper()
    meta["sex"] = str(ds.get("PatientSex", "") or "").strip().upper()
    meta["age"] = _parse_age(ds.get("PatientAge"))
    meta["photometric"] = photometric
    meta["bits_stored"] = int_or_none(ds.get("BitsStored"))
    meta["rows"], meta["cols"] = int(shape[0]), int(shape[1])
    meta["patient_key"] = patient_key_of(str(ds.get("PatientID", "") or ""), salt)
    return meta


def _parse_age(value: Any) -> int | None:
    """Age in years from a DICOM AS value ('050Y', '50', '018M'); None when absent or odd."""
    text = str(value or "").strip().upper()
    if not text:
        return None
    unit = text[-1] if text[-1] in "DWMY" else "Y"
    digits = text[:-1] if text[-1] in "DWMY" else text
    if not digits.isdigit():
        return None
    number = int(digits)
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    return years if 0 <= years <= 130 else None
