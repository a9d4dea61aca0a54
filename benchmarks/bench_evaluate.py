"""Evaluation benchmark: offline scoring of a 3,205-image submission, and gate tuning.

Run: .venv/bin/python benchmarks/bench_evaluate.py [path/to/train-rle.csv.gz]
Targets (issue 6): scoring a 3,205-image submission CSV against truth at 1024 x 1024 in < 10 s;
``--tune`` over the 5 x 5 x 5 x 3 grid on 1,000 validation probability maps in < 60 s.

The submission is built from the real stage-2 labels: the first 3,205 ImageIds, with predictions
= truth shifted, eroded, dropped (missed) or with false blobs on some empty images. The tuning maps
are synthetic 256 x 256 probability maps (blurred blobs of random confidence plus specks).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

from pneumo_cli.core.metrics import dice_score
from pneumo_cli.evaluation.scoring import score_submission, write_evaluation
from pneumo_cli.evaluation.tuning import GateGrid, tune_gate
from pneumo_cli.inference.postprocess import Gate, apply_gate
from pneumo_cli.io.rle import decode_union, encode_rle, read_rle_csv

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared/siim/csv/train-rle.csv.gz"
SUBMISSION_IMAGES = 3205
TUNING_IMAGES = 1000
WORK_SIZE = 256


def build_submission(truth_csv: Path, folder: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """Write truth.csv (all rows of the first 3,205 ImageIds) and a perturbed predictions.csv."""
    import cv2

    grouped: dict[str, list[str]] = {}
    for row in read_rle_csv(truth_csv):
        if row.image_id in grouped or len(grouped) < SUBMISSION_IMAGES:
            grouped.setdefault(row.image_id, []).append(row.encoded)
    truth_path, pred_path = folder / "truth.csv", folder / "predictions.csv"
    with open(truth_path, "w", newline="") as t, open(pred_path, "w", newline="") as p:
        truth_out, pred_out = csv.writer(t), csv.writer(p)
        truth_out.writerow(("ImageId", "EncodedPixels"))
        pred_out.writerow(("ImageId", "max_prob", "EncodedPixels"))
        for image_id, strings in grouped.items():
            truth_out.writerows((image_id, s) for s in strings)
            positive = strings != ["-1"]
            draw = rng.random()
            if positive and draw < 0.15:  # missed
                pred, prob = "-1", rng.uniform(0.1, 0.5)
            elif positive:
                mask = np.roll(decode_union(strings), int(rng.integers(-20, 21)), axis=0)
                if draw > 0.6:  # a tighter or looser outline
                    kernel = np.ones((int(rng.integers(3, 12)),) * 2, np.uint8)
                    morph = cv2.erode if draw > 0.8 else cv2.dilate
                    mask = morph(mask, kernel)
                pred, prob = encode_rle(mask), rng.uniform(0.5, 1.0)
            elif draw < 0.08:  # a false blob on an empty image
                mask = np.zeros((1024, 1024), np.uint8)
                top, left = rng.integers(100, 800, 2)
                mask[top : top + 80, left : left + 60] = 1
                pred, prob = encode_rle(mask), rng.uniform(0.5, 0.9)
            else:
                pred, prob = "-1", rng.uniform(0.0, 0.5)
            pred_out.writerow((image_id, f"{prob:.4f}", pred))
    return truth_path, pred_path


def synthetic_maps(rng: np.random.Generator, count: int, size: int):
    """``count`` (prob, truth) pairs at ``size`` px; about 22% positive, like SIIM."""
    import cv2

    yy, xx = np.mgrid[:size, :size]
    probs, truths = [], []
    for _ in range(count):
        logits = np.full((size, size), -4.0, np.float32)
        truth = np.zeros((size, size), np.uint8)
        positive = rng.random() < 0.22
        for blob in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(20, size - 20, 2)
            ry, rx = rng.uniform(3, 30, 2)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            logits[inside] = rng.uniform(-1.5, 4.0)
            if positive and blob == 0:
                truth[((yy - cy - 2) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 1
        logits += rng.normal(0, 0.8, logits.shape).astype(np.float32)
        logits = cv2.GaussianBlur(logits, (7, 7), 2.0)
        probs.append((1 / (1 + np.exp(-logits))).astype(np.float32))
        truths.append(truth)
    return probs, truths


def timed(fn, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    truth_csv = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CSV
    if not truth_csv.is_file():
        sys.exit(f"{truth_csv} not found: pass the path to train-rle.csv(.gz)")
    rng = np.random.default_rng(2019)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        truth_path, pred_path = build_submission(truth_csv, folder, rng)
        seconds, evaluation = timed(lambda: score_submission(pred_path, truth_path), repeats=3)
        m = evaluation.metrics
        rows.append(
            (
                f"score_submission, {m['n_images']} images at 1024x1024 (best of 3)",
                f"{seconds:.2f} s",
                "< 10 s",
            )
        )
        seconds, _ = timed(lambda: write_evaluation(evaluation, folder / "eval"))
        rows.append(
            ("write metrics.json, per_image.csv, 3 plots, report.html", f"{seconds:.2f} s", "")
        )
        command = [
            str(ROOT / ".venv/bin/pneumo"),
            "evaluate",
            "--predictions",
            str(pred_path),
            "--truth",
            str(truth_path),
            "--json",
            "--quiet",
        ]
        seconds, _ = timed(lambda: subprocess.run(command, capture_output=True, check=True))
        rows.append(
            ("`pneumo evaluate --predictions --truth` end to end", f"{seconds:.2f} s", "< 10 s")
        )
        headline = (
            f"mean Dice {m['mean_dice']:.4f}, positives {m['positive_mean_dice']:.4f}, "
            f"AUC {m['roc_auc']:.4f}"
        )

    probs, truths = synthetic_maps(rng, TUNING_IMAGES, WORK_SIZE)
    scale = (WORK_SIZE / 1024) ** 2
    grid = GateGrid()
    seconds, results = timed(lambda: tune_gate(probs, truths, grid, area_scale=scale))
    points = len(results)
    rows.append(
        (
            f"tune_gate, {points} gates x {TUNING_IMAGES} maps at {WORK_SIZE} px",
            f"{seconds:.2f} s",
            "< 60 s",
        )
    )
    sample = 20
    brute, _ = timed(
        lambda: [
            [
                dice_score(t, apply_gate(p, g, scale))
                for p, t in zip(probs[:sample], truths[:sample], strict=True)
            ]
            for g in grid.gates()
        ]
    )
    rows.append(
        (
            f"brute force apply_gate per grid point, extrapolated to {TUNING_IMAGES} maps",
            f"{brute * TUNING_IMAGES / sample:.1f} s",
            "(for comparison)",
        )
    )
    best = results[0]
    default = next(r for r in results if r.gate == Gate())
    tuned = (
        f"tuned gate {best.gate}: mean Dice {best.mean_dice:.4f} "
        f"(the default 0.5/0/0.5/0 gate: {default.mean_dice:.4f})"
    )

    print(machine_line() + "\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement'.ljust(width)}  {'time':>9}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>9}  {target}")
    print(f"\nsubmission scores: {headline}")
    print(tuned)


if __name__ == "__main__":
    main()
