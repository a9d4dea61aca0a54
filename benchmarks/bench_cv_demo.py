"""Cross-validation on the demo data: each fold's model against the 3-fold ensemble, on the
held-out test split, for each way of using a run's top-3 checkpoints.

Run: .venv/bin/python benchmarks/bench_cv_demo.py [--work DIR] [--epochs 20]

The dataset and training settings are `make demo`'s (300 synthetic X-rays, 128 px, resnet18 from
a random start, batch 16, --pos-fraction 0.5, patience 6), with the cache split into 3 folds.
One sweep is trained (`train --cv --keep-top 3`); its folds are then used three ways, in
copies of the sweep: ``best`` (best.keras), ``average`` (the top-3 weights averaged, BatchNorm
statistics recomputed) and ``ensemble`` (the top-3 checkpoints' maps averaged). For each way
the gate is tuned out of fold (`evaluate --tune` on the sweep) and the test split is scored by
the ensemble, each fold's model beside it under the same gate.

Prints the CPU, then one table: mean Dice and positives-only Dice on test, per fold and for the
ensemble, and the out-of-fold mean Dice. Synthetic data: the numbers say how the mechanisms
compare here, not what they reach on real X-rays. Takes about 15-30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

USES = ("best", "average", "ensemble")


def _set_use(sweep: Path, use: str) -> None:
    """Make every fold of ``sweep`` use its top checkpoints as ``use`` says: the value
    `train --top-use` would have written (the rest of checkpoints.json is unchanged)."""
    for fold in sorted(sweep.glob("fold*")):
        path = fold / "checkpoints.json"
        recorded = json.loads(path.read_text())
        path.write_text(json.dumps({**recorded, "use": use}))


def _fold_of(label: str) -> str:
    """The fold folder a member label names (a run folder, or a model file inside one)."""
    return next(part for part in reversed(Path(label).parts) if part.startswith("fold"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder to keep (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()

    from pneumo_cli.core.config import PreprocessConfig, TrainConfig
    from pneumo_cli.data.demo import write_demo_dataset
    from pneumo_cli.data.preprocess import run_preprocess
    from pneumo_cli.evaluation.model_eval import evaluate_run
    from pneumo_cli.training.cv import train_cross_validation

    print(machine_line(), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="pneumo-cv-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    raw, cache = work / "raw", work / "cache"
    if not (raw / "train-rle.csv").is_file():
        write_demo_dataset(raw, n=args.images, seed=0, size=256)
    if not (cache / "manifest.csv").is_file():
        run_preprocess(raw, cache, PreprocessConfig(image_size=128, folds=3),
                       rle_csv=raw / "train-rle.csv")  # fmt: skip
    config = TrainConfig(
        cache=str(cache), encoder="resnet18", encoder_weights="none", epochs=args.epochs,
        batch_size=16, pos_fraction="0.5", patience=6, gpus=0, keep_top=3, top_use="best",
    )  # fmt: skip
    start = time.perf_counter()
    sweep = train_cross_validation(config, work / "runs", "cv")
    train_s = time.perf_counter() - start
    print(f"trained 3 folds in {train_s / 60:.1f} min", flush=True)

    rows = []
    for use in USES:
        copy = work / "runs" / f"cv-{use}"
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(sweep.run_dir, copy)
        _set_use(copy, use)
        oof = evaluate_run(copy, tune=True).evaluation.metrics
        test = evaluate_run(copy, split="test").evaluation.metrics
        for member in test["members"]:
            rows.append((use, _fold_of(member["run"]), member["mean_dice"],
                         member["positive_mean_dice"], None))  # fmt: skip
        rows.append((use, "ensemble", test["mean_dice"], test["positive_mean_dice"],
                     oof["mean_dice"]))  # fmt: skip
    checkpoint_scores = {
        fold.name: json.loads((fold / "checkpoints.json").read_text())["val_dice"]
        for fold in sorted(Path(sweep.run_dir).glob("fold*"))
    }

    print(f"\ntest split: {test['n_images']} images ({test['n_positive']} positive)")
    print(f"{'top-3 use':<10} {'model':<9} {'test Dice':>9} {'test pos Dice':>13} {'OOF Dice':>9}")
    for use, model, dice, pos, oof_dice in rows:
        shown = "" if oof_dice is None else f"{oof_dice:.4f}"
        print(f"{use:<10} {model:<9} {dice:>9.4f} {pos or float('nan'):>13.4f} {shown:>9}")
    print("\nvalidation Dice (threshold 0.5, own fold) of each fold's checkpoints:")
    print(f"{'fold':<6} {'best':>7} {'averaged':>9} {'top-3 ensemble':>15}")
    for fold, scores in checkpoint_scores.items():
        print(f"{fold:<6} {scores['best']:>7.4f} {scores['averaged']:>9.4f} "
              f"{scores['top_ensemble']:>15.4f}")  # fmt: skip
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
