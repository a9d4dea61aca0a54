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
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, PneumoError
from pneumo_cli.core.files import (
    atomic_write_json,
    ensure_output_dir,
    remove_stale_temporaries,
    write_mask_png,
    write_png,
)
from pneumo_cli.core.progress import ProgressFactory, ProgressFn, stage
from pneumo_cli.inference.outputs import (
    PREDICTIONS_FILE,
    REJECTED_FILE,
    output_row,
    write_predictions,
    write_rejected,
)
from pneumo_cli.inference.postprocess import Gate
from pneumo_cli.inference.predictor import check_cache_matches, open_predictor
from pneumo_cli.inference.sources import (
    Item,
    Rejected,
    batches,
    cache_sources,
    file_loader,
    file_sources,
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
    gate: dict[str, float] = field(default_factory=dict)
    out_dir: str = ""
    predictions_csv: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    progress: ProgressFn | None = None,
) -> PredictSummary:
    """Predict every source and write masks, records and the CSVs into ``out_dir``.

    ``predictor`` is a :class:`Predictor` or an exported model's predictor (see
    :func:`open_predictor`).

    ``sources`` are ``(image_id, handle)`` pairs and ``load(handle) -> Item`` prepares one (it
    may raise a PneumoError, which rejects that image only). Finished images (mask and record
    present) are skipped unless ``overwrite``.
    """
    gate = gate or predictor.gate
    out = ensure_output_dir(out_dir, *inputs_to_protect)
    folders = {name: out / name for name in ("masks", "records", "probs")}
    for name, folder in folders.items():
        if name != "probs" or save_probs:
            folder.mkdir(exist_ok=True)
            remove_stale_temporaries(folder)
    remove_stale_temporaries(out)
    summary = PredictSummary(
        images=len(sources), tta=predictor.tta, gate=asdict(gate), out_dir=str(out)
    )
    records: dict[str, dict] = {}
    rejected = list(rejected)
    todo = []
    for image_id, handle in sources:
        record_path = folders["records"] / f"{image_id}.json"
        if (
            not overwrite
            and record_path.is_file()
            and (folders["masks"] / f"{image_id}.png").is_file()
        ):
            records[image_id] = json.loads(record_path.read_text(encoding="utf-8"))
            summary.skipped_existing += 1
            if progress:
                progress(1)
        else:
            todo.append((image_id, handle))

    def prepare(source: tuple[str, Any]) -> Item | Rejected:
        try:
            return load(source[1])
        except PneumoError as exc:
            label = str(source[1]) if isinstance(source[1], Path) else source[0]
            return Rejected(label, str(exc))

    def finish(result: tuple[Item, np.ndarray]) -> dict:
        item, prob = result
        record, mask, full = output_row(item.image_id, prob, item, gate, keep_probs=save_probs)
        write_mask_png(folders["masks"] / f"{item.image_id}.png", mask)
        if save_probs:
            write_png(
                folders["probs"] / f"{item.image_id}.png",
                np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8),
            )
        atomic_write_json(folders["records"] / f"{item.image_id}.json", record)
        return record

    threads = workers or os.cpu_count() or 1
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as loaders, ThreadPoolExecutor(threads) as writers:
        # Loading runs up to two batches ahead of the network (bounded: a folder of 12,000
        # X-rays must not be held in memory at once).
        prepared = _ordered_map(loaders, prepare, todo, ahead=2 * batch_size + threads)
        pending = []
        for result in predict_items(predictor, prepared, batch_size):
            if isinstance(result, Rejected):
                rejected.append((result.source, result.reason))
                if progress:
                    progress(1)
                continue
            pending.append(writers.submit(finish, result))
            while pending and pending[0].done():
                record = pending.pop(0).result()
                records[record["ImageId"]] = record
                summary.predicted += 1
                if progress:
                    progress(1)
        for future in pending:
            record = future.result()
            records[record["ImageId"]] = record
            summary.predicted += 1
            if progress:
                progress(1)
    elapsed = time.perf_counter() - start
    summary.images_per_second = round(summary.predicted / elapsed, 2) if summary.predicted else 0.0
    summary.rejected = len(rejected)
    summary.positive = sum(r["has_pneumothorax"] for r in records.values())
    write_rejected(out / REJECTED_FILE, rejected)
    write_predictions(out, [records[k] for k in sorted(records)])
    summary.predictions_csv = str(out / PREDICTIONS_FILE)
    return summary


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
    run: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    split: str | None = None,
    tta: str = "none",
    gate_overrides: dict[str, float | None] | None = None,
    save_probs: bool = False,
    overwrite: bool = False,
    batch_size: int = 8,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> PredictSummary:
    """`pneumo predict`: files/folders of X-rays, or one split of a cache, through a run or
    through an exported model (``model``: a folder written by `pneumo export`, or its model).

    ``gate_overrides`` replaces the run's gate values that are not None. Progress is reported
    per image (:mod:`pneumo_cli.core.progress`).

    Raises:
        PneumoError: no run, unreadable model or export, no inputs, a cache that does not fit
            the run, an output folder inside an input folder, or bad gate values.
    """
    import dataclasses

    from pneumo_cli.io.xrays import collect_xray_files

    if bool(inputs) == (cache is not None):
        raise ConfigError("give INPUT files/folders or --cache CACHE (exactly one of the two)")
    predictor = open_predictor(run, model, tta)
    overrides = {k: v for k, v in (gate_overrides or {}).items() if v is not None}
    gate = dataclasses.replace(predictor.gate, **overrides)
    if cache is not None:
        from pneumo_cli.data.cache import load_cache_settings

        cache = Path(cache)
        check_cache_matches(load_cache_settings(cache), predictor, cache)
        sources, load = cache_sources(cache, split or "test")
        rejected: list[tuple[str, str]] = []
        protect: list[str | os.PathLike[str]] = [cache]
    else:
        sources, rejected = file_sources(collect_xray_files(inputs))
        load = file_loader(predictor.settings)
        protect = [p for p in inputs if Path(p).is_dir()]
    with stage(progress, "predicting", len(sources) + len(rejected)) as advance:
        return predict_sources(
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
            progress=advance,
        )
