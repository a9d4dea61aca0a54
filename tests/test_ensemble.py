"""Ensembles: several runs or a cross-validation sweep predicting as one (64/96 px, resnet18).

The members are barely trained: the tests check the averaging, the checks and the plumbing,
not accuracy (the README has the demo data's measurements).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import PreprocessConfig, TrainConfig
from pneumo_cli.data.imaging import resize_image
from pneumo_cli.inference.ensemble import EnsemblePredictor, resolve_members
from pneumo_cli.inference.loading import open_predictor
from pneumo_cli.inference.postprocess import Gate
from pneumo_cli.inference.predictor import load_predictor
from pneumo_cli.inference.sources import cache_sources

pytestmark = pytest.mark.slow

runner = CliRunner()
QUICK = dict(
    encoder="resnet18", encoder_weights="none", batch_size=4, epochs=1, steps_per_epoch=2,
    patience=0, gpus=0, precision="fp32", augment=False, input_norm="trainable",
)  # fmt: skip


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def members(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-fold sweep at 64 px, a run at 96 px and one without CLAHE, all from the demo
    images of ``tiny_run``."""
    from pneumo_cli.data.preprocess import run_preprocess
    from pneumo_cli.training import cv, train

    root = tmp_path_factory.mktemp("ensemble")
    raw, rle = tiny_run["raw"], tiny_run["raw"] / "train-rle.csv"
    caches = {}
    for name, settings in (
        ("folded", PreprocessConfig(image_size=64, folds=3)),
        ("large", PreprocessConfig(image_size=96)),
        ("flat", PreprocessConfig(image_size=64, clahe=False)),
    ):
        caches[name] = root / name
        run_preprocess(raw, caches[name], settings, rle_csv=rle, workers=1)
    sweep = cv.train_cross_validation(
        TrainConfig(cache=str(caches["folded"]), **QUICK), root / "runs", "cv"
    )
    large = train.train_model(TrainConfig(cache=str(caches["large"]), **QUICK), root / "runs",
                              "large")  # fmt: skip
    flat = train.train_model(TrainConfig(cache=str(caches["flat"]), **QUICK), root / "runs",
                             "flat")  # fmt: skip
    return {
        "caches": caches,
        "sweep": Path(sweep.run_dir),
        "folds": [Path(r.run_dir) for r in sweep.folds],
        "large": Path(large.run_dir),
        "flat": Path(flat.run_dir),
    }


def _test_images(cache: Path) -> np.ndarray:
    sources, load = cache_sources(cache, "test")
    return np.stack([load(row).image for _, row in sources])


def test_an_ensemble_of_one_run_is_that_run(members: dict) -> None:
    run = members["folds"][0]
    single = load_predictor(run, precision="fp32", engine="keras")
    images = _test_images(members["caches"]["folded"])
    alone = single.probabilities(images)
    # Through --run given once, and through the averaging code with one member: the same maps.
    given_once = open_predictor([run], precision="fp32", engine="keras")
    assert given_once.source == run and given_once.gate == single.gate
    np.testing.assert_array_equal(given_once.probabilities(images), alone)
    of_one = EnsemblePredictor(run, [single], single.gate, "members' own", sweep=False)
    np.testing.assert_array_equal(of_one.probabilities(images), alone)


def test_two_members_average_their_maps(members: dict, tmp_path: Path) -> None:
    first, second = members["folds"][:2]
    images = _test_images(members["caches"]["folded"])
    by_hand = np.mean(
        [load_predictor(run, precision="fp32", engine="keras").probabilities(images)
         for run in (first, second)],
        axis=0,
    )  # fmt: skip
    pair = open_predictor([first, second], precision="fp32", engine="keras")
    assert isinstance(pair, EnsemblePredictor) and pair.member_dirs == [first, second]
    np.testing.assert_allclose(pair.probabilities(images), by_hand, rtol=0, atol=1e-6)

    # End to end: predict's max_prob per image is the peak of the averaged map.
    out = tmp_path / "pred"
    result = invoke(
        "predict", "--cache", members["caches"]["folded"], "--split", "test", "--run", first,
        "--run", second, "--precision", "fp32", "--engine", "keras", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as handle:
        peaks = {row["ImageId"]: float(row["max_prob"]) for row in csv.DictReader(handle)}
    sources, _ = cache_sources(members["caches"]["folded"], "test")
    expected = {
        image_id: round(float(m.max()), 6)
        for (image_id, _), m in zip(sources, by_hand, strict=True)
    }
    assert peaks == pytest.approx(expected, abs=2e-6)
    job = json.loads((out / "job.json").read_text())
    assert job["members"] == [str((run / "best.keras").resolve()) for run in (first, second)]


def test_members_of_different_sizes_are_averaged_on_the_largest_grid(members: dict) -> None:
    import cv2

    small, large = members["folds"][0], members["large"]
    images = _test_images(members["caches"]["large"])  # prepared at 96 px
    small_net = load_predictor(small, precision="fp32", engine="keras")
    large_net = load_predictor(large, precision="fp32", engine="keras")
    shrunk = np.stack([resize_image(image, 64) for image in images])
    small_maps = [cv2.resize(m, (96, 96), interpolation=cv2.INTER_LINEAR)
                  for m in small_net.probabilities(shrunk)]  # fmt: skip
    by_hand = (np.stack(small_maps) + large_net.probabilities(images)) / 2
    pair = open_predictor([small, large], precision="fp32", engine="keras")
    assert pair.image_size == 96 and pair.settings.image_size == 96
    np.testing.assert_allclose(pair.probabilities(images), by_hand, rtol=0, atol=1e-6)


def test_a_sweep_folder_is_the_ensemble_of_its_folds(members: dict, tmp_path: Path) -> None:
    resolved = resolve_members(members["sweep"])
    assert resolved.sweep and list(resolved.runs) == members["folds"]
    out = tmp_path / "pred"
    result = invoke("predict", "--cache", members["caches"]["folded"], "--split", "test",
                    "--run", members["sweep"], "--out", out, "--json", "--precision", "fp32",
                    "--engine", "keras")  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads((out / "job.json").read_text())
    assert job["model"] == str(members["sweep"].resolve())
    assert job["members"] == [str((run / "best.keras").resolve()) for run in members["folds"]]
    assert len(job["model_sha256"]) == 64


def test_mismatched_or_unfinished_members_are_refused(members: dict, tmp_path: Path) -> None:
    cache = members["caches"]["folded"]
    result = invoke("predict", "--cache", cache, "--split", "test", "--run", members["folds"][0],
                    "--run", members["flat"], "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert str(members["flat"]) in line and "clahe False" in line and "clahe True" in line
    assert not (tmp_path / "o").exists()

    result = invoke("predict", "--cache", cache, "--split", "test", "--run", members["folds"][0],
                    "--run", members["folds"][0], "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1 and "in the ensemble twice" in result.stderr

    # A sweep whose fold 2 is unfinished (its state says so) is not yet an ensemble.
    import shutil

    copy = tmp_path / "cv"
    shutil.copytree(members["sweep"], copy)
    state = json.loads((copy / "fold2" / "state.json").read_text())
    (copy / "fold2" / "state.json").write_text(json.dumps({**state, "status": "interrupted"}))
    result = invoke("predict", "--cache", cache, "--split", "test", "--run", copy,
                    "--out", tmp_path / "o")  # fmt: skip
    assert result.exit_code == 1
    assert "fold 2 of" in result.stderr and f"pneumo train --resume {copy}" in result.stderr


def test_members_with_different_gates_fall_back_to_the_default_with_a_note(
    members: dict, tmp_path: Path
) -> None:
    import shutil

    from pneumo_cli.inference.postprocess import save_gate

    first = tmp_path / "first"
    shutil.copytree(members["folds"][0], first)
    save_gate(first / "postprocess.json", Gate(top_threshold=0.7, bottom_threshold=0.4))
    pair = open_predictor([first, members["folds"][1]], precision="fp32", engine="keras")
    assert pair.gate == Gate()
    assert any("different post-processing gates" in text for _, text in pair.notes)


def _per_image(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "per_image.csv", newline="") as handle:
        return {row["ImageId"]: row for row in csv.DictReader(handle)}


def test_out_of_fold_scores_every_train_and_val_image_once_by_its_own_fold(
    members: dict, tmp_path: Path
) -> None:
    import shutil

    from pneumo_cli.data.cache import load_manifest
    from pneumo_cli.evaluation.model_eval import evaluate_run

    sweep = tmp_path / "cv"
    shutil.copytree(members["sweep"], sweep)  # --tune writes the sweep's gate
    cache = members["caches"]["folded"]
    result = evaluate_run(sweep, cache=cache, tune=True, precision="fp32", engine="keras")
    metrics = result.evaluation.metrics
    assert metrics["mode"] == "out-of-fold" and metrics["split"] == "oof"
    assert result.out_dir == sweep / "eval-oof"

    manifest = load_manifest(cache)
    pool = manifest[(manifest["split"] != "test") & (manifest["mask"] != "")]
    rows = _per_image(result.out_dir)
    assert sorted(rows) == sorted(pool["ImageId"])  # each labelled train/val image, once
    # Each image's map is its own fold's model's: the peaks agree with that model alone.
    sources, load = cache_sources(cache, "train")
    val_sources, _ = cache_sources(cache, "val")
    fold_of = dict(zip(pool["ImageId"], pool["fold"].astype(int), strict=True))
    for k, run in enumerate(members["folds"]):
        mine = [row for image_id, row in sources + val_sources if fold_of.get(image_id) == k]
        net = load_predictor(run, precision="fp32", engine="keras")
        peaks = net.probabilities(np.stack([load(row).image for row in mine])).max(axis=(1, 2))
        for row, peak in zip(mine, peaks, strict=True):
            assert float(rows[row["ImageId"]]["max_prob"]) == pytest.approx(peak, abs=1e-6)
    by_fold = {Path(entry["run"]).name: entry for entry in metrics["members"]}
    assert list(by_fold) == ["fold0", "fold1", "fold2"]
    assert [by_fold[f"fold{k}"]["images"] for k in range(3)] == [
        int((pool["fold"].astype(int) == k).sum()) for k in range(3)
    ]
    assert all(entry["scored_on"] == "its own validation fold" for entry in by_fold.values())

    # The tuned gate is the sweep's, and the test split is scored by the ensemble with it.
    saved = json.loads((sweep / "postprocess.json").read_text())
    assert saved == metrics["gate"]
    test = evaluate_run(sweep, cache=cache, split="test", precision="fp32", engine="keras")
    assert test.evaluation.metrics["gate"] == saved
    assert test.evaluation.metrics["gate_source"] == str(sweep / "postprocess.json")
    assert test.evaluation.metrics["mode"] == "ensemble"
    assert len(test.evaluation.metrics["members"]) == 3
    report = (test.out_dir / "report.html").read_text()
    assert "Members and ensemble" in report and "fold2" in report
    assert "Each fold's model on its own fold" in (result.out_dir / "report.html").read_text()


def test_each_member_beside_the_ensemble_scores_as_it_does_alone(
    members: dict, tmp_path: Path
) -> None:
    from pneumo_cli.evaluation.model_eval import evaluate_run

    cache = members["caches"]["folded"]
    pair = members["folds"][:2]
    together = evaluate_run(pair, cache=cache, split="test", out_dir=tmp_path / "pair",
                            precision="fp32", engine="keras")  # fmt: skip
    beside = {entry["run"]: entry for entry in together.evaluation.metrics["members"]}
    for run in pair:
        alone = evaluate_run(run, cache=cache, split="test", out_dir=tmp_path / run.name,
                             precision="fp32", engine="keras").evaluation.metrics  # fmt: skip
        for key in ("mean_dice", "positive_mean_dice", "mean_iou"):
            assert beside[str(run)][key] == alone[key], key
        assert beside[str(run)]["images"] == alone["n_images"]


def test_evaluate_refuses_what_an_ensemble_cannot_do(members: dict, tmp_path: Path) -> None:
    cache, sweep = members["caches"]["folded"], members["sweep"]
    first, second = members["folds"][:2]
    result = invoke("evaluate", "--run", sweep, "--cache", cache, "--split", "val")
    assert result.exit_code == 1 and "drop --split to score (and --tune) it out of fold" in (
        result.stderr
    )
    result = invoke("evaluate", "--run", first, "--run", second, "--cache", cache, "--tune",
                    "--out", tmp_path / "t")  # fmt: skip
    assert result.exit_code == 1 and "nowhere to keep the gate" in result.stderr
    result = invoke("evaluate", "--run", first, "--run", second, "--cache", cache,
                    "--split", "test")  # fmt: skip
    assert result.exit_code == 2 and "give --out" in result.stderr
    # A fold's own model refuses the cache's val split: it trained on some of those images.
    result = invoke("evaluate", "--run", first, "--cache", cache, "--split", "val",
                    "--out", tmp_path / "v")  # fmt: skip
    assert result.exit_code == 1 and "training images would be scored as held out" in (
        result.stderr
    )
    assert not (tmp_path / "t").exists() and not (tmp_path / "v").exists()


def test_export_of_an_ensemble_is_one_graph_averaging_its_members(
    members: dict, tmp_path: Path
) -> None:
    from pneumo_cli.export.export import export_run
    from pneumo_cli.inference.exported import load_exported_predictor

    pair = members["folds"][:2]
    out = tmp_path / "onnx"
    summary = export_run(pair, "onnx", out)
    assert summary.parity.passed
    manifest = json.loads((out / "pneumo-model.json").read_text())
    assert [m["run"] for m in manifest["members"]] == [str(run.resolve()) for run in pair]
    assert manifest["source_run"]["model"] is None
    images = _test_images(members["caches"]["folded"])
    exported = load_exported_predictor(out)
    together = open_predictor(pair, precision="fp32", engine="keras")
    np.testing.assert_allclose(exported.probabilities(images), together.probabilities(images),
                               rtol=0, atol=1e-4)  # fmt: skip

    result = invoke("export", "--format", "onnx", "--run", members["folds"][0], "--run",
                    members["large"], "--out", tmp_path / "mixed")  # fmt: skip
    assert result.exit_code == 1
    assert "image size 96" in result.stderr and "one exported graph" in result.stderr
    assert not (tmp_path / "mixed").exists()


def test_downscale_first_members_must_share_the_setting_and_one_image_size() -> None:
    from types import SimpleNamespace

    from pneumo_cli.core.errors import ConfigError
    from pneumo_cli.inference.ensemble import check_members_agree

    def member(name: str, **settings: object) -> SimpleNamespace:
        config = PreprocessConfig(**settings)  # type: ignore[arg-type]
        return SimpleNamespace(run_dir=Path(name), settings=config, image_size=config.image_size)

    fast = member("a", downscale_first=True)
    check_members_agree([fast, member("b", downscale_first=True)])
    with pytest.raises(ConfigError, match="downscale_first False, a with downscale_first True"):
        check_members_agree([fast, member("b")])
    # CLAHE ran at each member's own size: a shrunk 512 px image is not what a 256 px one saw.
    with pytest.raises(ConfigError, match="must share one image size"):
        check_members_agree([fast, member("c", downscale_first=True, image_size=512)])
    check_members_agree([member("d"), member("e", image_size=512)])  # the paper's order may
