"""Synthetic phantoms (``synthetic.py``) and the SIIM-layout demo dataset (``demo_dataset.py``,
``pneumo demo-data``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import ConfigError, DicomError, InputError, OutputError
from pneumo_cli.core.patient_key import PatientKeySecret
from pneumo_cli.data.demo import CORRUPTION_KINDS, CSV_HEADER, iter_demo_images, write_demo_dataset
from pneumo_cli.data.synthetic import MAX_PTX_FRACTION, MIN_PTX_FRACTION, draw_phantom
from pneumo_cli.io import dicom_read
from pneumo_cli.io.rle import decode_rle, decode_union, read_rle_csv

N, SIZE, SEED = 30, 128, 3
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, object, list]:
    """A written demo dataset, its summary and the images the library says it drew."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    summary = write_demo_dataset(out, n=N, seed=SEED, size=SIZE)
    images = list(iter_demo_images(np.random.default_rng(SEED), N, SIZE))
    return out, summary, images


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- phantoms ---------------------------------------------------------------------------------


def test_phantom_is_deterministic_for_a_generator_state():
    first = draw_phantom(np.random.default_rng(7), 128, pneumothorax=True)
    again = draw_phantom(np.random.default_rng(7), 128, pneumothorax=True)
    other = draw_phantom(np.random.default_rng(8), 128, pneumothorax=True)
    assert np.array_equal(first.image, again.image)
    assert np.array_equal(first.mask, again.mask)
    assert (first.side, first.location) == (again.side, again.location)
    assert not np.array_equal(first.image, other.image)


def test_negative_phantom_has_an_empty_mask_and_a_dark_border():
    phantom = draw_phantom(np.random.default_rng(1), 160)
    assert phantom.image.shape == phantom.mask.shape == (160, 160)
    assert phantom.image.dtype == phantom.mask.dtype == np.uint8
    assert phantom.mask.sum() == 0 and phantom.side == phantom.location == ""
    # Air outside the body (top corners) is dark, the mediastinum and abdomen are bright.
    assert phantom.image[:8, :8].mean() < 50 and phantom.image[:8, -8:].mean() < 50
    assert phantom.image[140:, 70:90].mean() > 120


@pytest.mark.parametrize("seed", range(6))
def test_pneumothorax_is_one_large_band_darker_than_the_other_lung(seed):
    import cv2

    phantom = draw_phantom(np.random.default_rng(seed), 128, pneumothorax=True)
    mask = phantom.mask
    assert set(np.unique(mask)) == {0, 1}
    assert MIN_PTX_FRACTION <= mask.mean() <= MAX_PTX_FRACTION
    count, _ = cv2.connectedComponents(mask)
    assert count == 2  # background + one band
    assert phantom.side in ("left", "right") and phantom.location in ("apex", "lateral")
    # The patient's right is on the image's left.
    columns = np.flatnonzero(mask.any(axis=0))
    assert (columns.mean() < 64) == (phantom.side == "right")
    # Free pleural air has no lung markings and is darker than the mirror-image lung region.
    image = phantom.image.astype(np.float64)
    mirror = np.fliplr(mask).astype(bool) & ~mask.astype(bool)
    assert image[mask.astype(bool)].mean() < image[mirror].mean() - 10


def test_phantom_refuses_a_tiny_size():
    with pytest.raises(ValueError, match="at least 32"):
        draw_phantom(np.random.default_rng(0), 16)


# --- the plan --------------------------------------------------------------------------------


def test_plan_has_22_percent_positives_shared_patients_and_unique_uids():
    images = list(iter_demo_images(np.random.default_rng(0), 100, 128))
    positives = sum(bool(item.phantom.mask.any()) for item in images)
    assert positives == 22  # round(0.22 * n) exactly, not only on average
    patients = {item.patient_id for item in images}
    assert len(patients) < 100
    assert max(sum(i.patient_id == p for i in images) for p in patients) >= 2
    uids = [u for i in images for u in (i.image_id, i.study_uid, i.series_uid)]
    assert len(set(uids)) == 300
    assert all(re.fullmatch(r"2\.25\.[1-9]\d{0,38}", u) for u in uids)
    assert sum(i.photometric == "MONOCHROME1" for i in images) == 6
    assert all(i.header["PatientName"] == "SYNTHETIC^PHANTOM" for i in images)


def test_plan_refuses_bad_settings():
    with pytest.raises(ConfigError, match="--n"):
        next(iter_demo_images(np.random.default_rng(0), 0, 128))
    with pytest.raises(ConfigError, match="--size"):
        next(iter_demo_images(np.random.default_rng(0), 5, 64))


# --- the written dataset ---------------------------------------------------------------------


def test_summary_counts(demo):
    _, summary, images = demo
    positives = [i for i in images if i.phantom.mask.any()]
    assert summary.images == N and summary.positives == len(positives) == round(0.22 * N)
    assert summary.negatives == N - summary.positives
    assert summary.rle_rows == sum(len(i.rle_rows) for i in images)
    assert summary.multi_row_images == sum(len(i.rle_rows) == 2 for i in images) >= 1
    assert summary.monochrome1 == sum(i.photometric == "MONOCHROME1" for i in images) == 2
    assert summary.patients == len({i.patient_id for i in images}) < N
    assert summary.corrupted == len(summary.corrupted_files) == len(CORRUPTION_KINDS)
    assert sorted(summary.corrupted_files.values()) == sorted(CORRUPTION_KINDS)


def test_files_are_nested_like_the_kaggle_archive(demo):
    out, summary, images = demo
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == N + len(CORRUPTION_KINDS)
    for item in images:
        path = out / item.relative_path
        ds = pydicom.dcmread(path)
        assert path.stem == ds.SOPInstanceUID == item.image_id
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.parent.parent.name == ds.StudyInstanceUID
        assert path.parent.parent.parent.name == "dicom-images-train"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.BitsStored == 8 and ds.PhotometricInterpretation == item.photometric
        assert ds.PatientID == item.patient_id and str(ds.PatientName) == "SYNTHETIC^PHANTOM"
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        # No dates or times: they would break byte-identical output for a seed.
        assert not [e.keyword for e in ds if "Date" in e.keyword or "Time" in e.keyword]


def test_csv_is_in_the_stage1_format_and_decodes_to_the_drawn_masks(demo):
    out, _, images = demo
    lines = (out / "train-rle.csv").read_text().splitlines()
    assert lines[0] == CSV_HEADER
    assert all(re.fullmatch(r"2\.25\.\d+, (-1|\d+( \d+)+)", line) for line in lines[1:])
    rows: dict[str, list[str]] = {}
    for row in read_rle_csv(out / "train-rle.csv"):
        rows.setdefault(row.image_id, []).append(row.encoded)
    assert list(rows) == [item.image_id for item in images]
    for item in images:
        decoded = decode_union(rows[item.image_id], SIZE, SIZE)
        assert np.array_equal(decoded, item.phantom.mask)
        if len(rows[item.image_id]) == 2:
            upper, lower = (decode_rle(s, SIZE, SIZE) for s in rows[item.image_id])
            assert (upper & lower).any()  # overlapping parts, as in the real CSV
            assert upper.sum() < item.phantom.mask.sum() and lower.sum() < item.phantom.mask.sum()


def test_images_read_back_match_the_phantoms_within_jpeg_loss(demo):
    out, _, images = demo
    for item in images:
        secret = PatientKeySecret(Path("test.secret"), b"s" * 32)
        xray = dicom_read.read_xray(out / item.relative_path, patient_secret=secret)
        difference = np.abs(xray.image.astype(np.int16) - item.phantom.image.astype(np.int16))
        assert difference.mean() < 3.0 and difference.max() <= 40, item.photometric
        assert xray.meta["patient_key"] and xray.meta["view_position"] in ("AP", "PA")


def test_monochrome1_files_store_inverted_pixels_and_read_back_with_dark_air(demo):
    out, _, images = demo
    inverted = [item for item in images if item.photometric == "MONOCHROME1"]
    assert inverted
    for item in inverted:
        stored = pydicom.dcmread(out / item.relative_path).pixel_array
        assert stored[:6, :6].mean() > 200  # air is bright in the stored values
        image = dicom_read.read_xray(out / item.relative_path).image
        assert image[:6, :6].mean() < 50
        assert abs(float(image.mean()) - float(item.phantom.image.mean())) < 2


def test_corrupt_files_are_rejected_by_the_reader(demo):
    out, summary, _ = demo
    empty = [p for p, kind in summary.corrupted_files.items() if kind == "empty"]
    assert (out / empty[0]).stat().st_size == 0
    for relative in summary.corrupted_files:
        with pytest.raises((DicomError, InputError)):
            dicom_read.read_xray(out / relative)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo, tmp_path):
    out, _, _ = demo
    write_demo_dataset(tmp_path / "again", n=N, seed=SEED, size=SIZE)
    assert _tree(tmp_path / "again") == _tree(out)
    write_demo_dataset(tmp_path / "other", n=N, seed=SEED + 1, size=SIZE)
    other = _tree(tmp_path / "other")
    assert set(other).isdisjoint(set(_tree(out)) - {"train-rle.csv"})
    assert other["train-rle.csv"] != _tree(out)["train-rle.csv"]


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "raw"
    write_demo_dataset(out, n=6, seed=0, size=SIZE)
    with pytest.raises(OutputError, match="--overwrite"):
        write_demo_dataset(out, n=6, seed=0, size=SIZE)
    (out / "keep.txt").write_text("mine")
    summary = write_demo_dataset(out, n=3, seed=1, size=SIZE, overwrite=True)
    # The old images are gone (no stale files), unrelated files are kept.
    assert len(list(out.rglob("*.dcm"))) == 3 + summary.corrupted
    assert (out / "keep.txt").read_text() == "mine"
    assert len((out / "train-rle.csv").read_text().splitlines()) == 1 + summary.rle_rows


# --- the command -----------------------------------------------------------------------------


def test_cli_writes_the_layout_and_reports_json(tmp_path):
    out = tmp_path / "raw"
    result = runner.invoke(
        app, ["demo-data", str(out), "--n", "12", "--size", "128", "--seed", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 12 and report["positives"] == 3 and report["corrupted"] == 4
    assert len(list((out / "dicom-images-train").glob("*/*/*.dcm"))) == 16
    assert (out / "train-rle.csv").read_text().startswith("ImageId, EncodedPixels\n")
    again = runner.invoke(app, ["demo-data", str(out), "--n", "12", "--size", "128"])
    assert again.exit_code == 1
    assert "--overwrite" in again.output


@pytest.mark.parametrize(
    "args", [["--n", "0"], ["--size", "64"], ["--seed", "-1"], ["--n", "many"]]
)
def test_cli_bad_arguments_exit_2(tmp_path, args):
    result = runner.invoke(app, ["demo-data", str(tmp_path / "raw"), *args])
    assert result.exit_code == 2
    assert not (tmp_path / "raw").exists()
