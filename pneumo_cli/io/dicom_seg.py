"""DICOM Segmentation (SEG) objects for predicted pneumothorax masks, made with highdicom.

:func:`write_seg` turns one predicted mask into a binary Segmentation (SOP Class
1.2.840.10008.5.1.4.1.1.66.4) that a PACS files next to its source X-ray: it copies the
source's patient and study modules, references the source image (study, series, SOP instance)
and carries one segment, "Pneumothorax" (SNOMED CT 36118008, category 49755003 "Morphologically
abnormal structure"), algorithm type AUTOMATIC, identified as pneumo with its version and the run
that made the mask. The frame is the source's full Rows x Columns pixel grid in image orientation,
so it lines up with the image whatever its photometric interpretation (MONOCHROME1 included).

Decisions:

- **Negative predictions** (an all-zero mask) still write a SEG, with the segment present and one
  all-zero frame. A PACS then shows "the AI ran and found nothing" next to the study; writing
  nothing would look the same as "the AI never ran". highdicom keeps the frame because it cannot
  omit every frame; we pass ``omit_empty_frames=False`` to say so explicitly.
- **One new series per predict call and study.** A DICOM series belongs to exactly one study,
  so :class:`SegSeries` holds a ``run_uid`` made once per predict call and each study's series UID
  is derived from it (:meth:`SegSeries.series_uid_for`). The SEG's own SOP Instance UID is derived
  from the run, the source image and the output file name, so a rerun with the same
  :class:`SegSeries` writes the same UIDs.
- **Broken headers** (SIIM stage 2: empty Study/Series Instance UID, SOPInstanceUID ``ID_...``):
  the best identifiers the file has are used, on an in-memory copy of the header (the input file
  is never touched). An invalid SOP Class/Instance UID is taken from the file meta
  (MediaStorageSOPClassUID / MediaStorageSOPInstanceUID); an empty or invalid Study or Series
  Instance UID is generated from the SOP Instance UID, deterministically, so a rerun gives the
  same UIDs. A file with no valid SOP Instance UID anywhere cannot be referenced and is refused.
  Every repair is listed in :attr:`WrittenSeg.repairs`.
- **Geometry.** Chest X-rays have no Frame of Reference; the SEG then relies on the derivation
  reference to the source image. highdicom 0.28 would copy PixelSpacing into a Pixel Measures
  Sequence without SliceThickness, which its own reader rejects, so the header copy drops
  PixelSpacing in that case (the SEG shares the source's pixel grid anyway).
- **Read-back check.** Every SEG is parsed again with pydicom and its frame compared with the
  mask before it is written; with ``full_check`` it is also read with highdicom's SEG reader,
  which costs more than the rest of the check. Whether highdicom can read a SEG depends on the
  header's geometry attributes, not on the pixels, so a caller writing many SEGs reads the first
  one of each :func:`header_signature` fully (as `pneumo predict` does).

Privacy: a SEG must carry the patient module to be filed with its patient; nothing else here
does. Return values hold only UIDs and paths, warnings from pydicom/highdicom (which can quote
names) are silenced, and exception messages have patient-identifying values redacted.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError, shorten_reason
from pneumo_cli.core.files import atomic_write_bytes
from pneumo_cli.io.dicom_read import PHI_FIELDS, open_dataset
from pneumo_cli.io.seg_headers import header_signature, repair_source_header

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SEGMENT_LABEL = "Pneumothorax"
PNEUMOTHORAX_CODE = ("36118008", "SCT", "Pneumothorax")
CATEGORY_CODE = ("49755003", "SCT", "Morphologically abnormal structure")
ALGORITHM_NAME = "pneumo"
SERIES_DESCRIPTION = "pneumo AI pneumothorax segmentation - not for diagnosis"
# High enough to sort after the acquired series of a study; any positive number is valid.
DEFAULT_SERIES_NUMBER = 9901
_LO_MAX_CHARS = 64  # DICOM LO (long string), the VR of every text set here
_PHI_KEYWORDS = (*PHI_FIELDS, "OtherPatientIDs", "ReferringPhysicianName", "PatientAddress")


@dataclass(frozen=True)
class SegSeries:
    """The new series of one predict call, and the algorithm identification of its SEGs.

    Attributes:
        run_uid: a UID made once per predict call; each study's series UID derives from it.
        series_number: SeriesNumber of the new series (positive).
        series_description: SeriesDescription; says the content is an AI result.
        algorithm_name, algorithm_version: "pneumo" and ``pneumo_cli.__version__``.
        algorithm_source: the run, export or ensemble that made the masks (at most 64 chars).
    """

    run_uid: str
    series_number: int
    series_description: str
    algorithm_name: str
    algorithm_version: str
    algorithm_source: str

    def series_uid_for(self, study_uid: str) -> str:
        """The SeriesInstanceUID of this predict call's series in study ``study_uid``."""
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=[self.run_uid, "pneumo-seg-series", study_uid]))


def new_seg_series(
    source: str,
    version: str,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str = SERIES_DESCRIPTION,
) -> SegSeries:
    """Start the series of one predict call, with a fresh random ``run_uid``.

    Args:
        source: what made the masks, e.g. "run runs/train3, best.keras sha256 1a2b3c4d".
        version: pneumo's version (``pneumo_cli.__version__``).

    Raises:
        ConfigError: a text is empty, longer than 64 characters or contains a backslash or a
            control character (DICOM LO), or ``series_number`` is not positive.
    """
    from pydicom.uid import generate_uid

    for name, text in (
        ("algorithm source", source),
        ("version", version),
        ("series description", series_description),
    ):
        _check_lo(name, text)
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise ConfigError(f"DICOM series number must be a positive integer, not {series_number!r}")
    return SegSeries(
        run_uid=str(generate_uid()),
        series_number=series_number,
        series_description=series_description,
        algorithm_name=ALGORITHM_NAME,
        algorithm_version=version,
        algorithm_source=source,
    )


def _check_lo(name: str, text: str) -> None:
    if not text.strip():
        raise ConfigError(f"DICOM SEG {name} is empty; give a short description")
    if len(text) > _LO_MAX_CHARS:
        raise ConfigError(
            f"DICOM SEG {name} has {len(text)} characters, DICOM allows {_LO_MAX_CHARS}; "
            "shorten it (e.g. abbreviate the checksum)"
        )
    if "\\" in text or any(ord(char) < 32 for char in text):
        raise ConfigError(f"DICOM SEG {name} contains a backslash or control character")


@dataclass(frozen=True)
class WrittenSeg:
    """What :func:`write_seg` wrote (identifiers only, never patient data).

    Attributes:
        path: the SEG file.
        sop_instance_uid, series_instance_uid, study_instance_uid: the SEG's own UIDs.
        source_sop_instance_uid, source_series_instance_uid: the source image it references.
        empty: True when the mask had no foreground pixel (a negative prediction).
        repairs: one short note per header repair, e.g. "StudyInstanceUID generated".
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    source_sop_instance_uid: str
    source_series_instance_uid: str
    empty: bool
    repairs: tuple[str, ...]


def write_seg(
    source_path: str | os.PathLike[str],
    mask: np.ndarray,
    series: SegSeries,
    out_path: str | os.PathLike[str],
    *,
    instance_number: int,
    full_check: bool | set[tuple] = True,
) -> WrittenSeg:
    """Write the binary DICOM SEG of ``mask`` over the X-ray ``source_path``, atomically.

    Args:
        source_path: the source DICOM (only its header is read).
        mask: uint8 {0,1} (or bool) array of shape (Rows, Columns) of the source, image
            orientation (row 0 is the first pixel row of the DICOM).
        series: the predict call's series, from :func:`new_seg_series`.
        out_path: the SEG file to write (replaced atomically if it exists).
        instance_number: InstanceNumber of the SEG in its series (positive).
        full_check: read the SEG back with highdicom too; without it the bytes are parsed
            with pydicom and the frame compared with the mask. A set of header signatures
            (:func:`~pneumo_cli.io.seg_headers.header_signature`) means: fully for a header
            whose signature is not in it yet, then added to it.

    Raises:
        InputError: the source is not a readable single-frame DICOM image, has no valid SOP
            Instance UID to reference, or its header cannot make a valid SEG; or the mask does
            not fit the image or is not binary. Nothing is written then.
        OutputError: the SEG cannot be written (missing or read-only folder, disk full).
        ValueError: ``instance_number`` is not positive (a caller bug).
    """
    source_path, out_path = Path(source_path), Path(out_path)
    if instance_number < 1:
        raise ValueError(f"instance_number must be positive, not {instance_number}")
    with warnings.catch_warnings():
        # pydicom and highdicom warn about odd header values, quoting them (patient names too).
        warnings.simplefilter("ignore")
        source, repairs = repair_source_header(
            open_dataset(source_path, stop_before_pixels=True), source_path
        )
        binary = _check_mask(mask, source, source_path)
        sop_uid = _seg_sop_uid(series, source.SOPInstanceUID, out_path.name)
        data = _encode_seg(source, binary, series, sop_uid, instance_number, source_path)
        # What was repaired is part of how the header was built, so it joins the signature.
        signature = (header_signature(source), repairs) if isinstance(full_check, set) else None
        fully = signature not in full_check if isinstance(full_check, set) else full_check
        _check_read_back(data, binary, source, source_path, with_highdicom=fully)
        if isinstance(full_check, set):
            full_check.add(signature)
    atomic_write_bytes(out_path, data)
    return WrittenSeg(
        path=out_path,
        sop_instance_uid=sop_uid,
        series_instance_uid=series.series_uid_for(source.StudyInstanceUID),
        study_instance_uid=str(source.StudyInstanceUID),
        source_sop_instance_uid=str(source.SOPInstanceUID),
        source_series_instance_uid=str(source.SeriesInstanceUID),
        empty=not binary.any(),
        repairs=repairs,
    )


def _check_mask(mask: np.ndarray, source: Dataset, path: Path) -> np.ndarray:
    """The mask as a contiguous uint8 {0,1} (Rows, Columns) array, or InputError."""
    mask = np.asarray(mask)
    shape = (int(source.Rows), int(source.Columns))
    if mask.shape != shape:
        raise InputError(
            f"{path}: mask is {mask.shape} but the image is {shape} (Rows, Columns); "
            "give the mask at the source's full resolution"
        )
    if mask.dtype == np.bool_:
        return np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.dtype != np.uint8 or mask.max(initial=0) > 1:
        raise InputError(f"{path}: mask must be uint8 0/1 (got {mask.dtype}); threshold it first")
    return np.ascontiguousarray(mask)


def _seg_sop_uid(series: SegSeries, source_uid: str, out_name: str) -> str:
    # The output name is in the entropy so that two files sharing a SOPInstanceUID (the SIIM
    # MONOCHROME1 copy of 6904) still get distinct SEG instances.
    from pydicom.uid import generate_uid

    entropy = [series.run_uid, "pneumo-seg-instance", str(source_uid), out_name]
    return str(generate_uid(entropy_srcs=entropy))


def _encode_seg(
    source: Dataset,
    mask: np.ndarray,
    series: SegSeries,
    sop_uid: str,
    instance_number: int,
    path: Path,
) -> bytes:
    """Build the highdicom Segmentation and return its Part-10 file bytes.

    Raises:
        InputError: highdicom or pydicom refuse the header (message redacted).
    """
    import highdicom as hd
    from pydicom import config

    try:
        # Values copied from the source are written as they are (they were valid enough for its
        # PACS); validation would only log them, names included.
        with config.disable_value_validation():
            seg = hd.seg.Segmentation(
                source_images=[source],
                pixel_array=mask.astype(bool),  # bool: highdicom skips a value scan
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[_segment_description(series)],
                series_instance_uid=series.series_uid_for(source.StudyInstanceUID),
                series_number=series.series_number,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                manufacturer=ALGORITHM_NAME,
                manufacturer_model_name=ALGORITHM_NAME,
                software_versions=series.algorithm_version,
                device_serial_number="none (software)",
                content_label="PNEUMOTHORAX",
                content_description=series.series_description,
                omit_empty_frames=False,
                series_description=series.series_description,
            )
            buffer = io.BytesIO()
            seg.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - untrusted headers make highdicom raise many types
        raise InputError(
            f"{path}: cannot make a DICOM SEG from this header ({_redact(exc, source)})"
        ) from None
    return buffer.getvalue()


def _segment_description(series: SegSeries) -> Any:
    """The one segment: "Pneumothorax", its SNOMED CT codes, AUTOMATIC, by ``series``' algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm = hd.AlgorithmIdentificationSequence(
        name=series.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=series.algorithm_version,
        source=series.algorithm_source,
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=Code(*CATEGORY_CODE),
        segmented_property_type=Code(*PNEUMOTHORAX_CODE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _check_read_back(
    data: bytes, mask: np.ndarray, source: Dataset, path: Path, with_highdicom: bool
) -> None:
    """Parse ``data`` with pydicom (and, ``with_highdicom``, highdicom's SEG reader) and
    compare its frame with ``mask``.

    Raises:
        InputError: the SEG does not read back (the header led highdicom astray).
        RuntimeError: it reads back with different pixels (a bug, never expected).
    """
    import highdicom as hd
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        if with_highdicom:
            seg = hd.seg.Segmentation.from_dataset(dataset, copy=False)
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[str(source.SOPInstanceUID)], segment_numbers=[1]
            )[0, :, :, 0]
        else:
            referenced = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            if referenced.ReferencedSOPInstanceUID != source.SOPInstanceUID:
                raise ValueError("the SEG references another image")
            rows, cols = int(dataset.Rows), int(dataset.Columns)
            packed = np.frombuffer(dataset.PixelData, np.uint8)
            pixels = np.unpackbits(packed, bitorder="little")[: rows * cols].reshape(rows, cols)
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable SEG
        raise InputError(
            f"{path}: the DICOM SEG made from this header does not read back "
            f"({_redact(exc, source)}); report it with the header (without patient data)"
        ) from None
    if pixels.shape != mask.shape or not np.array_equal(pixels, mask):
        raise RuntimeError(f"{path}: DICOM SEG pixels differ from the mask after reading back")


def _redact(exc: BaseException, source: Dataset) -> str:
    """``exc`` as a short one-line reason with patient-identifying header values removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    secrets: set[str] = set()
    for keyword in _PHI_KEYWORDS:
        value = str(source.get(keyword, "") or "").strip()
        secrets.update({value, *re.split(r"[\^=\\]", value)})
    for secret in sorted((s for s in secrets if len(s.strip()) >= 3), key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return shorten_reason(text)
