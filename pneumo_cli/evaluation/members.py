"""Ensembles in `pneumo evaluate`: each member scored beside the whole, and a sweep's images
out of fold (each fold's images with the fold's own model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.choices import Split
from pneumo_cli.core.errors import ConfigError, InputError


@dataclass(frozen=True)
class Part:
    """Images one network scores: every image with the run's (or ensemble's) predictor, or out
    of fold one fold's images with that fold's model (``name`` its folder)."""

    name: str
    predictor: Any
    labelled: list[tuple[str, Any]]


def fold_parts(cache_dir: Path, folds: list[Any]) -> tuple[list[Part], Callable, int]:
    """Out of fold: fold K's labelled train and val images, to be scored by fold K's model.

    Raises:
        ConfigError: a member that is not fold K of this cache's folds.
    """
    from pneumo_cli.inference.sources import cache_sources

    pool: list[tuple[str, Any]] = []
    load: Callable | None = None
    for split in (Split.train.value, Split.val.value):
        try:
            sources, load = cache_sources(cache_dir, split)
        except InputError:
            continue  # a cache may lack one of the two splits
        pool += sources
    parts = []
    for k, member in enumerate(folds):
        if member.config.get("fold") != k:
            raise ConfigError(
                f"{member.run_dir} is not fold {k} of its sweep (its config.json says fold "
                f"{member.config.get('fold')}); train the sweep again"
            )
        mine = [(i, row) for i, row in pool if int(row["fold"]) == k and row["mask"]]
        parts.append(Part(member.run_dir.name, member, mine))
    unlabelled = sum(1 for _, row in pool if not row["mask"])
    if load is None:
        raise InputError(f"{cache_dir}/manifest.csv has no train or val images to score")
    return parts, load, unlabelled


def member_scorer(
    names: list[str],
    gate: Any,
    masks_of: Callable[[Any, Any, np.ndarray, Any], tuple[np.ndarray, np.ndarray, Any]],
    counts: dict[str, list],
) -> Callable:
    """``on_members(item, row, maps)`` for evaluate's pass: scores each member's map under the
    ensemble's ``gate`` as it comes (the maps are not kept), into ``counts[name]``;
    ``masks_of(item, row, prob, gate)`` gives (truth, predicted mask, record)."""
    from pneumo_cli.core.metrics import overlap_counts

    def on_members(item: Any, row: Any, maps: np.ndarray) -> None:
        for name, prob in zip(names, maps, strict=True):
            truth, pred, _ = masks_of(item, row, prob, gate)
            entry = (item.image_id, *overlap_counts(truth, pred), float(prob.max()))
            counts.setdefault(name, []).append(entry)

    return on_members


MEMBER_METRICS = ("mean_dice", "positive_mean_dice", "mean_iou", "positive_mean_iou", "roc_auc")


def member_metrics(
    job: Any, evaluation: Any, scored: list[Any], counts: dict[str, list]
) -> list[dict[str, Any]]:
    """Each member's scores beside the ensemble's: out of fold, each fold's model on its own
    fold (a slice of the evaluation); else each member on the whole split."""
    from pneumo_cli.evaluation.scoring import score_counts

    rows = {row.image_id: row for row in evaluation.rows}
    if job.mode == "out-of-fold":
        for part in job.parts:
            mine = [rows[s.item.image_id] for s in scored if s.part == part.name]
            counts[str(part.predictor.run_dir)] = [
                (r.image_id, r.intersection, r.truth_area, r.pred_area, r.max_prob) for r in mine
            ]
    result = []
    for name, entries in counts.items():
        if not entries:
            continue
        columns = [list(column) for column in zip(*entries, strict=True)]
        member = score_counts(*columns).metrics
        scored_on = "its own validation fold" if job.mode == "out-of-fold" else job.split
        result.append({"run": name, "images": len(entries), "scored_on": scored_on}
                      | {key: member[key] for key in MEMBER_METRICS})  # fmt: skip
    return result
