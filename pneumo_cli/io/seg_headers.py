"""Source headers for DICOM SEG objects: repairing what a broken header lacks (on a copy), and
the signature that decides whether highdicom can read a SEG made from it back."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo_cli.core.errors import DicomError, InputError
from pneumo_cli.io.dicom_read import open_dataset
from pneumo_cli.io.xrays import has_dicom_preamble

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Type 2 attributes of the Patient and General Study modules, which a SEG copies from its source.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
_GEOMETRY_KEYWORDS = (
    "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "ImagerPixelSpacing", "SliceThickness", "PhotometricInterpretation",
)  # fmt: skip


def repair_source_header(ds: Dataset, path: Path) -> tuple[Dataset, tuple[str, ...]]:
    """A copy of the header ``ds`` with valid identifiers, and notes on what was repaired.

    SOP Class/Instance UIDs that are not valid UIDs come from the file meta; empty or invalid
    Study/Series Instance UIDs are generated from the SOP Instance UID (deterministic). Type 2
    patient and study attributes the SEG copies (name, ID, birth date, sex, study date...) are
    added empty where the source lacks them, as the standard allows. An image
    without Frame of Reference loses PixelSpacing when it has no SliceThickness (see the module
    docstring). ``ds`` itself is not modified.

    Raises:
        DicomError: not a DICOM image (no Rows/Columns), or several frames.
        InputError: no valid SOP Instance or SOP Class UID anywhere.
        Messages name ``path``.
    """
    from pydicom.uid import generate_uid

    if positive_int(ds.get("Rows")) is None or positive_int(ds.get("Columns")) is None:
        if not has_dicom_preamble(path):
            raise DicomError(f"{path}: not a DICOM file (no DICM preamble, no image header)")
        raise DicomError(f"{path}: DICOM header has no image size (Rows/Columns); not an image")
    frames = positive_int(ds.get("NumberOfFrames")) or 1
    if frames > 1:
        raise DicomError(f"{path}: multi-frame DICOM ({frames} frames); a SEG needs one image")
    ds = copy.deepcopy(ds)
    meta = getattr(ds, "file_meta", None) or {}
    repairs: list[str] = []
    for keyword, meta_keyword in (
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ("SOPClassUID", "MediaStorageSOPClassUID"),
    ):
        if is_uid(ds.get(keyword)):
            continue
        if not is_uid(meta.get(meta_keyword)):
            raise InputError(
                f"{path}: no valid {keyword} in the header or the file meta, so a SEG could not "
                "reference this image; fix the header or leave --dicom-seg off"
            )
        setattr(ds, keyword, str(meta.get(meta_keyword)))
        repairs.append(f"{keyword} from {meta_keyword}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not is_uid(ds.get(keyword)):
            entropy = [f"pneumo-source-{keyword}", str(ds.SOPInstanceUID)]
            setattr(ds, keyword, str(generate_uid(entropy_srcs=entropy)))
            repairs.append(f"{keyword} generated")
    for keyword in _TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2: present and empty is valid; absent is not
            repairs.append(f"empty {keyword} added")
    has_position = "FrameOfReferenceUID" in ds and "ImagePositionPatient" in ds
    if not has_position and "SliceThickness" not in ds and "PixelSpacing" in ds:
        del ds.PixelSpacing  # highdicom 0.28 cannot read back spacing without thickness
    return ds, tuple(repairs)


def is_uid(value: Any) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and _UID.match(text) is not None


def positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def header_signature(header: Dataset | str | os.PathLike[str]) -> tuple:
    """What decides whether highdicom can read back a SEG made from this header (a dataset, or
    a file whose header is read): the geometry and identity attributes present and the image
    size. SEGs of headers with the same signature are built the same way, so one full
    read-back per signature covers them all."""
    ds = header
    if isinstance(header, (str, os.PathLike)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = open_dataset(Path(header), stop_before_pixels=True)
    present = tuple(
        keyword in ds and bool(str(ds.get(keyword, "")).strip())
        for keyword in (*_GEOMETRY_KEYWORDS, "StudyInstanceUID", "SeriesInstanceUID")
    )
    return (*present, ds.get("Rows"), ds.get("Columns"), str(ds.get("SOPClassUID", "")))
