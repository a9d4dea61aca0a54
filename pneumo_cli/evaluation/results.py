"""What an evaluation holds: per-image rows, the metrics, the cases a report shows and the
per-image CSV."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PER_IMAGE_COLUMNS = ("ImageId", "truth_area", "pred_area", "dice", "iou", "max_prob", "outcome")
REPORT_SECTIONS = {
    "false_negatives": "Worst false negatives (largest missed pneumothorax)",
    "false_positives": "Worst false positives (largest mask on an empty image)",
    "lowest_dice": "Lowest-Dice positives (found, badly outlined)",
}
CONVENTIONS = {
    "dice": "mean over images of 2|T and P| / (|T| + |P|); both masks empty = 1, "
    "exactly one empty = 0 (SIIM-ACR 2019)",
    "iou": "mean over images of |T and P| / |T or P|; both empty = 1, exactly one empty = 0",
    "positive_only": "positive_mean_dice/iou average only images whose truth mask is non-empty",
    "image_level": "an image is positive when its mask has at least one pixel",
    "roc_auc": "Mann-Whitney U on each image's maximum probability, ties count 1/2; "
    "null without probabilities or without both classes",
    "undefined": "a ratio with a zero denominator is null",
}


@dataclass(frozen=True)
class ImageRow:
    """One image's scores; areas in pixels at the scoring resolution."""

    image_id: str
    truth_area: int
    pred_area: int
    intersection: int
    dice: float
    iou: float
    max_prob: float | None
    outcome: str  # "TP", "FP", "FN" or "TN" at image level


@dataclass(frozen=True)
class Evaluation:
    """All numbers (``metrics``, JSON-ready) and the per-image rows behind them."""

    metrics: dict[str, Any]
    rows: list[ImageRow]


def json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def select_cases(rows: Sequence[ImageRow], per_section: int = 6) -> dict[str, list[ImageRow]]:
    """The images a reader should look at, per report section (ties broken by ImageId).

    ``false_negatives``: missed positives, largest truth first; ``false_positives``: masks on
    empty images, largest first; ``lowest_dice``: true positives with the lowest Dice.
    """
    fn = sorted((r for r in rows if r.outcome == "FN"), key=lambda r: (-r.truth_area, r.image_id))
    fp = sorted(
        (r for r in rows if r.outcome == "FP"),
        key=lambda r: (-r.pred_area, -(r.max_prob or 0.0), r.image_id),
    )
    low = sorted((r for r in rows if r.outcome == "TP"), key=lambda r: (r.dice, r.image_id))
    return {
        "false_negatives": fn[:per_section],
        "false_positives": fp[:per_section],
        "lowest_dice": low[:per_section],
    }


def per_image_csv(rows: Sequence[ImageRow]) -> str:
    """The text of ``per_image.csv`` (columns :data:`PER_IMAGE_COLUMNS`; max_prob may be empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_IMAGE_COLUMNS)
    for r in rows:
        prob = "" if r.max_prob is None else repr(r.max_prob)
        writer.writerow(
            (r.image_id, r.truth_area, r.pred_area, repr(r.dice), repr(r.iou), prob, r.outcome)
        )
    return buffer.getvalue()
