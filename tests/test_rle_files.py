"""`pneumo rle-decode` / `pneumo rle-encode` through the CLI: files written, JSON, bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.io import rle
from tests.conftest import REAL_TRAIN_AREAS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_decode_writes_union_masks_and_json(tmp_path):
    csv_path = write_csv(tmp_path, "ImageId,EncodedPixels\na,0 2\na,1 2\nb,-1\nc,5 1\n")
    out = tmp_path / "masks"
    result = invoke("rle-decode", csv_path, out, "--width", 3, "--height", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 3
    assert summary["positive"] == 2 and summary["empty"] == 1
    assert summary["images_with_several_rows"] == 1 and summary["rows_merged"] == 2
    assert summary["written"] == 3
    a = read_png(out / "a.png")
    assert a.dtype == np.uint8 and a.shape == (2, 3)
    # union of pixels 0-1 and 1-2 (column-major): (0,0), (1,0), (0,1)
    np.testing.assert_array_equal(a, np.array([[255, 255, 0], [255, 0, 0]], np.uint8))
    assert not read_png(out / "b.png").any()
    np.testing.assert_array_equal(read_png(out / "c.png"), [[0, 0, 0], [0, 0, 255]])
    assert not (out / "rejected.csv").exists()


def test_decode_table_output(tmp_path):
    csv_path = write_csv(tmp_path, "a,1 1\n")
    result = invoke("rle-decode", csv_path, tmp_path / "m", "--width", 2, "--height", 2)
    assert result.exit_code == 0
    assert "positive" in result.stdout and "rle-decode" in result.stdout


def test_real_excerpts_decode_like_the_full_file(siim, tmp_path):
    out = tmp_path / "m"
    result = invoke("rle-decode", siim / "csv" / "train-rle_stage1_format_excerpt.csv", out)
    assert result.exit_code == 0, result.output
    for png in out.glob("*.png"):
        mask = read_png(png)
        assert mask.shape == (1024, 1024)
        assert set(np.unique(mask)) <= {0, 255}


def test_real_training_images_decode_to_known_areas(real_rle_csv, tmp_path):
    # Only the three images whose DICOMs we have: filter the real file (keeps all their rows).
    rows = [r for r in rle.read_rle_csv(real_rle_csv) if r.image_id in REAL_TRAIN_AREAS]
    text = "ImageId, EncodedPixels\n" + "".join(f"{r.image_id}, {r.encoded}\n" for r in rows)
    out = tmp_path / "m"
    result = invoke("rle-decode", write_csv(tmp_path, text), out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows_merged"] == 4  # the 4 overlapping annotations of 307
    for image_id, area in REAL_TRAIN_AREAS.items():
        assert int((read_png(out / f"{image_id}.png") > 0).sum()) == area


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ImageId,EncodedPixels\nok,1 1\nbad,1 2 3\n", "line 3 (ImageId 'bad'): odd number"),
        ("ImageId,EncodedPixels\nok,1 1\nbad,1 q\n", "line 3 (ImageId 'bad'): token 'q'"),
        ("ImageId,EncodedPixels\nok,1 1\nbad,1 0\n", "line 3 (ImageId 'bad'): run 1 has length 0"),
        ("ImageId,EncodedPixels\nok,1 1\nbad,1 -4\n", "line 3 (ImageId 'bad'): run 1 has length"),
        ("ImageId,EncodedPixels\nok,1 1\nbad,2 3\n", "line 3 (ImageId 'bad'): run 1 ends at"),
        ("ImageId,EncodedPixels\nok,1 1\n../x,1 1\n", "line 3: ImageId '../x' cannot be a file"),
        ("ImageId,EncodedPixels\nok,1 1\na/b,1 1\n", "line 3: ImageId 'a/b' cannot be a file n"),
        ("ImageId,EncodedPixels\nok,1 1\n,1 1\n", "line 3: empty ImageId"),
        ("ImageId,EncodedPixels\n", "no rows to decode"),
        ("", "the CSV is empty"),
        ("x,y,z\n1,2,3\n", "no recognisable columns"),
    ],
)
def test_decode_bad_input_one_line_exit_1_no_output(tmp_path, text, message):
    csv_path = write_csv(tmp_path, text)
    out = tmp_path / "masks"
    result = invoke("rle-decode", csv_path, out, "--width", 2, "--height", 2)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert message in lines[0]
    assert str(csv_path) in lines[0] or "CSV" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_skip_invalid_reports_rejections(tmp_path):
    text = "ImageId,EncodedPixels\ngood,1 1\nbad,1 2 3\nbad,0 1\nalso,-1\n"
    out = tmp_path / "m"
    result = invoke(
        "rle-decode", write_csv(tmp_path, text), out, "--width", 2, "--height", 2,
        "--skip-invalid", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rejected_rows"] == 1 and summary["rejected_images"] == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["also.png", "good.png"]
    rejected = (out / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "line,ImageId,reason"
    assert rejected[1].startswith("3,bad,") and "odd number of tokens" in rejected[1]


def test_existing_outputs_kept_unless_overwrite(tmp_path):
    csv_path = write_csv(tmp_path, "a,0 1\nb,-1\n")
    out = tmp_path / "m"
    first = invoke("rle-decode", csv_path, out, "--width", 2, "--height", 2, "--json")
    assert json.loads(first.stdout)["written"] == 2
    sentinel = np.full((2, 2), 7, np.uint8)
    cv2.imwrite(str(out / "a.png"), sentinel)  # stands for a mask finished earlier
    result = invoke("rle-decode", csv_path, out, "--width", 2, "--height", 2, "--json")
    assert json.loads(result.stdout)["skipped_existing"] == 2  # the same job resumes
    np.testing.assert_array_equal(read_png(out / "a.png"), sentinel)
    result = invoke("rle-decode", csv_path, out, "--width", 2, "--height", 2, "--overwrite")
    assert result.exit_code == 0
    np.testing.assert_array_equal(read_png(out / "a.png"), [[255, 0], [0, 0]])
    assert not [p for p in out.iterdir() if p.name.startswith(".pneumo-tmp")]


def test_another_csv_or_size_is_not_resumed_into_old_masks(tmp_path):
    out = tmp_path / "m"
    first = write_csv(tmp_path, "a,0 1\n")
    assert invoke("rle-decode", first, out, "--width", 2, "--height", 2).exit_code == 0
    other = tmp_path / "other.csv"
    other.write_text("ImageId,EncodedPixels\na,1 2\n")
    for args in ([other, out, "--width", 2, "--height", 2], [first, out, "--width", 3]):
        result = invoke("rle-decode", *args)
        assert result.exit_code == 1 and "holds the outputs of another rle-decode job" in (
            " ".join(result.stderr.split())
        ), args
    np.testing.assert_array_equal(read_png(out / "a.png"), [[255, 0], [0, 0]])  # untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cv2.imwrite(str(foreign / "a.png"), np.zeros((2, 2), np.uint8))  # not made by rle-decode
    refused = invoke("rle-decode", first, foreign, "--width", 2, "--height", 2)
    assert refused.exit_code == 1 and "without a .pneumo-job.json" in refused.stderr


def test_stale_temporary_files_are_removed(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / ".pneumo-tmp-123-a.png").write_bytes(b"half a png")
    result = invoke("rle-decode", write_csv(tmp_path, "a,0 1\n"), out, "--width", 2, "--height", 2)
    assert result.exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".pneumo-job.json", "a.png"]


def test_encode_round_trip_and_formats(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    a = np.zeros((3, 4), np.uint8)
    a[1:, 0] = 255
    a[0, 2] = 255
    cv2.imwrite(str(masks / "a.png"), a)
    cv2.imwrite(str(masks / "b.png"), np.zeros((3, 4), np.uint8))
    cv2.imwrite(str(masks / "c.png"), (a > 0).astype(np.uint8))  # 0/1 mask
    cv2.imwrite(str(masks / "d.png"), np.full((3, 4), 255, np.uint8))  # run to the last pixel
    out_csv = tmp_path / "sub" / "submission.csv"
    result = invoke("rle-encode", masks, out_csv, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 4
    assert out_csv.read_text().splitlines() == [
        "ImageId,EncodedPixels",
        "a,1 2 3 1",
        "b,-1",
        "c,1 2 3 1",
        "d,0 12",
    ]
    back = tmp_path / "back"
    assert invoke("rle-decode", out_csv, back, "--width", 4, "--height", 3).exit_code == 0
    np.testing.assert_array_equal(read_png(back / "a.png"), a)
    np.testing.assert_array_equal(read_png(back / "c.png"), a)


def test_encode_bad_input(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "a.png"), np.zeros((3, 4), np.uint8))
    cv2.imwrite(str(masks / "b.png"), np.zeros((4, 4), np.uint8))
    out_csv = tmp_path / "s.csv"
    result = invoke("rle-encode", masks, out_csv)
    assert result.exit_code == 1
    assert "b.png is 4x4 but" in result.output and "a.png is 4x3" in result.output
    assert not out_csv.exists()

    (masks / "b.png").unlink()
    out_csv.write_text("keep me")
    result = invoke("rle-encode", masks, out_csv)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert out_csv.read_text() == "keep me"
    assert invoke("rle-encode", masks, out_csv, "--overwrite").exit_code == 0

    result = invoke("rle-encode", tmp_path / "nope", out_csv)
    assert result.exit_code == 1 and "mask folder not found" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("rle-encode", empty, tmp_path / "x.csv")
    assert result.exit_code == 1 and "no mask images" in result.output


def test_encode_jpeg_style_threshold(siim, tmp_path):
    # Lossy JPEG masks: --threshold 127 recovers the binary mask (README of shared/siim).
    masks = tmp_path / "m"
    masks.mkdir()
    source = sorted((siim / "jpg-sample" / "mask").glob("*.jpg"))[0]
    grey = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(masks / f"{source.stem}.png"), grey)
    out_csv = tmp_path / "s.csv"
    assert invoke("rle-encode", masks, out_csv, "--threshold", 127).exit_code == 0
    encoded = out_csv.read_text().splitlines()[1].split(",", 1)[1]
    np.testing.assert_array_equal(rle.decode_rle(encoded, *grey.shape), (grey > 127))


def test_encode_reads_the_real_lossy_jpeg_masks_like_preprocess(siim, real_rle_csv, tmp_path):
    # The 13 real JPEG masks: > 127 recovers the labels of train-rle.csv exactly (siim README).
    # `rle-encode` reads them with the reader `preprocess --masks` uses: same files, same rule.
    from pneumo_cli.core.config import PreprocessConfig
    from pneumo_cli.data.preprocess import run_preprocess

    mask_dir = siim / "jpg-sample" / "mask"
    truth: dict[str, list[str]] = {}
    for row in rle.read_rle_csv(real_rle_csv):
        truth.setdefault(row.image_id, []).append(row.encoded)
    explicit, automatic = tmp_path / "explicit.csv", tmp_path / "automatic.csv"
    result = invoke("rle-encode", mask_dir, explicit, "--threshold", 127, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 13
    rows = [line.split(",", 1) for line in explicit.read_text().splitlines()[1:]]
    assert len(rows) == 13
    for image_id, encoded in rows:
        np.testing.assert_array_equal(
            rle.decode_rle(encoded), rle.decode_union(truth[image_id]), err_msg=image_id
        )
    # Without --threshold a JPEG mask gets the lossy rule (> 127), a PNG any non-zero pixel.
    assert invoke("rle-encode", mask_dir, automatic).exit_code == 0
    assert automatic.read_text() == explicit.read_text()
    summary = run_preprocess(
        siim / "jpg-sample" / "image", tmp_path / "cache", PreprocessConfig(image_size=64),
        masks_dir=mask_dir, workers=2,
    )  # fmt: skip
    assert (summary.positive, summary.negative, summary.unlabelled) == (8, 5, 1)
    assert (tmp_path / "cache" / "truth.csv").read_text() == explicit.read_text()
