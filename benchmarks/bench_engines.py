"""Inference engines side by side for one trained network: speed, and parity with Keras fp32.

Run: .venv/bin/python benchmarks/bench_engines.py [--encoder resnet34] [--image-size 256]
     .venv/bin/python benchmarks/bench_engines.py --run runs/train   (a trained run instead)
     .venv/bin/python benchmarks/bench_engines.py --engines keras-fp32,openvino-bf16

Builds a run (resnet34 U-Net at 256 px, random encoder weights, one training step on synthetic
images: speed does not depend on the weights) in a temporary folder, removed at the end, unless
``--run`` names one. Every engine then runs the run's ``best.keras`` on the same random uint8
(B, S, S) batch (seed 0), with pneumo's preprocessing:

- ``keras-fp32``: the model behind one ``tf.function`` (uint8 in, the run's input scaling,
  the network, probabilities out; no autograph), the path of ``load_predictor``. The reference.
- ``keras-fp32-fast``: the same on ``precision_copy(model, "fp32")``, which adds the inference
  fast paths; it tells how much of ``keras-bf16``'s gain is bf16 and how much the fast paths.
- ``keras-bf16``: the same on ``precision_copy(model, "bf16")``.
- ``onnxruntime-fp32``: ``write_onnx``'s model (the scaling is inside the graph, fed float32
  grey 0..255 (B, S, S, 1) as ``pneumo predict --model`` feeds it) through ``load_runner``.
  ONNX Runtime's CPU provider has no bf16 convolutions, so there is no ONNX Runtime bf16 row.
- ``tflite-fp32``: ``write_tflite``'s model, no quantisation, through ``load_runner`` (XNNPACK).
- ``openvino-fp32``, ``openvino-bf16``: the same ONNX file compiled by OpenVINO for the CPU with
  ``INFERENCE_PRECISION_HINT`` f32 or bf16, reshaped to a static batch (OpenVINO plans a static
  shape better). Batch 1 uses the LATENCY hint. Batch B uses LATENCY too by default (one
  stream on every core runs the whole batch, the way ``pneumo predict`` calls its network one
  batch at a time); ``--openvino-batch-hint THROUGHPUT`` splits the batch over OpenVINO's
  streams instead, run in parallel. OpenVINO is not a pneumo dependency: without it these rows
  are skipped (``pip install openvino``).

Each engine: batch B throughput (2 warm-up batches, then ``--repeats`` batches; images/s) and
batch 1 latency (5 warm-up calls, then the median of ``--latency-calls`` calls; ms). Parity
against ``keras-fp32`` on the batch: the largest absolute probability difference, the share of
pixels whose mask (probability > 0.5) agrees, and the mean per-image Dice of the two masks (two
empty masks score 1). A random-weights network's probabilities may sit anywhere, so its parity
only shows the engines' rounding; a trained ``--run`` gives the numbers that matter. Every
engine uses ``--threads`` CPU threads (default: all cores).

Wall-clock times: nothing else should run on the machine meanwhile (the load average is printed
before and after). Ratios are within this one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_export import time_calls  # noqa: E402  (same folder; run as a script)
from bench_predict import build_run  # noqa: E402

ENGINES = (
    "keras-fp32",
    "keras-fp32-fast",
    "keras-bf16",
    "onnxruntime-fp32",
    "tflite-fp32",
    "openvino-fp32",
    "openvino-bf16",
)
REFERENCE = "keras-fp32"
THRESHOLD = 0.5

# Maps uint8 grey (n, S, S) to float32 probabilities (n, S, S).
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Setup:
    """What every engine is built from: the loaded network, its run settings, a work folder."""

    model: Any
    scaling: str
    size: int
    batch: int
    threads: int
    folder: Path
    openvino_batch_hint: str
    exports: dict[str, Path] = field(default_factory=dict)

    def export(self, fmt: str) -> Path:
        """The model written once by pneumo's ``write_onnx`` or ``write_tflite`` (float32)."""
        from pneumo_cli.export.backends import write_onnx, write_tflite

        if fmt not in self.exports:
            print(f"exporting {fmt} ...", file=sys.stderr)
            target = self.folder / f"export-{fmt}"
            target.mkdir(exist_ok=True)
            writer = {"onnx": write_onnx, "tflite": write_tflite}[fmt]
            self.exports[fmt] = writer(self.model, self.scaling, self.size, target)
        return self.exports[fmt]


@dataclass(frozen=True)
class Row:
    """One engine's measurements; ``note`` says anything that qualifies them."""

    engine: str
    images_per_s: float
    latency_ms: float
    max_abs_diff: float
    mask_agreement: float
    dice: float
    note: str = ""


def keras_runner(model: Any, scaling: str, size: int) -> Runner:
    """``model`` behind one ``tf.function`` as ``load_predictor`` compiles it (no TTA)."""
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model.encoders import scale_input

    tf = import_tf()

    @tf.function(input_signature=[tf.TensorSpec([None, size, size], tf.uint8)], autograph=False)
    def forward(images: Any) -> Any:
        inputs = scale_input(images[..., tf.newaxis], scaling)
        return tf.cast(model(inputs, training=False), tf.float32)[..., 0]

    return lambda images: forward(images).numpy()


def grey_input(run: Callable[[np.ndarray], np.ndarray]) -> Runner:
    """An exported graph (float32 grey 0..255 (n, S, S, 1) in, (n, S, S, 1) out) fed uint8
    (n, S, S) images as ``ExportedPredictor.probabilities`` feeds it."""
    return lambda images: run(images.astype(np.float32)[..., np.newaxis])[..., 0]


def openvino_compile(setup: Setup, batch: int, precision: str, hint: str) -> Any:
    """The ONNX export compiled by OpenVINO for the CPU at a static batch size."""
    import openvino as ov

    core = ov.Core()
    network = core.read_model(str(setup.export("onnx")))
    network.reshape([batch, setup.size, setup.size, 1])
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": hint,
        "INFERENCE_NUM_THREADS": setup.threads,
    }
    return core.compile_model(network, "CPU", config)


def openvino_sync(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One inference request, called synchronously on the whole input."""
    request = compiled.create_infer_request()

    def run(batch: np.ndarray) -> np.ndarray:
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()

    return run


def openvino_parallel(setup: Setup, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """THROUGHPUT hint: the batch split into one chunk per optimal request, run in parallel
    (the last chunk padded with zeros to the compiled static shape)."""
    import openvino as ov

    compiled = openvino_compile(setup, setup.batch, precision, "THROUGHPUT")
    requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    chunk = -(-setup.batch // requests)
    if chunk != setup.batch:
        compiled = openvino_compile(setup, chunk, precision, "THROUGHPUT")
    queue = ov.AsyncInferQueue(compiled, requests)
    results: dict[int, np.ndarray] = {}

    def done(request: Any, index: int) -> None:
        results[index] = request.get_output_tensor(0).data.copy()

    queue.set_callback(done)

    def run(batch: np.ndarray) -> np.ndarray:
        results.clear()
        starts = range(0, len(batch), chunk)
        for index, start in enumerate(starts):
            part = batch[start : start + chunk]
            padding = [(0, chunk - len(part))] + [(0, 0)] * (part.ndim - 1)
            queue.start_async({0: np.pad(part, padding)}, index)
        queue.wait_all()
        parts = [results[index] for index in range(len(starts))]
        return np.concatenate(parts)[: len(batch)]

    return run


def openvino_runners(setup: Setup, precision: str) -> tuple[Runner, Runner, str]:
    """Batch B and batch 1 runners of OpenVINO at ``precision`` ('f32' or 'bf16'), and a note
    naming the precision the CPU plugin actually took."""
    single = openvino_compile(setup, 1, precision, "LATENCY")
    taken = single.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if setup.openvino_batch_hint == "THROUGHPUT":
        batch_run = openvino_parallel(setup, precision)
    else:
        batch_run = openvino_sync(openvino_compile(setup, setup.batch, precision, "LATENCY"))
    note = f"hints: b{setup.batch} {setup.openvino_batch_hint}, b1 LATENCY"
    if taken != precision:
        note += f"; CPU plugin took {taken}"
    return grey_input(batch_run), grey_input(openvino_sync(single)), note


def build_engine(name: str, setup: Setup) -> tuple[Runner, Runner, str]:
    """The engine ``name``'s batch B runner, batch 1 runner and a note for the table."""
    from pneumo_cli.inference.exported import load_runner
    from pneumo_cli.model.build import precision_copy

    if name == "keras-fp32":
        run = keras_runner(setup.model, setup.scaling, setup.size)
    elif name in ("keras-fp32-fast", "keras-bf16"):
        twin = precision_copy(setup.model, "bf16" if name.endswith("bf16") else "fp32")
        run = keras_runner(twin, setup.scaling, setup.size)
    elif name in ("onnxruntime-fp32", "tflite-fp32"):
        fmt = "onnx" if name.startswith("onnx") else "tflite"
        run = grey_input(load_runner(fmt, setup.export(fmt), threads=setup.threads))
    elif name in ("openvino-fp32", "openvino-bf16"):
        return openvino_runners(setup, "bf16" if name.endswith("bf16") else "f32")
    else:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return run, run, ""


def images_per_second(run: Runner, batch: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Images/s over ``repeats`` calls after 2 warm-up calls, and the first call's output."""
    first = run(batch)
    run(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * len(batch) / (time.perf_counter() - start), first


def median_ms(run: Runner, image: np.ndarray, calls: int) -> float:
    """Median milliseconds of ``run(image)`` over ``calls`` calls after 5 warm-up calls."""
    return 1e3 * time_calls(run, image, calls, warmup=5)


def parity(reference: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    """Max |probability difference|, mask agreement share and mean per-image mask Dice."""
    from pneumo_cli.core.metrics import batch_dice

    probs = np.asarray(probs, np.float32).reshape(reference.shape)
    diff = np.abs(reference.astype(np.float64) - probs)
    diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN must show, not vanish in max()
    masks_ref, masks = reference > THRESHOLD, probs > THRESHOLD
    dice = batch_dice(masks_ref, masks, empty_score=1.0)
    return float(diff.max()), float(np.mean(masks_ref == masks)), float(np.mean(dice))


def measure(
    name: str, setup: Setup, images: np.ndarray, reference: np.ndarray | None, args: Any
) -> tuple[Row, np.ndarray]:
    """Build and time engine ``name``; its parity against ``reference`` (itself when None)."""
    print(f"timing {name} ...", file=sys.stderr)
    batch_run, single_run, note = build_engine(name, setup)
    rate, probs = images_per_second(batch_run, images, args.repeats)
    latency = median_ms(single_run, images[:1], args.latency_calls)
    row = Row(name, rate, latency, *parity(probs if reference is None else reference, probs), note)
    return row, probs


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


def print_table(rows: list[Row], batch: int) -> None:
    """The results, ratios against the reference row of this run."""
    reference = next((row for row in rows if row.engine == REFERENCE), None)
    header = (
        f"{'engine':<17} {f'b{batch} img/s':>9} {'x keras fp32':>12} {'b1 ms':>8} "
        f"{'max|dp|':>8} {'agree %':>8} {'Dice':>6}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row.images_per_s / reference.images_per_s:.2f}" if reference else "-"
        print(
            f"{row.engine:<17} {row.images_per_s:>9.1f} {ratio:>12} {row.latency_ms:>8.1f} "
            f"{row.max_abs_diff:>8.2g} {100 * row.mask_agreement:>8.3f} {row.dice:>6.3f}  "
            f"{row.note}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8, help="timed batches per engine")
    parser.add_argument("--latency-calls", type=int, default=30, help="timed batch-1 calls")
    parser.add_argument("--run", type=Path, help="a trained run instead of a random-weights one")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma list from: {', '.join(ENGINES)}"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--openvino-batch-hint", choices=("LATENCY", "THROUGHPUT"), default="LATENCY"
    )
    args = parser.parse_args()
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    return args


def run_engines(args: argparse.Namespace, root: Path) -> list[Row]:
    """Open (or build) the run, then measure every selected engine on the same batch."""
    from pneumo_cli.inference.predictor import open_run_for_inference
    from pneumo_cli.model.saving import load_model

    if args.run is None:
        print(f"building a {args.encoder} run at {args.image_size} px ...", file=sys.stderr)
    opened = open_run_for_inference(args.run or build_run(root, args.encoder, args.image_size))
    size, batch = opened.image_size, args.batch_size
    setup = Setup(
        load_model(opened.model_path), opened.input_scaling, size, batch, args.threads, root,
        args.openvino_batch_hint,
    )  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    engines = [REFERENCE] + [name for name in args.engines if name != REFERENCE]
    reference_row, reference = measure(REFERENCE, setup, images, None, args)
    rows = [reference_row]
    for name in engines[1:]:
        rows.append(measure(name, setup, images, reference, args)[0])
    encoder = opened.config.get("encoder", args.encoder)
    print(f"{encoder} U-Net at {size} px, batch {batch}, {args.threads} threads, run "
          f"{args.run or 'random weights (one training step)'}")  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    print(machine_line())
    version = openvino_version()
    if version is None:
        print("openvino: not installed (pip install openvino)")
        args.engines = [name for name in args.engines if not name.startswith("openvino")]
    else:
        print(f"openvino {version}")
    from pneumo_cli.engine.tf import import_tf

    import_tf().config.threading.set_intra_op_parallelism_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-engines-"))
    try:
        rows = run_engines(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows, args.batch_size)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; keras-fp32 is the reference")


if __name__ == "__main__":
    main()
