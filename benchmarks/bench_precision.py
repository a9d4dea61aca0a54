"""Training speed in fp32 and bf16, CPU settings, multi-worker throughput, and accuracy parity.

Sections (each runs in fresh processes so thread and oneDNN settings take effect):

- ``speed``: images/s of ``fit`` steps for the resnet34 U-Net at 256 px, batch 16, one batch
  held in memory (the network alone), in fp32 and bf16, under a few settings: TensorFlow's
  default threading, intra-op threads = cores with inter-op 1, the encoder's input
  normalisation trained (``--input-norm trainable``) instead of frozen, pneumo's fast paths
  undone (``plain Keras ops``: Keras' Adam, upsampling gradient, fused input batch norm and
  zero-padding layers, see ``pneumo_cli/model/fastpaths.py``), and oneDNN off. Each is batch / the
  median time between the ends of consecutive steps, after a warm-up fit; with ``--repeat N``,
  the median of N processes (run interleaved; one process's speed varies by ~4% from the next
  here).
  GFLOP/s = images/s x 3 x 15.7 GFLOP, against the measured peaks 533 (fp32) / 989 (bf16).
- ``multi-worker``: the same model trained by 2 worker processes on 127.0.0.1 (pneumo's
  MultiWorkerMirroredStrategy path). Both share this machine's cores, so expect LESS than one
  process: the point is that it works, not that it is faster here.
- ``parity``: the same seed and synthetic data (the demo's X-rays, 300 at 256 px) trained in fp32
  and in bf16 at full size (resnet34 U-Net, 256 px, batch 16, random start, lr 3e-4) for 24
  epochs; the best validation SIIM Dice of each (issue 8 asks for them within 0.02). About 25
  minutes here; ``--parity-input-norm`` adds a bf16 run with the input normalisation trained.

Usage (a quiet machine gives the real numbers; each row prints the 1-minute load average):
    .venv/bin/python benchmarks/bench_precision.py                 # speed + multi-worker
    .venv/bin/python benchmarks/bench_precision.py --precisions bf16 --no-multi-worker \
        --settings "TF defaults" "plain Keras ops" --steps 16 --repeat 5
    .venv/bin/python benchmarks/bench_precision.py --parity        # adds the parity runs
    .venv/bin/python benchmarks/bench_precision.py --parity-only --keep-runs /tmp/parity
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
GFLOP_PER_IMAGE_STEP = 3 * 15.7  # at 256 px, resnet34 U-Net
PEAK_GFLOPS = {"fp32": 533.0, "bf16": 989.0}

# One timed run: printed as a JSON line by the child process.
_SPEED_CHILD = """
import json, os, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from pneumo_cli.engine import tf as engine
from pneumo_cli.model import build, encoders, fastpaths, losses
precision, batch, size, steps, threads = {precision!r}, {batch}, {size}, {steps}, {threads}
tf = engine.import_tf()
if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
input_norm = {input_norm!r}
net = build.build_model(
    "resnet34", size, encoder_weights=None, precision=precision, input_norm=input_norm
)
optimizer = fastpaths.FusedAdam(1e-4)  # pneumo train's
if {plain}:  # undo pneumo's fast paths (fastpaths.py): Keras' Adam and layer calls, fused norm
    optimizer = tf.keras.optimizers.Adam(1e-4)
    for layer in net.layers:
        if "call" in vars(layer):
            del layer.call
    if input_norm == "frozen":
        net.get_layer(build.INPUT_NORM_LAYER).fused = True
net.compile(optimizer=optimizer, loss=losses.bce_loss)
rng = np.random.default_rng(0)
x = encoders.scale_input(rng.integers(0, 256, (batch, size, size, 1)), "raw-0-255")
y = tf.constant((rng.random((batch, size, size, 1)) > 0.9).astype(np.float32))
data = tf.data.Dataset.from_tensors((x, y)).repeat()
ends = []


class StepClock(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        ends.append(time.perf_counter())


net.fit(data, epochs=1, steps_per_epoch=4, verbose=0)  # tracing, memory pools
net.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[StepClock()])
# The median step: whole-fit wall times here came out in suspicious multiples of 10.24 s.
step = float(np.median(np.diff(ends)))
print(json.dumps({{"images_per_s": batch / step, "load": os.getloadavg()[0]}}))
"""

# name: (environment, intra-op threads (0: TensorFlow's choice), --input-norm, plain Keras ops)
SETTINGS = {
    "TF defaults": ({}, 0, "frozen", False),
    "intra=2 inter=1": ({}, 2, "frozen", False),
    "input norm trained": ({}, 0, "trainable", False),
    "plain Keras ops": ({}, 0, "frozen", True),
    "oneDNN off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 0, "frozen", False),
}


def _run_speed(precision: str, setting: str, batch: int, size: int, steps: int) -> dict:
    env_extra, threads, input_norm, plain = SETTINGS[setting]
    code = _SPEED_CHILD.format(
        repo=str(REPO), precision=precision, batch=batch, size=size, steps=steps,
        threads=threads, input_norm=input_norm, plain=plain,
    )  # fmt: skip
    env = {**os.environ, **env_extra, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_speed(
    setting: str, precision: str, rates: list[float], load: float, scale: float
) -> None:
    """One table row: the median over processes, their range, GFLOP/s and the highest load."""
    rate = statistics.median(rates)
    gflops = rate * GFLOP_PER_IMAGE_STEP * scale
    spread = f"{min(rates):.2f}-{max(rates):.2f}"
    print(f"{precision:<9} {setting:<18} {rate:>9.2f} {spread:>13} {gflops:>8.0f} "
          f"{100 * gflops / PEAK_GFLOPS[precision]:>6.1f}% {load:>5.1f}", flush=True)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_multi_worker(folder: Path, precision: str, batch: int, steps: int) -> dict:
    """Two `pneumo train --multi-worker` processes on a 256 px synthetic cache."""
    from tests.cachefactory import synthetic_cache

    cache = synthetic_cache(folder / "cache", image_size=256, n_train=32, n_val=4)
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": ""}
        command = [sys.executable, "-m", "pneumo_cli", "train", "--multi-worker", "--gpus", "0",
                   "--cache", str(cache), "--runs-dir", str(folder / "runs"), "--encoder",
                   "resnet34", "--encoder-weights", "none", "--batch-size", str(batch // 2),
                   "--epochs", "2", "--steps-per-epoch", str(steps), "--precision", precision,
                   "--no-augment", "--patience", "0", "--json", "--quiet"]  # fmt: skip
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        )
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        return {"error": f"exit codes {[p.returncode for p in processes]}"}
    history = (folder / "runs" / "train" / "history.csv").read_text().splitlines()
    last = dict(zip(history[0].split(","), history[-1].split(","), strict=True))
    same = len({json.loads(out)["weights_sha256"] for out in outputs}) == 1
    # Epoch 2 only (epoch 1 includes tracing); global batch = 2 workers x batch/2.
    return {"images_per_s": float(last["images_per_s"]), "load": os.getloadavg()[0],
            "identical_weights": same}  # fmt: skip


def _run_parity(folder: Path, args: argparse.Namespace) -> list[tuple[str, float, float, Path]]:
    """Train the same seed on the same synthetic dataset in fp32 and in bf16; best val Dice each.

    The dataset is the demo's (synthetic chest X-rays in the Kaggle layout, ~22% positive),
    preprocessed by pneumo like real data; the training is the demo's recipe (random encoder
    start, half of each batch positive, the best epoch by validation Dice).
    """
    from pneumo_cli.core.config import PreprocessConfig, TrainConfig
    from pneumo_cli.data.demo import write_demo_dataset
    from pneumo_cli.data.preprocess import run_preprocess
    from pneumo_cli.training import runs, train

    raw, cache = folder / "raw", folder / "cache"
    write_demo_dataset(raw, n=args.parity_images, seed=0, size=max(256, args.parity_size))
    run_preprocess(
        raw, cache, PreprocessConfig(image_size=args.parity_size), rle_csv=raw / "train-rle.csv"
    )
    rows = []
    # The third run trains the encoder's input normalisation (pneumo's default freezes it).
    for name, precision, input_norm in (
        ("fp32", "fp32", "frozen"),
        ("bf16", "bf16", "frozen"),
        ("bf16-trainable-input-norm", "bf16", "trainable"),
    )[: 3 if args.parity_input_norm else 2]:
        config = TrainConfig(
            cache=str(cache), encoder=args.parity_encoder, encoder_weights="none",
            batch_size=args.batch_size, lr=args.parity_lr, epochs=args.parity_epochs,
            patience=args.parity_patience, pos_fraction="0.5", precision=precision, gpus=0,
            input_norm=input_norm,
        )  # fmt: skip
        result = train.train_model(config, folder / "runs", name=name)
        history = runs.read_history(result.run_dir)
        last_three = sum(row["val_dice"] for row in history[-3:]) / min(3, len(history))
        rows.append((name, result.best_val_dice, last_three, Path(result.run_dir)))
        print(f"  {name}: {len(history)} epochs in {result.seconds:.0f} s, "
              f"{result.images_per_s} images/s", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="processes per speed row (step times vary ~4%% between processes)",
    )
    parser.add_argument(
        "--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-multi-worker", action="store_true")
    parser.add_argument("--parity", action="store_true", help="also train to a plateau twice")
    parser.add_argument("--parity-only", action="store_true", help="the parity runs alone")
    parser.add_argument("--parity-encoder", default="resnet34")
    parser.add_argument("--parity-size", type=int, default=256)
    parser.add_argument("--parity-images", type=int, default=300, help="synthetic X-rays")
    parser.add_argument("--parity-epochs", type=int, default=24)
    parser.add_argument("--parity-patience", type=int, default=0)
    parser.add_argument("--parity-lr", type=float, default=3e-4)
    parser.add_argument("--parity-input-norm", action="store_true",
                        help="a third run: bf16 with a trainable input normalisation")  # fmt: skip
    parser.add_argument("--keep-runs", type=Path, help="new folder to train the parity runs in")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    print(machine_line())
    print(f"resnet34 U-Net, {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps, {args.repeat} process(es) per row, "
          f"{os.cpu_count()} CPU(s)")  # fmt: skip
    print(f"{'precision':<9} {'setting':<18} {'images/s':>9} {'range':>13} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'load':>5}")  # fmt: skip
    scale = (args.image_size / 256) ** 2
    if args.parity_only:
        args.settings, args.no_multi_worker = [], True
    rows = [(setting, precision) for setting in args.settings for precision in args.precisions]
    rates: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    loads: dict[tuple[str, str], list[float]] = {row: [] for row in rows}
    for attempt in range(args.repeat):  # interleaved, so a slow spell hits every row alike
        for setting, precision in rows:
            result = _run_speed(precision, setting, args.batch_size, args.image_size, args.steps)
            if "error" in result:
                print(f"{precision:<9} {setting:<18} failed: {result['error']}")
                continue
            rates[setting, precision].append(result["images_per_s"])
            loads[setting, precision].append(result["load"])
            if attempt == args.repeat - 1:
                _print_speed(setting, precision, rates[setting, precision],
                             max(loads[setting, precision]), scale)  # fmt: skip

    if not args.no_multi_worker:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            row = _run_multi_worker(Path(folder), "fp32", args.batch_size, args.steps)
            wall = time.perf_counter() - start
        if "error" in row:
            print(f"2 workers on 127.0.0.1: failed ({row['error']})")
        else:
            print(f"2 workers on 127.0.0.1 (fp32, global batch {args.batch_size}): "
                  f"{row['images_per_s']:.2f} images/s in epoch 2, identical final weights: "
                  f"{row['identical_weights']}, load {row['load']:.1f}, {wall:.0f} s wall. "
                  "Both share this machine's cores: slower than one process.")  # fmt: skip

    if args.parity or args.parity_only:
        print(f"parity: {args.parity_encoder} U-Net, {args.parity_size} px, batch "
              f"{args.batch_size}, {args.parity_images} synthetic X-rays, up to "
              f"{args.parity_epochs} epochs (patience {args.parity_patience})",
              flush=True)  # fmt: skip
        if args.keep_runs:  # the runs and their cache stay there (e.g. for bench_export --run)
            args.keep_runs.mkdir(parents=True, exist_ok=False)
            rows = _run_parity(args.keep_runs, args)
        else:
            with tempfile.TemporaryDirectory() as folder:
                rows = _run_parity(Path(folder), args)
        for precision, best, last_three, _ in rows:
            print(f"  {precision}: best val Dice {best:.4f}, mean of last 3 epochs "
                  f"{last_three:.4f}")  # fmt: skip
        print(f"  |best fp32 - best bf16| = {abs(rows[0][1] - rows[1][1]):.4f} (target <= 0.02)")


if __name__ == "__main__":
    main()
