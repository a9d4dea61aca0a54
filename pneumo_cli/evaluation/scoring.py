"""Scoring predictions against the truth: metrics, per-image rows and the evaluation folder.

Two entry points build the same :class:`Evaluation`:

- :func:`score_masks` from (truth, prediction) masks per image (the model mode, after predict);
- :func:`score_submission` from two SIIM RLE CSV files, offline, with no TensorFlow. It computes
  overlaps directly on the run intervals, so a 1024 x 1024 submission is scored without
  building full masks.

:func:`write_evaluation` then writes ``metrics.json``, ``per_image.csv``, the plots and
``report.html`` into one folder. All Dice/IoU numbers follow the SIIM empty-mask convention
(see :mod:`pneumo_cli.core.metrics`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli import __version__
from pneumo_cli.core import metrics
from pneumo_cli.core.errors import InputError, OutputError, RleError
from pneumo_cli.core.files import (
    atomic_write_json,
    atomic_write_text,
    describe_os_error,
    ensure_output_dir,
    read_text_input,
    remove_stale_temporaries,
)
from pneumo_cli.evaluation.results import (
    CONVENTIONS,
    Evaluation,
    ImageRow,
    json_number,
    per_image_csv,
    select_cases,
)
from pneumo_cli.io.rle import ID_COLUMNS, RleRow, parse_runs, read_rle_csv, row_context

MAX_PROB_COLUMNS = ("max_prob", "max_probability", "maxprob", "max probability")


def score_counts(
    image_ids: Sequence[str],
    intersections: Sequence[int] | np.ndarray,
    truth_areas: Sequence[int] | np.ndarray,
    pred_areas: Sequence[int] | np.ndarray,
    max_probs: Sequence[float | None] | None = None,
    details: dict[str, Any] | None = None,
) -> Evaluation:
    """Build an :class:`Evaluation` from per-image pixel counts.

    ``max_probs`` (each image's maximum probability) feed the ROC AUC and curves; without them
    (or with any missing) the AUC is null. ``details`` (split, gate, inputs, resolution, ...)
    are merged into the metrics as given.

    Raises:
        InputError: no images, or arrays of different lengths.
    """
    inter = np.asarray(intersections, dtype=np.int64)
    truth = np.asarray(truth_areas, dtype=np.int64)
    pred = np.asarray(pred_areas, dtype=np.int64)
    count = len(image_ids)
    if count == 0:
        raise InputError("no images to score")
    if not inter.size == truth.size == pred.size == count:
        raise InputError("image ids and pixel counts have different lengths")
    probs = list(max_probs) if max_probs is not None else [None] * count
    if len(probs) != count:
        raise InputError(f"{len(probs)} max probabilities for {count} images")
    dice = metrics.dice_from_counts(inter, truth, pred)
    iou = metrics.iou_from_counts(inter, truth, pred)
    outcome = metrics.outcomes(truth > 0, pred > 0)
    result = _summary_metrics(dice, iou, truth, pred, probs)
    result.update(details or {})
    rows = [
        ImageRow(
            image_id=image_ids[i],
            truth_area=int(truth[i]),
            pred_area=int(pred[i]),
            intersection=int(inter[i]),
            dice=float(dice[i]),
            iou=float(iou[i]),
            max_prob=None if probs[i] is None else float(probs[i]),
            outcome=str(outcome[i]),
        )
        for i in range(count)
    ]
    return Evaluation(result, rows)


def _summary_metrics(
    dice: np.ndarray,
    iou: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    probs: list[float | None],
) -> dict[str, Any]:
    """The split's metrics from per-image scores and areas (metrics.json without details)."""
    count = len(dice)
    truth_present, pred_present = truth > 0, pred > 0
    confusion = metrics.confusion_matrix(truth_present, pred_present)
    scored = all(p is not None for p in probs)
    scores = np.array(probs, dtype=np.float64) if scored else None
    return {
        "mean_dice": json_number(metrics.mean_over_images(dice)),
        "mean_iou": json_number(metrics.mean_over_images(iou)),
        "positive_mean_dice": json_number(metrics.mean_over_positives(dice, truth)),
        "positive_mean_iou": json_number(metrics.mean_over_positives(iou, truth)),
        "sensitivity": json_number(confusion.sensitivity),
        "specificity": json_number(confusion.specificity),
        "precision": json_number(confusion.precision),
        "accuracy": json_number(confusion.accuracy),
        "roc_auc": json_number(metrics.roc_auc(truth_present, scores)) if scored else None,
        "average_precision": (
            json_number(metrics.average_precision(truth_present, scores)) if scored else None
        ),
        "confusion_matrix": {
            "tp": confusion.tp,
            "fp": confusion.fp,
            "fn": confusion.fn,
            "tn": confusion.tn,
        },
        "n_images": count,
        "n_positive": int(truth_present.sum()),
        "n_negative": int(count - truth_present.sum()),
        "has_probabilities": scored,
        "conventions": dict(CONVENTIONS),
        "split": None,
        "gate": None,
        "pneumo_version": __version__,
    }


def score_masks(
    items: Iterable[tuple[str, np.ndarray, np.ndarray, float | None]],
    details: dict[str, Any] | None = None,
) -> Evaluation:
    """Score ``(image_id, truth_mask, pred_mask, max_prob)`` tuples of (H, W) {0,1} masks.

    Masks are consumed one at a time, so a generator keeps memory to one image pair.
    """
    ids, inters, truths, preds, probs = [], [], [], [], []
    for image_id, truth, pred, max_prob in items:
        try:
            inter, truth_area, pred_area = metrics.overlap_counts(truth, pred)
        except ValueError as exc:
            raise InputError(f"ImageId '{image_id}': {exc}") from None
        ids.append(image_id)
        inters.append(inter)
        truths.append(truth_area)
        preds.append(pred_area)
        probs.append(max_prob)
    return score_counts(ids, inters, truths, preds, probs, details)


def _group_rows(rows: list[RleRow]) -> dict[str, list[RleRow]]:
    grouped: dict[str, list[RleRow]] = {}
    for row in rows:
        grouped.setdefault(row.image_id, []).append(row)
    return grouped


def _union_runs(path: Path, rows: list[RleRow], height: int, width: int) -> tuple[np.ndarray, ...]:
    starts, ends = [], []
    for row in rows:
        try:
            row_starts, row_ends = parse_runs(row.encoded, height, width)
        except RleError as exc:
            raise RleError(f"{row_context(path, row)}: {exc}") from None
        starts.append(row_starts)
        ends.append(row_ends)
    return np.concatenate(starts), np.concatenate(ends)


def _describe_missing(ids: list[str], where: Path) -> str:
    shown = ", ".join(f"'{i}'" for i in ids[:2])
    return f"{len(ids)} ImageId(s) missing from {where} (e.g. {shown})"


def score_submission(
    predictions_csv: str | Path,
    truth_csv: str | Path,
    allow_missing: bool = False,
    height: int = 1024,
    width: int = 1024,
) -> Evaluation:
    """Score a SIIM submission CSV against an RLE truth CSV at ``height`` x ``width``.

    Both files may have several rows per ImageId (their union is the mask). Images present in
    only one file are listed in ``metrics["missing"]``; with ``allow_missing`` the images in
    common are scored, otherwise that is an error. If the predictions CSV has a ``max_prob``
    column, it gives the ROC AUC and curves (several rows of an image: their maximum).

    Raises:
        InputError: unreadable files, no ImageId in common, or (without ``allow_missing``)
            ImageIds in only one file; a bad max probability.
        RleError: a malformed RLE string, named by file, line and ImageId.
    """
    predictions_csv, truth_csv = Path(predictions_csv), Path(truth_csv)
    predicted = _group_rows(read_rle_csv(predictions_csv))
    truth = _group_rows(read_rle_csv(truth_csv))
    common = [image_id for image_id in predicted if image_id in truth]
    not_predicted = [image_id for image_id in truth if image_id not in predicted]
    not_in_truth = [image_id for image_id in predicted if image_id not in truth]
    if not common:
        raise InputError(
            f"{predictions_csv} ({len(predicted)} ImageIds) and {truth_csv} ({len(truth)}) have "
            "no ImageId in common; are they from the same image set?"
        )
    if (not_predicted or not_in_truth) and not allow_missing:
        parts = []
        if not_predicted:
            parts.append(_describe_missing(not_predicted, predictions_csv))
        if not_in_truth:
            parts.append(_describe_missing(not_in_truth, truth_csv))
        raise InputError(
            f"{'; '.join(parts)}; pass --allow-missing to score the {len(common)} in common"
        )
    max_probs = _read_max_probs(predictions_csv)
    counts = np.zeros((len(common), 3), dtype=np.int64)
    for i, image_id in enumerate(common):
        counts[i] = metrics.run_overlap_counts(
            _union_runs(truth_csv, truth[image_id], height, width),
            _union_runs(predictions_csv, predicted[image_id], height, width),
        )
    probs = [max_probs.get(i) for i in common] if max_probs is not None else None
    details = {
        "mode": "offline",
        "inputs": {"predictions": str(predictions_csv), "truth": str(truth_csv)},
        "resolution": {"height": height, "width": width, "at": "original"},
        "missing": {
            "allowed": allow_missing,
            "not_in_predictions": len(not_predicted),
            "not_in_truth": len(not_in_truth),
            "examples_not_in_predictions": not_predicted[:10],
            "examples_not_in_truth": not_in_truth[:10],
        },
    }
    return score_counts(common, counts[:, 0], counts[:, 1], counts[:, 2], probs, details)


def _read_max_probs(path: Path) -> dict[str, float] | None:
    """ImageId -> max probability from an optional ``max_prob`` column; None without one."""
    data = read_text_input(path)  # bounded: read_rle_csv has already read it the same way
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), skipinitialspace=True)
    header = next((row for row in reader if any(cell.strip() for cell in row)), [])
    names = [cell.strip().lower() for cell in header]
    id_col = next((names.index(n) for n in ID_COLUMNS if n in names), None)
    prob_col = next((names.index(n) for n in MAX_PROB_COLUMNS if n in names), None)
    if id_col is None or prob_col is None:
        return None
    probs: dict[str, float] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        image_id = row[id_col].strip()
        text = row[prob_col].strip() if len(row) > prob_col else ""
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise InputError(
                f"{path} line {reader.line_num} (ImageId '{image_id}'): max probability "
                f"'{text[:20]}' is not a number in [0, 1]"
            )
        probs[image_id] = max(value, probs.get(image_id, 0.0))
    return probs


def write_evaluation(
    evaluation: Evaluation,
    out_dir: str | Path,
    panels: Sequence[Any] = (),
    inputs: Sequence[str | Path] = (),
) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_image.csv``, ``roc.png``, ``pr.png``, ``dice_hist.png`` and
    ``report.html`` into ``out_dir`` (created; existing files replaced atomically).

    ``panels`` are :class:`pneumo_cli.report.ReportPanel` overlay images to show in the report;
    ``inputs`` are folders the output must not be inside. Returns name -> path of every file.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    from pneumo_cli.evaluation import report

    out = ensure_output_dir(out_dir, *inputs)
    remove_stale_temporaries(out)
    written = {"metrics.json": out / "metrics.json", "per_image.csv": out / "per_image.csv"}
    # An older metrics.json would mark a folder complete while its other files are being
    # replaced; it goes first and comes back last.
    try:
        written["metrics.json"].unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot replace {written['metrics.json']}: {describe_os_error(exc)}"
        ) from None
    atomic_write_text(written["per_image.csv"], per_image_csv(evaluation.rows))
    written.update(report.write_plots(evaluation, out))
    written["report.html"] = report.write_report(
        evaluation, out, select_cases(evaluation.rows), panels
    )
    # metrics.json last: its presence means the folder is complete.
    atomic_write_json(written["metrics.json"], evaluation.metrics)
    return written
