"""`pneumo predict --dicom-seg` on the real SIIM DICOMs: one SEG per DICOM input whose frame is
predict's own mask, filed in the source's study, and resumable."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.files import read_mask_png
from pneumo_cli.io.dicom_seg import SEG_SOP_CLASS_UID

runner = CliRunner()
MONO1 = "monochrome1_same_uid_as_6904"
pytestmark = pytest.mark.slow


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def seg_frame(path: Path, referenced_uid: str) -> np.ndarray:
    """The SEG's frame over the source image ``referenced_uid``, read with highdicom."""
    import highdicom

    seg = highdicom.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[referenced_uid], segment_numbers=[1]
    )
    assert pixels.shape[0] == 1 and pixels.shape[3] == 1
    return np.asarray(pixels[0, :, :, 0]).astype(np.uint8)


def source_uid(path: Path) -> str:
    """The UID a SEG must reference: SOPInstanceUID, or the file meta's when that is broken."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uid = str(ds.get("SOPInstanceUID", ""))
    return uid if not uid.startswith("ID_") else str(ds.file_meta.MediaStorageSOPInstanceUID)


@pytest.fixture(scope="module")
def inputs(siim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every real DICOM (3 train, 10 sample, 6 odd ones) and one JPEG, in one folder."""
    folder = tmp_path_factory.mktemp("seg_inputs")
    for path in [*sorted((siim / "dicom-images-train").rglob("*.dcm")),
                 *sorted((siim / "dicom-sample").glob("*.dcm")),
                 *sorted((siim / "dicom-odd").glob("*.dcm"))]:  # fmt: skip
        shutil.copy(path, folder / path.name)
    jpeg = sorted((siim / "jpg-sample" / "image").glob("*.jpg"))[0]
    shutil.copy(jpeg, folder / "a_jpeg_input.jpg")
    return folder


@pytest.fixture(scope="module")
def threshold(tiny_run, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A gate threshold at the median probability of one image, so masks are neither empty nor
    full: the tiny run is barely trained and would predict nothing at 0.5."""
    out = tmp_path_factory.mktemp("probe")
    one = next(p for p in sorted(inputs.glob("*.dcm")) if not p.name.startswith("stage2"))
    result = invoke("predict", one, "--run", tiny_run["run"], "--out", out, "--save-probs", "-q")
    assert result.exit_code == 0, result.output
    probs = cv2.imread(str(next((out / "probs").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    assert probs.shape == (1024, 1024)
    return f"{np.median(probs) / 255.0:.4f}"


@pytest.fixture(scope="module")
def predicted(tiny_run, inputs: Path, threshold: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("seg") / "out"
    args = ["predict", inputs, "--run", tiny_run["run"], "--out", out, "--dicom-seg",
            "--top-threshold", threshold, "--bottom-threshold", threshold, "--json"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return out, args, json.loads(result.stdout)


def test_every_dicom_input_gets_a_seg_equal_to_its_mask(predicted, inputs: Path) -> None:
    out, _, summary = predicted
    # The MONOCHROME1 copy repeats the 6904 file's SOPInstanceUID: a duplicate, as in preprocess.
    dicoms = [p for p in sorted(inputs.glob("*.dcm")) if p.stem != MONO1]
    assert summary["rejected"] == 1 and MONO1 in (out / "rejected.csv").read_text()
    assert summary["outputs"] == {
        "dicom_seg_written": len(dicoms),
        "dicom_seg_not_dicom": 1,
        "dicom_seg_refused": 0,
    }
    partial = 0
    for source in dicoms:
        seg_path = out / "dicom-seg" / f"{source.stem}.dcm"
        seg = pydicom.dcmread(seg_path)
        assert seg.SOPClassUID == SEG_SOP_CLASS_UID
        mask = read_mask_png(out / "masks" / f"{source.stem}.png")
        frame = seg_frame(seg_path, source_uid(source))
        assert frame.shape == mask.shape == (seg.Rows, seg.Columns)
        np.testing.assert_array_equal(frame, mask)
        partial += 0 < mask.sum() < mask.size
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source_uid(source)
        original = pydicom.dcmread(source, stop_before_pixels=True)
        if original.get("StudyInstanceUID"):
            assert seg.StudyInstanceUID == original.StudyInstanceUID
            assert seg.SeriesInstanceUID != original.SeriesInstanceUID
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
        assert "pneumo" in seg.SeriesDescription
    assert partial >= 5, "the masks should be partial, or the comparison proves little"
    assert not (out / "dicom-seg" / "a_jpeg_input.dcm").exists()
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(dicoms) + 1  # the JPEG has its row and mask, just no SEG


def test_one_series_per_study_and_unique_seg_uids(predicted) -> None:
    out, _, _ = predicted
    segs = {p.stem: pydicom.dcmread(p) for p in (out / "dicom-seg").glob("*.dcm")}
    by_study: dict[str, set[str]] = {}
    for seg in segs.values():
        by_study.setdefault(seg.StudyInstanceUID, set()).add(seg.SeriesInstanceUID)
    assert all(len(series) == 1 for series in by_study.values())
    assert len({seg.SOPInstanceUID for seg in segs.values()}) == len(segs)


def test_the_monochrome1_file_gets_a_seg_aligned_with_its_image(
    tiny_run, inputs: Path, tmp_path: Path
) -> None:
    source = inputs / f"{MONO1}.dcm"
    from pneumo_cli.inference.outputs import output_row
    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import file_loader

    # This inverted image's own median probability (exact, not the PNG's 8 bits): a threshold
    # that makes its mask partial, so the comparison shows the orientation.
    predictor = load_predictor(tiny_run["run"])
    item = file_loader(predictor.settings)(source)
    prob = predictor.probabilities(item.image[None])[0]
    full = output_row(item.image_id, prob, item, predictor.gate, keep_probs=True)[2]
    own = repr(float(np.median(full)))
    out = tmp_path / "mono1"
    args = ["--top-threshold", own, "--bottom-threshold", own, "--dicom-seg", "-q"]
    result = invoke("predict", source, "--run", tiny_run["run"], "--out", out, *args)
    assert result.exit_code == 0, result.output
    (seg_path,) = (out / "dicom-seg").glob("*.dcm")
    (mask_path,) = (out / "masks").glob("*.png")
    seg, mask = pydicom.dcmread(seg_path), read_mask_png(mask_path)
    assert (seg.Rows, seg.Columns) == mask.shape == (1024, 1024)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(seg_frame(seg_path, source_uid(source)), mask)


def test_a_rerun_finishes_missing_segs_in_the_same_series(predicted, tmp_path: Path) -> None:
    out, args, _ = predicted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    removed = sorted((copy / "dicom-seg").glob("*.dcm"))[:3]
    for path in removed:
        path.unlink()
        (copy / "records" / f"{path.stem}.json").unlink()  # as a kill before the record
    result = invoke(*[copy if a == out else a for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["predicted"] == 3
    for path in removed:
        again, first = pydicom.dcmread(path), pydicom.dcmread(out / "dicom-seg" / path.name)
        assert again.SeriesInstanceUID == first.SeriesInstanceUID
        assert again.SOPInstanceUID == first.SOPInstanceUID
        assert again.PixelData == first.PixelData


def test_an_earlier_output_without_segs_gets_them_on_a_rerun(tiny_run, inputs, tmp_path) -> None:
    one = sorted(inputs.glob("*.dcm"))[0]
    out = tmp_path / "out"
    assert invoke("predict", one, "--run", tiny_run["run"], "--out", out, "-q").exit_code == 0
    result = invoke("predict", one, "--run", tiny_run["run"], "--out", out, "--dicom-seg", "-q")
    assert result.exit_code == 0, result.output
    assert (out / "dicom-seg" / f"{one.stem}.dcm").is_file()


def test_dicom_seg_with_a_cache_is_a_usage_error(tiny_run) -> None:
    result = invoke("predict", "--cache", tiny_run["cache"], "--run", tiny_run["run"],
                    "--dicom-seg")  # fmt: skip
    assert result.exit_code == 2
    assert "--dicom-seg needs the DICOM files as INPUT" in result.output


def test_png_and_jpeg_inputs_get_a_note_not_an_error(tiny_run, inputs, tmp_path) -> None:
    jpeg = inputs / "a_jpeg_input.jpg"
    result = invoke("predict", jpeg, "--run", tiny_run["run"], "--out", tmp_path / "o",
                    "--dicom-seg")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 input(s) are PNG/JPEG and got no DICOM SEG" in result.stderr
    assert list((tmp_path / "o" / "dicom-seg").glob("*.dcm")) == []
