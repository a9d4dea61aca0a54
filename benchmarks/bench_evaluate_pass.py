"""`evaluate`'s model pass against `predict --cache` on the same split, same network.

Run: .venv/bin/python benchmarks/bench_evaluate_pass.py [--run RUN --cache CACHE] [--split val]

Both run the predictor that ``--precision auto --engine auto`` resolves to for the run (they share
it, so they also share the choice): ``evaluate``'s pass keeps every map in memory for tuning and
scoring; ``predict --cache`` writes masks, records and CSVs. Images/s of each over the split,
alternating, median of ``--rounds``. Without ``--run`` a random-weights resnet34 run is built at
256 px on the demo data (its cache's train split is used: the largest). Wall-clock times: run
nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_predict import build_run
from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--cache", type=Path, help="the run's cache (default: the run's own)")
    parser.add_argument("--split", default=None, help="default: val with --run, else train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from pneumo_cli.evaluation.maps import predict_split
    from pneumo_cli.inference.predict import predict_sources
    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import cache_sources

    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-evaluate-pass-"))
    try:
        run = args.run or build_run(root, "resnet34", 256)
        predictor = load_predictor(run)
        cache = args.cache or Path(predictor.config["cache"])
        split = args.split or ("val" if args.run else "train")
        sources, load = cache_sources(cache, split)
        rates: dict[str, list[float]] = {"evaluate": [], "predict": []}
        workers = os.cpu_count() or 1
        for _ in range(args.rounds):
            start = time.perf_counter()
            predict_split(predictor, sources, load, args.batch_size, workers, lambda n: None)
            rates["evaluate"].append(len(sources) / (time.perf_counter() - start))
            start = time.perf_counter()
            predict_sources(predictor, sources, root / "out", load=load,
                            batch_size=args.batch_size, overwrite=True)  # fmt: skip
            rates["predict"].append(len(sources) / (time.perf_counter() - start))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    evaluate, predict = (statistics.median(rates[k]) for k in ("evaluate", "predict"))
    way = f"{predictor.precision} ({predictor.engine})"
    print(f"{len(sources)} images of split {split}, batch {args.batch_size}, {way}, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(f"evaluate's model pass  {evaluate:7.1f} images/s")
    print(f"predict --cache        {predict:7.1f} images/s")
    print(f"evaluate / predict     {evaluate / predict:7.2f}")


if __name__ == "__main__":
    main()
