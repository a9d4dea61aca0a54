"""Reading chest X-rays (DICOM, PNG, JPEG) into 8-bit grey images; writing test DICOMs.

This is the only module that imports pydicom. :func:`read_xray` turns any supported file into an
:class:`XRay`: a uint8 (H, W) image in which air is dark, plus a small dict of non-identifying
header fields. Patient names, IDs, birth dates, institutions and accession numbers never leave this
module; a non-empty PatientID only comes out as a keyed hash (``patient_key``, an HMAC under a
secret the cache does not hold, see :mod:`pneumo_cli.core.patient_key`) used to keep one
patient's images in one split.

Pixel conversion, in DICOM order:

1. decode: single-frame grey JPEG Baseline (every SIIM file) through OpenCV's libjpeg-turbo, 6x
   faster than pylibjpeg here and refusing truncated streams; every other compressed syntax through
   pydicom's plugins (pylibjpeg); uncompressed natively; multi-frame files are refused;
2. colour (RGB/YBR) is converted to grey;
3. for images stored with more than 8 bits, or with a RescaleSlope/Intercept: the modality rescale,
   then the first VOI window (WindowCenter/WindowWidth) with the VOI LUT Function the header
   names (LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2-3; any other is refused), or the VOI
   LUT, else the full value range of the image pixels, mapped to 0..255;
4. MONOCHROME1 (bright air) is inverted so that air is dark in every output;
5. pixel padding (PixelPaddingValue, up to PixelPaddingRangeLimit) is background: 0, and left
   out of the value range in step 3, so a padded band is cropped like a black border.

The SIIM files are 8-bit MONOCHROME2 JPEGs: for them step 3 is the identity.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import DicomError, InputError, shorten_reason
from pneumo_cli.core.files import check_image_id, decode_image_file, image_file_size
from pneumo_cli.core.image_files import check_image_pixels, reduction_for
from pneumo_cli.core.patient_key import PatientKeySecret
from pneumo_cli.io.dicom_pixels import (
    decode_grey_baseline,
    first_float,
    int_or_none,
    to_grey_uint8,
)
from pneumo_cli.io.xrays import (
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    ImageIdRegistry,
    has_dicom_preamble,
    image_id_for,
    image_id_of,
    is_dicom_file,
)


@dataclass
class XRay:
    """A decoded X-ray.

    Attributes:
        image: uint8 (H, W) grey, 0..255, air dark.
        image_id: see :func:`pneumo_cli.io.xrays.image_id_for`: the file name without its
            suffix (the SOPInstanceUID in the Kaggle layout), the SOPInstanceUID for a DICOM
            File-set member such as ``IM000000``.
        meta: non-identifying fields: ``pixel_spacing_mm`` (float | None), ``view_position``,
            ``sex`` (str, "" when absent), ``age`` (int | None), ``photometric``, ``bits_stored``,
            ``rows``, ``cols`` (int) and ``patient_key`` (HMAC of the PatientID under the
            secret given to :func:`read_xray`; "" without a PatientID or a secret).
        stored_range: only when ``image`` is constant, the (min, max) of the values stored in
            the file (a constant 16-bit image of 77 is 0 after scaling: say 77, not 0).
        reduction: 1, or the factor (2, 4, 8) by which the JPEG was decoded smaller (see
            :func:`read_xray`'s ``min_side``); ``image`` then has the sides of
            :attr:`original_shape` divided by it, rounded up.
    """

    image: np.ndarray
    image_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    stored_range: tuple[float, float] | None = None
    reduction: int = 1
    original_shape: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.original_shape == (0, 0):
            self.original_shape = (int(self.image.shape[0]), int(self.image.shape[1]))


def read_xray(
    path: str | os.PathLike[str],
    *,
    patient_secret: PatientKeySecret | None = None,
    min_side: int | None = None,
) -> XRay:
    """Read a DICOM, PNG or JPEG chest X-ray as an :class:`XRay` (uint8 (H, W), air dark).

    DICOM is recognised by a ``.dcm``/``.dicom`` suffix or by the ``DICM`` preamble. With
    ``patient_secret`` the PatientID becomes ``meta["patient_key"]``; without, that is "".
    With ``min_side``, a grey 8-bit JPEG Baseline DICOM without pixel padding is decoded at the
    smallest power-of-two fraction (1/2, 1/4, 1/8) that keeps its shorter side at least
    ``min_side`` (:func:`~pneumo_cli.core.image_files.reduction_for`), which is quicker;
    ``reduction`` says by how much. Every other file is decoded whole (``reduction`` 1).

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
        return _read_dicom(path, patient_secret, min_side)
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
    """What can be learnt without decoding pixels: the ImageId
    (:func:`pneumo_cli.io.xrays.image_id_for`), ``uids`` (the SOPInstanceUID, then the file
    meta's MediaStorageSOPInstanceUID when it differs; empty for PNG/JPEG), ``rows`` and
    ``cols``."""

    image_id: str
    uids: tuple[str, ...]
    rows: int
    cols: int

    @property
    def instance_uid(self) -> str:
        """The SOPInstanceUID (or, without one, the MediaStorageSOPInstanceUID); "" if none."""
        return self.uids[0] if self.uids else ""


def read_header(path: str | os.PathLike[str]) -> XRayHeader:
    """Read the identity and size of an X-ray without decoding a DICOM's pixels.

    Raises:
        DicomError, InputError: as :func:`read_xray`, for files that cannot even be opened.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in RASTER_SUFFIXES:
        rows, cols = image_file_size(path)
        return XRayHeader(image_id_of(path), (), rows, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset(path, stop_before_pixels=True)
        uids = instance_uids(ds)
        rows = int_or_none(ds.get("Rows"))
        cols = int_or_none(ds.get("Columns"))
    if not rows or not cols:
        if not has_dicom_preamble(path) and "Rows" not in ds:
            raise DicomError(f"{path}: not a DICOM file (no DICM preamble, no image header)")
        raise DicomError(f"{path}: DICOM header has no image size (Rows/Columns); not an image")
    check_image_pixels(path, rows, cols)
    return XRayHeader(image_id_for(path, uids), uids, rows, cols)


def instance_uids(ds: Any) -> tuple[str, ...]:
    """The SOPInstanceUID and the file meta's MediaStorageSOPInstanceUID, stripped, without
    empties or repeats (the stage-2 SIIM files hold the real UID only in the file meta)."""
    meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else {}
    found = [
        str(ds.get("SOPInstanceUID", "") or "").strip(),
        str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip(),
    ]
    return tuple(dict.fromkeys(uid for uid in found if uid))


class XRayNamer:
    """ImageIds for X-ray files offered one at a time, by the rule ``preprocess`` uses (see
    :mod:`pneumo_cli.io.xrays`): ``predict`` and ``overlay`` name their outputs with it, so
    they agree with the cache and with each other on every layout (Kaggle, DICOMDIR, PACS)."""

    def __init__(self) -> None:
        self._registry = ImageIdRegistry()

    def name(self, path: str | os.PathLike[str]) -> str:
        """The ImageId of ``path``; a DICOM's header is read (not its pixels).

        Raises:
            InputError: an unreadable DICOM header, an ImageId that cannot be a file name, or
                a duplicate of an earlier file (a repeated SOPInstanceUID or ImageId); the
                message names the file.
        """
        path = Path(path)
        uids: tuple[str, ...] = ()
        if is_dicom_file(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                uids = instance_uids(open_dataset(path, stop_before_pixels=True))
        image_id = check_image_id(image_id_for(path, uids), str(path))
        try:
            return self._registry.claim(str(path), image_id, uids)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None


def _read_raster(path: Path) -> XRay:
    stored = decode_image_file(path)
    image = (stored >> 8).astype(np.uint8) if stored.dtype == np.uint16 else stored
    meta = _empty_meta()
    bits = 16 if stored.dtype == np.uint16 else 8
    meta.update(
        photometric="MONOCHROME2", bits_stored=bits, rows=image.shape[0], cols=image.shape[1]
    )
    return XRay(image, image_id_of(path), meta, _range_if_constant(image, stored))


def _range_if_constant(image: np.ndarray, stored: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the stored values when the 8-bit image came out constant, else None."""
    if image.size and int(image.min()) == int(image.max()):
        return float(stored.min()), float(stored.max())
    return None


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


def _read_dicom(path: Path, secret: PatientKeySecret | None, min_side: int | None) -> XRay:
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
        rows, cols = int_or_none(ds.get("Rows")) or 0, int_or_none(ds.get("Columns")) or 0
        check_image_pixels(path, rows, cols)
        # Padding values must be seen exactly, so a padded image is never decoded smaller.
        padded = "PixelPaddingValue" in ds
        reduction = 1 if padded else reduction_for((rows, cols), min_side)
        try:
            pixels = decode_grey_baseline(ds, path, reduction)
            if pixels is None:
                reduction = 1
                pixels = ds.pixel_array
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many unrelated types
            raise DicomError(f"{path}: pixel data cannot be decoded ({_short(exc)})") from None
        image = to_grey_uint8(ds, pixels, photometric, path)
        shape = (rows, cols) if reduction > 1 else image.shape
        meta = _dicom_meta(ds, photometric, shape, secret)
        image_id = image_id_for(path, instance_uids(ds))
    constant = _range_if_constant(image, pixels)
    return XRay(image, image_id, meta, constant, reduction, (int(shape[0]), int(shape[1])))


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
    return shorten_reason(str(exc) or type(exc).__name__)


def _dicom_meta(
    ds: Any, photometric: str, shape: tuple[int, ...], secret: PatientKeySecret | None
) -> dict[str, Any]:
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
    if secret is not None:
        meta["patient_key"] = secret.patient_key(str(ds.get("PatientID", "") or ""))
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
