"""Image steps (crop, masks, restore) and `run_preprocess` end to end on real and fake data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import ConfigError, InputError, OutputError, RleError
from pneumo_cli.core.files import read_grey_png, read_mask_png, write_mask_png
from pneumo_cli.data.cache import MANIFEST_COLUMNS, load_cache_settings, load_manifest
from pneumo_cli.data.imaging import (
    Box,
    detect_crop,
    prepare_image,
    prepare_mask,
    restore_to_original,
)
from pneumo_cli.data.preprocess import run_preprocess
from pneumo_cli.io.dicom_read import read_xray
from pneumo_cli.io.dicom_write import write_dicom
from pneumo_cli.io.rle import decode_union, encode_rle, read_rle_csv
from tests.conftest import REAL_TRAIN_AREAS

REPO = Path(__file__).resolve().parents[1]
UID_6904 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"


def _link_tree(source: Path, target: Path) -> None:
    """Mirror ``source`` under ``target`` with symlinked files (the fixtures are never copied)."""
    for path in source.rglob("*"):
        if path.is_file():
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)


@pytest.fixture(scope="module")
def siim_raw(siim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("siim_raw")
    _link_tree(siim / "dicom-images-train", raw / "dicom-images-train")
    _link_tree(siim / "dicom-odd", raw / "dicom-odd")
    return raw


@pytest.fixture(scope="module")
def siim_cache(siim_raw: Path, real_rle_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("siim") / "cache"
    summary = run_preprocess(siim_raw, cache, PreprocessConfig(), rle_csv=real_rle_csv, workers=2)
    return cache, summary


def _fake_xray(rng: np.random.Generator, size: int = 256, border: int = 0) -> np.ndarray:
    """A smooth, non-constant uint8 picture with an optional black border."""
    noise = rng.random((size // 8, size // 8)).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(40 + image * 180, 0, 255).astype(np.uint8)
    if border:
        image[:border], image[:, :border] = 0, 0
    return image


# --- image steps ---------------------------------------------------------------------------------


def test_detect_crop_finds_the_dark_border_only() -> None:
    image = np.full((40, 30), 120, dtype=np.uint8)
    image[:2] = 0
    image[:, -3:] = 5
    image[20] = 0  # a dark row inside the picture is kept
    assert detect_crop(image, threshold=10) == (2, 40, 0, 27)
    assert detect_crop(np.zeros((40, 30), np.uint8)) == (0, 40, 0, 30)


def test_detect_crop_on_real_stage2_borders(siim: Path) -> None:
    left_border = read_xray(siim / "dicom-odd" / "stage2_ID_0011fe81e.dcm").image
    assert detect_crop(left_border) == (0, 1024, 24, 1024)
    right_border = read_xray(siim / "dicom-odd" / "stage2_ID_004d6fbb6.dcm").image
    assert detect_crop(right_border) == (0, 1023, 1, 1003)


def test_prepare_mask_keeps_areas_and_thin_lines() -> None:
    settings = PreprocessConfig(image_size=256)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[100:612, 200:712] = 1  # 512 x 512, aligned to the 4 x 4 bins
    mask[800:1000, 900] = 1  # one pixel wide: half coverage would erase it
    small = prepare_mask(mask, (0, 1024, 0, 1024), settings)
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert small[25:153, 50:178].all() and small[:, :200].sum() == 128 * 128
    assert small[200:250, 225].all() and small[:, 225].sum() == 50


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """A {0,1} disc: pixels whose centre (row + 0.5, col + 0.5) is within ``radius``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Mean position of the foreground pixels' centres, (row, col)."""
    return np.array(np.nonzero(mask), dtype=np.float64).mean(axis=1) + 0.5


@pytest.mark.parametrize(
    ("crop", "size"),
    [
        ((100, 300, 150, 350), 256),  # 200 x 200 box enlarged to 256
        ((10, 1010, 100, 900), 1024),  # a bordered X-ray at the winners' 1024 px
        ((50, 250, 100, 400), 256),  # taller side enlarged, wider side shrunk
        ((0, 1024, 0, 1024), 256),  # shrunk
    ],
)
def test_prepare_mask_keeps_a_disc_in_place(crop: Box, size: int) -> None:
    top, bottom, left, right = crop
    height, width = bottom - top, right - left
    rng = np.random.default_rng(6)
    shifts = []
    for _ in range(8):
        centre = (top + height * rng.uniform(0.3, 0.7), left + width * rng.uniform(0.3, 0.7))
        radius = min(height, width) * rng.uniform(0.12, 0.25)
        mask = _disc((1024, 1024), centre, radius)
        small = prepare_mask(mask, crop, PreprocessConfig(image_size=size))
        # The cached mask's centroid mapped back to original pixels, against the drawn disc's;
        # the shift is measured in cached pixels.
        back = np.array([top, left]) + _centroid(small) * [height / size, width / size]
        shifts.append((back - _centroid(mask)) * [size / height, size / width])
        # The disc drawn directly at the cached size, where the image's pixels are.
        cached_centre = ((centre[0] - top) * size / height, (centre[1] - left) * size / width)
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        aligned = ((rows - cached_centre[0]) * height / size) ** 2 + (
            (cols - cached_centre[1]) * width / size
        ) ** 2 <= radius**2
        dice = 2 * (aligned & (small > 0)).sum() / (aligned.sum() + small.sum())
        assert dice >= 0.99, (centre, radius, dice)
    shifts = np.array(shifts)
    # Nearest-neighbour resizing moved every disc ~0.45 px down and right; what is left is the
    # rasterisation noise of single discs, which averages out.
    assert np.abs(shifts.mean(axis=0)).max() <= 0.05, shifts.mean(axis=0)
    assert np.abs(shifts).max() <= 0.2, shifts


def test_restore_to_original_undoes_crop_and_resize() -> None:
    crop = (10, 110, 20, 220)  # 100 x 200 box in a 128 x 256 image
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    restored = restore_to_original(mask, crop, (128, 256), is_mask=True)
    assert restored.shape == (128, 256) and restored.dtype == np.uint8
    assert restored[35:85, 70:170].all() and restored.sum() == 50 * 100
    probability = restore_to_original(np.full((64, 64), 0.75), crop, (128, 256), is_mask=False)
    assert probability.dtype == np.float32
    assert probability[10:110, 20:220].min() == pytest.approx(0.75)
    assert probability.sum() == pytest.approx(0.75 * 100 * 200)


def test_prepare_image_records_crop_and_shape() -> None:
    image = _fake_xray(np.random.default_rng(0), 300, border=12)
    prepared = prepare_image(image, PreprocessConfig(image_size=64))
    assert prepared.image.shape == (64, 64) and prepared.image.dtype == np.uint8
    assert prepared.crop == (12, 300, 12, 300) and prepared.original_shape == (300, 300)


# --- real SIIM files end to end ------------------------------------------------------------------


def test_real_files_exact_counts(siim_cache) -> None:
    cache, summary = siim_cache
    assert (summary.images, summary.rejected) == (8, 1)
    assert (summary.positive, summary.negative, summary.unlabelled) == (2, 1, 5)
    assert len(summary.labels_without_image) == 12047 - 3
    assert summary.rejected_examples[0][0] == "dicom-odd/monochrome1_same_uid_as_6904.dcm"
    assert UID_6904 in summary.rejected_examples[0][1]
    assert "dicom-images-train/" in summary.rejected_examples[0][1]  # names the first file
    rejected = (cache / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "path,reason" and len(rejected) == 2


def test_real_files_manifest(siim_cache) -> None:
    cache, _ = siim_cache
    manifest = load_manifest(cache)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    rows = manifest.set_index("ImageId")
    for image_id, area in REAL_TRAIN_AREAS.items():
        assert rows.loc[image_id, "mask_area_px"] == area
        assert rows.loc[image_id, "has_pneumothorax"] == int(area > 0)
    stage2 = rows.loc["stage2_ID_0011fe81e"]
    assert stage2["mask"] == "" and stage2["patient_key"] == "" and stage2["sex"] == "F"
    assert (stage2["crop_left"], stage2["crop_right"], stage2["orig_width"]) == (24, 1024, 1024)
    assert set(manifest["split"]) <= {"train", "val", "test"}
    assert set(manifest["fold"]) == {-1}
    text = (cache / "manifest.csv").read_text()
    assert "97d32841-8836-4630-873c-be0b4d2e5478" not in text  # the raw PatientID
    assert load_cache_settings(cache) == PreprocessConfig()


def test_real_positive_masks_keep_area_and_place(siim_cache, real_rle_csv: Path) -> None:
    cache, _ = siim_cache
    rows = read_rle_csv(real_rle_csv)
    for image_id, area in REAL_TRAIN_AREAS.items():
        small = read_mask_png(cache / "masks" / f"{image_id}.png")
        assert small.shape == (256, 256)
        expected = area / 16
        assert abs(int(small.sum()) - expected) <= max(2, 0.05 * expected)
        if area:
            original = decode_union([r.encoded for r in rows if r.image_id == image_id])
            # Every stored pixel covers at least one original mask pixel (4 x 4 bins).
            touched = original.reshape(256, 4, 256, 4).max(axis=(1, 3))
            assert not (small & (1 - touched)).any()


def test_monochrome1_copy_comes_out_inverted_before_clahe(
    siim: Path, real_train_dicoms: dict[str, Path], tmp_path: Path
) -> None:
    settings = PreprocessConfig(image_size=256, clahe=False, crop_border=False)
    images = []
    for name, source in [
        ("orig", real_train_dicoms[UID_6904]),
        ("mono1", siim / "dicom-odd" / "monochrome1_same_uid_as_6904.dcm"),
    ]:
        raw = tmp_path / f"raw_{name}"
        raw.mkdir()
        (raw / source.name).symlink_to(source)
        run_preprocess(raw, tmp_path / f"cache_{name}", settings, workers=1)
        images.append(read_grey_png(tmp_path / f"cache_{name}" / "images" / f"{source.stem}.png"))
    difference = np.abs(images[1].astype(int) - (255 - images[0].astype(int)))
    assert difference.max() <= 1  # area averaging rounds each copy separately


def test_rerun_reuses_everything_and_other_settings_are_refused(
    siim_cache, siim_raw: Path, real_rle_csv: Path
) -> None:
    cache, _ = siim_cache
    before = (cache / "manifest.csv").read_bytes()
    again = run_preprocess(siim_raw, cache, PreprocessConfig(), rle_csv=real_rle_csv, workers=1)
    assert (again.processed, again.reused) == (0, 8)
    assert (cache / "manifest.csv").read_bytes() == before
    with pytest.raises(ConfigError, match="image_size 256 -> 128.*--overwrite"):
        run_preprocess(siim_raw, cache, PreprocessConfig(image_size=128), rle_csv=real_rle_csv)
    with pytest.raises(ConfigError, match="label input"):
        run_preprocess(siim_raw, cache, PreprocessConfig())


# --- --downscale-first ---------------------------------------------------------------------------


def test_reduction_is_the_largest_power_of_two_keeping_the_shorter_side() -> None:
    from pneumo_cli.core.image_files import reduced_shape, reduction_for

    assert reduction_for((1024, 1024), 512) == 2
    assert reduction_for((1024, 1024), 128) == 8
    assert reduction_for((1024, 1024), 1025) == 1
    assert reduction_for((1023, 1017), 512) == 1  # 509 px at 1/2: too short
    assert reduction_for((1000, 3000), 250) == 4
    assert reduction_for((4096, 4096), None) == 1
    assert reduced_shape((1023, 1017), 2) == (512, 509)  # rounded up, like a JPEG decoder


def test_real_jpeg_dicom_decodes_at_reduced_scale(
    real_train_dicoms: dict[str, Path], tmp_path: Path
) -> None:
    path = real_train_dicoms[UID_6904]
    whole = read_xray(path)
    half = read_xray(path, min_side=512)
    assert (whole.reduction, whole.original_shape, whole.image.shape) == (1,) + ((1024, 1024),) * 2
    assert (half.reduction, half.original_shape, half.image.shape) == (2, (1024, 1024), (512, 512))
    assert (half.meta["rows"], half.meta["cols"]) == (1024, 1024)
    assert half.image_id == whole.image_id
    assert [read_xray(path, min_side=side).reduction for side in (256, 1024)] == [4, 1]
    area = cv2.resize(whole.image, (512, 512), interpolation=cv2.INTER_AREA).astype(int)
    difference = np.abs(half.image.astype(int) - area)
    assert difference.mean() < 0.5 and difference.max() <= 8  # DCT scaling ~ block means
    # Uncompressed and padded images are decoded whole: padding must be seen value by value.
    pixels = _fake_xray(np.random.default_rng(3), 512)
    write_dicom(tmp_path / "raw.dcm", pixels, jpeg=False)
    write_dicom(tmp_path / "padded.dcm", pixels, extra={"PixelPaddingValue": 0})
    write_dicom(tmp_path / "jpeg.dcm", pixels)
    found = {name: read_xray(tmp_path / f"{name}.dcm", min_side=128).reduction
             for name in ("raw", "padded", "jpeg")}  # fmt: skip
    assert found == {"raw": 1, "padded": 1, "jpeg": 4}


def _smooth_xray(height: int, width: int) -> np.ndarray:
    """A uint8 X-ray-like image of any size: a dark border, a lit body with slow gradients, and
    bright blocks near every corner (so a shift, a flip or a rotation shows)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 90 + 60 * np.sin(rows / 97.0) * np.cos(cols / 131.0) + 40 * cols / width
    image[: height // 20], image[:, : width // 25] = 0, 0  # a black border to crop
    for top, left in ((0.1, 0.1), (0.1, 0.8), (0.75, 0.15), (0.8, 0.85)):
        top, left = int(top * height), int(left * width)
        image[top : top + height // 12, left : left + width // 14] = 245
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(2001, 2501), (4095, 4097)])
def test_an_xray_shrunk_whole_matches_its_reduced_jpeg_decode_at_odd_sizes(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    """libjpeg's 1/f decode averages exact f x f blocks, the last ones padded by their edge; the
    area shrink of a whole image (PNG, uncompressed or padded DICOM) must do the same, or the
    two drift apart towards the far corner when a side is not a multiple of f."""
    # Without CLAHE, which turns a one-level difference into several, so a drift stands out.
    fast = PreprocessConfig(downscale_first=True, clahe=False)
    path = tmp_path / "odd.dcm"
    write_dicom(path, _smooth_xray(*shape))
    whole, small = read_xray(path), read_xray(path, min_side=512)
    assert small.reduction == {(2001, 2501): 2, (4095, 4097): 8}[shape]
    decoded = prepare_image(
        small.image, fast, reduction=small.reduction, original_shape=small.original_shape
    )
    shrunk = prepare_image(whole.image, fast)
    assert decoded.crop == shrunk.crop
    difference = np.abs(decoded.image.astype(int) - shrunk.image)
    # Block means round alike but for rounding (a level at most); a drift of a fraction of a
    # small pixel moved the bright blocks' edges by 17 (1/2 scale) and 64 levels (1/8).
    assert difference.max() <= 2 and difference.mean() < 0.3, (difference.max(), difference.mean())


def test_an_exif_orientation_in_a_jpeg_frame_is_ignored_at_every_scale(tmp_path: Path) -> None:
    """DICOM says how an image is oriented; a stray EXIF Orientation tag inside the JPEG frame
    must not turn the reduced decode (OpenCV applies EXIF there by default) against the whole."""
    from pydicom.encaps import encapsulate, generate_frames

    path = tmp_path / "exif.dcm"
    write_dicom(path, _smooth_xray(1024, 1024))
    # An APP1 Exif segment right after the start of the image: little-endian TIFF, one IFD entry,
    # Orientation (0x0112), SHORT, value 3 (rotated 180 degrees).
    tiff = b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x03\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00"
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:2] + app1 + frame[2:]])
    ds.save_as(path)
    whole = read_xray(path)
    for min_side in (512, 256, 128):
        small = read_xray(path, min_side=min_side)
        assert small.reduction == 1024 // min_side
        area = cv2.resize(whole.image, small.image.shape[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(small.image.astype(int) - area).mean() < 1.0, min_side


def test_downscale_first_prepares_every_source_of_an_xray_alike(
    real_train_dicoms: dict[str, Path], siim: Path
) -> None:
    from pneumo_cli.data.imaging import decoded_min_side

    fast = PreprocessConfig(downscale_first=True)
    default = PreprocessConfig()
    paths = [*real_train_dicoms.values(), siim / "dicom-odd" / "stage2_ID_0011fe81e.dcm"]
    for path in paths:
        whole = read_xray(path)
        small = read_xray(path, min_side=decoded_min_side(fast))
        decoded = prepare_image(
            small.image, fast, reduction=small.reduction, original_shape=small.original_shape
        )
        shrunk = prepare_image(whole.image, fast)  # the full image, shrunk by area averaging
        paper = prepare_image(whole.image, default)
        assert decoded.crop == shrunk.crop and decoded.original_shape == (1024, 1024)
        assert all(abs(a - b) <= 2 for a, b in zip(decoded.crop, paper.crop, strict=True))
        assert np.abs(decoded.image.astype(int) - shrunk.image).mean() < 1.5
        # The other order of CLAHE and resizing gives other pixels: the setting is not a no-op.
        assert np.abs(decoded.image.astype(int) - paper.image).mean() > 2
    with pytest.raises(ValueError, match="does not fit these settings"):
        prepare_image(small.image, default, reduction=2, original_shape=(1024, 1024))
    with pytest.raises(ValueError, match="does not fit these settings"):
        prepare_image(small.image[:100], fast, reduction=2, original_shape=(1024, 1024))


def test_downscale_first_cache_matches_what_predict_prepares(
    siim_raw: Path, real_rle_csv: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from pneumo_cli.cli.main import app
    from pneumo_cli.inference.sources import file_loader

    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        app,
        ["preprocess", str(siim_raw), str(cache), "--rle", str(real_rle_csv), "--downscale-first",
         "-j", "1", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = load_cache_settings(cache)
    assert settings == PreprocessConfig(downscale_first=True)
    rows = load_manifest(cache).set_index("ImageId")
    for image_id, area in REAL_TRAIN_AREAS.items():
        assert rows.loc[image_id, "mask_area_px"] == area  # masks stay at original resolution
    stage2 = rows.loc["stage2_ID_0011fe81e"]
    assert (stage2["orig_height"], stage2["orig_width"]) == (1024, 1024)
    assert abs(stage2["crop_left"] - 24) <= 2 and stage2["crop_right"] == 1024
    load = file_loader(settings)
    for image_id, row in rows.iterrows():
        item = load(siim_raw / row["source"])
        assert item.image_id == image_id
        cached = read_grey_png(cache / row["image"])
        np.testing.assert_array_equal(item.image, cached)  # predict sees the training pixels
        assert item.crop == tuple(row[f"crop_{s}"] for s in ("top", "bottom", "left", "right"))
    with pytest.raises(ConfigError, match="downscale_first True -> False"):
        run_preprocess(siim_raw, cache, PreprocessConfig(), rle_csv=real_rle_csv)


# --- synthetic files ----------------------------------------------------------------------------


def _synthetic_raw(raw: Path) -> dict[str, np.ndarray]:
    """One file of each kind; returns ImageId -> pixels of the good grey ones."""
    rng = np.random.default_rng(5)
    good = {"plain": _fake_xray(rng, 256, border=8), "nested": _fake_xray(rng, 200)}
    write_dicom(raw / "plain.dcm", good["plain"], patient_id="A")
    (raw / "a" / "b").mkdir(parents=True)
    write_dicom(raw / "a" / "b" / "nested.dcm", good["nested"], patient_id="B")
    stored = (_fake_xray(rng, 160).astype(np.uint16) * 16).astype(np.uint16)
    extra = {"BitsStored": 12, "HighBit": 11, "RescaleSlope": 1, "RescaleIntercept": -1024}
    write_dicom(raw / "wide.dcm", stored, jpeg=False, extra=extra)
    rgb = np.stack([_fake_xray(rng, 160)] * 3, axis=-1)
    write_dicom(raw / "colour.dcm", rgb, jpeg=False, photometric="RGB")
    write_dicom(raw / "cine.dcm", np.stack([_fake_xray(rng, 160)] * 2), jpeg=False)
    write_dicom(raw / "whole.dcm", _fake_xray(rng, 256))
    data = (raw / "whole.dcm").read_bytes()
    (raw / "whole.dcm").unlink()
    (raw / "truncated.dcm").write_bytes(data[: len(data) // 2])
    write_dicom(raw / "flat.dcm", np.full((160, 160), 77, np.uint8), jpeg=False)
    write_dicom(raw / "tiny.dcm", _fake_xray(rng, 64), jpeg=False)
    (raw / "readme.txt").write_text("not an image")
    return good


def test_synthetic_kinds_are_cached_or_rejected_with_reasons(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _synthetic_raw(raw)
    cache = tmp_path / "cache"
    summary = run_preprocess(raw, cache, PreprocessConfig(image_size=64), workers=1)
    assert summary.images == 4
    manifest = load_manifest(cache)
    assert list(manifest["ImageId"]) == ["colour", "nested", "plain", "wide"]
    assert manifest.set_index("ImageId").loc["nested", "source"] == "a/b/nested.dcm"
    assert manifest.set_index("ImageId").loc["plain", "crop_top"] == 8
    reasons = dict(
        line.split(",", 1) for line in (cache / "rejected.csv").read_text().split("\n")[1:-1]
    )
    assert set(reasons) == {"cine.dcm", "flat.dcm", "tiny.dcm", "truncated.dcm"}
    assert "multi-frame" in reasons["cine.dcm"]
    assert reasons["flat.dcm"].startswith("constant image")
    assert reasons["tiny.dcm"].startswith("too small (64x64 px")
    assert "pixel data" in reasons["truncated.dcm"]
    with pytest.raises(InputError, match="4 file.s. rejected and --strict"):
        run_preprocess(raw, cache, PreprocessConfig(image_size=64), workers=1, strict=True)
    with pytest.raises(InputError, match="unfinished cache"):
        load_manifest(cache)


def test_masks_folder_and_wrong_sizes(tmp_path: Path) -> None:
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    raw.mkdir(), masks.mkdir()
    rng = np.random.default_rng(1)
    write_dicom(raw / "one.dcm", _fake_xray(rng, 256))
    write_dicom(raw / "two.dcm", _fake_xray(rng, 256))
    mask = np.zeros((256, 256), np.uint8)
    mask[64:128, 32:96] = 1
    write_mask_png(masks / "one.png", mask)
    write_mask_png(masks / "ghost.png", mask)
    summary = run_preprocess(
        raw, tmp_path / "c1", PreprocessConfig(image_size=128), masks_dir=masks
    )
    assert (summary.positive, summary.unlabelled, summary.labels_without_image) == (1, 1, ["ghost"])
    assert load_manifest(tmp_path / "c1").set_index("ImageId").loc["one", "mask_area_px"] == 4096
    write_mask_png(masks / "two.png", np.zeros((100, 256), np.uint8))
    with pytest.raises(InputError, match=r"two.png is 256x100 but its image two.dcm is 256x256"):
        run_preprocess(raw, tmp_path / "c2", PreprocessConfig(), masks_dir=masks)
    assert not (tmp_path / "c2").exists()


def test_rle_for_another_image_size_is_an_error_before_writing(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_dicom(raw / "img1.dcm", _fake_xray(np.random.default_rng(2), 256))
    big = np.zeros((512, 512), np.uint8)
    big[400:500, 400:500] = 1
    (tmp_path / "rle.csv").write_text(f"ImageId,EncodedPixels\nimg1,{encode_rle(big)}\nzzz,-1\n")
    with pytest.raises(RleError, match=r"line 2 \(ImageId 'img1'\).*image img1.dcm \(256x256\)"):
        run_preprocess(raw, tmp_path / "cache", PreprocessConfig(), rle_csv=tmp_path / "rle.csv")
    assert not (tmp_path / "cache").exists()


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not a folder"):
        run_preprocess(tmp_path / "missing", tmp_path / "cache", PreprocessConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no DICOM, PNG or JPEG files"):
        run_preprocess(tmp_path / "empty", tmp_path / "cache", PreprocessConfig())
    with pytest.raises(OutputError, match="inside input folder"):
        run_preprocess(tmp_path / "empty", tmp_path / "empty" / "cache", PreprocessConfig())
    assert not (tmp_path / "cache").exists() and not (tmp_path / "empty" / "cache").exists()


def test_grown_raw_dir_keeps_earlier_splits(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        write_dicom(raw / f"a{i:02d}.dcm", _fake_xray(rng, 160), jpeg=False)
    settings = PreprocessConfig(image_size=32, folds=3)
    run_preprocess(raw, tmp_path / "cache", settings, workers=1)
    before = load_manifest(tmp_path / "cache").set_index("ImageId")[["split", "fold"]]
    for i in range(12):
        write_dicom(raw / f"b{i:02d}.dcm", _fake_xray(rng, 160), jpeg=False)
    summary = run_preprocess(raw, tmp_path / "cache", settings, workers=1)
    assert (summary.processed, summary.reused, summary.images) == (12, 12, 24)
    after = load_manifest(tmp_path / "cache").set_index("ImageId")[["split", "fold"]]
    assert after.loc[before.index].equals(before)


def test_overwrite_rebuilds_with_new_settings(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_dicom(raw / "x.dcm", _fake_xray(np.random.default_rng(4), 200), jpeg=False)
    run_preprocess(raw, tmp_path / "cache", PreprocessConfig(image_size=64), workers=1)
    settings = replace(PreprocessConfig(), image_size=32)
    summary = run_preprocess(raw, tmp_path / "cache", settings, workers=1, overwrite=True)
    assert summary.processed == 1
    assert read_grey_png(tmp_path / "cache" / "images" / "x.png").shape == (32, 32)
    assert load_cache_settings(tmp_path / "cache").image_size == 32


# --- kill -9 and resume -------------------------------------------------------------------------


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(cache)): path.read_bytes()
        for path in sorted(cache.rglob("*"))
        if path.is_file()
    }


def test_killed_run_resumes_to_the_same_cache_as_a_clean_run(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(6)
    rows = ["ImageId,EncodedPixels"]
    for i in range(40):
        image = _fake_xray(rng, 768, border=16)
        write_dicom(raw / f"s{i:02d}.dcm", image, patient_id=f"P{i % 30}")
        mask = np.zeros((768, 768), np.uint8)
        if i % 3 == 0:
            mask[100 + i : 300 + i, 200:260] = 1
        rows.append(f"s{i:02d},{encode_rle(mask)}")
    (tmp_path / "rle.csv").write_text("\n".join(rows) + "\n")
    command = [
        sys.executable, "-m", "pneumo_cli", "preprocess", str(raw), "CACHE",
        "--rle", str(tmp_path / "rle.csv"), "--workers", "1", "--quiet", "--folds", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [killed if arg == "CACHE" else arg for arg in command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = killed / "records"
        if records.is_dir() and len(list(records.glob("*.json"))) >= 5:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.csv").exists(), "the run finished before it could be killed"
    done = subprocess.run(
        [killed if arg == "CACHE" else arg for arg in command], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    clean = tmp_path / "clean"
    subprocess.run([clean if arg == "CACHE" else arg for arg in command], env=env, check=True)
    assert _cache_files(killed) == _cache_files(clean)


# --- command line -------------------------------------------------------------------------------


def test_cli_json_summary_and_one_line_errors(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from pneumo_cli.cli.main import app

    raw = tmp_path / "raw"
    raw.mkdir()
    write_dicom(raw / "x.dcm", _fake_xray(np.random.default_rng(7), 200), jpeg=False)
    runner = CliRunner()
    cache = str(tmp_path / "cache")
    result = runner.invoke(
        app, ["preprocess", str(raw), cache, "--image-size", "32", "-j", "1", "--json", "-q"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["splits"]) == (1, {"train": 1, "val": 0, "test": 0})
    result = runner.invoke(app, ["preprocess", str(raw), cache, "-j", "1", "-q"])
    assert result.exit_code == 1
    assert "other settings (image_size 32 -> 256)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["preprocess", str(raw), cache, "--rle", "a", "--masks", "b"])
    assert result.exit_code == 2


def test_truth_csv_holds_original_resolution_masks(siim_cache, real_rle_csv: Path) -> None:
    cache, _ = siim_cache
    truth = {row.image_id: row.encoded for row in read_rle_csv(cache / "truth.csv")}
    assert set(truth) == set(REAL_TRAIN_AREAS)  # labelled images only
    rows = read_rle_csv(real_rle_csv)
    for image_id, area in REAL_TRAIN_AREAS.items():
        original = decode_union([r.encoded for r in rows if r.image_id == image_id])
        np.testing.assert_array_equal(decode_union([truth[image_id]]), original)
        assert int(original.sum()) == area


def test_file_names_with_spaces_unicode_commas_and_dashes_are_cached(tmp_path: Path) -> None:
    import csv
    import json

    from typer.testing import CliRunner

    from pneumo_cli.cli.main import app

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(9)
    names = ["chest one", "-x", "Müller ß 日本", "naïve,comma", "a..b"]
    for name in names[:-1]:
        write_dicom(raw / f"{name}.dcm", _fake_xray(rng, 128), jpeg=False)
    write_png_file = raw / "a..b.png"
    cv2.imencode(".png", _fake_xray(rng, 128))[1].tofile(write_png_file)
    write_dicom(raw / "tab\there.dcm", _fake_xray(rng, 128), jpeg=False)  # a control character
    write_dicom(raw / os.fsdecode(b"caf\xe9.dcm"), _fake_xray(rng, 128), jpeg=False)  # Latin-1
    mask = np.zeros((128, 128), np.uint8)
    mask[40:60, 30:70] = 1
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows([[n, encode_rle(mask)] for n in ("chest one", "naïve,comma")])
        writer.writerows([[n, "-1"] for n in ("-x", "Müller ß 日本", "a..b")])
    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        app, ["preprocess", str(raw), str(cache), "--rle", str(labels), "--image-size", "32",
              "-j", "1", "-q", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["positive"], summary["negative"]) == (5, 2, 3)
    assert summary["labels_without_image"] == []
    manifest = load_manifest(cache).set_index("ImageId")
    assert sorted(manifest.index) == sorted(names)
    assert manifest.loc["naïve,comma", "mask_area_px"] == 800
    for name in names:
        assert (cache / "images" / f"{name}.png").is_file()
    truth = {row.image_id: row.encoded for row in read_rle_csv(cache / "truth.csv")}
    assert truth == {n: encode_rle(mask) if n in ("chest one", "naïve,comma") else "-1"
                     for n in names}  # fmt: skip
    with open(cache / "rejected.csv", newline="", encoding="utf-8") as handle:
        rejected = list(csv.DictReader(handle))
    assert [r["path"] for r in rejected] == ["caf\\udce9.dcm", "tab\there.dcm"]
    assert "cannot be a file name: it holds bytes that are not UTF-8" in rejected[0]["reason"]
    assert "cannot be a file name: it contains U+0009" in rejected[1]["reason"]
    assert "the rule: any characters but '/'" in rejected[1]["reason"]


SAMPLE_AREAS = {  # real dicom-sample files and their union mask areas (siim README)
    "1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027": 0,
    "1.2.276.0.7230010.3.1.4.8323329.12743.1517875241.599591": 2071,
    "1.2.276.0.7230010.3.1.4.8323329.1314.1517875167.222290": 29079,
    "1.2.276.0.7230010.3.1.4.8323329.4440.1517875182.865105": 2486,
}


def _write_dicomdir(files: list[Path], folder: Path) -> None:
    """Write ``files`` as a DICOM File-set (DICOMDIR + PT*/ST*/SE*/IM*), as a CD or a PACS
    export holds them. The SIIM headers lack the study fields a DICOMDIR record needs; those
    are filled in, pixels and UIDs are left alone."""
    import pydicom
    from pydicom.fileset import FileSet

    file_set = FileSet()
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in (("StudyID", "1"), ("StudyDate", "20190101"),
                               ("StudyTime", "000000"), ("SeriesNumber", 1),
                               ("InstanceNumber", 1)):  # fmt: skip
            if not str(ds.get(keyword, "") or "").strip():
                setattr(ds, keyword, value)
        file_set.add(ds)
    file_set.write(folder)


def test_dicomdir_layout_is_cached_by_sop_instance_uid(
    siim: Path, real_rle_csv: Path, tmp_path: Path
) -> None:
    files = sorted((siim / "dicom-images-train").rglob("*.dcm"))
    files += [siim / "dicom-sample" / f"{uid}.dcm" for uid in SAMPLE_AREAS]
    raw = tmp_path / "cd"
    _write_dicomdir(files, raw)
    names = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    assert names[0] == "DICOMDIR" and all(n.endswith("/IM000000") for n in names[1:])
    assert len(names) == 8
    cache = tmp_path / "cache"
    summary = run_preprocess(raw, cache, PreprocessConfig(image_size=64), rle_csv=real_rle_csv)
    areas = {**REAL_TRAIN_AREAS, **SAMPLE_AREAS}
    assert (summary.images, summary.rejected, summary.positive) == (7, 0, 5)
    assert set(areas).isdisjoint(summary.labels_without_image)
    assert len(summary.labels_without_image) == 12047 - 7
    manifest = load_manifest(cache).set_index("ImageId")
    assert dict(manifest["mask_area_px"]) == areas
    assert all(manifest.loc[uid, "source"].endswith("/IM000000") for uid in areas)
    assert sorted(p.stem for p in (cache / "images").iterdir()) == sorted(areas)
    again = run_preprocess(raw, cache, PreprocessConfig(image_size=64), rle_csv=real_rle_csv)
    assert (again.processed, again.reused) == (0, 7)


def test_image_ids_fall_back_to_the_uid_and_duplicates_are_judged_by_it(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rng = np.random.default_rng(4)
    for folder, uid in (("a", "1.2.3.1"), ("b", "1.2.3.2"), ("c", "1.2.3.1")):
        (raw / folder).mkdir(parents=True)
        write_dicom(raw / folder / "1.dcm", _fake_xray(rng, 128), jpeg=False, sop_uid=uid)
    summary = run_preprocess(raw, tmp_path / "cache", PreprocessConfig(image_size=32))
    # a/1.dcm keeps its name; b/1.dcm's name is taken, so its UID names it; c/1.dcm repeats
    # a/1.dcm's SOPInstanceUID: the same image, a duplicate.
    manifest = load_manifest(tmp_path / "cache")
    assert dict(zip(manifest["ImageId"], manifest["source"], strict=True)) == {
        "1": "a/1.dcm", "1.2.3.2": "b/1.dcm",
    }  # fmt: skip
    assert summary.rejected_examples == [
        ("c/1.dcm", "duplicate: ImageId/SOPInstanceUID '1.2.3.1' is already a/1.dcm")
    ]


def test_a_constant_16_bit_image_is_reported_with_its_stored_value(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    flat = np.full((160, 160), 77, np.uint16)
    write_dicom(raw / "flat16.dcm", flat, jpeg=False, extra={"BitsStored": 12, "HighBit": 11})
    cv2.imwrite(str(raw / "flat16b.png"), flat)  # a 16-bit PNG: 77 >> 8 is 0
    ramp = np.tile(np.arange(160, dtype=np.uint16) * 20, (160, 1))
    extra = {"WindowCenter": 10_000, "WindowWidth": 10}  # every value far below the window
    write_dicom(raw / "dark.dcm", ramp, jpeg=False, extra=extra)
    write_dicom(raw / "ok.dcm", _fake_xray(np.random.default_rng(8), 160), jpeg=False)
    summary = run_preprocess(raw, tmp_path / "cache", PreprocessConfig(image_size=32))
    reasons = dict(summary.rejected_examples)
    assert reasons == {
        "flat16.dcm": "constant image (every stored pixel value is 77); nothing to learn",
        "flat16b.png": "constant image (every stored pixel value is 77); nothing to learn",
        "dark.dcm": "constant image once converted to 8 bits (every pixel is 0, from stored "
        "values 0..3180: see its window or padding); nothing to learn",
    }
