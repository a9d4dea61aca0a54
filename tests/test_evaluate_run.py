"""`pneumo evaluate` on a trained run (model mode): tuning, both resolutions, outputs, refusals."""

from __future__ import annotations

import json
import re
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import to_dict
from pneumo_cli.evaluation.scoring import score_submission
from pneumo_cli.inference.postprocess import Gate, load_gate
from pneumo_cli.inference.predictor import load_predictor

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_tune_then_score_val(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    result = invoke("evaluate", "--run", run, "--split", "val", "--tune", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    out = run / "eval-val"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # The winner is saved for predict and reported with the numbers it was scored with.
    gate = load_gate(run / "postprocess.json")
    assert metrics["gate"] == {
        "top_threshold": gate.top_threshold,
        "min_area_px": gate.min_area_px,
        "bottom_threshold": gate.bottom_threshold,
        "min_component_area_px": gate.min_component_area_px,
    }
    assert metrics["tuning"]["grid_points"] == 5 * 5 * 5 * 3
    best = metrics["tuning"]["best"]
    assert best[0]["mean_dice"] >= best[-1]["mean_dice"]
    manifest = pd.read_csv(tiny_run["cache"] / "manifest.csv")
    labelled_val = manifest[(manifest["split"] == "val") & manifest["mask"].notna()]
    assert metrics["n_images"] == len(labelled_val)
    assert metrics["split"] == "val" and metrics["resolution"]["at"] == "original"
    per_image = pd.read_csv(out / "per_image.csv")
    assert sorted(per_image["ImageId"]) == sorted(labelled_val["ImageId"])
    # Original resolution: truth areas are the manifest's original-pixel areas.
    areas = dict(zip(labelled_val["ImageId"], labelled_val["mask_area_px"], strict=True))
    assert all(areas[r.ImageId] == r.truth_area for r in per_image.itertuples())
    # The report links only files that exist.
    html = (out / "report.html").read_text()
    for target in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert (out / target).is_file(), target
    # Scoring the written predictions offline against the cache's truth gives the same number.
    offline = score_submission(out / "predictions.csv", tiny_run["cache"] / "truth.csv", True,
                               128, 128)  # fmt: skip
    assert abs(offline.metrics["mean_dice"] - metrics["mean_dice"]) < 1e-12


def test_score_test_at_model_resolution(tiny_run, tmp_path):
    out = tmp_path / "eval"
    result = invoke(
        "evaluate", "--run", tiny_run["run"], "--split", "test", "--at", "model",
        "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["resolution"] == {"at": "model", "height": 64, "width": 64}
    # Recomputed independently: the run's network on the cached test images (default gate, so a
    # pixel is predicted when > 0.5) against the cached 64 px masks, Dice per image, then mean.
    assert metrics["gate"] == to_dict(Gate()) and metrics["tta"] == "none"
    manifest = pd.read_csv(tiny_run["cache"] / "manifest.csv")
    test = manifest[(manifest["split"] == "test") & manifest["mask"].notna()]
    images = np.stack([cv2.imread(str(tiny_run["cache"] / f), 0) for f in test["image"]])
    truths = np.stack([cv2.imread(str(tiny_run["cache"] / f), 0) > 0 for f in test["mask"]])
    predictor = load_predictor(tiny_run["run"])
    probs = np.concatenate([predictor.probabilities(images[i : i + 8])  # evaluate's batches
                            for i in range(0, len(images), 8)])  # fmt: skip
    preds = probs > 0.5
    shared = (truths & preds).sum(axis=(1, 2))
    total = truths.sum(axis=(1, 2)) + preds.sum(axis=(1, 2))
    dice = np.where(total > 0, 2 * shared / np.maximum(total, 1), 1.0)
    per_image = pd.read_csv(out / "per_image.csv").set_index("ImageId").loc[test["ImageId"]]
    np.testing.assert_array_equal(per_image["truth_area"], truths.sum(axis=(1, 2)))
    np.testing.assert_array_equal(per_image["pred_area"], preds.sum(axis=(1, 2)))
    np.testing.assert_allclose(per_image["dice"], dice, atol=1e-9)
    assert metrics["n_images"] == len(test) > 0
    assert abs(metrics["mean_dice"] - dice.mean()) < 1e-9
    assert not (tiny_run["run"] / "eval-test").exists()  # --out was honoured


def test_refusals(tiny_run, tmp_path):
    result = invoke("evaluate", "--run", tiny_run["run"], "--split", "test", "--tune")
    assert result.exit_code == 1 and "--tune on the test split is refused" in result.output
    cache = tmp_path / "cache"
    shutil.copytree(tiny_run["cache"], cache)
    manifest = pd.read_csv(cache / "manifest.csv")
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.to_csv(cache / "manifest.csv", index=False)
    result = invoke("evaluate", "--run", tiny_run["run"], "--cache", cache, "--split", "val")
    assert result.exit_code == 1 and "has no images in split 'val'" in result.output
    settings = json.loads((cache / "preprocess.json").read_text())
    settings["settings"]["image_size"] = 96
    (cache / "preprocess.json").write_text(json.dumps(settings))
    result = invoke("evaluate", "--run", tiny_run["run"], "--cache", cache, "--split", "train")
    assert result.exit_code == 1 and "preprocessed differently" in result.output
    assert "image_size 96 vs 64" in result.output
    settings["settings"]["image_size"] = 64
    settings["settings"]["downscale_first"] = True  # the pixels differ, the size does not
    (cache / "preprocess.json").write_text(json.dumps(settings))
    result = invoke("evaluate", "--run", tiny_run["run"], "--cache", cache, "--split", "train")
    assert result.exit_code == 1 and "downscale_first True vs False" in result.output


@pytest.mark.slow
def test_a_cache_split_with_another_seed_is_refused(tiny_run, tmp_path) -> None:
    """Same images, `--seed 7` instead of 42: some training images land in val, and scoring
    them as held out would flatter the run. The run's splits.csv catches it; a run without that
    record (an older pneumo) is checked by its split settings."""
    import shutil

    from pneumo_cli.core.config import PreprocessConfig
    from pneumo_cli.data.preprocess import run_preprocess

    resplit = tmp_path / "seed7"
    run_preprocess(tiny_run["raw"], resplit, PreprocessConfig(image_size=64, seed=7),
                   rle_csv=tiny_run["raw"] / "train-rle.csv", workers=1)  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    result = invoke("evaluate", "--run", run, "--cache", resplit, "--out", tmp_path / "e")
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "that were in another split when" in message and "'train' then" in message
    assert not (tmp_path / "e" / "metrics.json").exists()
    (run / "splits.csv").unlink()
    older = invoke("evaluate", "--run", run, "--cache", resplit, "--out", tmp_path / "e")
    assert older.exit_code == 1 and "seed 42 -> 7" in " ".join(older.stderr.split())
    same = invoke("evaluate", "--run", run, "--cache", tiny_run["cache"], "--out", tmp_path / "s")
    assert same.exit_code == 0, same.output


@pytest.mark.slow
def test_evaluate_scores_exactly_what_predict_writes(tiny_run, tmp_path) -> None:
    """The same run, split and TTA: evaluate's per-image records (areas, max_prob, RLE) equal
    those of `predict --cache` for every image (evaluate once rounded the maps to float16)."""
    import csv
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    evaluated = invoke("evaluate", "--run", run, "--split", "test", "--out", tmp_path / "e")
    predicted = invoke("predict", "--run", run, "--cache", tiny_run["cache"], "--split", "test",
                       "--out", tmp_path / "p")  # fmt: skip
    assert evaluated.exit_code == 0 and predicted.exit_code == 0, (evaluated.output, predicted)

    def rows(path):
        with open(path, newline="") as handle:
            return {row["ImageId"]: row for row in csv.DictReader(handle)}

    scored, written = (
        rows(tmp_path / "e" / "predictions.csv"),
        rows(tmp_path / "p" / "predictions.csv"),
    )
    labelled = {r["ImageId"] for r in rows(tmp_path / "e" / "per_image.csv").values()}
    assert labelled and set(scored) == labelled <= set(written)
    assert {i: written[i] for i in labelled} == scored
