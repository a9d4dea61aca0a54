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
import csv
import io
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

from pneumo_cli import rle
from pneumo_cli.config import PreprocessConfig, from_dict
from pneumo_cli.console import ProgressFn
from pneumo_cli.errors import ConfigError, InputError, PneumoError
from pneumo_cli.files import (
    atomic_write_json,
    atomic_write_text,
    check_image_id,
    ensure_output_dir,
    remove_stale_temporaries,
    write_mask_png,
    write_png,
)
from pneumo_cli.postprocess import POSTPROCESS_FILE, Gate, apply_gate, load_gate

MODEL_FILE = "best.keras"
TTA_MODES = ("none", "hflip")
PREDICTIONS_FILE = "predictions.csv"
SUBMISSION_FILE = "submission.csv"
REJECTED_FILE = "rejected.csv"
PREDICTION_COLUMNS = ("ImageId", "has_pneumothorax", "max_prob", "area_px", "EncodedPixels")
# Preprocessing settings that change the pixels the network sees; a cache used for prediction
# must agree with the run's training cache on all of them.
PIXEL_SETTINGS = (
    "image_size",
    "crop_border",
    "crop_threshold",
    "crop_min_keep",
    "clahe",
    "clahe_clip",
    "clahe_grid",
)


@dataclass
class Predictor:
    """A trained run ready for inference.

    ``probabilities(images)`` maps uint8 (B, S, S) prepared images to float32 (B, S, S)
    probabilities through one compiled ``tf.function``; ``tta="hflip"`` averages each image's
    prediction with that of its mirror image.
    """

    run_dir: Path
    config: dict[str, Any]
    settings: PreprocessConfig
    gate: Gate
    tta: str
    _forward: Any = field(repr=False)

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def source(self) -> Path:
        return self.run_dir

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()


def load_predictor(run_dir: str | os.PathLike[str], tta: str = "none") -> Predictor:
    """Load a run's model, preprocessing settings and gate (``postprocess.json`` if present).

    Raises:
        ConfigError: not a run, unknown TTA, or a config without the settings inference needs.
        InputError: the run has no readable ``best.keras``.
    """
    from pneumo_cli.model import SCALINGS, import_tf, load_model, scale_input
    from pneumo_cli.runs import load_run_config

    if tta not in TTA_MODES:
        raise ConfigError(f"unknown --tta '{tta}'; choose one of: {', '.join(TTA_MODES)}")
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    missing = [key for key in ("preprocess", "input_scaling", "image_size") if key not in config]
    if missing:
        raise ConfigError(f"{run_dir}/config.json lacks {', '.join(missing)}; retrain the run")
    settings = from_dict(PreprocessConfig, config["preprocess"], f"{run_dir}/config.json")
    if config["input_scaling"] not in SCALINGS:
        raise ConfigError(
            f"{run_dir}/config.json: unknown input_scaling {config['input_scaling']!r}; "
            f"expected one of {', '.join(SCALINGS)}"
        )
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise InputError(f"{run_dir} has no {MODEL_FILE}: was it written by `pneumo train`?")
    model = load_model(model_path)
    gate_path = run_dir / POSTPROCESS_FILE
    gate = load_gate(gate_path) if gate_path.is_file() else Gate()

    tf = import_tf()
    size, scaling = settings.image_size, config["input_scaling"]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size], tf.uint8)])
    def forward(images: Any) -> Any:
        inputs = scale_input(images[..., tf.newaxis], scaling)
        probs = tf.cast(model(inputs, training=False), tf.float32)[..., 0]
        if tta == "hflip":
            mirrored = tf.cast(model(tf.reverse(inputs, axis=[2]), training=False), tf.float32)
            probs = (probs + tf.reverse(mirrored[..., 0], axis=[2])) / 2.0
        return probs

    return Predictor(run_dir, config, settings, gate, tta, forward)


@dataclass(frozen=True)
class Item:
    """One image to predict: id, prepared uint8 (S, S) image, crop box and original (H, W)."""

    image_id: str
    image: np.ndarray
    crop: tuple[int, int, int, int]
    original_shape: tuple[int, int]


@dataclass(frozen=True)
class Rejected:
    """An input that could not be predicted: what it was and why."""

    source: str
    reason: str


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
    from pneumo_cli.imaging import restore_region, restore_to_original

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


def _batches(items: Iterator[Item | Rejected], size: int) -> Iterator[list[Item | Rejected]]:
    batch: list[Item | Rejected] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_items(
    predictor: Any,
    items: Iterator[Item | Rejected],
    batch_size: int,
) -> Iterator[tuple[Item, np.ndarray] | Rejected]:
    """Run the network over prepared items in batches; errors pass through in order."""
    for batch in _batches(items, batch_size):
        good = [item for item in batch if isinstance(item, Item)]
        probs = predictor.probabilities(np.stack([i.image for i in good])) if good else []
        results = iter(zip(good, probs, strict=True))
        for item in batch:
            yield next(results) if isinstance(item, Item) else item


def run_predict(
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
    _write_rejected(out / REJECTED_FILE, rejected)
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


def _write_rejected(path: Path, rejected: list[tuple[str, str]]) -> None:
    if not rejected:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["source", "reason"])
    writer.writerows(rejected)
    atomic_write_text(path, buffer.getvalue())


def write_predictions(out: Path, records: list[dict]) -> None:
    """Write ``predictions.csv`` and ``submission.csv`` (Kaggle format) from per-image records."""
    full, short = io.StringIO(), io.StringIO()
    writer = csv.DictWriter(full, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    submission = csv.writer(short, lineterminator="\n")
    submission.writerow(["ImageId", "EncodedPixels"])
    submission.writerows((r["ImageId"], r["EncodedPixels"]) for r in records)
    atomic_write_text(out / SUBMISSION_FILE, short.getvalue(), fsync=True)
    atomic_write_text(out / PREDICTIONS_FILE, full.getvalue(), fsync=True)


def file_sources(paths: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """ImageId for each input file; a repeated ImageId is rejected naming the first file."""
    from pneumo_cli.dicom_io import image_id_of

    seen: dict[str, Path] = {}
    sources, rejected = [], []
    for path in paths:
        image_id = image_id_of(path)
        try:
            check_image_id(image_id, str(path))
        except InputError as exc:
            rejected.append((str(path), str(exc)))
            continue
        if image_id in seen:
            rejected.append((str(path), f"same ImageId {image_id} as {seen[image_id]}"))
            continue
        seen[image_id] = path
        sources.append((image_id, path))
    return sources, rejected


def file_loader(settings: PreprocessConfig) -> Any:
    """``load(path) -> Item``: read an X-ray and prepare it as the run's cache was prepared."""
    from pneumo_cli.dicom_io import image_id_of, read_xray
    from pneumo_cli.imaging import prepare_image

    def load(path: Path) -> Item:
        xray = read_xray(path)
        prepared = prepare_image(xray.image, settings)
        return Item(image_id_of(path), prepared.image, prepared.crop, prepared.original_shape)

    return load


def check_cache_matches(cache_settings: PreprocessConfig, run: Any, cache: Path) -> None:
    """Refuse a cache whose pixel settings differ from those the run (or export) was made with.

    ``run`` is a :class:`Predictor` or an ``export_runtime.ExportedPredictor``.
    """
    differing = [
        f"{name} {getattr(cache_settings, name)} vs {getattr(run.settings, name)}"
        for name in PIXEL_SETTINGS
        if getattr(cache_settings, name) != getattr(run.settings, name)
    ]
    if differing:
        raise ConfigError(
            f"{cache} was preprocessed differently from {run.source} "
            f"(cache vs run: {'; '.join(differing)}); preprocess again with the run's settings"
        )


def cache_sources(cache: Path, split: str) -> tuple[list[tuple[str, Any]], Any]:
    """``(image_id, manifest row)`` pairs of one split of a cache, and a loader for them."""
    from pneumo_cli.files import read_grey_png
    from pneumo_cli.preprocess import load_manifest

    manifest = load_manifest(cache)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        present = ", ".join(sorted(set(manifest["split"]))) or "none"
        raise InputError(
            f"{cache}/manifest.csv has no images in split '{split}' (splits: {present})"
        )

    def load(row: Any) -> Item:
        image = read_grey_png(cache / row["image"])
        crop = (
            int(row["crop_top"]),
            int(row["crop_bottom"]),
            int(row["crop_left"]),
            int(row["crop_right"]),
        )
        shape = (int(row["orig_height"]), int(row["orig_width"]))
        return Item(row["ImageId"], image, crop, shape)

    return [(row["ImageId"], row) for _, row in rows.iterrows()], load


def open_predictor(
    run: str | os.PathLike[str] | None,
    model: str | os.PathLike[str] | None = None,
    tta: str = "none",
) -> Any:
    """A run's :class:`Predictor`, or with ``model`` an exported model's predictor.

    Both offer ``settings``, ``gate``, ``tta``, ``image_size``, ``source`` and
    ``probabilities(uint8 (B, S, S)) -> float32 (B, S, S)``. An ONNX export loads without
    TensorFlow.

    Raises:
        ConfigError: both ``run`` and ``model`` given, or what the loaders raise.
    """
    if model is not None:
        if run is not None:
            raise ConfigError("give --run or --model, not both")
        from pneumo_cli.export_runtime import load_exported_predictor

        return load_exported_predictor(model, tta)
    from pneumo_cli.runs import resolve_run

    return load_predictor(resolve_run(run), tta)


def predict(
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
    progress_factory: Any = None,
) -> PredictSummary:
    """`pneumo predict`: files/folders of X-rays, or one split of a cache, through a run or
    through an exported model (``model``: a folder written by `pneumo export`, or its model).

    ``gate_overrides`` replaces the run's gate values that are not None. ``progress_factory(total)``
    returns a context manager yielding ``advance(n)`` (see ``console.progress_bar``).

    Raises:
        PneumoError: no run, unreadable model or export, no inputs, a cache that does not fit
            the run, an output folder inside an input folder, or bad gate values.
    """
    import contextlib
    import dataclasses

    from pneumo_cli.dicom_io import collect_xray_files

    if bool(inputs) == (cache is not None):
        raise ConfigError("give either INPUT files/folders or --cache CACHE --split SPLIT")
    predictor = open_predictor(run, model, tta)
    overrides = {k: v for k, v in (gate_overrides or {}).items() if v is not None}
    gate = dataclasses.replace(predictor.gate, **overrides)
    if cache is not None:
        from pneumo_cli.preprocess import load_cache_settings

        cache = Path(cache)
        check_cache_matches(load_cache_settings(cache), predictor, cache)
        sources, load = cache_sources(cache, split or "test")
        rejected: list[tuple[str, str]] = []
        protect: list[str | os.PathLike[str]] = [cache]
    else:
        sources, rejected = file_sources(collect_xray_files(inputs))
        load = file_loader(predictor.settings)
        protect = [p for p in inputs if Path(p).is_dir()]
    factory = progress_factory or (lambda total: contextlib.nullcontext(None))
    with factory(len(sources) + len(rejected)) as advance:
        return run_predict(
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
