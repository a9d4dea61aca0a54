"""`pneumo predict`: geometry of the back-mapping, the outputs, TTA, resume and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.data.imaging import prepare_image, prepare_mask
from pneumo_cli.inference.outputs import output_row
from pneumo_cli.inference.postprocess import Gate, save_gate
from pneumo_cli.inference.predictor import load_predictor
from pneumo_cli.inference.sources import Item
from pneumo_cli.io import rle
from pneumo_cli.io.dicom_read import read_xray

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_mask_comes_back_at_the_right_place_and_size():
    # A synthetic X-ray with a known dark border: 40 rows on top, 100 columns on the left.
    rng = np.random.default_rng(0)
    image = np.zeros((700, 900), np.uint8)
    image[40:, 100:860] = rng.integers(60, 200, (660, 760), dtype=np.uint8)
    mask = np.zeros(image.shape, np.uint8)
    cv2.ellipse(mask, (500, 300), (120, 80), 20, 0, 360, 1, -1)
    settings = PreprocessConfig(image_size=128)
    prepared = prepare_image(image, settings)
    assert prepared.crop == (40, 700, 100, 860)
    small = prepare_mask(mask, prepared.crop, settings)
    # A "network" that outputs exactly the cached mask: the gate and back-mapping must put it
    # back where it was drawn, at the original size.
    item = Item("x", prepared.image, prepared.crop, prepared.original_shape)
    record, restored, probs = output_row("x", small.astype(np.float32), item, Gate())
    assert restored.shape == (700, 900) and probs.shape == (700, 900)
    assert iou(restored.astype(bool), mask.astype(bool)) > 0.95
    assert not restored[:40].any() and not restored[:, :100].any()
    assert record["area_px"] == int(restored.sum())
    np.testing.assert_array_equal(rle.decode_rle(record["EncodedPixels"], 700, 900), restored)


def test_gate_areas_are_original_pixels():
    item = Item("x", np.zeros((64, 64), np.uint8), (0, 1024, 0, 1024), (1024, 1024))
    prob = np.zeros((64, 64), np.float32)
    prob[10:18, 10:18] = 0.9  # 64 working pixels = 64 * 16 * 16 = 16,384 original pixels
    record, _, _ = output_row("x", prob, item, Gate(min_area_px=15000))
    # Bilinear upsampling softens the edges, so the area above 0.5 is slightly smaller.
    assert record["has_pneumothorax"] == 1 and abs(record["area_px"] - 16384) < 1000
    record, _, _ = output_row("x", prob, item, Gate(min_area_px=18000))
    assert record["has_pneumothorax"] == 0 and record["EncodedPixels"] == "-1"


def test_the_fast_path_without_probabilities_gives_the_same_records_and_masks():
    # Without keep_probs, empty maps are not restored and the others are gated inside the crop
    # box only: both must give exactly what gating the full original-size map gives.
    item = Item("x", np.zeros((64, 64), np.uint8), (10, 900, 20, 1000), (1024, 1024))
    rng = np.random.default_rng(2)
    gates = (
        Gate(),
        Gate(top_threshold=0.8, min_area_px=50, bottom_threshold=0.3),
        Gate(bottom_threshold=0.1, min_component_area_px=400),
        Gate(top_threshold=0.0, bottom_threshold=0.0),
    )
    for gate in gates:
        for peak in (0.2, 0.31, 0.5, 0.79, 0.81, 0.95):
            prob = (rng.random((64, 64)) * peak).astype(np.float32)
            prob[30, 30] = peak
            full = output_row("x", prob, item, gate, keep_probs=True)
            fast = output_row("x", prob, item, gate, keep_probs=False)
            assert full[0] == fast[0]
            np.testing.assert_array_equal(full[1], fast[1])
            assert fast[2] is None and full[2].shape == (1024, 1024)


def test_predict_real_dicoms_at_original_size(tiny_run, real_train_dicoms, tmp_path):
    out = tmp_path / "pred"
    inputs = list(real_train_dicoms.values())
    result = invoke("predict", *inputs, "--run", tiny_run["run"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["predicted"] == 3 and summary["rejected"] == 0
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["ImageId"] for r in rows] == sorted(real_train_dicoms)
    assert list(rows[0]) == ["ImageId", "has_pneumothorax", "max_prob", "area_px", "EncodedPixels"]
    for row in rows:
        mask = cv2.imread(str(out / "masks" / f"{row['ImageId']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (1024, 1024) and set(np.unique(mask)) <= {0, 255}
        decoded = rle.decode_rle(row["EncodedPixels"], 1024, 1024)
        np.testing.assert_array_equal(decoded, mask > 0)
        assert int(row["area_px"]) == int(decoded.sum())
        assert int(row["has_pneumothorax"]) == int(decoded.any())
    # max_prob is the peak of the network's map of that very image: recomputed from the DICOM
    # through the run's recorded preprocessing and one batch through the predictor.
    predictor = load_predictor(tiny_run["run"])
    prepared = [prepare_image(read_xray(real_train_dicoms[r["ImageId"]]).image, predictor.settings)
                for r in rows]  # fmt: skip
    peaks = predictor.probabilities(np.stack([p.image for p in prepared])).max(axis=(1, 2))
    np.testing.assert_allclose([float(r["max_prob"]) for r in rows], peaks, atol=1e-5)
    submission = (out / "submission.csv").read_text().splitlines()
    assert submission[0] == "ImageId,EncodedPixels" and len(submission) == 4


@pytest.mark.parametrize("engine", ["keras", "openvino"])
def test_hflip_tta_averages_the_mirror_prediction(tiny_run, tmp_path, engine):
    """TTA is part of the network function, so it holds in either engine (float32 here: the
    same function in two engines, each compared with itself)."""
    plain = load_predictor(tiny_run["run"], tta="none", precision="fp32", engine=engine)
    mirrored = load_predictor(tiny_run["run"], tta="hflip", precision="fp32", engine=engine)
    assert plain.engine == mirrored.engine == engine
    rng = np.random.default_rng(1)
    half = rng.integers(0, 255, (2, 64, 32), dtype=np.uint8)
    asymmetric = rng.integers(0, 255, (1, 64, 64), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    p = plain.probabilities(symmetric)
    t = mirrored.probabilities(symmetric)
    # On a mirror-symmetric input, TTA gives the symmetric average of the plain prediction.
    np.testing.assert_allclose(t, (p + p[:, :, ::-1]) / 2, atol=1e-5)
    np.testing.assert_allclose(t, t[:, :, ::-1], atol=1e-5)
    # In general it is the mean of the prediction and the un-mirrored prediction of the mirror.
    q = plain.probabilities(asymmetric[:, :, ::-1].copy())[:, :, ::-1]
    np.testing.assert_allclose(
        mirrored.probabilities(asymmetric), (plain.probabilities(asymmetric) + q) / 2, atol=1e-5
    )


def test_skip_existing_overwrite_rejected_and_gate(tiny_run, siim, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for jpg in sorted((siim / "jpg-sample" / "image").glob("*.jpg"))[:2]:
        shutil.copy(jpg, inputs / jpg.name)
    (inputs / "broken.dcm").write_bytes(b"not a dicom")
    (inputs / "..sneaky.png").write_bytes(b"")  # hidden: skipped by the folder walk
    out = tmp_path / "out"
    first = invoke("predict", inputs, "--run", tiny_run["run"], "--out", out, "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert (summary["predicted"], summary["rejected"]) == (2, 1)
    rejected = (out / "rejected.csv").read_text().splitlines()
    assert rejected[0] == "source,reason" and "broken.dcm" in rejected[1]
    before = (out / "predictions.csv").read_bytes()

    again = invoke("predict", inputs, "--run", tiny_run["run"], "--out", out, "--json")
    assert json.loads(again.stdout)["skipped_existing"] == 2
    assert (out / "predictions.csv").read_bytes() == before

    # A gate that nothing can pass: every mask empty, from the CLI override...
    empty = invoke(
        "predict", inputs, "--run", tiny_run["run"], "--out", out, "--overwrite",
        "--min-area", 1e9, "--json",
    )  # fmt: skip
    assert json.loads(empty.stdout)["positive"] == 0
    # ... and from the run's postprocess.json when no option is given.
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run_copy)
    save_gate(run_copy / "postprocess.json", Gate(top_threshold=1.0, bottom_threshold=1.0))
    result = invoke("predict", inputs, "--run", run_copy, "--out", out, "--overwrite", "--json")
    assert json.loads(result.stdout)["gate"]["top_threshold"] == 1.0
    assert json.loads(result.stdout)["positive"] == 0
    assert not [p for p in out.rglob(".pneumo-tmp-*")]


def test_predict_a_cache_split(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "predict", "--cache", tiny_run["cache"], "--split", "test", "--run", tiny_run["run"],
        "--out", out, "--json", "--save-probs",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["predicted"] >= 1
    probs = sorted((out / "probs").glob("*.png"))
    assert len(probs) == summary["predicted"]
    assert cv2.imread(str(probs[0]), cv2.IMREAD_UNCHANGED).shape == (128, 128)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--top-threshold", "1.5"], 2, ""),
        (["--min-area", "-1"], 2, ""),
        (["--tta", "vflip"], 2, ""),
    ],
)
def test_predict_bad_options(tiny_run, real_train_dicoms, tmp_path, args, code, message):
    path = next(iter(real_train_dicoms.values()))
    result = invoke("predict", path, "--run", tiny_run["run"], "--out", tmp_path / "o", *args)
    assert result.exit_code == code
    assert message in result.output


def test_predict_bad_runs_and_inputs(tiny_run, real_train_dicoms, tmp_path):
    path = next(iter(real_train_dicoms.values()))
    no_model = tmp_path / "nomodel"
    no_model.mkdir()
    (no_model / "config.json").write_text((tiny_run["run"] / "config.json").read_text())
    result = invoke("predict", path, "--run", no_model, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "has no best.keras" in result.output
    result = invoke("predict", path, "--run", tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "is not a pneumo run" in result.output
    result = invoke("predict", tmp_path / "missing.dcm", "--run", tiny_run["run"])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    result = invoke("predict", "--run", tiny_run["run"])
    assert result.exit_code == 2 and "exactly one of the two" in result.output
    inside = tiny_run["raw"] / "out"
    result = invoke("predict", tiny_run["raw"], "--run", tiny_run["run"], "--out", inside)
    assert result.exit_code == 1 and "inside input folder" in result.output
    assert not inside.exists()


def test_loading_keeps_order_and_runs_a_bounded_distance_ahead() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pneumo_cli.inference.predict import _ordered_map

    started, consumed, lock = [0], [0], threading.Lock()
    most_ahead = [0]

    def load(value: int) -> int:
        with lock:
            started[0] += 1
            most_ahead[0] = max(most_ahead[0], started[0] - consumed[0])
        return value * 2

    with ThreadPoolExecutor(2) as pool:
        results = []
        for result in _ordered_map(pool, load, range(200), ahead=5):
            results.append(result)
            consumed[0] += 1
    assert results == [2 * value for value in range(200)]
    assert 1 <= most_ahead[0] <= 5 + 1  # + the result being handed over


class _ZeroNetwork:
    """A predictor whose maps are all zero (for predict's plumbing, not its network)."""

    tta, precision, engine, precision_reason, precision_check = "none", "fp32", "keras", "", None
    gate = Gate()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.zeros(images.shape, np.float32)


def test_predict_loads_with_opencvs_own_threads_off_and_restores_them(tmp_path) -> None:
    from pneumo_cli.inference.predict import predict_sources

    seen = []

    def load(index: int) -> Item:
        seen.append(cv2.getNumThreads())
        return Item(f"img{index}", np.zeros((32, 32), np.uint8), (0, 64, 0, 64), (64, 64))

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        sources = [(f"img{index}", index) for index in range(6)]
        summary = predict_sources(_ZeroNetwork(), sources, tmp_path / "out", load=load)
        assert summary.predicted == 6 and seen == [1] * 6
        assert cv2.getNumThreads() == 2
        # One image has nothing to overlap with: OpenCV keeps its threads for it.
        predict_sources(_ZeroNetwork(), sources[:1], tmp_path / "one", load=load)
        assert seen[6:] == [2]
    finally:
        cv2.setNumThreads(before)


def test_overlapping_single_threaded_blocks_restore_opencv_once_the_last_ends() -> None:
    import threading

    from pneumo_cli.core.workers import single_threaded_opencv

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        inside = []

        def second() -> None:
            first_in.wait()
            with single_threaded_opencv():
                second_in.set()
                first_out.wait()
                inside.append(cv2.getNumThreads())  # the first block has ended: still off

        worker = threading.Thread(target=second)
        worker.start()
        with single_threaded_opencv():
            first_in.set()
            second_in.wait()
        first_out.set()
        worker.join()
        assert inside == [1]
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
