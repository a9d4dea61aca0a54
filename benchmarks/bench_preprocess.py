"""Benchmark `pneumo preprocess` on the real SIIM DICOMs: images/s with 1 and 2 workers and the
time per stage (decode, crop, CLAHE, resize, write), in the paper's order and with
`--downscale-first` (decode at reduced scale, crop, resize, then CLAHE).

Run: .venv/bin/python benchmarks/bench_preprocess.py [--copies N]

The 8 distinct real DICOMs (3 training, 5 stage-2) are too few to time a process pool, so each is
re-saved N times with a new SOPInstanceUID (pixel data untouched: still the original JPEG
Baseline bytes) into a temporary RAW_DIR. Timings on a shared 2-core machine vary with whatever
else runs; read them as rough figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from machine import machine_line  # benchmarks/machine.py (the script's own folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIIM = REPO.parent / "shared" / "siim"


def make_raw(raw: Path, copies: int) -> int:
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted((SIIM / "dicom-images-train").rglob("*.dcm"))
    sources += sorted((SIIM / "dicom-odd").glob("stage2_*.dcm"))
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in sources:
            ds = pydicom.dcmread(source)
            for _ in range(copies):
                uid = generate_uid()
                ds.SOPInstanceUID = uid
                ds.file_meta.MediaStorageSOPInstanceUID = uid
                ds.save_as(raw / f"{uid}.dcm")
                count += 1
    return count


def time_run(raw: Path, cache: Path, workers: int, settings: Any, repeats: int = 2) -> float:
    """Best wall time of ``repeats`` fresh runs (one-time imports done beforehand)."""
    import shutil

    from pneumo_cli.data.preprocess import run_preprocess

    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        run_preprocess(raw, cache, settings, workers=workers)
        best = min(best, time.perf_counter() - started)
    return best


def warm_up(raw: Path) -> None:
    """Import the decoders once so the 1-worker time is not charged for them."""
    import pandas  # noqa: F401

    from pneumo_cli.io.dicom_read import read_xray

    read_xray(next(raw.glob("*.dcm")))


def time_stages(raw: Path, out: Path, settings: Any) -> dict[str, float]:
    """Median milliseconds per image of each stage, in one process, one OpenCV thread, in the
    order ``settings`` prescribe (``imaging.prepare_image`` does the same steps)."""
    import cv2

    from pneumo_cli.core.files import write_png
    from pneumo_cli.data.imaging import apply_clahe, decoded_min_side, detect_crop, resize_image
    from pneumo_cli.io.dicom_read import read_xray

    cv2.setNumThreads(1)
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "crop", "clahe", "resize", "write")}
    for path in sorted(raw.glob("*.dcm")):
        t0 = time.perf_counter()
        image = read_xray(path, min_side=decoded_min_side(settings)).image
        t1 = time.perf_counter()
        top, bottom, left, right = detect_crop(image, settings.crop_threshold)
        region = image[top:bottom, left:right]
        t2 = time.perf_counter()
        if settings.downscale_first:
            small = resize_image(region, settings.image_size)
            t3 = time.perf_counter()
            small = apply_clahe(small, settings.clahe_clip, settings.clahe_grid)
            t4 = time.perf_counter()
            clahe, resize = t4 - t3, t3 - t2
        else:
            region = apply_clahe(region, settings.clahe_clip, settings.clahe_grid)
            t3 = time.perf_counter()
            small = resize_image(region, settings.image_size)
            t4 = time.perf_counter()
            clahe, resize = t3 - t2, t4 - t3
        write_png(out / f"{path.stem}.png", small)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, clahe, resize, t5 - t4), strict=True):
            stages[name].append(seconds * 1000)
    return {name: statistics.median(values) for name, values in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of each real DICOM")
    args = parser.parse_args()
    if not SIIM.is_dir():
        sys.exit(f"real SIIM fixtures not found at {SIIM}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "raw").mkdir()
        count = make_raw(work / "raw", args.copies)
        print(machine_line())
        print(f"{count} real 1024x1024 JPEG DICOMs ({args.copies} copies of 8), image_size 256")
        warm_up(work / "raw")
        from pneumo_cli.core.config import PreprocessConfig

        orders = {"paper order": PreprocessConfig(), "--downscale-first": PreprocessConfig(
            downscale_first=True)}  # fmt: skip
        print(f"{'order':>18} {'workers':>8} {'seconds':>8} {'images/s':>9}")
        for label, settings in orders.items():
            rates = {}
            for workers in (1, 2):
                cache = work / f"cache-{workers}-{settings.downscale_first}"
                seconds = time_run(work / "raw", cache, workers, settings)
                rates[workers] = count / seconds
                print(f"{label:>18} {workers:>8} {seconds:>8.2f} {rates[workers]:>9.1f}")
            print(f"{label:>18} speed-up with 2 workers: {rates[2] / rates[1]:.2f}x")
        stages = {}
        for label, settings in orders.items():
            (work / f"stages-{settings.downscale_first}").mkdir()
            stages[label] = time_stages(work / "raw", work / f"stages-{settings.downscale_first}",
                                        settings)  # fmt: skip
        print(f"\n{'stage':>8} " + " ".join(f"{label:>18}" for label in orders))
        print(f"{'':>8} " + " ".join(f"{'ms/image, 1 core':>18}" for _ in orders))
        for name in stages["paper order"]:
            print(f"{name:>8} " + " ".join(f"{stages[label][name]:>18.2f}" for label in orders))
        totals = " ".join(f"{sum(stages[label].values()):>18.2f}" for label in orders)
        print(f"{'total':>8} {totals}")


if __name__ == "__main__":
    main()
