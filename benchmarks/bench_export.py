"""Inference speed of every export path, and each path's accuracy relative to Keras float32.

Run: .venv/bin/python benchmarks/bench_export.py [--encoder resnet34] [--size 256] [--repeats 20]
     .venv/bin/python benchmarks/bench_export.py --run runs/train   (a trained run instead)

Builds a run (resnet34 U-Net at 256 px, random start, one training step on synthetic images:
speed does not depend on the weights), then sets every BatchNorm layer's moving statistics to
those of a batch of synthetic X-rays. Without that the random network's logits reach 1e4 and
float32 rounding alone moves probabilities by 1e-2 between runtimes, which no trained model
shows; with it the logits are O(1), as in a trained model. It then exports the run with
``pneumo_cli.export.export_run`` to SavedModel, TFLite (float32, float16, int8) and ONNX, each
passing its parity check, and times:

- single-image latency: median wall time of one (1, S, S, 1) call over ``--repeats`` calls;
- batch-16 throughput: 16 / median wall time of a (16, S, S, 1) call.

Keras is the run's model behind one ``tf.function`` (what ``pneumo predict --run`` uses). TFLite
runs with XNNPACK on 2 threads, ONNX Runtime with 2 intra-op threads. The accuracy columns are
the export's parity report against Keras float32 on the run cache's images (max and mean
absolute probability difference, mask pixel agreement, mean per-image Dice at threshold 0.5).
Wall-clock times: anything else running on the machine slows them down; the load average is
printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THREADS = 2

from bench_predict import build_run  # noqa: E402  (same folder; run as a script)


def calibrate_batchnorm(run_dir: Path, size: int) -> None:
    """Give ``best.keras``'s BatchNorm layers the statistics of 8 synthetic X-rays."""
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.inference.run_images import synthetic_images
    from pneumo_cli.model.encoders import scale_input
    from pneumo_cli.model.saving import load_model, save_model

    tf = import_tf()
    scaling = json.loads((run_dir / "config.json").read_text())["input_scaling"]
    model = load_model(run_dir / "best.keras")
    layers = [x for x in model.layers if isinstance(x, tf.keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = 0.0  # the moving statistics become this batch's statistics
    images = synthetic_images(size, 8, seed=5)[..., np.newaxis]
    model(scale_input(images, scaling), training=True)
    for layer in layers:
        layer.momentum = 0.99
    save_model(model, run_dir / "best.keras")


def time_calls(
    run: Callable[[np.ndarray], object], batch: np.ndarray, repeats: int, warmup: int = 3
) -> float:
    """Median seconds of ``run(batch)`` after ``warmup`` warm-up calls."""
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def passes(parity: object, tolerance: object) -> str:
    """``pass`` or ``FAIL``: would ``export_run`` keep this export under its real tolerance?"""
    checks = [parity.mask_agreement >= tolerance.min_mask_agreement]
    if tolerance.max_abs_diff is not None:
        checks.append(parity.max_abs_diff <= tolerance.max_abs_diff)
    if tolerance.mean_abs_diff is not None:
        checks.append(parity.mean_abs_diff <= tolerance.mean_abs_diff)
    return "pass" if all(checks) else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--run", type=Path, help="Export this trained run instead of building a random one."
    )
    args = parser.parse_args()
    if args.run is not None:
        config = json.loads((args.run / "config.json").read_text())
        args.encoder, args.size = config["encoder"], config["image_size"]

    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.export import export as export_module
    from pneumo_cli.export import parity
    from pneumo_cli.export.backends import serving_function
    from pneumo_cli.export.export import export_run
    from pneumo_cli.inference.exported import load_runner
    from pneumo_cli.model.saving import load_model

    # Measure, do not gate: every export is kept and its parity is judged against the real
    # tolerances in the table's last column.
    tolerances = dict(parity.TOLERANCES)
    export_module.TOLERANCES = {key: parity.Tolerance(None, None, 0.0) for key in tolerances}
    tf = import_tf()
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (1, args.size, args.size, 1)).astype(np.float32)
    batch = rng.integers(0, 256, (16, args.size, args.size, 1)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.run is None:
            print(f"building a {args.encoder} run at {args.size} px ...", file=sys.stderr)
            run_dir = build_run(root, args.encoder, args.size)
            calibrate_batchnorm(run_dir, args.size)
        else:
            run_dir = args.run
        model = load_model(run_dir / "best.keras")
        scaling = json.loads((run_dir / "config.json").read_text())["input_scaling"]
        forward = serving_function(model, scaling, args.size)

        def keras(x: np.ndarray) -> np.ndarray:
            return forward(tf.constant(x))["probability"].numpy()

        paths: list[tuple[str, Callable[[np.ndarray], object], dict, float]] = [
            ("Keras tf.function fp32", keras, {}, 0.0)
        ]
        for fmt, quantize in (
            ("savedmodel", None),
            ("tflite", None),
            ("tflite", "float16"),
            ("tflite", "int8"),
            ("onnx", None),
        ):
            label = {"savedmodel": "SavedModel", "tflite": "TFLite", "onnx": "ONNX Runtime"}[fmt]
            label += f" {quantize or 'fp32'}".replace("float16", "fp16")
            print(f"exporting {label} ...", file=sys.stderr)
            summary = export_run(run_dir, fmt, root / f"{fmt}-{quantize}", quantize=quantize)
            runner = load_runner(fmt, summary.model, threads=THREADS)
            parity = summary.parity.to_dict()
            parity["size_mb"] = summary.size_mb
            parity["passes"] = passes(summary.parity, tolerances[quantize or "float32"])
            paths.append((label, runner, parity, summary.seconds))
        for label, runner, parity, export_seconds in paths:
            print(f"timing {label} ...", file=sys.stderr)
            latency = time_calls(runner, single, args.repeats)
            per_batch = time_calls(runner, batch, max(5, args.repeats // 4))
            rows.append((label, latency, 16 / per_batch, parity, export_seconds))
    load_after = os.getloadavg()

    print(
        f"\nexport paths, {args.encoder} U-Net at {args.size} px"
        f" ({'run ' + str(args.run) if args.run else 'random weights, BatchNorm calibrated'}), "
        f"{THREADS} threads "
        f"(goal: <= 25 ms single image, >= 50 images/s at batch 16)"
    )
    header = (
        f"{'path':<24} {'1 image ms':>10} {'b16 img/s':>9} {'MB':>6} {'export s':>8} "
        f"{'max|dp|':>8} {'mean|dp|':>9} {'agree %':>8} {'Dice':>6} {'parity':>6}"
    )
    print(machine_line())
    print(header)
    print("-" * len(header))
    for label, latency, throughput, parity, export_seconds in rows:
        if parity:
            accuracy = (
                f"{export_seconds:>8.1f} {parity['max_abs_diff']:>8.2g} "
                f"{parity['mean_abs_diff']:>9.2g} {100 * parity['mask_agreement']:>8.3f} "
                f"{parity['dice_agreement']:>6.3f} {parity['passes']:>6}"
            )
            size = f"{parity['size_mb']:>6.1f}"
        else:
            accuracy, size = f"{'-':>8} {'reference':>8}", f"{'-':>6}"
        print(f"{label:<24} {1000 * latency:>10.1f} {throughput:>9.1f} {size} {accuracy}")
    print(
        f"\nload average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)}; CPU: {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
