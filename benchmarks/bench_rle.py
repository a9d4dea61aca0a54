"""RLE benchmark: decode the full real train-rle.csv in memory and to PNG files.

Run: .venv/bin/python benchmarks/bench_rle.py [path/to/train-rle.csv.gz]
Targets (issue 2): all 12,954 rows decoded in memory in < 2 s; rle-decode to PNGs >= 300 masks/s.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import machine_line  # benchmarks/machine.py (the script's own folder)

from pneumo_cli.io import rle
from pneumo_cli.io.rle_files import decode_csv

DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared/siim/csv/train-rle.csv.gz"


def main() -> None:
    csv_path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CSV
    if not csv_path.is_file():
        sys.exit(f"{csv_path} not found: pass the path to train-rle.csv(.gz)")
    results = []

    start = time.perf_counter()
    rows = rle.read_rle_csv(csv_path)
    results.append(("read CSV", len(rows), "rows", time.perf_counter() - start))

    start = time.perf_counter()
    for row in rows:
        rle.decode_rle(row.encoded)
    results.append(("decode every row to a mask", len(rows), "rows", time.perf_counter() - start))

    groups = defaultdict(list)
    for row in rows:
        groups[row.image_id].append(row.encoded)
    start = time.perf_counter()
    encoded = [rle.encode_rle(rle.decode_union(g)) for g in groups.values()]
    results.append(
        ("union + re-encode per image", len(encoded), "images", time.perf_counter() - start)
    )

    for workers in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="pneumo-bench-"))
        try:
            start = time.perf_counter()
            summary = decode_csv(csv_path, out, workers=workers)
            elapsed = time.perf_counter() - start
        finally:
            shutil.rmtree(out, ignore_errors=True)
        results.append(
            (f"rle-decode to PNGs, {workers} thread(s)", summary.written, "masks", elapsed)
        )

    print(f"{machine_line()}, Python {platform.python_version()}")
    print(f"{'step':40s} {'items':>7s} {'unit':>7s} {'seconds':>8s} {'per second':>11s}")
    for name, count, unit, seconds in results:
        print(f"{name:40s} {count:7d} {unit:>7s} {seconds:8.2f} {count / seconds:11.0f}")


if __name__ == "__main__":
    main()
