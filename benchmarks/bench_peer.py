"""`pneumo predict` against the PyTorch peer's bare bf16 network, alternating in one run.

Run: .venv/bin/python benchmarks/bench_peer.py --peer-python /path/to/peer/bin/python
     [--run RUN] [--rounds 4] [--copies 8] [--batch-size 16]

The peer (benchmarks/peer_smp.py: segmentation_models_pytorch U-Net, bf16 autocast,
channels-last, bare network) runs in a scratch environment of your own with torch and
segmentation_models_pytorch, neither a pneumo dependency: give its Python with
``--peer-python`` or ``PNEUMO_PEER_PYTHON``; without one the benchmark says so and stops.

Each round measures, the order swapped every round so both see the same machine state:

- pneumo: ``predict_sources`` with what ``--precision auto --engine auto`` chooses for the run,
  end to end over copies of the real SIIM DICOMs with SIIM's mix of outputs (images/s), one
  X-ray through serve's stages (load, network at batch 1, gate, RLE and mask of a negative map)
  and one DICOM through a single-file ``predict_sources`` call (its lock, job file and CSVs too);
- the peer: its bare network at ``--batch-size`` (images/s) and at batch 1 (ms).

The table gives each round and the medians, with pneumo's rates as ratios to the peer's of
the same round. Give a trained ``--run``: with random weights ``auto`` stays in float32 (random
maps fail the bf16 check). Wall-clock times: run nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_inference import time_pipeline, time_stages
from bench_predict import SIIM, build_run, real_inputs
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

HERE = Path(__file__).resolve().parent


def peer_round(python: str, size: int, batch: int) -> dict:
    """One run of peer_smp.py in the peer's environment: its JSON line."""
    done = subprocess.run(
        [python, str(HERE / "peer_smp.py"), "--size", str(size), "--batch", str(batch)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"the peer failed in {python} (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=os.environ.get("PNEUMO_PEER_PYTHON"))
    parser.add_argument("--run", type=Path, help="a trained run (else random weights)")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--copies", type=int, default=8, help="copies of each real DICOM")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print(machine_line())
    if not args.peer_python:
        print("not run: no peer environment (give --peer-python or PNEUMO_PEER_PYTHON: a Python "
              "with torch and segmentation_models_pytorch)")  # fmt: skip
        return
    if not SIIM.is_dir():
        sys.exit(f"{SIIM} not found: the benchmark reads the real SIIM DICOMs")

    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import file_loader, file_sources

    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-peer-"))
    rows = []
    try:
        run = args.run or build_run(root, args.encoder, args.image_size)
        predictor = load_predictor(run)
        print(f"pneumo runs {predictor.precision} ({predictor.engine}): "
              f"{predictor.precision_reason}")  # fmt: skip
        sources, _ = file_sources(real_inputs(root / "inputs", args.copies))
        load = file_loader(predictor.settings, sources)
        time_pipeline(predictor, sources, load, root / "warm", args.batch_size)  # compile, cache
        peer = {}
        for round_ in range(args.rounds):
            if round_ % 2:
                peer = peer_round(args.peer_python, args.image_size, args.batch_size)
            rate, single = time_pipeline(predictor, sources, load, root / "out", args.batch_size)
            stages = time_stages(predictor, sources, load)
            one = stages["load"] + stages["network"] + stages["negative"]
            if not round_ % 2:
                peer = peer_round(args.peer_python, args.image_size, args.batch_size)
            rows.append((rate, peer["images_per_second"], one, single, peer["batch1_ms"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load_now = os.getloadavg()[0]
    print(f"{args.encoder} U-Net at {args.image_size} px, batch {args.batch_size}, "
          f"{len(sources)} real DICOMs; peer: torch {peer['torch']}, smp {peer['smp']}, "
          f"{peer['threads']} threads; load average {load_now:.1f} at the end")  # fmt: skip
    header = (f"{'round':>6s} {'predict img/s':>13s} {'peer img/s':>10s} {'x peer':>6s} "
              f"{'one X-ray ms':>12s} {'1 DICOM ms':>10s} {'peer b1 ms':>10s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for label, (rate, peer_rate, one, single, peer_one) in [
        *((str(i + 1), row) for i, row in enumerate(rows)),
        ("median", tuple(statistics.median(col) for col in zip(*rows, strict=True))),  # per column
    ]:
        print(f"{label:>6s} {rate:13.1f} {peer_rate:10.1f} {rate / peer_rate:6.2f} "
              f"{one:12.1f} {single:10.1f} {peer_one:10.1f}")  # fmt: skip
    ratios = [row[0] / row[1] for row in rows]
    print(f"predict / peer per round: {min(ratios):.2f}-{max(ratios):.2f}, median "
          f"{statistics.median(ratios):.2f}; one X-ray = serve's stages (load, network at "
          f"batch 1, gate + RLE + mask of a negative map); 1 DICOM = a single-file predict_sources "
          f"call (lock, job file, mask, fsynced CSVs), median of 10")  # fmt: skip


if __name__ == "__main__":
    main()
