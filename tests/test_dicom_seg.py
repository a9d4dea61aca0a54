"""DICOM SEG writing on the real SIIM DICOMs in ../shared/siim: references, codes, pixels,
broken stage-2 headers, MONOCHROME1, atomic writes and privacy."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import pneumo_cli
from pneumo_cli.core.errors import ConfigError, DicomError, InputError, OutputError
from pneumo_cli.core.files import TEMP_PREFIX
from pneumo_cli.io import dicom_seg
from pneumo_cli.io.dicom_seg import (
    SEG_SOP_CLASS_UID,
    SegSeries,
    WrittenSeg,
    new_seg_series,
    write_seg,
)
from pneumo_cli.io.rle import decode_union, read_rle_csv
from tests.conftest import REAL_TRAIN_AREAS

UID_6904 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
UID_307 = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"
STAGE2 = ["ID_0011fe81e", "ID_003206608", "ID_004d6fbb6", "ID_004d72c54", "ID_00528aa0e"]
MONOCHROME1 = "monochrome1_same_uid_as_6904.dcm"
VALID_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SOURCE = "run runs/train3, best.keras sha256 1a2b3c4d"


def disc_and_rectangle(rows: int = 1024, cols: int = 1024) -> np.ndarray:
    """A uint8 {0,1} mask that no flip or transpose maps onto itself: a disc in the upper right
    and a wide rectangle in the lower left."""
    r, c = np.mgrid[0:rows, 0:cols]
    mask = ((r - 250) ** 2 + (c - 700) ** 2 <= 90**2).astype(np.uint8)
    mask[600:680, 100:420] = 1
    return mask


def header(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def read_seg(path: Path) -> tuple[pydicom.Dataset, hd.seg.Segmentation]:
    """The SEG as pydicom reads it and as highdicom reads it (both must succeed)."""
    dataset = pydicom.dcmread(path)
    return dataset, hd.seg.segread(path)


def seg_frame(seg: hd.seg.Segmentation, source_uid: str) -> np.ndarray:
    """The segment-1 frame of ``seg`` for source image ``source_uid``, as (Rows, Columns)."""
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source_uid], segment_numbers=[1]
    )
    assert pixels.shape[0] == 1 and pixels.shape[3] == 1
    return pixels[0, :, :, 0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def series() -> SegSeries:
    return new_seg_series(SOURCE, pneumo_cli.__version__)


def test_test_mask_is_asymmetric() -> None:
    mask = disc_and_rectangle()
    assert mask.sum() > 50_000
    for moved in (mask[::-1], mask[:, ::-1], mask.T, mask[::-1, ::-1]):
        assert not np.array_equal(moved, mask)


def test_new_seg_series_identifies_pneumo_and_says_ai(series: SegSeries) -> None:
    assert VALID_UID.match(series.run_uid)
    assert series.algorithm_name == "pneumo"
    assert series.algorithm_version == pneumo_cli.__version__
    assert series.algorithm_source == SOURCE
    assert "AI" in series.series_description and len(series.series_description) <= 64
    assert series.series_number >= 1
    other = new_seg_series(SOURCE, pneumo_cli.__version__)
    assert other.run_uid != series.run_uid
    # One series per study: distinct per study, stable for a study.
    a, b = series.series_uid_for("1.2.3"), series.series_uid_for("1.2.4")
    assert a != b and a == series.series_uid_for("1.2.3") and VALID_UID.match(a)
    assert other.series_uid_for("1.2.3") != a


@pytest.mark.parametrize(
    ("source", "version", "number"),
    [("x" * 65, "0.1.0", 1), ("", "0.1.0", 1), ("run a\\b", "0.1.0", 1), (SOURCE, "0.1", 0)],
)
def test_new_seg_series_refuses_texts_dicom_cannot_hold(source: str, version: str, number: int):
    with pytest.raises(ConfigError):
        new_seg_series(source, version, series_number=number)


def assert_seg_of(out: Path, source_path: Path, mask: np.ndarray, series: SegSeries) -> None:
    """Everything a SEG of ``source_path`` must carry, checked on the file as read back."""
    src = header(source_path)
    ds, seg = read_seg(out)
    assert ds.SOPClassUID == SEG_SOP_CLASS_UID and ds.file_meta.MediaStorageSOPClassUID == (
        SEG_SOP_CLASS_UID
    )
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns) == mask.shape
    # Filed in the source's study and patient, in the new series of this predict call.
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID == series.series_uid_for(src.StudyInstanceUID)
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SeriesDescription == series.series_description
    assert int(ds.SeriesNumber) == series.series_number
    assert (ds.PatientID, str(ds.PatientName)) == (src.PatientID, str(src.PatientName))
    assert (ds.StudyDate, ds.PatientSex) == (src.StudyDate, src.PatientSex)
    # References: series/instance, and the frame's derivation source image.
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    (ref_instance,) = ref_series.ReferencedInstanceSequence
    assert ref_instance.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ref_instance.ReferencedSOPClassUID == src.SOPClassUID
    (frame,) = ds.PerFrameFunctionalGroupsSequence
    (source_image,) = frame.DerivationImageSequence[0].SourceImageSequence
    assert source_image.ReferencedSOPInstanceUID == src.SOPInstanceUID
    # The segment: codes, algorithm type and identification.
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "Pneumothorax"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    cat = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("36118008", "SCT")
    assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("49755003", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "pneumo"
    assert algorithm.AlgorithmVersion == pneumo_cli.__version__
    assert algorithm.AlgorithmSource == SOURCE
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM: AI
    description = seg.get_segment_description(1)
    assert description.segmented_property_type.value == "36118008"
    np.testing.assert_array_equal(seg_frame(seg, src.SOPInstanceUID), mask)


@pytest.mark.parametrize("uid", sorted(REAL_TRAIN_AREAS))
def test_seg_of_real_training_dicom(
    uid: str, real_train_dicoms: dict[str, Path], series: SegSeries, tmp_path: Path
) -> None:
    mask = disc_and_rectangle()
    out = tmp_path / f"{uid}.dcm"
    written = write_seg(real_train_dicoms[uid], mask, series, out, instance_number=3)
    assert_seg_of(out, real_train_dicoms[uid], mask, series)
    ds = pydicom.dcmread(out)
    assert int(ds.InstanceNumber) == 3
    assert written == WrittenSeg(
        path=out,
        sop_instance_uid=ds.SOPInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        source_sop_instance_uid=uid,
        source_series_instance_uid=header(real_train_dicoms[uid]).SeriesInstanceUID,
        empty=False,
        repairs=(),
    )


def test_seg_of_every_sample_dicom(siim: Path, series: SegSeries, tmp_path: Path) -> None:
    files = sorted((siim / "dicom-sample").glob("*.dcm"))
    assert len(files) == 10
    mask = disc_and_rectangle()[::-1].copy()  # another orientation, still asymmetric
    uids = set()
    for number, path in enumerate(files, 1):
        out = tmp_path / path.name
        written = write_seg(path, mask, series, out, instance_number=number)
        assert_seg_of(out, path, mask, series)
        assert written.source_sop_instance_uid == path.stem
        uids.add(written.sop_instance_uid)
    assert len(uids) == 10


def test_real_annotation_mask_round_trips(
    real_train_dicoms: dict[str, Path], real_rle_csv: Path, series: SegSeries, tmp_path: Path
) -> None:
    encoded = [r.encoded for r in read_rle_csv(real_rle_csv) if r.image_id == UID_307]
    mask = decode_union(encoded)
    assert int(mask.sum()) == REAL_TRAIN_AREAS[UID_307]
    out = tmp_path / "307.dcm"
    write_seg(real_train_dicoms[UID_307], mask, series, out, instance_number=1)
    assert_seg_of(out, real_train_dicoms[UID_307], mask, series)
    _, seg = read_seg(out)
    assert int(seg_frame(seg, UID_307).sum()) == 69274


def test_bool_mask_is_accepted(real_train_dicoms, series: SegSeries, tmp_path: Path) -> None:
    mask = disc_and_rectangle()
    out = tmp_path / "b.dcm"
    write_seg(real_train_dicoms[UID_6904], mask.astype(bool), series, out, instance_number=1)
    assert_seg_of(out, real_train_dicoms[UID_6904], mask, series)


def test_negative_prediction_writes_seg_with_an_empty_segment(
    real_train_dicoms: dict[str, Path], series: SegSeries, tmp_path: Path
) -> None:
    mask = np.zeros((1024, 1024), np.uint8)
    out = tmp_path / "neg.dcm"
    written = write_seg(real_train_dicoms[UID_6904], mask, series, out, instance_number=1)
    assert written.empty is True
    assert_seg_of(out, real_train_dicoms[UID_6904], mask, series)
    ds, seg = read_seg(out)
    assert int(ds.NumberOfFrames) == 1 and len(ds.SegmentSequence) == 1
    assert seg_frame(seg, UID_6904).max() == 0


def test_monochrome1_seg_aligns_with_pixel_grid(
    siim: Path, real_train_dicoms: dict[str, Path], series: SegSeries, tmp_path: Path
) -> None:
    path = siim / "dicom-odd" / MONOCHROME1
    assert header(path).PhotometricInterpretation == "MONOCHROME1"
    mask = disc_and_rectangle()
    written = write_seg(path, mask, series, tmp_path / "m1.dcm", instance_number=1)
    assert_seg_of(tmp_path / "m1.dcm", path, mask, series)
    assert written.source_sop_instance_uid == UID_6904 and written.repairs == ()
    # Same SOPInstanceUID as the 6904 original, yet two distinct SEG instances.
    original = write_seg(
        real_train_dicoms[UID_6904], mask, series, tmp_path / "6904.dcm", instance_number=2
    )
    assert original.sop_instance_uid != written.sop_instance_uid


@pytest.mark.parametrize("stem", STAGE2)
def test_stage2_broken_header_gives_valid_repeatable_seg(
    stem: str, siim: Path, series: SegSeries, tmp_path: Path
) -> None:
    path = siim / "dicom-odd" / f"stage2_{stem}.dcm"
    src = header(path)
    assert (src.SOPInstanceUID, src.StudyInstanceUID, src.SeriesInstanceUID) == (stem, "", "")
    real_uid = src.file_meta.MediaStorageSOPInstanceUID
    before = sha256(path)
    mask = disc_and_rectangle()
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run / f"stage2_{stem}.dcm"
        out.parent.mkdir()
        written = write_seg(path, mask, series, out, instance_number=1)
        ds, seg = read_seg(out)
        (ref_series,) = ds.ReferencedSeriesSequence
        assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == real_uid
        assert written.source_sop_instance_uid == real_uid
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ref_series.SeriesInstanceUID):
            assert VALID_UID.match(uid) and len(uid) <= 64
        assert ds.SeriesInstanceUID == series.series_uid_for(ds.StudyInstanceUID)
        assert ds.SeriesInstanceUID != ref_series.SeriesInstanceUID
        assert ds.StudyInstanceUID == written.study_instance_uid
        np.testing.assert_array_equal(seg_frame(seg, real_uid), mask)
        runs.append((ds.StudyInstanceUID, ref_series.SeriesInstanceUID, ds.SOPInstanceUID))
        assert written.repairs == (
            "SOPInstanceUID from MediaStorageSOPInstanceUID",
            "StudyInstanceUID generated",
            "SeriesInstanceUID generated",
        )
    assert runs[0] == runs[1]
    assert sha256(path) == before  # the input is never modified


def test_stage2_files_get_distinct_generated_studies(siim: Path, series, tmp_path: Path):
    studies = {
        write_seg(
            siim / "dicom-odd" / f"stage2_{stem}.dcm",
            np.zeros((1024, 1024), np.uint8),
            series,
            tmp_path / f"{stem}.dcm",
            instance_number=1,
        ).study_instance_uid
        for stem in STAGE2
    }
    assert len(studies) == len(STAGE2)


def save_modified(source: Path, out: Path, **changes: str) -> Path:
    """A copy of ``source`` with header keywords changed (``file_meta__X`` for file meta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
        for keyword, value in changes.items():
            target = ds.file_meta if keyword.startswith("file_meta__") else ds
            setattr(target, keyword.removeprefix("file_meta__"), value)
        ds.save_as(out)  # keeps the file meta as it is, inconsistent or not
    return out


def test_header_without_any_valid_sop_uid_is_refused(siim: Path, series, tmp_path: Path):
    bad = save_modified(
        siim / "dicom-odd" / "stage2_ID_0011fe81e.dcm",
        tmp_path / "bad.dcm",
        file_meta__MediaStorageSOPInstanceUID="ID_0011fe81e",
    )
    out = tmp_path / "out.dcm"
    with pytest.raises(InputError, match=r"bad\.dcm: no valid SOPInstanceUID"):
        write_seg(bad, np.zeros((1024, 1024), np.uint8), series, out, instance_number=1)
    assert not out.exists()


def test_not_a_dicom_and_bad_masks_are_input_errors(real_train_dicoms, series, tmp_path: Path):
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom")
    with pytest.raises(DicomError, match="notes.dcm"):
        write_seg(text, np.zeros((4, 4), np.uint8), series, tmp_path / "a.dcm", instance_number=1)
    source = real_train_dicoms[UID_6904]
    for mask, message in [
        (np.zeros((256, 256), np.uint8), r"\(256, 256\) but the image is \(1024, 1024\)"),
        (np.full((1024, 1024), 255, np.uint8), "must be uint8 0/1"),
        (np.zeros((1024, 1024), np.float32), "must be uint8 0/1"),
    ]:
        with pytest.raises(InputError, match=message):
            write_seg(source, mask, series, tmp_path / "a.dcm", instance_number=1)
    with pytest.raises(ValueError, match="instance_number"):
        write_seg(source, disc_and_rectangle(), series, tmp_path / "a.dcm", instance_number=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.dcm"]


def test_existing_file_is_replaced_only_by_a_complete_seg(
    real_train_dicoms: dict[str, Path], series: SegSeries, tmp_path: Path, monkeypatch
) -> None:
    source, mask = real_train_dicoms[UID_6904], disc_and_rectangle()
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"old")
    write_seg(source, mask, series, out, instance_number=1)
    assert_seg_of(out, source, mask, series)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]  # no temporary left
    complete = out.read_bytes()

    # A failure at the rename (killed, disk full) keeps the previous file and no temporary.
    def fail_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OutputError, match="no space left"):
        write_seg(source, np.zeros_like(mask), series, out, instance_number=1)
    monkeypatch.undo()
    assert out.read_bytes() == complete
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))
    # An input error leaves the existing SEG alone, too.
    with pytest.raises(InputError):
        write_seg(source, np.zeros((8, 8), np.uint8), series, out, instance_number=1)
    assert out.read_bytes() == complete


def test_missing_output_folder_is_an_output_error(real_train_dicoms, series, tmp_path: Path):
    with pytest.raises(OutputError, match="does not exist"):
        write_seg(
            real_train_dicoms[UID_6904],
            disc_and_rectangle(),
            series,
            tmp_path / "missing" / "seg.dcm",
            instance_number=1,
        )


def test_patient_data_only_inside_the_seg(
    real_train_dicoms: dict[str, Path],
    series: SegSeries,
    tmp_path: Path,
    monkeypatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = real_train_dicoms[UID_6904]
    src = header(source)
    secrets = {str(src.PatientID), str(src.PatientName)}
    assert all(len(s) > 8 for s in secrets)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_seg(
            source, disc_and_rectangle(), series, tmp_path / "s.dcm", instance_number=1
        )
        seen.append(repr(written))
        with pytest.raises(InputError) as shape_error:
            write_seg(
                source, np.zeros((2, 2), np.uint8), series, tmp_path / "x.dcm", instance_number=1
            )
        seen.append(str(shape_error.value))

        # highdicom refusing a header may quote it: the message must come out redacted.
        def refuse(*args: object, **kwargs: object) -> None:
            raise ValueError(f"bad patient {src.PatientName} / id {src.PatientID}")

        monkeypatch.setattr(hd.seg, "Segmentation", refuse)
        with pytest.raises(InputError, match="redacted") as refused:
            write_seg(source, disc_and_rectangle(), series, tmp_path / "y.dcm", instance_number=1)
        seen.append(str(refused.value))
    seen += [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for secret in secrets:
        assert not any(secret in text for text in seen), secret
    # ...while the SEG itself carries the patient module, as filing requires.
    ds = pydicom.dcmread(tmp_path / "s.dcm")
    assert {str(ds.PatientID), str(ds.PatientName)} == secrets


def test_redaction_covers_person_name_components(real_train_dicoms, tmp_path: Path):
    ds = header(real_train_dicoms[UID_6904])
    ds.PatientName = "Doe^Johnathan"
    reason = dicom_seg._redact(ValueError("component Johnathan invalid for Doe^Johnathan"), ds)
    assert "Johnathan" not in reason and "Doe" not in reason and "invalid" in reason


def test_geometry_with_slice_thickness_keeps_pixel_spacing(
    real_train_dicoms: dict[str, Path], series: SegSeries, tmp_path: Path
) -> None:
    source = save_modified(real_train_dicoms[UID_6904], tmp_path / "thick.dcm", SliceThickness="1")
    out = tmp_path / "seg.dcm"
    write_seg(source, disc_and_rectangle(), series, out, instance_number=1)
    ds, _ = read_seg(out)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.168, 0.168]
    # Without SliceThickness (all SIIM files) the spacing is left out, so highdicom reads it.
    write_seg(real_train_dicoms[UID_6904], disc_and_rectangle(), series, out, instance_number=1)
    ds = pydicom.dcmread(io.BytesIO(out.read_bytes()))
    assert "PixelMeasuresSequence" not in ds.SharedFunctionalGroupsSequence[0]


def test_multi_frame_header_is_refused(real_train_dicoms, series, tmp_path: Path) -> None:
    multi = save_modified(real_train_dicoms[UID_6904], tmp_path / "multi.dcm", NumberOfFrames="2")
    with pytest.raises(DicomError, match=r"multi\.dcm: multi-frame DICOM \(2 frames\)"):
        write_seg(multi, disc_and_rectangle(), series, tmp_path / "o.dcm", instance_number=1)


def test_invalid_sop_class_comes_from_file_meta(real_train_dicoms, series, tmp_path: Path):
    odd = save_modified(real_train_dicoms[UID_6904], tmp_path / "odd.dcm", SOPClassUID="SC")
    written = write_seg(odd, disc_and_rectangle(), series, tmp_path / "o.dcm", instance_number=1)
    assert written.repairs == ("SOPClassUID from MediaStorageSOPClassUID",)
    ds, _ = read_seg(tmp_path / "o.dcm")
    ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert ds.StudyInstanceUID == header(real_train_dicoms[UID_6904]).StudyInstanceUID


def test_missing_type2_patient_and_study_attributes_are_added_empty(series, tmp_path: Path):
    """pneumo's own demo DICOMs (and many exports) lack PatientBirthDate, StudyDate...: the SEG
    is still written, with those attributes present and empty, and reads back."""
    from pneumo_cli.io.dicom_write import write_dicom

    rng = np.random.default_rng(5)
    source = tmp_path / "sparse.dcm"
    write_dicom(source, rng.integers(0, 255, (96, 128), dtype=np.uint8), patient_id="P-1")
    assert "PatientBirthDate" not in header(source)
    mask = np.zeros((96, 128), np.uint8)
    mask[10:40, 70:120] = 1
    written = write_seg(source, mask, series, tmp_path / "seg.dcm", instance_number=1)
    assert "empty PatientBirthDate added" in written.repairs
    seg, parsed = read_seg(tmp_path / "seg.dcm")
    assert seg.PatientBirthDate == "" and seg.PatientID == "P-1"
    np.testing.assert_array_equal(seg_frame(parsed, header(source).SOPInstanceUID), mask)


@pytest.mark.parametrize("with_highdicom", [True, False])
def test_read_back_check_catches_a_frame_that_differs(
    real_train_dicoms, series, tmp_path: Path, with_highdicom: bool
) -> None:
    """Both read-back checks (highdicom's reader, or pydicom and the unpacked bits) compare the
    written frame with the mask, so a SEG of other pixels is never written."""
    source = next(iter(real_train_dicoms.values()))
    mask = disc_and_rectangle()
    write_seg(source, mask, series, tmp_path / "seg.dcm", instance_number=1, full_check=False)
    data = (tmp_path / "seg.dcm").read_bytes()
    ds = header(source)
    dicom_seg._check_read_back(data, mask, ds, source, with_highdicom=with_highdicom)
    other = mask.copy()
    other[0, 0] ^= 1
    with pytest.raises(RuntimeError, match="pixels differ from the mask"):
        dicom_seg._check_read_back(data, other, ds, source, with_highdicom=with_highdicom)


def test_header_signature_groups_headers_built_the_same_way(siim: Path) -> None:
    from pneumo_cli.io.seg_headers import header_signature

    samples = {header_signature(p) for p in sorted((siim / "dicom-sample").glob("*.dcm"))}
    stage2 = {header_signature(p) for p in sorted((siim / "dicom-odd").glob("stage2_*.dcm"))}
    assert len(samples) == 1 and len(stage2) == 1  # one full read-back covers each group
    assert samples != stage2  # the broken stage-2 headers are read back fully on their own


def test_a_signature_set_reads_back_with_highdicom_once_per_header_kind(
    siim: Path, series, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = hd.seg.Segmentation.from_dataset
    monkeypatch.setattr(
        hd.seg.Segmentation, "from_dataset", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    seen: set[tuple] = set()
    sources = sorted((siim / "dicom-sample").glob("*.dcm"))[:3]
    sources += sorted((siim / "dicom-odd").glob("stage2_*.dcm"))[:2]
    for n, source in enumerate(sources, 1):
        mask = disc_and_rectangle()
        write_seg(source, mask, series, tmp_path / f"{n}.dcm", instance_number=n, full_check=seen)
    assert len(calls) == 2 and len(seen) == 2  # one sample header, one stage-2 kind
