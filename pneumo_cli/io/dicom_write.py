"""Writing DICOM X-rays (grey, JPEG Baseline or uncompressed), used by the demo dataset and
the tests."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from pneumo_cli.core.files import atomic_write_bytes
from pneumo_cli.io.dicom_pixels import JPEG_BASELINE

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


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
