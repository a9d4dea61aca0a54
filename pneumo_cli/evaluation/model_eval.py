"""`pneumo evaluate` on a trained run: predict one cache split, tune the gate, score, report.

The probability maps of the split are computed once, at the model's resolution, by the predict
code (:mod:`pneumo_cli.inference.predict`), and kept in float32 as `pneumo predict` gates them.
``--tune`` searches the gate on those maps against the cached masks (areas scaled to original
pixels per image) and saves the winner as the run's ``postprocess.json``. Scoring then applies
the gate the way ``pneumo predict`` does: by default at the original resolution, each map
restored through resize and crop and compared with the image's original mask from
``CACHE/truth.csv`` (as Kaggle scored); with ``at="model"`` at the cached size against the
cached mask.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.choices import Resolution, Split, check_choice
from pneumo_cli.core.config import to_dict
from pneumo_cli.core.errors import ConfigError, InputError, UsageError
from pneumo_cli.core.files import ensure_output_dir, remove_stale_temporaries
from pneumo_cli.core.progress import ProgressFactory, stage
from pneumo_cli.evaluation.maps import Scored, predict_split
from pneumo_cli.evaluation.members import (
    Part,
    fold_parts,
    member_metrics,
    member_scorer,
)
from pneumo_cli.inference.ensemble import member_label
from pneumo_cli.inference.postprocess import (
    POSTPROCESS_FILE,
    Gate,
    apply_gate,
    area_scale_for,
    save_gate,
)

PANEL_SIZE_PX = 512
TOP_GATES_SHOWN = 5


@dataclass
class RunEvaluation:
    """What ``evaluate_run`` produced: the evaluation, its files and, with tuning, the ranking."""

    evaluation: Any
    written: dict[str, Path]
    out_dir: Path
    tuned: list[Any]
    gate: Gate
    run_dir: Path
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # for stderr


def _read_truth(cache: Path, image_ids: set[str]) -> dict[str, str]:
    from pneumo_cli.data.cache import TRUTH_FILE
    from pneumo_cli.io.rle import read_rle_csv

    path = cache / TRUTH_FILE
    if not path.is_file():
        raise InputError(
            f"{cache} has no {TRUTH_FILE} (made by an older pneumo); run `pneumo preprocess` "
            "on it again with --overwrite, or use --at model"
        )
    truth = {row.image_id: row.encoded for row in read_rle_csv(path) if row.image_id in image_ids}
    missing = sorted(image_ids - set(truth))
    if missing:
        raise InputError(f"{path} lacks {len(missing)} labelled image(s), e.g. {missing[0]}")
    return truth


def _cached_mask(cache: Path, row: Any) -> np.ndarray:
    from pneumo_cli.core.files import read_mask_png

    return read_mask_png(cache / row["mask"])


def _crop_scale(item: Any, size: int) -> float:
    top, bottom, left, right = item.crop
    return area_scale_for((bottom - top, right - left), (size, size))


@dataclass(frozen=True)
class _EvalJob:
    """A checked evaluation request: the loaded run or ensemble, its cache split (or, out of
    fold, each fold's images) and the output folder."""

    run_dir: Path
    predictor: Any
    cache_dir: Path
    split: str
    at: str
    parts: list[Part]
    unlabelled: int
    load: Callable
    out: Path
    mode: str  # "run", "ensemble" (members scored beside it) or "out-of-fold"

    @property
    def labelled(self) -> list[tuple[str, Any]]:
        return [source for part in self.parts for source in part.labelled]


OUT_OF_FOLD = "oof"


def evaluate_run(
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    *,
    cache: str | os.PathLike[str] | None = None,
    split: str | None = None,
    tta: str = "none",
    precision: str = "auto",
    engine: str = "auto",
    tune: bool = False,
    at: str = "original",
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> RunEvaluation:
    """Score a run, an ensemble or a cross-validation sweep on one split of its cache (see the
    module docstring).

    A sweep without ``split`` (or with ``tune``) is scored out of fold: each fold's model on its
    own validation fold only, so every labelled train and val image is scored once, by the one
    model that did not train on it; ``tune`` tunes one gate on all of them and saves it as the
    sweep's ``postprocess.json``, which ``split="test"`` then applies to the ensemble. An
    ensemble is scored with each member beside it (metrics.json ``members``).

    ``precision`` and ``engine`` are resolved as `pneumo predict` resolves them
    (:func:`~pneumo_cli.inference.predictor.load_predictor`), so the maps scored are those
    predict writes in the same precision; metrics.json records it. Progress is reported per
    stage (:mod:`pneumo_cli.core.progress`).

    Raises:
        ConfigError: tuning on anything but val (out of fold for a sweep), tuning runs given one
            by one, unknown split or resolution, a cache made with other preprocessing settings
            than the run's, a split that holds images a member trained on.
        InputError: no run or model, the split absent or without labelled images, no truth.
    """
    from pneumo_cli.evaluation.results import select_cases
    from pneumo_cli.evaluation.scoring import score_counts, write_evaluation
    from pneumo_cli.inference.outputs import write_predictions

    job = _open_job(run, cache, split, tta, (precision, engine), tune, at, out_dir)
    workers = workers or os.cpu_count() or 1
    member_counts: dict[str, list] = {}
    on_members = _member_scorer(job, member_counts) if job.mode == "ensemble" else None
    scored: list[Scored] = []
    with stage(progress, f"predicting {job.split}", len(job.labelled)) as advance:
        for part in job.parts:
            scored += predict_split(part.predictor, part.labelled, job.load, batch_size, workers,
                                     advance, part.name, on_members)  # fmt: skip
    tuned: list[Any] = []
    gate = job.predictor.gate
    if tune:
        with stage(progress, "tuning the gate", len(scored)) as advance:
            tuned = _tune_gate(job, scored, advance)
        gate = tuned[0].gate
        save_gate(job.run_dir / POSTPROCESS_FILE, gate)
    with stage(progress, "scoring", len(scored)) as advance:
        counts, records = _score(job, scored, gate, workers, advance)
    details = _details(job, gate, tta, tuned)
    evaluation = score_counts(*counts, details)
    if job.mode != "run":
        evaluation.metrics["members"] = member_metrics(job, evaluation, scored, member_counts)
    cases = select_cases(evaluation.rows)
    panels = _report_panels(evaluation, cases, scored, job.cache_dir, gate, job.out)
    if records:
        write_predictions(job.out, sorted(records, key=lambda r: r["ImageId"]))
    written = write_evaluation(evaluation, job.out, panels, inputs=[job.cache_dir])
    notes = list(job.predictor.notes)
    return RunEvaluation(evaluation, written, job.out, tuned, gate, job.run_dir, notes)


def _open_job(
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    cache: str | os.PathLike[str] | None,
    split: str | None,
    tta: str,
    precision: tuple[str, str],
    tune: bool,
    at: str,
    out_dir: str | os.PathLike[str] | None,
) -> _EvalJob:
    """Check the request and load the run; everything that can refuse it happens here, before
    the slow part (the output folder too, so a bad --out fails at once)."""
    from pneumo_cli.data.cache import load_cache_settings
    from pneumo_cli.evaluation.leakage import check_split_unchanged
    from pneumo_cli.inference.ensemble import resolve_members
    from pneumo_cli.inference.loading import open_predictor
    from pneumo_cli.inference.predictor import check_cache_matches
    from pneumo_cli.inference.sources import cache_sources

    if split is not None:
        check_choice(Split, split, "--split")
    check_choice(Resolution, at, "--at")
    if tune and split not in (None, Split.val):
        raise ConfigError(
            f"--tune on the {split} split is refused: tune the gate on val (out of fold for a "
            "sweep), then score test once"
        )
    members = resolve_members(run)
    out_of_fold = members.sweep and split is None
    if members.sweep and split == Split.val:
        raise ConfigError(
            f"{members.source} is a cross-validation sweep: every val image trained some of its "
            "folds; drop --split to score (and --tune) it out of fold, or use --split test"
        )
    split = OUT_OF_FOLD if out_of_fold else (split or Split.val.value)
    if tune and len(members.runs) > 1 and not members.sweep:
        raise ConfigError(
            "--tune on runs given one by one has nowhere to keep the gate: train them as one "
            "sweep (`pneumo train --cv`) and tune it out of fold, or tune each run"
        )
    if out_dir is None and len(members.runs) > 1 and not members.sweep:
        raise UsageError(
            "runs given one by one have no folder of their own for the evaluation; give --out"
        )
    predictor = open_predictor(list(members.runs) if not members.sweep else members.source,
                               None, tta, precision[0], engine=precision[1])  # fmt: skip
    member_predictors = getattr(predictor, "members", [predictor])
    cache_dir = Path(cache) if cache is not None else Path(predictor.config.get("cache", "cache"))
    check_cache_matches(load_cache_settings(cache_dir), predictor, cache_dir)
    if out_of_fold:
        parts, load, unlabelled = fold_parts(cache_dir, member_predictors)
        for part in parts:
            ids = [i for i, _ in part.labelled]
            check_split_unchanged(part.predictor.run_dir, part.predictor.config, cache_dir,
                                  "val", ids)  # fmt: skip
    else:
        sources, load = cache_sources(cache_dir, split)
        for member in member_predictors:
            ids = [i for i, _ in sources]
            check_split_unchanged(member.run_dir, member.config, cache_dir, split, ids)
        labelled = [(i, row) for i, row in sources if row["mask"]]
        parts = [Part("", predictor, labelled)]
        unlabelled = len(sources) - len(labelled)
    out = ensure_output_dir(
        Path(out_dir) if out_dir is not None else members.source / f"eval-{split}", cache_dir
    )
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "overlays")
    if not any(part.labelled for part in parts):
        raise InputError(f"split '{split}' of {cache_dir} has no labelled image to score")
    mode = "out-of-fold" if out_of_fold else ("ensemble" if len(member_predictors) > 1 else "run")
    return _EvalJob(members.source, predictor, cache_dir, split, at, parts, unlabelled, load, out,
                    mode)  # fmt: skip


def _tune_gate(job: _EvalJob, scored: list[Scored], advance: Callable) -> list[Any]:
    """Gates ranked on the split's maps against the cached masks (areas in original pixels)."""
    from pneumo_cli.evaluation.tuning import GateGrid, tune_gate

    size = job.predictor.image_size
    return tune_gate(
        (s.prob for s in scored),
        (_cached_mask(job.cache_dir, s.row) for s in scored),
        GateGrid(),
        area_scale=[_crop_scale(s.item, size) for s in scored],
        progress=advance,
    )


def _score(
    job: _EvalJob, scored: list[Scored], gate: Gate, workers: int, advance: Callable
) -> tuple[tuple[list, ...], list[dict]]:
    """Per-image overlap counts under ``gate`` (in original or model pixels, as ``job.at``
    says) and, at original resolution, the predictions.csv records `pneumo predict` writes."""
    from pneumo_cli.core.metrics import overlap_counts

    ids = {s.item.image_id for s in scored}
    truth_rle = _read_truth(job.cache_dir, ids) if job.at == Resolution.original else {}

    def image_masks(entry: Scored) -> tuple[np.ndarray, np.ndarray, dict | None]:
        return _masks(job, entry.item, entry.row, entry.prob, gate, truth_rle)

    columns: tuple[list, ...] = ([], [], [], [], [])
    records = []
    with ThreadPoolExecutor(workers) as pool:
        for entry, (truth, pred, record) in zip(scored, pool.map(image_masks, scored), strict=True):
            for column, value in zip(
                columns,
                (entry.item.image_id, *overlap_counts(truth, pred), float(entry.prob.max())),
                strict=True,
            ):
                column.append(value)
            if record is not None:
                records.append(record)
            advance(1)
    return columns, records


def _masks(
    job: _EvalJob, item: Any, row: Any, prob: np.ndarray, gate: Gate, truth_rle: dict[str, str]
) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(truth, predicted mask, predictions.csv record or None) of one map, at the resolution
    ``job.at`` says: original pixels (through resize and crop, against ``truth.csv``) or the
    cached size (against the cached mask)."""
    from pneumo_cli.inference.outputs import output_row
    from pneumo_cli.io.rle import decode_union

    if job.at != Resolution.original:
        pred = apply_gate(prob, gate, area_scale=_crop_scale(item, prob.shape[-1]))
        return _cached_mask(job.cache_dir, row), pred, None
    record, pred, _ = output_row(item.image_id, prob, item, gate, keep_probs=False)
    height, width = item.original_shape
    return decode_union([truth_rle[item.image_id]], height, width), pred, record


def _member_scorer(job: _EvalJob, counts: dict[str, list]) -> Callable:
    ids = {image_id for image_id, _ in job.labelled}
    truth_rle = _read_truth(job.cache_dir, ids) if job.at == Resolution.original else {}
    names = [member_label(member) for member in job.predictor.members]

    def masks_of(item: Any, row: Any, prob: np.ndarray, gate: Gate) -> tuple:
        return _masks(job, item, row, prob, gate, truth_rle)

    return member_scorer(names, job.predictor.gate, masks_of, counts)


def _details(job: _EvalJob, gate: Gate, tta: str, tuned: list[Any]) -> dict[str, Any]:
    """What metrics.json records besides the scores."""
    size = job.predictor.image_size
    details: dict[str, Any] = {
        "split": job.split,
        "gate": to_dict(gate),
        "gate_source": "tuned now" if tuned else _gate_source(job),
        # Original images may differ in size; at model resolution every image is size x size.
        "resolution": {
            "at": job.at,
            "height": size if job.at == Resolution.model else None,
            "width": size if job.at == Resolution.model else None,
        },
        "tta": tta,
        # How the network ran ("precision" alone is the positive predictive value here).
        "inference": {
            "precision": job.predictor.precision,
            "engine": job.predictor.engine,
            "reason": job.predictor.precision_reason,
        },
        "run": str(job.run_dir),
        "mode": job.mode,
        "ensemble": [member_label(m) for m in getattr(job.predictor, "members", [])] or None,
        "cache": str(job.cache_dir),
        "image_size": size,
        "unlabelled_skipped": job.unlabelled,
    }
    if tuned:
        details["tuning"] = {
            "grid_points": len(tuned),
            "best": [dataclasses.asdict(score) for score in tuned[:TOP_GATES_SHOWN]],
        }
    return details


def _gate_source(job: _EvalJob) -> str:
    """Where the gate scored with came from: the run's (or sweep's) postprocess.json or the
    default; for runs given one by one, their common gate or the default."""
    ensemble_source = getattr(job.predictor, "gate_source", None)
    if ensemble_source is not None:
        return "default" if ensemble_source == "default" else str(ensemble_source)
    return POSTPROCESS_FILE if (job.run_dir / POSTPROCESS_FILE).is_file() else "default"


def _report_panels(
    evaluation: Any,
    cases: dict[str, list[Any]],
    scored: list[Scored],
    cache: Path,
    gate: Gate,
    out: Path,
) -> list[Any]:
    """Overlay pictures (cached image, model resolution) of the images the report shows."""
    from pneumo_cli.core.files import read_grey_png, write_png
    from pneumo_cli.evaluation.report import ReportPanel
    from pneumo_cli.overlay.render import format_title, render_panels

    by_id = {s.item.image_id: s for s in scored}
    folder = out / "overlays"
    panels = []
    for section, rows in cases.items():
        for row in rows:
            entry = by_id[row.image_id]
            size = entry.item.image.shape[0]
            pred = apply_gate(entry.prob, gate, area_scale=_crop_scale(entry.item, size))
            truth = _cached_mask(cache, entry.row)
            image = read_grey_png(cache / entry.row["image"])
            picture = render_panels(image, pred, truth, format_title(row.image_id, row.dice))
            path = folder / f"{row.image_id}.png"
            folder.mkdir(exist_ok=True)
            write_png(path, picture)
            caption = (
                f"Dice {row.dice:.3f}, truth {row.truth_area} px, predicted {row.pred_area} px"
            )
            panels.append(ReportPanel(section, row.image_id, path, caption))
    return panels
