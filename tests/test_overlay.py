"""Tests for pneumo_cli.overlay and `pneumo overlay`: exact pixels, real SIIM files, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.files import write_mask_png, write_png
from pneumo_cli.io import rle
from pneumo_cli.io.dicom_read import read_xray
from pneumo_cli.io.xrays import collect_xray_files
from pneumo_cli.overlay.render import (
    FILL_ALPHA_PCT,
    PRED_COLOR_BGR,
    TRUTH_COLOR_BGR,
    contour_thickness_px,
    format_title,
    mask_contour,
    panel_layout,
    render_overlay,
    render_panels,
)
from pneumo_cli.overlay.run import load_mask, run_overlay
from tests.conftest import REAL_TRAIN_AREAS

POSITIVE_IDS = [i for i, area in REAL_TRAIN_AREAS.items() if area > 0]
NEGATIVE_ID = next(i for i, area in REAL_TRAIN_AREAS.items() if area == 0)


# ----------------------------------------------------------------------------------------------
# Independent reference: the contour and fill written out with plain numpy.


def expected_contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Mask pixels with a background pixel (or the outside of the image) within ``thickness``
    rows and columns: a square-window minimum computed by shifting a zero-padded copy."""
    on = mask != 0
    padded = np.pad(on, thickness, constant_values=False)
    core = np.ones_like(on)
    height, width = on.shape
    side = 2 * thickness + 1
    for dy in range(side):
        for dx in range(side):
            core &= padded[dy : dy + height, dx : dx + width]
    return on & ~core


def expected_fill(grey: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(N, 3) blended values for grey values (N,), by the documented integer formula."""
    g = grey.astype(np.int64)[:, None]
    c = np.array(color, dtype=np.int64)[None, :]
    return ((g * (100 - FILL_ALPHA_PCT) + c * FILL_ALPHA_PCT + 50) // 100).astype(np.uint8)


def check_overlay_pixels(
    panel: np.ndarray, grey: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]
) -> None:
    """Every changed pixel is in the mask; contour pixels are the colour, fill pixels the blend,
    and every other pixel is the untouched grey X-ray."""
    grey_bgr = np.repeat(grey[:, :, None], 3, axis=2)
    changed = (panel != grey_bgr).any(axis=2)
    np.testing.assert_array_equal(changed, mask != 0)
    contour = expected_contour(mask, contour_thickness_px(*grey.shape))
    is_colour = (panel == np.array(color, dtype=np.uint8)).all(axis=2)
    np.testing.assert_array_equal(is_colour, contour)
    fill = (mask != 0) & ~contour
    np.testing.assert_array_equal(panel[fill], expected_fill(grey[fill], color))


def panels_of(figure: np.ndarray, height: int, width: int, n_panels: int) -> list[np.ndarray]:
    layout = panel_layout(height, width, n_panels)
    assert figure.shape == (layout.height, layout.width, 3)
    panels = []
    for index in range(n_panels):
        top, left = layout.panel_origin(index)
        panels.append(figure[top : top + height, left : left + width])
    return panels


def read_picture(path: Path) -> np.ndarray:
    picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert picture is not None, path
    return picture


# ----------------------------------------------------------------------------------------------
# Drawing: hand-computed cases.


def test_render_overlay_hand_computed_3x3_square() -> None:
    image = np.full((5, 5), 100, dtype=np.uint8)
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[1:4, 1:4] = 1
    out = render_overlay(image, mask, PRED_COLOR_BGR, thickness_px=1)
    # Centre pixel: (100*65 + c*35 + 50) // 100 per channel for c = (0, 94, 213).
    assert out[2, 2].tolist() == [65, 98, 140]
    ring = mask.astype(bool)
    ring[2, 2] = False
    assert (out[ring] == PRED_COLOR_BGR).all()
    assert (out[mask == 0] == 100).all()
    assert out.dtype == np.uint8 and out.shape == (5, 5, 3)


def test_contour_closes_along_the_image_border() -> None:
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[:, :3] = 1  # touches top, bottom and left edges
    contour = mask_contour(mask, 1)
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[[0, 5], :3] = 1
    expected[:, [0, 2]] = 1
    np.testing.assert_array_equal(contour, expected)


def test_render_overlay_matches_reference_on_random_masks() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    mask = np.zeros((64, 48), dtype=np.uint8)
    cv2.circle(mask, (20, 30), 12, 1, -1)
    mask[50:60, 40:48] = 255  # 0/255 masks are foreground too
    mask[5, 5] = 1  # a single pixel is all contour
    check_overlay_pixels(render_overlay(image, mask, TRUTH_COLOR_BGR), image, mask, TRUTH_COLOR_BGR)


def test_empty_mask_leaves_the_xray_grey() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = render_overlay(image, np.zeros((3, 4), np.uint8))
    np.testing.assert_array_equal(out, np.repeat(image[:, :, None], 3, axis=2))


def test_render_overlay_rejects_mismatched_mask() -> None:
    with pytest.raises(InputError, match="shape"):
        render_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))


def test_render_panels_three_and_two_panels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 60), dtype=np.uint8)
    pred = np.zeros_like(image)
    pred[10:40, 10:30] = 1
    truth = np.zeros_like(image)
    truth[20:50, 15:35] = 1
    figure = render_panels(image, pred, truth, "Dice 0.500   x")
    x_ray, pred_panel, truth_panel = panels_of(figure, 80, 60, 3)
    np.testing.assert_array_equal(x_ray, np.repeat(image[:, :, None], 3, axis=2))
    check_overlay_pixels(pred_panel, image, pred, PRED_COLOR_BGR)
    check_overlay_pixels(truth_panel, image, truth, TRUTH_COLOR_BGR)
    layout = panel_layout(80, 60, 3)
    # The title bar carries text (not just background).
    assert len(np.unique(figure[: layout.title_px].reshape(-1, 3), axis=0)) > 2

    two = render_panels(image, pred, None, "no truth")
    panels_of(two, 80, 60, 2)


def test_render_panels_max_size_shrinks_each_panel() -> None:
    image = np.full((400, 300), 90, np.uint8)
    mask = np.zeros_like(image)
    mask[100:200, 100:200] = 1
    figure = render_panels(image, mask, mask, "t", max_size=100)
    layout = panel_layout(100, 75, 3)
    assert figure.shape == (layout.height, layout.width, 3)
    # Small images are never enlarged.
    small = render_panels(image[:50, :40], mask[:50, :40], None, "t", max_size=100)
    assert small.shape[:2] == (panel_layout(50, 40, 2).height, panel_layout(50, 40, 2).width)


def test_format_title_puts_dice_first() -> None:
    assert format_title("abc", 0.70912) == "Dice 0.709   abc"
    assert format_title("abc", None) == "abc"


# ----------------------------------------------------------------------------------------------
# Masks: sizes and file formats.


def test_load_mask_same_size_and_binary_values(tmp_path: Path) -> None:
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 1
    path = tmp_path / "m.png"
    write_png(path, mask)  # a 0/1 PNG, not 0/255
    loaded, stretched = load_mask(path, 6, 8)
    np.testing.assert_array_equal(loaded, mask)
    assert not stretched


def test_load_mask_model_size_is_stretched_with_nearest(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    write_mask_png(path, np.array([[1, 0], [0, 1]], np.uint8))
    loaded, stretched = load_mask(path, 4, 6)
    assert stretched
    expected = np.array([[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2, np.uint8)
    np.testing.assert_array_equal(loaded, expected)


@pytest.mark.parametrize("shape", [(5, 7), (6, 6), (3, 4)])
def test_load_mask_wrong_size_is_refused(tmp_path: Path, shape: tuple[int, int]) -> None:
    path = tmp_path / "m.png"
    write_mask_png(path, np.ones(shape, np.uint8))
    with pytest.raises(InputError, match=r"neither|square model size"):
        load_mask(path, 5, 8)


def test_load_mask_jpeg_uses_threshold_127(tmp_path: Path) -> None:
    grey = np.array([[0, 60, 127, 128, 200, 255]], np.uint8).repeat(8, axis=0).repeat(8, axis=1)
    path = tmp_path / "m.jpg"
    cv2.imwrite(str(path), grey, [cv2.IMWRITE_JPEG_QUALITY, 100])
    decoded = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    loaded, _ = load_mask(path, 8, 48)
    np.testing.assert_array_equal(loaded, (decoded > 127).astype(np.uint8))
    assert loaded[:, 20:24].sum() == 0 and loaded[:, 44:].all()


# ----------------------------------------------------------------------------------------------
# Real SIIM DICOMs with their RLE rows.


@pytest.fixture(scope="module")
def real_truth(real_rle_csv: Path) -> dict[str, np.ndarray]:
    rows = rle.read_rle_csv(real_rle_csv)
    return {
        image_id: rle.decode_union([r.encoded for r in rows if r.image_id == image_id])
        for image_id in REAL_TRAIN_AREAS
    }


def shifted_prediction(mask: np.ndarray) -> np.ndarray:
    """A plausible imperfect prediction: the truth moved 6 rows down and 4 columns right."""
    pred = np.zeros_like(mask)
    pred[6:, 4:] = mask[:-6, :-4]
    return pred


def test_real_dicoms_with_rle_truth_exact_pixels_and_dice(
    tmp_path: Path,
    real_train_dicoms: dict[str, Path],
    real_rle_csv: Path,
    real_truth: dict[str, np.ndarray],
) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    preds = {}
    for image_id in REAL_TRAIN_AREAS:
        preds[image_id] = shifted_prediction(real_truth[image_id])
        write_mask_png(masks / f"{image_id}.png", preds[image_id])
    out = tmp_path / "out"
    calls: list = []

    @contextlib.contextmanager
    def recording(description, total):
        calls.append((description, total))
        yield calls.append

    summary = run_overlay(
        [real_train_dicoms[i] for i in POSITIVE_IDS] + [real_train_dicoms[NEGATIVE_ID]],
        masks,
        out,
        rle_csv=real_rle_csv,
        progress=recording,
    )
    assert (summary.written, summary.skipped, summary.rejected) == (3, 0, [])
    assert calls == [("overlay", 3), 1, 1, 1]
    assert summary.stretched_masks == 0 and summary.without_truth == 0
    results = {r.image_id: r for r in summary.results}
    for image_id in POSITIVE_IDS:
        truth, pred = real_truth[image_id], preds[image_id]
        assert int(truth.sum()) == REAL_TRAIN_AREAS[image_id]
        grey = read_xray(real_train_dicoms[image_id]).image
        assert grey.shape == (1024, 1024)
        overlap = int((truth & pred).sum())
        dice = 2 * overlap / (int(truth.sum()) + int(pred.sum()))
        assert 0.5 < dice < 0.99  # neither trivial nor perfect
        assert results[image_id].dice == pytest.approx(dice, abs=1e-12)

        figure = read_picture(out / f"{image_id}.png")
        x_ray, pred_panel, truth_panel = panels_of(figure, 1024, 1024, 3)
        np.testing.assert_array_equal(x_ray, np.repeat(grey[:, :, None], 3, axis=2))
        check_overlay_pixels(truth_panel, grey, truth, TRUTH_COLOR_BGR)
        check_overlay_pixels(pred_panel, grey, pred, PRED_COLOR_BGR)
        # The title bar is exactly the one for this image's Dice.
        expected = render_panels(grey, pred, truth, f"Dice {dice:.3f}   {image_id}")
        np.testing.assert_array_equal(figure, expected)
    # Empty prediction on an empty ('-1') truth: Dice 1 (SIIM convention), panels all grey.
    assert results[NEGATIVE_ID].dice == 1.0
    figure = read_picture(out / f"{NEGATIVE_ID}.png")
    grey = read_xray(real_train_dicoms[NEGATIVE_ID]).image
    for panel in panels_of(figure, 1024, 1024, 3):
        np.testing.assert_array_equal(panel, np.repeat(grey[:, :, None], 3, axis=2))
    assert not (out / "rejected.csv").exists()


def test_real_dicom_model_size_mask_is_stretched(
    tmp_path: Path, real_train_dicoms: dict[str, Path], real_truth: dict[str, np.ndarray]
) -> None:
    image_id = POSITIVE_IDS[0]
    small = cv2.resize(real_truth[image_id], (256, 256), interpolation=cv2.INTER_NEAREST)
    masks = tmp_path / "masks"
    masks.mkdir()
    write_mask_png(masks / f"{image_id}.png", small)
    summary = run_overlay([real_train_dicoms[image_id]], masks, tmp_path / "out", max_size=512)
    assert summary.written == 1 and summary.stretched_masks == 1
    assert summary.results[0].dice is None
    figure = read_picture(tmp_path / "out" / f"{image_id}.png")
    layout = panel_layout(512, 512, 2)
    assert figure.shape == (layout.height, layout.width, 3)


# ----------------------------------------------------------------------------------------------
# The command.

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, ["overlay", *map(str, args)])


def test_cli_jpeg_sample_with_lossy_jpeg_masks(tmp_path: Path, siim: Path) -> None:
    sample = siim / "jpg-sample"
    out = tmp_path / "out"
    result = invoke(
        sample / "image", "--masks", sample / "mask", "--truth", sample / "mask",
        "--out", out, "--format", "jpg", "--max-size", "256", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # 14 images, 13 masks: the image without a mask is reported, the rest are drawn.
    assert summary["written"] == 13 and summary["skipped"] == 0
    assert summary["mean_dice"] == 1.0
    assert [r["dice"] for r in summary["results"]] == [1.0] * 13
    missing = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"
    assert [Path(r["path"]).stem for r in summary["rejected"]] == [missing]
    with open(out / "rejected.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["path"]).stem for r in rows] == [missing]
    assert "no mask" in rows[0]["reason"]
    written = sorted(out.glob("*.jpg"))
    assert len(written) == 13
    layout = panel_layout(256, 256, 3)
    assert read_picture(written[0]).shape == (layout.height, layout.width, 3)


def test_cli_rejects_unreadable_inputs_and_draws_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b"):
        write_png(images / f"{name}.png", rng.integers(0, 256, (40, 30), dtype=np.uint8))
        write_mask_png(masks / f"{name}.png", np.ones((40, 30), np.uint8))
    (images / "broken.dcm").write_bytes(b"not a dicom at all")
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    (images / "sub").mkdir()
    write_png(images / "sub" / "wrong.png", np.zeros((40, 30), np.uint8))
    write_mask_png(masks / "wrong.png", np.ones((41, 30), np.uint8))
    write_mask_png(masks / "broken.png", np.ones((40, 30), np.uint8))
    (images / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    result = invoke(images, "--masks", masks, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == 2
    assert "rejected" in result.stderr
    with open(out / "rejected.csv", newline="") as handle:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert set(rows) == {"broken.dcm", "broken.png", "wrong.png"}
    assert "41" in rows["wrong.png"] and "40" in rows["wrong.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".pneumo-job.json",
        "a.png",
        "b.png",
        "rejected.csv",
    ]


def test_cli_skips_existing_and_overwrites_on_request(tmp_path: Path) -> None:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    masks.mkdir()
    write_png(images / "a.png", np.full((20, 20), 50, np.uint8))
    write_mask_png(masks / "a.png", np.eye(20, dtype=np.uint8))
    first = invoke(images, "--masks", masks, "--out", out, "--json")
    assert json.loads(first.stdout)["written"] == 1
    (out / "a.png").write_bytes(b"kept")
    second = invoke(images, "--masks", masks, "--out", out, "--json")
    again = json.loads(second.stdout)
    assert (again["written"], again["skipped"], again["results"]) == (0, 1, [])
    assert (out / "a.png").read_bytes() == b"kept"
    third = invoke(images, "--masks", masks, "--out", out, "--overwrite")
    assert third.exit_code == 0 and "written" in third.stdout
    assert read_picture(out / "a.png").shape == (
        panel_layout(20, 20, 2).height,
        panel_layout(20, 20, 2).width,
        3,
    )


def test_stale_rejected_csv_is_removed_when_all_inputs_are_fine(tmp_path: Path) -> None:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    masks.mkdir()
    out.mkdir()
    write_png(images / "a.png", np.full((20, 20), 50, np.uint8))
    write_mask_png(masks / "a.png", np.zeros((20, 20), np.uint8))
    (out / "rejected.csv").write_text("path,reason\nold,gone\n")
    assert run_overlay([images], masks, out).rejected_csv is None
    assert not (out / "rejected.csv").exists()


def test_duplicate_image_ids_are_rejected(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "a.png", np.zeros((10, 10), np.uint8))
    write_mask_png(masks / "a.png", np.zeros((10, 10), np.uint8))
    summary = run_overlay([tmp_path / "x", tmp_path / "y"], masks, tmp_path / "out")
    assert summary.written == 1
    assert summary.rejected == [
        (str(tmp_path / "y" / "a.png"),
         f"duplicate: ImageId/SOPInstanceUID 'a' is already {tmp_path / 'x' / 'a.png'}"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--masks", "{tmp}/nope"], 1, "mask folder"),
        (["--masks", "{tmp}/masks", "--format", "gif"], 2, "gif"),
        (["--masks", "{tmp}/masks", "--max-size", "0"], 2, "max-size"),
        (["--masks", "{tmp}/masks", "--truth", "{tmp}/masks", "--rle", "x.csv"], 2, "not both"),
        (["--masks", "{tmp}/masks", "--out", "{tmp}/images/out"], 1, "inside input folder"),
    ],
)
def test_cli_exit_codes(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_png(tmp_path / "images" / "a.png", np.zeros((10, 10), np.uint8))
    result = invoke(tmp_path / "images", *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "images" / "out").exists()


def test_missing_input_is_exit_1(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    result = invoke(tmp_path / "nothing", "--masks", tmp_path / "masks")
    assert result.exit_code == 1
    assert "no such file or folder" in result.stderr


def test_library_validates_settings(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    with pytest.raises(ConfigError, match="format 'gif'"):
        run_overlay([tmp_path], tmp_path / "masks", tmp_path / "o", fmt="gif")
    with pytest.raises(ConfigError, match="not both"):
        run_overlay([tmp_path], tmp_path / "masks", tmp_path / "o", truth_dir=tmp_path, rle_csv="x")


def test_collect_image_files_finds_extensionless_dicoms(
    tmp_path: Path, real_train_dicoms: dict[str, Path]
) -> None:
    source = real_train_dicoms[NEGATIVE_ID]
    (tmp_path / NEGATIVE_ID).write_bytes(source.read_bytes())  # Kaggle UID name, no extension
    (tmp_path / "readme.txt").write_text("x")
    assert collect_xray_files([tmp_path]) == [tmp_path / NEGATIVE_ID]


def test_missing_truth_gives_two_panels_and_bad_rle_row_is_rejected(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        write_png(images / f"{name}.png", np.full((8, 8), 77, np.uint8))
        write_mask_png(masks / f"{name}.png", np.ones((8, 8), np.uint8))
    # a: full 8x8 truth (Dice 1); b: no row (two panels); c: a run past the 64 pixels.
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("ImageId,EncodedPixels\na,0 64\nc,60 10\n")
    summary = run_overlay([images], masks, tmp_path / "out", rle_csv=truth_csv)
    assert summary.written == 2 and summary.without_truth == 1
    assert {r.image_id: r.dice for r in summary.results} == {"a": 1.0, "b": None}
    assert summary.mean_dice == 1.0
    ((path, reason),) = summary.rejected
    assert Path(path).name == "c.png" and "line 3" in reason and "run 1 ends" in reason
    two = read_picture(tmp_path / "out" / "b.png")
    assert two.shape[:2] == (panel_layout(8, 8, 2).height, panel_layout(8, 8, 2).width)


def test_masks_or_truth_given_as_a_file_says_it_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "a.png", np.zeros((10, 10), np.uint8))
    write_mask_png(tmp_path / "a.png", np.zeros((10, 10), np.uint8))
    result = invoke(tmp_path / "images", "--masks", tmp_path / "a.png", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --masks {tmp_path / 'a.png'} is a file, not a folder; point --masks at the "
        "masks/ folder written by `pneumo predict` (or any folder of <ImageId>.png masks)"
    ]
    (tmp_path / "masks").mkdir()
    result = invoke(tmp_path / "images", "--masks", tmp_path / "masks", "--truth",
                    tmp_path / "a.png", "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1
    assert f"--truth {tmp_path / 'a.png'} is a file, not a folder" in result.stderr
    assert not (tmp_path / "o").exists()


def test_dicomdir_members_are_named_by_their_uid_like_preprocess_names_them(
    tmp_path: Path,
) -> None:
    from pneumo_cli.io.dicom_write import write_dicom

    cd, masks = tmp_path / "cd", tmp_path / "masks"
    masks.mkdir()
    for series, uid in (("SE000000", "1.2.3.1"), ("SE000001", "1.2.3.2")):
        (cd / "PT000000" / "ST000000" / series).mkdir(parents=True)
        image = np.full((32, 32), 90 + len(series), np.uint8)
        write_dicom(cd / "PT000000" / "ST000000" / series / "IM000000", image, sop_uid=uid)
        write_mask_png(masks / f"{uid}.png", np.eye(32, dtype=np.uint8))
    summary = run_overlay([cd], masks, tmp_path / "out")
    assert (summary.written, summary.rejected) == (2, [])
    assert sorted(r.image_id for r in summary.results) == ["1.2.3.1", "1.2.3.2"]


def test_overlays_of_other_masks_are_not_resumed(tmp_path: Path) -> None:
    """Masks rewritten (say, by a predict with another gate) or another format: the finished
    pictures of the old job are not kept under the new one."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    write_png(images / "a.png", np.full((32, 32), 90, np.uint8))
    write_mask_png(masks / "a.png", np.eye(32, dtype=np.uint8))
    out = tmp_path / "out"
    args = ["overlay", str(images), "--masks", str(masks), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # the same job: resumed
    write_mask_png(masks / "a.png", np.zeros((32, 32), np.uint8))
    changed = runner.invoke(app, args)
    assert changed.exit_code == 1
    assert "holds the outputs of another overlay job (masks_state" in changed.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
