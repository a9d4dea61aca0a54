"""`pneumo export` and `pneumo predict --model`: parity maths, the three formats, refusals."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli import __version__
from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.core.files import TEMP_PREFIX
from pneumo_cli.export import backends as export_backends
from pneumo_cli.export.parity import TOLERANCES, Tolerance, compare_probabilities, dice_agreement
from pneumo_cli.inference.exported import MANIFEST_FILE
from pneumo_cli.inference.postprocess import Gate

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- parity maths (hand-computed) -------------------------------------------------------------


def test_dice_agreement_hand_computed():
    a = np.zeros((3, 2, 2), np.uint8)
    b = np.zeros((3, 2, 2), np.uint8)
    a[1, 0, :] = 1  # 2 pixels
    b[1, :, 0] = 1  # 2 pixels, 1 shared -> Dice 2 * 1 / 4 = 0.5
    a[2, 0, 0] = 1  # vs empty -> 0
    # image 0: both empty -> 1
    assert dice_agreement(a, b) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_compare_probabilities_hand_computed():
    reference = np.array([[[0.1, 0.6], [0.49, 0.9]]], np.float32)
    exported = np.array([[[0.1, 0.6], [0.51, 0.9]]], np.float32)
    loose = Tolerance(max_abs_diff=0.05, mean_abs_diff=None, min_mask_agreement=0.7)
    parity = compare_probabilities(reference, exported, Gate(), loose, "hand")
    assert parity.max_abs_diff == pytest.approx(0.02, abs=1e-6)
    assert parity.mean_abs_diff == pytest.approx(0.005, abs=1e-6)
    assert parity.mask_agreement == 0.75  # the 0.49 -> 0.51 pixel flips
    # masks {0.6, 0.9} vs {0.6, 0.51, 0.9}: Dice 2 * 2 / 5
    assert parity.dice_agreement == pytest.approx(0.8)
    assert parity.passed and parity.images == 1
    strict = compare_probabilities(reference, exported, Gate(), TOLERANCES["float32"], "hand")
    assert not strict.passed
    assert strict.failures == (
        "max abs difference 0.02 > 0.001",
        "mask agreement 75.0000% < 99.90% of pixels",
    )


def test_nan_output_fails_parity():
    reference = np.full((1, 2, 2), 0.2, np.float32)
    exported = reference.copy()
    exported[0, 1, 1] = np.nan
    parity = compare_probabilities(reference, exported, Gate(), TOLERANCES["int8"])
    assert parity.max_abs_diff == float("inf") and not parity.passed


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="shape"):
        compare_probabilities(
            np.zeros((1, 4, 4)), np.zeros((1, 2, 2)), Gate(), TOLERANCES["float32"]
        )


# --- refusals that need no conversion ---------------------------------------------------------


def test_refusals_before_any_conversion(tiny_run, tmp_path):
    run = tiny_run["run"]
    result = invoke("export", "--run", run, "--format", "pdf")  # a usage error
    assert result.exit_code == 2 and "'pdf' is not one of 'savedmodel'" in result.output
    result = invoke("export", "--run", run, "--format", "onnx", "--quantize", "int8")
    assert result.exit_code == 1 and "--quantize works with --format tflite only" in result.output
    result = invoke("export", "--run", run, "--format", "tflite", "--quantize", "int4")
    assert result.exit_code == 2 and "'int4' is not one of 'float16', 'int8'" in result.output
    # A run folder without a model (stopped before its first epoch).
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.json", bare / "config.json")
    result = invoke("export", "--run", bare, "--format", "onnx")
    assert result.exit_code == 1 and "has no best.keras" in result.output
    # An existing output folder is kept without --overwrite.
    taken = tmp_path / "taken"
    taken.mkdir()
    result = invoke("export", "--run", run, "--format", "onnx", "--out", taken)
    assert result.exit_code == 1 and "exists already; add --overwrite" in result.output
    assert list(taken.iterdir()) == []
    # --overwrite replaces earlier exports only, never the run or an unrelated folder.
    (taken / "notes.txt").write_text("mine")
    result = invoke("export", "--run", run, "--format", "onnx", "--out", taken, "--overwrite")
    assert result.exit_code == 1 and "is not an export written by" in result.output
    assert (taken / "notes.txt").read_text() == "mine"
    for inside in (run, run.parent):
        result = invoke("export", "--run", run, "--format", "onnx", "--out", inside, "--overwrite")
        assert result.exit_code == 1 and "would replace the run" in result.output
    result = invoke("export", "--run", tmp_path / "nowhere", "--format", "onnx")
    assert result.exit_code == 1 and "is not a pneumo run" in result.output


def test_predict_refuses_bad_exports(tiny_run, real_train_dicoms, tmp_path):
    dicom = next(iter(real_train_dicoms.values()))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not a model")
    out = tmp_path / "pred"
    result = invoke("predict", dicom, "--model", folder, "--out", out)
    assert result.exit_code == 1 and f"has no {MANIFEST_FILE} beside it" in result.output
    manifest = {"pneumo_version": "0.0.1", "format": "onnx"}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = invoke("predict", dicom, "--model", folder / "model.onnx", "--out", out)
    assert result.exit_code == 1
    assert f"written by pneumo 0.0.1, this is pneumo {__version__}" in result.output
    result = invoke("predict", dicom, "--model", folder, "--run", tiny_run["run"], "--out", out)
    assert result.exit_code == 1 and "give --run or --model, not both" in result.output
    assert not out.exists()


# --- real exports of the tiny trained run -----------------------------------------------------


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """The tiny run exported to every format through the CLI: format -> (folder, summary)."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for fmt in ("savedmodel", "tflite", "onnx"):
        out = root / fmt
        result = invoke("export", "--run", tiny_run["run"], "--format", fmt, "--out", out, "--json")
        assert result.exit_code == 0, result.output
        made[fmt] = (out, json.loads(result.stdout))
    return made


def split_counts(cache) -> dict[str, int]:
    """Images per split of a cache, read from its manifest."""
    from pneumo_cli.data.cache import load_manifest

    return load_manifest(cache)["split"].value_counts().to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite", "onnx"])
def test_export_passes_parity_and_describes_itself(exports, tiny_run, fmt):
    out, summary = exports[fmt]
    assert summary["parity_passed"] is True and summary["format"] == fmt
    assert summary["max_abs_diff"] <= 1e-3 and summary["mask_agreement"] >= 0.999
    # 16 parity images from the tiny cache: val first, then test, then train.
    n = split_counts(tiny_run["cache"])
    val, test = n["val"], min(n["test"], 16 - n["val"])
    expected = f"({val} val, {test} test, {16 - val - test} train)"
    assert summary["parity_images"] == 16 and expected in summary["parity_inputs"]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    config = json.loads((tiny_run["run"] / "config.json").read_text())
    assert manifest["pneumo_version"] == __version__ and manifest["format"] == fmt
    assert manifest["image_size"] == 64 and manifest["input"]["shape"] == [None, 64, 64, 1]
    assert manifest["input_scaling"] == config["input_scaling"]
    assert manifest["preprocess"]["image_size"] == 64
    assert manifest["postprocess"] == {
        "top_threshold": 0.5,
        "min_area_px": 0,
        "bottom_threshold": 0.5,
        "min_component_area_px": 0,
    }
    assert manifest["parity"]["max_abs_diff"] == pytest.approx(summary["max_abs_diff"], rel=1e-2)
    assert manifest["versions"]["tensorflow"].startswith("2.")
    expected = {"savedmodel": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}[fmt]
    assert sorted(p.name for p in out.iterdir()) == sorted([expected, MANIFEST_FILE])
    assert not any(p.name.startswith(TEMP_PREFIX) for p in out.parent.iterdir())


def _read_outputs(out: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    masks = {
        row["ImageId"]: cv2.imread(str(out / "masks" / f"{row['ImageId']}.png"), 0) for row in rows
    }
    return rows, masks


@pytest.fixture(scope="module")
def run_prediction(tiny_run, real_train_dicoms, tmp_path_factory):
    """Predictions of the run itself on the real DICOMs (with hflip TTA), to compare against:
    by the float32 Keras network, the one exports are checked against."""
    out = tmp_path_factory.mktemp("from_run")
    gate = ["--tta", "hflip"]
    inputs = list(real_train_dicoms.values())
    args = ["--run", tiny_run["run"], "--out", out, "--save-probs", *gate]
    args += ["--precision", "fp32", "--engine", "keras"]
    result = invoke("predict", *inputs, *args)
    assert result.exit_code == 0, result.output
    rows, masks = _read_outputs(out)
    # Equal masks must mean something: the barely trained model does draw some pixels.
    assert sum(int(r["area_px"]) for r in rows) > 0
    probs = {i: cv2.imread(str(out / "probs" / f"{i}.png"), 0) for i in masks}
    return gate, rows, masks, probs


def assert_same_masks(out: Path, run_prediction) -> None:
    """Masks from an export equal the run's, except pixels whose probability lies within the
    float32 tolerance of the 0.5 threshold (bilinear upsampling to 1024 x 1024 can put a pixel
    there); only such borderline pixels may differ, and at most 0.01% of the 3 x 1,048,576 (how
    many sit at the threshold depends on how the barely trained tiny run came out on this CPU:
    an AVX2-only one gave 99, over the fixed 64 allowed before)."""
    _, rows, masks, probs = run_prediction
    got_rows, got_masks = _read_outputs(out)
    assert [r["ImageId"] for r in got_rows] == [r["ImageId"] for r in rows]
    differing = 0
    for image_id, mask in masks.items():
        assert got_masks[image_id].shape == (1024, 1024)
        where = got_masks[image_id] != mask
        differing += int(where.sum())
        # probability x 255, rounded: 0.5 is 127.5, so borderline pixels read 127 or 128.
        assert set(np.unique(probs[image_id][where])) <= {127, 128}
    assert differing <= 1e-4 * sum(mask.size for mask in masks.values())
    for got, expected in zip(got_rows, rows, strict=True):
        assert got["has_pneumothorax"] == expected["has_pneumothorax"]
        assert abs(int(got["area_px"]) - int(expected["area_px"])) <= 64


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_predict_from_export_equals_predict_from_run(
    exports, run_prediction, real_train_dicoms, tmp_path, fmt
):
    gate = run_prediction[0]
    out = tmp_path / "pred"
    model = exports[fmt][0]
    result = invoke("predict", *real_train_dicoms.values(), "--model", model, "--out", out, *gate)
    assert result.exit_code == 0, result.output
    assert_same_masks(out, run_prediction)


_ONNX_PREDICT = """
import json, sys
from typer.testing import CliRunner
from pneumo_cli.cli import app
args = json.loads(sys.argv[1])
result = CliRunner().invoke(app, args)
print(json.dumps({"exit_code": result.exit_code, "output": result.output[-2000:],
                  "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.slow
def test_onnx_predict_needs_no_tensorflow_and_equals_run(
    exports, run_prediction, real_train_dicoms, tmp_path
):
    gate = run_prediction[0]
    out = tmp_path / "pred"
    model = exports["onnx"][0] / "model.onnx"  # the model file works as well as its folder
    args = ["predict", *map(str, real_train_dicoms.values()), "--model", str(model)]
    args += ["--out", str(out), *map(str, gate), "--json"]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS",)}
    done = subprocess.run(
        [sys.executable, "-c", _ONNX_PREDICT, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit_code"] == 0, report["output"]
    assert report["tensorflow"] is False
    assert_same_masks(out, run_prediction)


@pytest.mark.slow
def test_tampered_export_fails_parity_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    real_write = export_backends.write_export

    def tampered(model, *args, **kwargs):
        # Change the weights after the Keras reference was computed, as a corrupted or
        # mis-converted file would.
        layer = model.get_layer("final_conv")
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 1.5, bias + 0.5])
        return real_write(model, *args, **kwargs)

    monkeypatch.setattr(export_backends, "write_export", tampered)
    out = tmp_path / "exports" / "onnx"
    result = invoke("export", "--run", tiny_run["run"], "--format", "onnx", "--out", out)
    assert result.exit_code == 1
    assert "failed its parity check against Keras" in result.output
    assert "max abs difference" in result.output and "nothing was written" in result.output
    assert list((tmp_path / "exports").iterdir()) == []


@pytest.mark.slow
def test_int8_tflite_is_calibrated_on_cache_and_reports_dice(tiny_run, tmp_path, monkeypatch):
    """The int8 path: calibration on the cache, the report, the file size. The tiny run is
    barely trained, so its probabilities crowd around 0.5 and its int8 mask agreement lands
    near the 99% bar, above or below it depending on how training came out (a well-trained
    network reaches 99.99%, see the README); the bar is lowered to 95% here so that this test
    checks the path, not the tiny network. The tolerance logic is tested on its own above."""
    from pneumo_cli.export import export as export_module
    from pneumo_cli.export.export import export_run

    tolerances = dict(export_module.TOLERANCES)
    tolerances["int8"] = Tolerance(None, TOLERANCES["int8"].mean_abs_diff, 0.95)
    monkeypatch.setattr(export_module, "TOLERANCES", tolerances)
    out = tmp_path / "int8"
    summary = export_run(tiny_run["run"], "tflite", out, quantize="int8")
    assert summary.parity.passed and summary.quantize == "int8"
    assert summary.parity.mask_agreement >= 0.95
    n = split_counts(tiny_run["cache"])
    assert summary.calibration.startswith(
        f"40 images ({n['train']} train, {n['val']} val, {n['test']} test) of cache"
    )
    assert summary.parity.mean_abs_diff <= TOLERANCES["int8"].mean_abs_diff
    assert summary.parity.dice_agreement > 0.5  # the masks largely agree
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (
        manifest["quantize"] == "int8" and manifest["parity"]["tolerance"]["max_abs_diff"] is None
    )
    # int8 weights: about a quarter of the float32 file.
    float_size = (tiny_run["run"] / "best.keras").stat().st_size
    assert (out / "model.tflite").stat().st_size < 0.4 * float_size


def test_replace_folder_swaps_in_the_new_export(tmp_path):
    from pneumo_cli.export.export import _replace_folder

    old, new = tmp_path / "out", tmp_path / "scratch"
    old.mkdir()
    (old / "stale.txt").write_text("old")
    new.mkdir()
    (new / "model.onnx").write_text("new")
    _replace_folder(new, old)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in old.iterdir()] == ["model.onnx"]
