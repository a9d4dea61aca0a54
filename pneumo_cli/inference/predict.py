"""Masks on new X-rays with a trained run: the inference path behind `pneumo predict`.

An input goes through exactly the preprocessing recorded in the run (``imaging.prepare_image``,
the code ``pneumo preprocess`` uses), the network runs through one ``tf.function`` on batches
while a thread pool decodes the next images, and each probability map is mapped back through
the resize and crop to the original pixels, where the post-processing gate turns it into a mask.

Outputs in ``OUT``: ``masks/<ImageId>.png`` (0/255, original size), optionally
``probs/<ImageId>.png`` (probability x 255), ``records/<ImageId>.json`` (what the CSV row needs,
so a re-run can skip finished images), ``rejected.csv`` and, written last,
``predictions.csv`` (ImageId, has_pneumothorax, max_prob, area_px, EncodedPixels) and
``submission.csv`` (ImageId, EncodedPixels: the Kaggle format).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError, PneumoError, UsageError
from pneumo_cli.core.files import (
    atomic_write_json,
    ensure_output_dir,
    remove_stale_temporaries,
    write_mask_png,
    write_png,
)
from pneumo_cli.core.locks import folder_lock
from pneumo_cli.core.progress import ProgressFactory, ProgressFn, stage
from pneumo_cli.core.workers import single_threaded_opencv
from pneumo_cli.inference.jobs import claim_predict_job, job_identity
from pneumo_cli.inference.loading import open_predictor
from pneumo_cli.inference.outputs import (
    PREDICTIONS_FILE,
    REJECTED_FILE,
    SUBMISSION_FILE,
    output_row,
    write_predictions,
    write_rejected,
)
from pneumo_cli.inference.postprocess import Gate
from pneumo_cli.inference.predictor import check_cache_matches
from pneumo_cli.inference.shards import select_shard
from pneumo_cli.inference.sources import (
    Item,
    Rejected,
    batches,
    cache_sources,
    file_loader,
    file_sources,
    first_images,
)


@dataclass
class PredictSummary:
    """Counts and paths of a ``predict`` call."""

    images: int = 0
    predicted: int = 0
    skipped_existing: int = 0
    rejected: int = 0
    positive: int = 0
    images_per_second: float = 0.0
    tta: str = "none"
    precision: str = "fp32"
    engine: str = "keras"
    precision_reason: str = ""
    precision_check: dict[str, Any] | None = None
    shard: str = ""
    gate: dict[str, float] = field(default_factory=dict)
    out_dir: str = ""
    predictions_csv: str = ""
    outputs: dict[str, int] = field(default_factory=dict)  # counts of extra outputs (DICOM SEG)
    # For stderr, not for the result: (kind, text) with kind "note" or "warning".
    notes: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["notes"]
        return values


def predict_items(
    predictor: Any,
    items: Iterator[Item | Rejected],
    batch_size: int,
) -> Iterator[tuple[Item, np.ndarray] | Rejected]:
    """Run the network over prepared items in batches; errors pass through in order."""
    for batch in batches(items, batch_size):
        good = [item for item in batch if isinstance(item, Item)]
        probs = predictor.probabilities(np.stack([i.image for i in good])) if good else []
        results = iter(zip(good, probs, strict=True))
        for item in batch:
            yield next(results) if isinstance(item, Item) else item


class OutputStage(Protocol):
    """An extra output written for every predicted image (for example a DICOM SEG), in the
    writer threads, after the mask and before the record that marks the image finished."""

    def prepare(self, out: Path) -> None:
        """Create the stage's folder in ``out`` and remove its stale temporaries."""

    def done(self, out: Path, record: dict[str, Any]) -> bool:
        """Whether the image of a finished ``record`` already has this stage's output."""

    def write(self, out: Path, item: Item, mask: np.ndarray) -> dict[str, Any]:
        """Write the output for ``item`` (uint8 {0,1} ``mask`` at original size); returns the
        fields to add to the image's record."""

    def finish(self, out: Path, records: list[dict[str, Any]]) -> dict[str, int]:
        """After the job: write the stage's own summary files; returns counts for the summary."""


@dataclass(frozen=True)
class PredictOutputs:
    """The output folder of a predict call and what is written into it per image."""

    out: Path
    save_probs: bool
    stages: tuple[OutputStage, ...] = ()

    @property
    def masks(self) -> Path:
        return self.out / "masks"

    @property
    def records(self) -> Path:
        return self.out / "records"

    @property
    def probs(self) -> Path:
        return self.out / "probs"

    def prepare(self) -> None:
        folders = [self.masks, self.records] + ([self.probs] if self.save_probs else [])
        for folder in folders:
            folder.mkdir(exist_ok=True)
            remove_stale_temporaries(folder)
        remove_stale_temporaries(self.out)
        for extra in self.stages:
            extra.prepare(self.out)

    def finished_record(self, image_id: str) -> dict | None:
        """The record of an image finished by an earlier call, or None."""
        record = self.records / f"{image_id}.json"
        if not record.is_file() or not (self.masks / f"{image_id}.png").is_file():
            return None
        finished = json.loads(record.read_text(encoding="utf-8"))
        if not all(extra.done(self.out, finished) for extra in self.stages):
            return None
        return finished

    def write(self, item: Item, prob: np.ndarray, gate: Gate) -> dict:
        """Post-process one map and write the image's outputs; the record goes last."""
        record, mask, full = output_row(item.image_id, prob, item, gate, keep_probs=self.save_probs)
        write_mask_png(self.masks / f"{item.image_id}.png", mask)
        if full is not None:
            probs = np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8)
            write_png(self.probs / f"{item.image_id}.png", probs)
        for extra in self.stages:
            record.update(extra.write(self.out, item, mask))
        atomic_write_json(self.records / f"{item.image_id}.json", record)
        return record


def predict_sources(
    predictor: Any,
    sources: Sequence[tuple[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    load: Any,
    gate: Gate | None = None,
    save_probs: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
    workers: int | None = None,
    inputs_to_protect: Sequence[str | os.PathLike[str]] = (),
    rejected: Sequence[tuple[str, str]] = (),
    stages: Sequence[OutputStage] = (),
    job: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    part_of: str = "",
) -> PredictSummary:
    """Predict every source and write masks, records and the CSVs into ``out_dir``.

    ``predictor`` is a :class:`Predictor` or an exported model's predictor (see
    :func:`open_predictor`). ``sources`` are ``(image_id, handle)`` pairs and
    ``load(handle) -> Item`` prepares one (it may raise a PneumoError, which rejects that image
    only). Finished images (mask, record and every stage's output present) are skipped unless
    ``overwrite``, but only when ``out_dir`` holds the same ``job`` (:func:`job_identity`): outputs
    of another model, gate, TTA or preprocessing are refused. ``out_dir`` is locked while the call
    runs; its ``predictions.csv`` is removed first and written last, so it marks a finished call.
    ``progress(n)`` is called as images finish. ``part_of`` (``"K/N"``) marks a part of a sharded
    job, whose inputs may all be rejected (the merge then decides).

    Raises:
        ConfigError: ``out_dir`` holds another job's outputs (without ``overwrite``).
        OutputError: another process works in ``out_dir``; it cannot be written.
        InputError: no input at all could be predicted (names the first and its reason), unless
            ``part_of``.
    """
    out = ensure_output_dir(out_dir, *inputs_to_protect)
    with folder_lock(out, "predict"):
        if job is not None:
            claim_predict_job(out, job, overwrite)
        outputs = PredictOutputs(out, save_probs, tuple(stages))
        outputs.prepare()
        for name in (PREDICTIONS_FILE, SUBMISSION_FILE):  # until this call has finished
            (out / name).unlink(missing_ok=True)
        return _predict_into(
            predictor, sources, outputs, load, gate or predictor.gate, overwrite,
            batch_size, workers, list(rejected), progress or (lambda n: None), part_of,
        )  # fmt: skip


def _predict_into(
    predictor: Any,
    sources: Sequence[tuple[str, Any]],
    outputs: PredictOutputs,
    load: Any,
    gate: Gate,
    overwrite: bool,
    batch_size: int,
    workers: int | None,
    rejected: list[tuple[str, str]],
    advance: ProgressFn,
    part_of: str,
) -> PredictSummary:
    """The body of :func:`predict_sources`, run while holding the output folder's lock."""
    summary = PredictSummary(
        images=len(sources), tta=predictor.tta, gate=asdict(gate), out_dir=str(outputs.out),
        precision=predictor.precision, engine=predictor.engine,
        precision_reason=predictor.precision_reason,
        precision_check=predictor.precision_check,
    )  # fmt: skip
    records: dict[str, dict] = {}
    todo = []
    for image_id, handle in sources:
        record = None if overwrite else outputs.finished_record(image_id)
        if record is None:
            todo.append((image_id, handle))
        else:
            records[image_id] = record
    summary.skipped_existing = len(records)
    advance(len(records))
    start = time.perf_counter()
    for result in _predict_and_write(predictor, todo, load, gate, outputs, batch_size, workers):
        if isinstance(result, Rejected):
            rejected.append((result.source, result.reason))
        else:
            records[result["ImageId"]] = result
            summary.predicted += 1
        advance(1)
    elapsed = time.perf_counter() - start
    summary.images_per_second = round(summary.predicted / elapsed, 2) if summary.predicted else 0.0
    summary.rejected = len(rejected)
    summary.positive = sum(r["has_pneumothorax"] for r in records.values())
    write_rejected(outputs.out / REJECTED_FILE, rejected)
    if not records and rejected:
        source, reason = rejected[0]
        nothing = (
            f"no input could be predicted ({len(rejected)} rejected, reasons in "
            f"{outputs.out / REJECTED_FILE}); the first: {source}: {reason}"
        )
        if not part_of:
            raise InputError(nothing)
        summary.notes.append(("warning", f"part {part_of}: {nothing}"))
    ordered = [records[k] for k in sorted(records)]
    for extra in outputs.stages:
        summary.outputs.update(extra.finish(outputs.out, ordered))
    write_predictions(outputs.out, ordered)
    summary.predictions_csv = str(outputs.out / PREDICTIONS_FILE)
    return summary


def _predict_and_write(
    predictor: Any,
    todo: Sequence[tuple[str, Any]],
    load: Any,
    gate: Gate,
    outputs: PredictOutputs,
    batch_size: int,
    workers: int | None,
) -> Iterator[dict | Rejected]:
    """Records of the predicted images (and the rejected inputs) as they finish.

    Loading runs in a thread pool up to two batches ahead of the network (bounded: a folder of
    12,000 X-rays must not be held in memory at once); writing runs in another pool behind it.
    The pools are the parallelism: OpenCV's own threads are off meanwhile, except for a
    single image (nothing to overlap it with: OpenCV's threads then shorten its loading).
    """

    def prepare(source: tuple[str, Any]) -> Item | Rejected:
        try:
            return load(source[1])
        except PneumoError as exc:
            label = str(source[1]) if isinstance(source[1], Path) else source[0]
            return Rejected(label, str(exc))

    threads = workers or os.cpu_count() or 1
    with (
        single_threaded_opencv() if len(todo) > 1 else contextlib.nullcontext(),
        ThreadPoolExecutor(threads) as loaders,
        ThreadPoolExecutor(threads) as writers,
    ):
        prepared = _ordered_map(loaders, prepare, todo, ahead=2 * batch_size + threads)
        pending: collections.deque = collections.deque()
        for result in predict_items(predictor, prepared, batch_size):
            if isinstance(result, Rejected):
                yield result
                continue
            pending.append(writers.submit(outputs.write, *result, gate))
            while pending and pending[0].done():
                yield pending.popleft().result()
        for future in pending:
            yield future.result()


def _ordered_map(
    executor: ThreadPoolExecutor, fn: Any, items: Sequence[Any], ahead: int
) -> Iterator[Any]:
    """``executor.map(fn, items)`` keeping only ``ahead`` calls queued or running (besides the
    result being handed to the caller), where ``executor.map`` would submit them all at once."""
    pending: collections.deque = collections.deque()
    source = iter(items)
    for item in itertools.islice(source, ahead):
        pending.append(executor.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(source, 1):
            pending.append(executor.submit(fn, item))
        yield result


def predict_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    model: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    split: str | None = None,
    tta: str = "none",
    precision: str = "auto",
    engine: str = "auto",
    shard: tuple[int, int] | None = None,
    gate_overrides: dict[str, float | None] | None = None,
    save_probs: bool = False,
    dicom_seg: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> PredictSummary:
    """`pneumo predict`: files/folders of X-rays, or one split of a cache, through a run or
    through an exported model (``model``: a folder written by `pneumo export`, or its model).

    ``precision`` is resolved by :func:`~pneumo_cli.inference.predictor.load_predictor` (its
    check against float32 uses the run's validation images, else the first inputs).
    ``shard=(K, N)`` predicts only part K of N (:func:`select_shard`).
    ``gate_overrides`` replaces the run's gate values that are not None. ``dicom_seg`` also
    writes a DICOM Segmentation per DICOM input (:mod:`pneumo_cli.inference.dicom_outputs`).
    Progress is reported per image (:mod:`pneumo_cli.core.progress`).

    Raises:
        PneumoError: no run, unreadable model or export, no inputs, a cache that does not fit
            the run, ``dicom_seg`` with a cache, an output folder inside an input folder, or
            bad gate values.
    """
    import dataclasses

    from pneumo_cli.io.xrays import collect_xray_files

    if bool(inputs) == (cache is not None):
        raise ConfigError("give INPUT files/folders or --cache CACHE (exactly one of the two)")
    if dicom_seg and cache is not None:
        raise ConfigError(
            "--dicom-seg needs the DICOM files as INPUT: a cache keeps no DICOM headers"
        )
    if dicom_seg and shard is not None:
        raise UsageError(
            "--dicom-seg cannot be sharded yet (one job writes one SEG series); predict the "
            "SEGs in one job, or shard without --dicom-seg"
        )
    if cache is not None:
        from pneumo_cli.data.cache import load_cache_settings

        cache = Path(cache)
        cache_settings = load_cache_settings(cache)
        sources, load = cache_sources(cache, split or "test")
        rejected: list[tuple[str, str]] = []
        protect: list[str | os.PathLike[str]] = [cache]
        parity_inputs = first_images(sources, lambda settings: load)
    else:
        sources, rejected = file_sources(collect_xray_files(inputs))
        protect = [p for p in inputs if Path(p).is_dir()]
        parity_inputs = first_images(sources, lambda settings: file_loader(settings, sources))
    if shard is not None:
        sources, rejected = select_shard(sources, rejected, shard)
    predictor = open_predictor(run, model, tta, precision, parity_inputs, engine)
    if cache is not None:
        check_cache_matches(cache_settings, predictor, cache)
    else:
        load = file_loader(predictor.settings, sources)
    overrides = {k: v for k, v in (gate_overrides or {}).items() if v is not None}
    gate = dataclasses.replace(predictor.gate, **overrides)
    stages = []
    if dicom_seg:
        from pneumo_cli.inference.dicom_outputs import SegStage, algorithm_source

        ids = [image_id for image_id, _ in sources]
        stages.append(SegStage(algorithm_source(predictor), ids, overwrite=overwrite))
    part = f"{shard[0]}/{shard[1]}" if shard else ""
    with stage(progress, "predicting", len(sources) + len(rejected)) as advance:
        summary = predict_sources(
            predictor,
            sources,
            out_dir,
            load=load,
            gate=gate,
            save_probs=save_probs,
            overwrite=overwrite,
            batch_size=batch_size,
            workers=workers,
            inputs_to_protect=protect,
            rejected=rejected,
            stages=stages,
            job=job_identity(predictor, gate, shard, save_probs),
            progress=advance,
            part_of=part,
        )
    summary.shard = part
    summary.notes = list(predictor.notes) + summary.notes
    return summary
