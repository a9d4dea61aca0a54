"""`pneumo predict` per precision and engine end to end on real SIIM DICOMs, as ratios to fp32.

Run: .venv/bin/python benchmarks/bench_inference.py [--copies 8] [--batch-size 16] [--run RUN]

For each way to run the network (fp32 and bf16, each in Keras and in OpenVINO), with what
``--precision auto --engine auto`` resolves to on this machine marked:

- the bare network: ``probabilities`` on a uint8 batch, images/s, and at batch 1 (median ms);
- the pipeline: ``predict_sources`` over copies of the 8 real 1024 x 1024 JPEG DICOMs of
  ../shared/siim (decode, crop, CLAHE, resize in threads, network, back-mapping, gate, RLE,
  writes), with SIIM's mix of outputs (78% of the maps zeroed, see bench_predict.SiimMix);
- one DICOM end to end with the model loaded (median of 10), the path `pneumo serve` takes,
  and what the work around the network adds to it (end to end minus the network at batch 1).

Settings run alternately, ``--rounds`` times, and each figure is the median of its rounds, so
that all see the same machine state. With random weights (no ``--run``) the bf16 check fails
by nature (random maps sit near the threshold, so ``auto`` stays fp32): give a trained run to
see what ``auto`` chooses for a real model. Wall-clock times: run nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_predict import SIIM, SiimMix, build_run, real_inputs
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def time_network(predictor, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(images/s at ``batch``, median ms at batch 1) of the bare network."""
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    for _ in range(2):
        predictor.probabilities(images)
        predictor.probabilities(images[:1])
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.probabilities(images)
    rate = repeats * batch / (time.perf_counter() - start)
    single = []
    for _ in range(20):
        start = time.perf_counter()
        predictor.probabilities(images[:1])
        single.append(time.perf_counter() - start)
    return rate, statistics.median(single) * 1e3


def time_pipeline(predictor, sources, load, out: Path, batch: int) -> tuple[float, float]:
    """(images/s of predict over ``sources``, median ms of one DICOM end to end)."""
    from pneumo_cli.inference.predict import predict_sources

    mix = SiimMix(predictor)
    start = time.perf_counter()
    summary = predict_sources(mix, sources, out, load=load, batch_size=batch, overwrite=True)
    rate = summary.predicted / (time.perf_counter() - start)
    one = []
    for _ in range(10):
        start = time.perf_counter()
        predict_sources(predictor, sources[:1], out / "one", load=load, overwrite=True)
        one.append(time.perf_counter() - start)
    return rate, statistics.median(one) * 1e3


def time_stages(predictor, sources, load) -> dict[str, float]:
    """Median ms per stage of one X-ray with the model loaded, over the distinct DICOMs: load
    (read, decode, crop, CLAHE, resize), network at batch 1, then gate, RLE and the mask PNG for
    a negative map (SIIM's usual case) and for the map as it is (positive here)."""
    from pneumo_cli.core.files import encode_png
    from pneumo_cli.inference.outputs import output_row

    stages: dict[str, list[float]] = {"load": [], "network": [], "negative": [], "positive": []}
    for _, path in sources[:: max(1, len(sources) // 8)][:8] * 3:
        began = time.perf_counter()
        item = load(path)
        stages["load"].append(time.perf_counter() - began)
        began = time.perf_counter()
        prob = predictor.probabilities(item.image[None])[0]
        stages["network"].append(time.perf_counter() - began)
        for name, values in (("negative", prob * 0.0), ("positive", prob)):
            began = time.perf_counter()
            _, mask, _ = output_row(item.image_id, values, item, predictor.gate, False)
            if mask.any():  # an empty mask's PNG is made once per size (core.files)
                encode_png(np.multiply(mask > 0, 255, dtype=np.uint8), unfiltered=True)
            stages[name].append(time.perf_counter() - began)
    return {name: statistics.median(times) * 1e3 for name, times in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--copies", type=int, default=8, help="copies of each real DICOM")
    parser.add_argument("--repeats", type=int, default=6, help="timed network batches")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument("--run", type=Path, help="a trained run instead of a random-weights one")
    parser.add_argument(
        "--compare-orders",
        action="store_true",
        help="also run auto's pipeline with the other preprocessing order (--downscale-first "
        "flipped; same network), alternating with the others",
    )
    args = parser.parse_args()
    if not SIIM.is_dir():
        sys.exit(f"{SIIM} not found: the benchmark reads the real SIIM DICOMs")

    from pneumo_cli.core.errors import UsageError
    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import file_loader, file_sources

    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-inference-"))
    try:
        run = args.run or build_run(root, args.encoder, args.image_size)
        auto = load_predictor(run)
        print(f"auto resolves to {auto.precision} ({auto.engine}): {auto.precision_reason}")
        chosen = f"{auto.precision} {auto.engine}"
        settings = {}
        for engine in ("keras", "openvino"):
            for precision in ("fp32", "bf16"):  # bf16 is emulated on CPUs without it
                name = f"{precision} {engine}"
                try:
                    settings[name] = load_predictor(run, precision=precision, engine=engine)
                except UsageError as error:  # e.g. OpenVINO bf16 on a CPU without bf16
                    print(f"{name}: not run ({error})")
        paths = real_inputs(root / "inputs", args.copies)
        sources, _ = file_sources(paths)
        load = file_loader(auto.settings, sources)
        stages = time_stages(settings[chosen], sources, load)
        other = replace(auto.settings, downscale_first=not auto.settings.downscale_first)
        other_load = file_loader(other, sources)
        other_label = f"{chosen}, {'--downscale-first' if other.downscale_first else 'paper order'}"
        other_stages = time_stages(settings[chosen], sources, other_load)
        figures: dict[str, list[tuple[float, ...]]] = {name: [] for name in settings}
        other_figures: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            for name, predictor in settings.items():
                network = time_network(predictor, args.image_size, args.batch_size, args.repeats)
                pipeline = time_pipeline(predictor, sources, load, root / name, args.batch_size)
                figures[name].append(network + pipeline)
            if args.compare_orders:
                other_figures.append(
                    time_pipeline(
                        settings[chosen], sources, other_load, root / "other", args.batch_size
                    )  # fmt: skip
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {
        k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in figures.items()
    }
    base = medians["fp32 keras"]
    print(f"{args.encoder} U-Net at {args.image_size} px, batch {args.batch_size}, {len(sources)} "
          f"real DICOMs, median of {args.rounds} alternating rounds; load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    header = (f"{'network':16s} {'net img/s':>9s} {'x':>5s} {'net b1 ms':>9s} "
              f"{'predict img/s':>13s} {'x':>5s} {'1 DICOM ms':>10s} "
              f"{'around ms':>9s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, (net, net_b1, rate, one) in medians.items():
        label = f"{name}{' *' if name == chosen else ''}"
        print(f"{label:16s} {net:9.1f} {net / base[0]:5.2f} {net_b1:9.1f} {rate:13.1f} "
              f"{rate / base[2]:5.2f} {one:10.1f} {one - net_b1:9.1f}")  # fmt: skip
    print("x: ratio to fp32 keras in this run; * what auto chose; around: one DICOM end to end "
          "(predict_sources: lock, job file, CSVs) minus the network at batch 1")  # fmt: skip
    print(f"one X-ray, {chosen}, median ms: load {stages['load']:.1f}, network "
          f"{stages['network']:.1f}, gate + RLE + mask PNG {stages['negative']:.1f} negative / "
          f"{stages['positive']:.1f} positive; around the network "
          f"{stages['load'] + stages['negative']:.1f} / "
          f"{stages['load'] + stages['positive']:.1f} ms")  # fmt: skip
    order = "--downscale-first" if auto.settings.downscale_first else "paper order"
    print(f"the run's preprocessing: {order}")
    if other_figures:
        rate, one = (statistics.median(col) for col in zip(*other_figures, strict=True))
        print(f"{other_label}: predict {rate:.1f} img/s ({rate / medians[chosen][2]:.2f}x the "
              f"run's order), 1 DICOM {one:.1f} ms, load of one X-ray "
              f"{other_stages['load']:.1f} ms (same network, other masks)")  # fmt: skip


if __name__ == "__main__":
    main()
