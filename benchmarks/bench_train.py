"""Training throughput of the pneumo U-Net on this machine.

Measures images/s of ``model.fit`` steps for the resnet34 U-Net at 256 px, batch 16 (the
issue's reference shape), in three settings:

- ``model only``: one batch held in memory, repeated (the network's speed alone);
- ``pneumo pipeline``: the real tf.data pipeline over a synthetic cache with augmentation
  (decode, crop/affine/flip/contrast, scaling), which shares the CPU with the network;
- ``pipeline alone``: the data pipeline without a model (how fast it can feed one).

Training rows are batch / the median step time (whole-fit wall times here came out in
multiples of 10.24 s). Achieved GFLOP/s = images/s x 3 x 15.7 GFLOP (forward + backward of one
256 px image), compared with the machine's measured peak (533 GFLOP/s float32, 989 bfloat16).
Reference (same shapes, this machine): tf-keras float32 7.6 images/s, PyTorch
segmentation_models_pytorch 6.6.

Usage: .venv/bin/python benchmarks/bench_train.py [--steps 12] [--precision fp32|bf16]
Timings are wall-clock and suffer from anything else running on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumo_cli.data import cache as data_cache
from pneumo_cli.data import pipeline as data_pipeline
from pneumo_cli.engine import precision as precisions
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import (
    build,
    encoders,  # noqa: E402
    losses,
)
from pneumo_cli.model.fastpaths import FusedAdam  # noqa: E402

GFLOP_PER_IMAGE_STEP = 3 * 15.7  # at 256 px, resnet34 U-Net
PEAK_GFLOPS = {"fp32": 533.0, "bf16": 989.0}


def _images_per_s(net: object, dataset: object, batch: int, steps: int, warmup: int) -> float:
    """batch / the median time between the ends of consecutive steps, after a warm-up fit."""
    tf = tf_engine.import_tf()
    ends: list[float] = []

    class StepClock(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            ends.append(time.perf_counter())

    net.fit(dataset, epochs=1, steps_per_epoch=warmup, verbose=0)  # trace + warm caches
    net.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[StepClock()])
    return batch / float(np.median(np.diff(ends)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=precisions.PRECISIONS)
    args = parser.parse_args()

    tf = tf_engine.import_tf()
    size, batch = args.image_size, args.batch_size
    net = build.build_model(args.encoder, size, encoder_weights=None, precision=args.precision)
    net.compile(optimizer=FusedAdam(1e-4), loss=losses.bce_loss)  # pneumo train's optimizer
    scaling = encoders.input_scaling_for(args.encoder)
    rng = np.random.default_rng(0)
    x = encoders.scale_input(rng.integers(0, 256, (batch, size, size, 1)), scaling)
    y = tf.constant((rng.random((batch, size, size, 1)) > 0.9).astype(np.float32))
    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()

    rows = []
    rows.append(("model only", _images_per_s(net, in_memory, batch, args.steps, args.warmup)))

    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.cachefactory import synthetic_cache

        cache = synthetic_cache(Path(folder), image_size=size, n_train=64, n_val=2)
        records = data_cache.select_split(data_cache.read_cache(cache), "train")
        steps_total = args.steps + 1 + args.warmup
        pipeline = data_pipeline.make_train_dataset(
            records, size, scaling, batch, steps_total, seed=0
        )
        rate = _images_per_s(net, pipeline.dataset.repeat(), batch, args.steps, args.warmup)
        rows.append(("pneumo pipeline (augmented)", rate))

        alone = data_pipeline.make_train_dataset(records, size, scaling, batch, 40, seed=1)
        iterator = iter(alone.dataset)
        next(iterator)
        start = time.perf_counter()
        count = sum(int(xb.shape[0]) for xb, _ in iterator)
        rows.append(("pipeline alone (no model)", count / (time.perf_counter() - start)))

    peak = PEAK_GFLOPS[args.precision]
    print(machine_line())
    print(f"{args.encoder} U-Net, {size} px, batch {batch}, {args.precision}, "
          f"{tf_engine.keras_engine()}, {args.steps} timed steps")  # fmt: skip
    print(f"{'setting':<30} {'images/s':>9} {'GFLOP/s':>9} {'% of peak':>10}")
    for name, rate in rows:
        if name.startswith("pipeline alone"):
            print(f"{name:<30} {rate:>9.1f} {'-':>9} {'-':>10}")
            continue
        gflops = rate * GFLOP_PER_IMAGE_STEP * (size / 256) ** 2
        print(f"{name:<30} {rate:>9.2f} {gflops:>9.0f} {100 * gflops / peak:>9.1f}%")
    print("reference: tf-keras fp32 7.6 img/s, PyTorch smp fp32 6.6 img/s (same shapes)")


if __name__ == "__main__":
    main()
