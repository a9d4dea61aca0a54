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

import contextlib
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.errors import DicomError, InputError
from pneumo_cli.files import atomic_write_bytes, read_grey_png

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# The salt makes patient_key useless for looking up a known PatientID in a table of plain hashes.
# It is fixed (not per cache) so that a patient keeps one key when RAW_DIR grows or is re-cached.
PATIENT_SALT = "pneumo-patient-key-v1"
_PREAMBLE_OFFSET = 128


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


def image_id_of(path: str | os.PathLike[str]) -> str:
    """The ImageId of a file: its name without the last extension (``a/b/1.2.3.dcm`` -> ``1.2.3``).

    Only the known image suffixes are dropped, because SOPInstanceUIDs contain dots: an
    extension-less DICOM named ``1.2.840.5`` keeps its whole name.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES:
        return path.stem
    return path.name


def has_dicom_preamble(path: str | os.PathLike[str]) -> bool:
    """True when the file carries the ``DICM`` magic at byte 128 (the DICOM Part 10 preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_PREAMBLE_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_xray_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like an input X-ray: a DICOM/PNG/JPEG suffix, or no suffix and a
    DICOM preamble. Used to pick files from a folder walk."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES + RASTER_SUFFIXES:
        return True
    if suffix and not _looks_like_uid_suffix(suffix):
        return False
    return has_dicom_preamble(path)


def collect_xray_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The X-ray files named by ``inputs``, sorted and without duplicates: files as given (so an
    unreadable one is reported rather than silently ignored), folders searched recursively
    (hidden entries skipped, symlinked folders not followed, see :func:`is_xray_file`).

    Raises:
        InputError: an input does not exist, or no X-ray file is found at all.
    """
    from pneumo_cli.files import iter_files

    found: dict[Path, Path] = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for item in iter_files(path):
                if is_xray_file(item):
                    found.setdefault(item.resolve(), item)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not found:
        shown = ", ".join(str(p) for p in inputs) or "(no inputs)"
        raise InputError(f"no DICOM, PNG or JPEG files in {shown}")
    return sorted(found.values())


def _looks_like_uid_suffix(suffix: str) -> bool:
    # Extension-less Kaggle files named by UID have a "suffix" such as ".850819".
    return suffix[1:].isdigit()


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
        ds = _open_dataset(path, stop_before_pixels=True)
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
        ds = _open_dataset(path, stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        rows = _int_or_none(ds.get("Rows"))
        cols = _int_or_none(ds.get("Columns"))
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
        ds = _open_dataset(path, stop_before_pixels=False)
        if "PixelData" not in ds:
            if not has_dicom_preamble(path) and "Rows" not in ds:
                raise DicomError(f"{path}: not a DICOM file (no DICM preamble, no image header)")
            raise DicomError(
                f"{path}: DICOM has no pixel data (truncated file, or a report, not an image)"
            )
        frames = _int_or_none(ds.get("NumberOfFrames")) or 1
        if frames > 1:
            raise DicomError(
                f"{path}: multi-frame DICOM ({frames} frames); pneumo needs one 2-D radiograph "
                "per file, so split the frames first"
            )
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        try:
            pixels = _decode_grey_baseline(ds, path)
            if pixels is None:
                pixels = ds.pixel_array
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many unrelated types
            raise DicomError(f"{path}: pixel data cannot be decoded ({_short(exc)})") from None
        image = _to_grey_uint8(ds, pixels, photometric, path)
        meta = _dicom_meta(ds, photometric, image.shape, salt)
    return XRay(image=image, image_id=image_id_of(path), meta=meta)


def _decode_grey_baseline(ds: Any, path: Path) -> np.ndarray | None:
    """Decode a one-frame, one-sample, 8-bit JPEG Baseline image with OpenCV; None otherwise.

    Baseline decoders may differ by one grey level from each other (the JPEG standard allows it);
    libjpeg-turbo differs from pylibjpeg on about 3% of a SIIM image's pixels, by exactly 1.
    A stream OpenCV cannot decode (truncated, no end-of-image marker) is corrupt: pylibjpeg would
    silently fill the missing part, so it is refused here instead.
    """
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if ds.file_meta else ""
    if (
        syntax != JPEG_BASELINE
        or (_int_or_none(ds.get("SamplesPerPixel")) or 1) != 1
        or (_int_or_none(ds.get("BitsAllocated")) or 8) != 8
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
    expected = (_int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns")))
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or pixels.shape != expected:
        raise DicomError(
            f"{path}: JPEG pixel data has shape {pixels.shape} but the header says "
            f"{expected[0]} rows x {expected[1]} columns of grey; re-export the file"
        )
    return pixels


def _open_dataset(path: Path, stop_before_pixels: bool) -> Any:
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


def _to_grey_uint8(ds: Any, pixels: np.ndarray, photometric: str, path: Path) -> np.ndarray:
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
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
    bits_stored = _int_or_none(ds.get("BitsStored")) or 8
    slope = _float_or_none(ds.get("RescaleSlope"))
    intercept = _float_or_none(ds.get("RescaleIntercept"))
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
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
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


def _dicom_meta(ds: Any, photometric: str, shape: tuple[int, ...], salt: str) -> dict[str, Any]:
    meta = _empty_meta()
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    spacing_mm = _first_float(spacing)
    meta["pixel_spacing_mm"] = None if spacing_mm is None else round(spacing_mm, 6)
    meta["view_position"] = str(ds.get("ViewPosition", "") or "").strip().upper()
    meta["sex"] = str(ds.get("PatientSex", "") or "").strip().upper()
    meta["age"] = _parse_age(ds.get("PatientAge"))
    meta["photometric"] = photometric
    meta["bits_stored"] = _int_or_none(ds.get("BitsStored"))
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


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return _float_or_none(value)


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _int_or_none(value: Any) -> int | None:
    number = _float_or_none(value)
    return None if number is None else int(number)


def write_dicom(
    path: str | os.PathLike[str],
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    jpeg: bool = True,
    patient_id: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``pixels`` as a DICOM file shaped like the SIIM ones, atomically.

    Args:
        pixels: uint8 (H, W) grey; with ``jpeg=False`` also uint16/int16 (H, W) (add
            RescaleSlope/RescaleIntercept/WindowCenter/WindowWidth through ``extra``), uint8
            (H, W, 3) RGB (``photometric="RGB"``) or (frames, H, W) multi-frame.
        photometric: MONOCHROME2 (air dark), MONOCHROME1 (air bright) or RGB.
        jpeg: encode as 8-bit JPEG Baseline (transfer syntax 1.2.840.10008.2.4.50, lossy, as in
            the SIIM archive); otherwise Explicit VR Little Endian, uncompressed.
        patient_id: PatientID (and PatientName) to store; "" like the stage-2 files.
        study_uid, series_uid, sop_uid: UIDs; generated when None.
        extra: other header keywords to set, e.g. ``{"PatientSex": "F", "PixelSpacing": [0.14,
            0.14]}``; applied last, so they can override the defaults.

    Raises:
        ValueError: a pixel array this writer cannot store (a caller bug, not user input).
        OutputError: the file cannot be written.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    frames, rows, cols, samples = _pixel_layout(pixels, photometric)
    if jpeg and (pixels.dtype != np.uint8 or pixels.ndim != 2):
        raise ValueError("JPEG Baseline output needs uint8 (H, W) grey pixels; use jpeg=False")
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEG_BASELINE if jpeg else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if jpeg:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([_encode_jpeg(pixels)])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    atomic_write_bytes(path, _dataset_bytes(ds))


def _pixel_layout(pixels: np.ndarray, photometric: str) -> tuple[int, int, int, int]:
    if pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"pixels must be uint8, uint16 or int16, got {pixels.dtype}")
    if photometric == "RGB":
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"RGB pixels must have shape (H, W, 3), got {pixels.shape}")
        return 1, pixels.shape[0], pixels.shape[1], 3
    if pixels.ndim == 2:
        return 1, pixels.shape[0], pixels.shape[1], 1
    if pixels.ndim == 3:
        return pixels.shape[0], pixels.shape[1], pixels.shape[2], 1
    raise ValueError(f"pixels must be (H, W), (H, W, 3) or (frames, H, W), got {pixels.shape}")


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(pixels), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("OpenCV could not encode the pixels as JPEG")
    return buffer.tobytes()


def _dataset_bytes(ds: Any) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    with contextlib.suppress(AttributeError):
        ds.file_meta.FileMetaInformationGroupLength = 0  # recomputed by the writer
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
