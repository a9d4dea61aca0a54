"""What `pneumo predict` writes per image and at the end: the post-processed record and mask,
``predictions.csv``, ``submission.csv`` and ``rejected.csv``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.files import (
    atomic_write_text,
)
from pneumo_cli.inference.postprocess import Gate, apply_gate
from pneumo_cli.inference.sources import Item
from pneumo_cli.io import rle

PREDICTIONS_FILE = "predictions.csv"
SUBMISSION_FILE = "submission.csv"
REJECTED_FILE = "rejected.csv"
PREDICTION_COLUMNS = ("ImageId", "has_pneumothorax", "max_prob", "area_px", "EncodedPixels")


def output_row(
    image_id: str, prob: np.ndarray, item: Item, gate: Gate, keep_probs: bool = True
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Post-process one (S, S) probability map at the original resolution.

    Returns the CSV record, the original-size uint8 {0,1} mask and, with ``keep_probs``, the
    float32 probabilities at original size (else None). The gate works on the probability map
    restored to original pixels, so its areas are original pixels directly.

    Bilinear restoring never exceeds the map's maximum, so a map whose maximum is at most the
    bottom threshold (or at most the top threshold when a minimum area is set) is empty at any
    resolution: without ``keep_probs`` it is then not restored at all (most X-rays are empty).
    """
    from pneumo_cli.data.imaging import restore_region, restore_to_original

    peak = float(prob.max())
    empty = peak <= gate.bottom_threshold or (gate.min_area_px > 0 and peak <= gate.top_threshold)
    full = None
    mask = np.zeros(item.original_shape, dtype=np.uint8)
    if keep_probs:
        full = restore_to_original(prob, item.crop, item.original_shape, is_mask=False)
        mask = apply_gate(full, gate, area_scale=1.0)
    elif not empty:
        # Outside the crop box the restored map is 0, below any threshold and joined to no
        # component: gating the box alone gives the same mask, without a full-size float map.
        top, bottom, left, right = item.crop
        region = restore_region(prob, item.crop, item.original_shape, is_mask=False)
        mask[top:bottom, left:right] = apply_gate(region, gate, area_scale=1.0)
    area = int(np.count_nonzero(mask))
    record = {
        "ImageId": image_id,
        "has_pneumothorax": int(area > 0),
        "max_prob": round(peak, 6),
        "area_px": area,
        "EncodedPixels": rle.encode_rle(mask) if area else rle.EMPTY,
    }
    return record, mask, full


def write_rejected(path: Path, rejected: list[tuple[str, str]]) -> None:
    """``rejected.csv`` (source, reason), sorted by source so that the file does not depend on
    the order inputs were listed or finished in (a merged sharded job equals one run)."""
    if not rejected:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "reason"])
    writer.writerows(sorted_rejected(rejected))
    atomic_write_text(path, buffer.getvalue())


def sorted_rejected(rejected: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source, reason) rows in the order ``rejected.csv`` lists them: sorted as written, since a
    name that is not UTF-8 is written escaped ("\\udce9") and a merge reads it back that way."""
    return sorted(rejected, key=lambda row: [v.encode("utf-8", "backslashreplace") for v in row])


def write_predictions(out: Path, records: list[dict]) -> None:
    """Write ``predictions.csv`` and ``submission.csv`` (Kaggle format) from per-image records."""
    full, short = io.StringIO(), io.StringIO()
    writer = csv.DictWriter(
        full, fieldnames=PREDICTION_COLUMNS, lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(records)
    submission = csv.writer(short, lineterminator="\n")
    submission.writerow(["ImageId", "EncodedPixels"])
    submission.writerows((r["ImageId"], r["EncodedPixels"]) for r in records)
    atomic_write_text(out / SUBMISSION_FILE, short.getvalue(), fsync=True)
    atomic_write_text(out / PREDICTIONS_FILE, full.getvalue(), fsync=True)
