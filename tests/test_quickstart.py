"""The quickstart (`make demo`) end to end through the real CLI, at tiny sizes.

Runs `examples/quickstart.sh` in a subprocess with 1 epoch and 64 px, then checks that every
artifact the README promises exists and is well-formed. Accuracy is not checked here (one epoch
learns nothing); `make demo` at full settings is where the README's numbers come from.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from pneumo_cli.io.rle import decode_union, read_rle_csv

REPO = Path(__file__).resolve().parents[1]


def _mean_dice_of_files(predictions: Path, cache: Path) -> tuple[list[str], float]:
    """The sorted ImageIds of ``predictions`` (an RLE CSV) and their mean SIIM Dice against
    ``cache/truth.csv``, both decoded here at each image's original size (from the manifest)."""
    with open(cache / "manifest.csv") as handle:
        sizes = {r["ImageId"]: (int(r["orig_height"]), int(r["orig_width"]))
                 for r in csv.DictReader(handle)}  # fmt: skip
    strings: dict[Path, dict[str, list[str]]] = {}
    for path in (predictions, cache / "truth.csv"):
        for row in read_rle_csv(path):
            strings.setdefault(path, {}).setdefault(row.image_id, []).append(row.encoded)
    predicted, truth = strings[predictions], strings[cache / "truth.csv"]
    scores = []
    for image_id in sorted(predicted):
        pred = decode_union(predicted[image_id], *sizes[image_id]) > 0
        true = decode_union(truth[image_id], *sizes[image_id]) > 0
        total = int(pred.sum() + true.sum())
        scores.append(2 * int((pred & true).sum()) / total if total else 1.0)  # empty vs empty
    return sorted(predicted), float(np.mean(scores))


def test_quickstart_runs_end_to_end(tmp_path):
    demo = tmp_path / "demo"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DEMO_DIR": str(demo),
        "DEMO_N": "40",
        "DEMO_RAW_SIZE": "128",
        "DEMO_IMAGE_SIZE": "64",
        "DEMO_EPOCHS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pneumo quickstart finished" in result.stdout
    assert "test mean Dice (SIIM, empty vs empty = 1)" in result.stdout

    raw = demo / "raw"
    assert (raw / "train-rle.csv").is_file()
    dicoms = list((raw / "dicom-images-train").rglob("*.dcm"))
    assert len(dicoms) == 44  # 40 images + 4 corrupt files
    assert len(list((demo / "masks").glob("*.png"))) == 40
    cache = demo / "cache"
    for name in ("manifest.csv", "preprocess.json", "truth.csv", "rejected.csv"):
        assert (cache / name).is_file(), name
    run = (demo / "runs" / "latest").resolve()
    for name in ("config.json", "best.keras", "last.keras", "history.csv", "curves.png",
                 "summary.json", "postprocess.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["keras_engine"].startswith("tf-keras")
    for split in ("val", "test"):
        folder = run / f"eval-{split}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["split"] == split and metrics["resolution"]["at"] == "original"
        ids, mean_dice = _mean_dice_of_files(folder / "predictions.csv", cache)
        with open(folder / "per_image.csv") as handle:
            assert sorted(row["ImageId"] for row in csv.DictReader(handle)) == ids
        assert metrics["n_images"] == len(ids) > 0
        assert abs(metrics["mean_dice"] - mean_dice) < 1e-9
        for name in ("per_image.csv", "roc.png", "pr.png", "dice_hist.png", "report.html"):
            assert (folder / name).is_file(), f"eval-{split}/{name}"
    assert json.loads((demo / "test-metrics.json").read_text()) == json.loads(
        (run / "eval-test" / "metrics.json").read_text()
    )
    test_ids = [line.split("/")[-1].removesuffix(".dcm") for line in
                (demo / "test-files.txt").read_text().split()]  # fmt: skip
    with open(demo / "predictions" / "predictions.csv") as handle:
        predicted = [row["ImageId"] for row in csv.DictReader(handle)]
    assert sorted(predicted) == sorted(test_ids) and test_ids
    for image_id in test_ids:
        mask = cv2.imread(str(demo / "predictions" / "masks" / f"{image_id}.png"), 0)
        assert mask.shape == (128, 128)
        overlay = cv2.imread(str(demo / "overlays" / f"{image_id}.png"))
        assert overlay is not None and overlay.shape[0] >= 128


def test_siim_recipe_script_runs_on_the_kaggle_layout(tiny_run, tmp_path):
    # examples/siim.sh on data in the Kaggle layout (the demo dataset), shrunk to a dry run.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RECIPE": "strong",
        "SIZE": "64",
        "EPOCHS": "1",
        "ENCODER": "resnet18",
        "WEIGHTS": "none",
        "GPUS": "0",
        "FOLDS": "2",
        "WORK": str(tmp_path / "work"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "siim.sh"), str(tiny_run["raw"])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test mean Dice (SIIM):" in result.stdout
    sweep = (tmp_path / "work" / "runs" / "latest").resolve()
    assert sweep.name == "cv" and (sweep / "ensemble.json").is_file()
    for fold in range(2):
        config = json.loads((sweep / f"fold{fold}" / "config.json").read_text())
        assert (config["loss"], config["pos_fraction"], config["image_size"]) == (
            "bce-dice",
            "0.8:0.4",
            64,
        )
        assert (config["fold"], config["keep_top"], config["top_use"]) == (fold, 3, "average")
    assert (sweep / "postprocess.json").is_file()  # tuned out of fold
    oof = json.loads((sweep / "eval-oof" / "metrics.json").read_text())
    assert oof["mode"] == "out-of-fold" and len(oof["members"]) == 2
    metrics = json.loads((sweep / "eval-test" / "metrics.json").read_text())
    assert metrics["tta"] == "hflip" and metrics["split"] == "test"
    assert metrics["mode"] == "ensemble" and len(metrics["members"]) == 2
    assert metrics["gate_source"] == str(sweep / "postprocess.json")
