"""What an N-member ensemble costs against one model: images/s, as a share of 1/N of one model's.

Run: .venv/bin/python benchmarks/bench_ensemble.py [--members 3] [--copies 4] [--batch-size 16]

One run (random weights trained one step: speed does not depend on the weights) and N copies of
it as the members of an ensemble (`--run A --run B ...`). Each setting runs alternately,
``--rounds`` times, and each figure is the median of its rounds:

- the bare network: ``probabilities`` on a uint8 batch, images/s;
- the pipeline: ``predict_sources`` over copies of the real SIIM DICOMs of ../shared/siim, with
  SIIM's mix of outputs (bench_predict.SiimMix).

The goal (issue 17): the ensemble's images/s >= 90% of one model's divided by N, that is the
networks are the cost, not the plumbing. Both run in fp32 Keras so that the precision check
and OpenVINO's choice play no part. Wall-clock times: run nothing else on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_inference import time_network, time_pipeline
from bench_predict import build_run, real_inputs
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--copies", type=int, default=4, help="copies of each real DICOM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6, help="batches per network timing")
    args = parser.parse_args()

    from pneumo_cli.inference.loading import open_predictor
    from pneumo_cli.inference.sources import file_loader, file_sources

    print(machine_line(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-ensemble-"))
    try:
        run = build_run(root, args.encoder, args.image_size)
        copies = [run]
        for index in range(1, args.members):
            copy = run.parent / f"member{index}"
            shutil.copytree(run, copy)
            copies.append(copy)
        single = open_predictor(run, precision="fp32", engine="keras")
        ensemble = open_predictor(copies, precision="fp32", engine="keras")
        paths = real_inputs(root / "inputs", args.copies)
        sources, _ = file_sources(paths)
        load = file_loader(single.settings, sources)
        figures: dict[str, dict[str, list[float]]] = {
            name: {"network": [], "pipeline": []} for name in ("one model", "ensemble")
        }
        for round_index in range(args.rounds):
            for name, predictor in (("one model", single), ("ensemble", ensemble)):
                rate, _ = time_network(predictor, args.image_size, args.batch_size, args.repeats)
                figures[name]["network"].append(rate)
                out = root / f"out-{round_index}-{name.replace(' ', '-')}"
                rate, _ = time_pipeline(predictor, sources, load, out, args.batch_size)
                figures[name]["pipeline"].append(rate)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.members
    print(f"{args.encoder} U-Net at {args.image_size} px, batch {args.batch_size}, fp32 Keras, "
          f"{len(sources)} DICOMs per pipeline pass, median of {args.rounds} rounds")  # fmt: skip
    print(f"{'':<22} {'one model':>10} {f'{n} members':>11} {'share of 1/N':>13}")
    for stage, label in (("network", "network, images/s"), ("pipeline", "predict, images/s")):
        one = statistics.median(figures["one model"][stage])
        many = statistics.median(figures["ensemble"][stage])
        share = many / (one / n)
        print(f"{label:<22} {one:>10.2f} {many:>11.2f} {share:>12.1%}")
    print("goal: share of 1/N >= 90%")


if __name__ == "__main__":
    main()
