"""Raw X-rays -> training cache: images, masks, manifest with persisted splits (no TensorFlow).

``run_preprocess(RAW_DIR, CACHE_DIR, settings)`` writes::

    CACHE/preprocess.json       settings, label inputs, package versions, counts ("complete")
    CACHE/images/<ImageId>.png  uint8 S x S: crop of the dark border, CLAHE, resize
    CACHE/masks/<ImageId>.png   0/255 S x S, labelled images only
    CACHE/records/<ImageId>.json  one finished image (written after its PNGs; lets a run resume)
    CACHE/rejected.csv          path,reason of every file left out
    CACHE/truth.csv             ImageId,EncodedPixels: labelled masks at original size (SIIM RLE)
    CACHE/manifest.csv          one row per image, with split and fold (written last)
    CACHE/phi.csv               only with keep_phi: ImageId, source and the patient fields

While a run works on a cache it holds ``CACHE/.pneumo-lock`` (see :func:`files.folder_lock`), so
a second run into the same cache refuses to start instead of writing over the first.

A run goes in four phases: scan (walk RAW_DIR, read headers, drop duplicates), check labels
against image sizes (before anything is written), process images (in parallel; finished images
are skipped), then splits and the manifest. Every file is written atomically and the manifest
last, so a killed run leaves no file a later run trusts wrongly; re-running finishes the job and
gives the same cache as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_cli import __version__
from pneumo_cli.config import PreprocessConfig, from_dict, to_dict
from pneumo_cli.errors import ConfigError, InputError, OutputError
from pneumo_cli.files import (
    atomic_write_json,
    atomic_write_text,
    ensure_output_dir,
    folder_lock,
    remove_stale_temporaries,
)
from pneumo_cli.imaging import Prepared, prepare_image, prepare_mask, restore_to_original
from pneumo_cli.preprocess_inputs import (
    ProgressFn,
    phi_csv,
    process_images,
    read_labels,
    read_phi_rows,
    scan_raw_dir,
    worker_pool,
)
from pneumo_cli.splits import Assignment, SplitItem, assign_splits

__all__ = [
    "MANIFEST_COLUMNS",
    "Prepared",
    "PreprocessSummary",
    "load_cache_settings",
    "load_manifest",
    "prepare_image",
    "prepare_mask",
    "restore_to_original",
    "run_preprocess",
]

MANIFEST_COLUMNS = (
    "ImageId", "image", "mask", "has_pneumothorax", "mask_area_px", "split", "fold",
    "orig_height", "orig_width", "crop_top", "crop_bottom", "crop_left", "crop_right",
    "pixel_spacing_mm", "view_position", "sex", "age", "patient_key", "source",
)  # fmt: skip
_TEXT_COLUMNS = (
    "ImageId", "image", "mask", "split", "view_position", "sex", "patient_key", "source",
)  # fmt: skip
_NULLABLE_INT_COLUMNS = ("has_pneumothorax", "mask_area_px", "age")
# Labelled images' masks at original resolution as SIIM RLE (`pneumo evaluate` scores against it).
TRUTH_FILE = "truth.csv"
# Patient-identifying header fields, written only when asked for (--keep-phi).
PHI_FILE = "phi.csv"
_OUR_FOLDERS = {"images": ".png", "masks": ".png", "records": ".json"}


@dataclass
class PreprocessSummary:
    """What a run did. ``processed`` images were decoded now, ``reused`` were already finished;
    ``labels_without_image`` are ImageIds of RLE rows or mask files with no image."""

    cache_dir: str
    images: int
    processed: int
    reused: int
    rejected: int
    positive: int
    negative: int
    unlabelled: int
    splits: dict[str, int]
    folds: dict[str, int]
    labels_without_image: list[str] = field(default_factory=list)
    rejected_examples: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    phi_csv: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_preprocess(
    raw_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    settings: PreprocessConfig,
    *,
    rle_csv: str | os.PathLike[str] | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    keep_phi: bool = False,
    progress: ProgressFn | None = None,
) -> PreprocessSummary:
    """Build (or finish, or extend) the cache in ``cache_dir`` from the X-rays under ``raw_dir``.

    Args:
        rle_csv: SIIM RLE CSV (any variant :func:`pneumo_cli.rle.read_rle_csv` reads); masks are
            the union of an image's rows, decoded at the image's own size.
        masks_dir: folder of mask images named like the X-rays (PNG: any non-zero pixel is
            foreground; JPEG: above 127, as lossy masks need).
        workers: processes (default: all CPU cores).
        overwrite: rebuild a cache made with other settings or labels.
        strict: any rejected file is an error (the manifest is then not written).
        keep_phi: also write ``CACHE/phi.csv`` with each image's PatientID, PatientName,
            PatientBirthDate, InstitutionName and AccessionNumber. Without it no such field is
            written anywhere, and a phi.csv left by an earlier run is deleted.
        progress: called with the number of images finished since the last call.

    Raises:
        InputError: RAW_DIR missing or without images, a label that does not fit its image,
            rejections under ``strict``.
        ConfigError: the cache was made with other settings and ``overwrite`` is False.
        OutputError: CACHE_DIR inside RAW_DIR, or not writable, or in use by another run.
    """
    started = time.perf_counter()
    raw = Path(raw_dir)
    if rle_csv is not None and masks_dir is not None:
        raise InputError("give either --rle or --masks, not both")
    if not raw.is_dir():
        raise InputError(f"RAW_DIR {raw} is not a folder; give the folder holding the X-rays")
    workers = max(1, workers or os.cpu_count() or 1)
    cache = Path(cache_dir)
    _refuse_inside(cache, raw, masks_dir)
    labels = read_labels(rle_csv, masks_dir)
    created = not cache.exists()
    ensure_output_dir(cache)
    try:
        with folder_lock(cache, "preprocess"):
            return _build_cache(
                raw, cache, settings, labels, workers=workers, overwrite=overwrite,
                strict=strict, keep_phi=keep_phi, progress=progress, started=started,
            )  # fmt: skip
    finally:
        if created:
            # A run refused before its first write leaves no empty cache folder behind.
            with contextlib.suppress(OSError):
                cache.rmdir()


def _build_cache(
    raw: Path,
    cache: Path,
    settings: PreprocessConfig,
    labels: Any,
    *,
    workers: int,
    overwrite: bool,
    strict: bool,
    keep_phi: bool,
    progress: ProgressFn | None,
    started: float,
) -> PreprocessSummary:
    """The body of :func:`run_preprocess`, run while holding the cache's lock."""
    # Everything that can refuse the run happens before the first write.
    previous = None if overwrite else _check_cache(cache, settings, labels.fingerprint())
    try:
        with worker_pool(workers) as pool_map:
            candidates, rejected = scan_raw_dir(raw, pool_map, _previous_sources(previous))
            label_of, unmatched = labels.match(candidates)
            _start_cache(cache, settings, labels.fingerprint(), overwrite)
            if progress is not None:
                progress(len(rejected))
            records, newly_rejected, processed = process_images(
                candidates, label_of, cache, settings, pool_map, progress
            )
            phi_rows = read_phi_rows(raw, records, pool_map) if keep_phi else None
    except BaseException:
        # The pool is stopped (its workers terminated and joined) by now. A worker stopped in
        # the middle of a write leaves its temporary file; we hold the lock, so every
        # temporary in our folders is ours to delete.
        _sweep_temporaries(cache)
        raise
    rejected = sorted(rejected + newly_rejected)
    atomic_write_text(cache / "rejected.csv", _rejected_csv(rejected))
    if not records:
        raise InputError(
            f"no usable image in {raw} ({len(rejected)} file(s) rejected); "
            f"see {cache / 'rejected.csv'}"
        )
    if strict and rejected:
        raise InputError(
            f"{len(rejected)} file(s) rejected and --strict is set (first: {rejected[0][0]}: "
            f"{rejected[0][1]}); see {cache / 'rejected.csv'}"
        )
    manifest = _build_manifest(records, settings, previous)
    counts = _counts(manifest, rejected, unmatched)
    atomic_write_text(cache / TRUTH_FILE, _truth_csv(records))
    phi_path = cache / PHI_FILE
    if phi_rows is not None:
        atomic_write_text(phi_path, phi_csv(phi_rows), fsync=True)
    else:
        _remove(phi_path)
    _write_settings(cache, settings, labels.fingerprint(), counts, complete=True)
    atomic_write_text(cache / "manifest.csv", manifest.to_csv(index=False), fsync=True)
    return PreprocessSummary(
        cache_dir=str(cache),
        images=len(manifest),
        processed=processed,
        reused=len(records) - processed,
        rejected=len(rejected),
        positive=counts["positive"],
        negative=counts["negative"],
        unlabelled=counts["unlabelled"],
        splits=counts["splits"],
        folds=counts["folds"],
        labels_without_image=unmatched,
        rejected_examples=rejected[:10],
        seconds=round(time.perf_counter() - started, 3),
        phi_csv=str(phi_path) if phi_rows is not None else "",
    )


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot remove {path}: {exc.strerror}") from None


def _previous_sources(previous: Any) -> dict[str, str]:
    """ImageId -> source of an earlier manifest (that source wins a duplicate-id contest)."""
    if previous is None:
        return {}
    return dict(zip(previous["ImageId"], previous["source"], strict=True))


def _refuse_inside(cache: Path, raw: Path, masks_dir: str | os.PathLike[str] | None) -> None:
    resolved = cache.resolve()
    for given in (raw, masks_dir):
        if given is None:
            continue
        source = Path(given).resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(
                f"CACHE_DIR {cache} is inside input folder {given}; pneumo never writes into its "
                "inputs, so choose a cache folder outside it"
            )


def _check_cache(cache: Path, settings: PreprocessConfig, labels: dict[str, str]) -> Any:
    """Refuse a cache made with other settings or labels; return its earlier manifest (or None).

    Reads only: nothing is written before the whole run is known to be possible.
    """
    info_path = cache / "preprocess.json"
    ours_exist = any((cache / name).is_dir() for name in _OUR_FOLDERS)
    if info_path.is_file():
        info = _read_json(info_path)
        old = info.get("settings", {})
        differences = [
            f"{key} {old.get(key)!r} -> {value!r}"
            for key, value in to_dict(settings).items()
            if old.get(key) != value
        ]
        if info.get("labels") != labels:
            differences.append("label input (--rle/--masks file or its content)")
        if differences:
            raise ConfigError(
                f"{cache} was made with other settings ({'; '.join(differences[:4])}); "
                "use --overwrite to rebuild it, or choose another CACHE_DIR"
            )
    elif ours_exist:
        raise ConfigError(
            f"{cache} has images/masks/records folders but no preprocess.json; it is not a "
            "pneumo cache (use --overwrite to rebuild it, or choose another CACHE_DIR)"
        )
    if (cache / "manifest.csv").is_file():
        return _read_manifest(cache / "manifest.csv")
    return None


def _start_cache(
    cache: Path, settings: PreprocessConfig, labels: dict[str, str], overwrite: bool
) -> None:
    """Create the folders (emptied with ``overwrite``) and record the settings, marked
    incomplete, before any image is written."""
    ensure_output_dir(cache)
    if overwrite:
        _wipe(cache)
    for name in _OUR_FOLDERS:
        ensure_output_dir(cache / name)
    _sweep_temporaries(cache)
    _write_settings(cache, settings, labels, {}, complete=False)


def _sweep_temporaries(cache: Path) -> None:
    for name in _OUR_FOLDERS:
        remove_stale_temporaries(cache / name)
    remove_stale_temporaries(cache)


def _wipe(cache: Path) -> None:
    """Delete what an earlier run wrote (only our own file names)."""
    for name, suffix in _OUR_FOLDERS.items():
        folder = cache / name
        if folder.is_dir():
            for path in folder.iterdir():
                if path.suffix == suffix and path.is_file():
                    path.unlink()
    for name in ("manifest.csv", "rejected.csv", "preprocess.json", TRUTH_FILE, PHI_FILE):
        (cache / name).unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); delete it or use --overwrite") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; delete it or use --overwrite")
    return data


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("numpy", "opencv-python-headless", "pydicom", "pylibjpeg", "pandas"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _write_settings(
    cache: Path,
    settings: PreprocessConfig,
    labels: dict[str, str],
    counts: dict[str, Any],
    complete: bool,
) -> None:
    atomic_write_json(
        cache / "preprocess.json",
        {
            "settings": to_dict(settings),
            "labels": labels,
            "versions": _package_versions(),
            "pneumo_version": __version__,
            "counts": counts,
            "complete": complete,
        },
    )


def _truth_csv(records: list[dict[str, Any]]) -> str:
    """``ImageId,EncodedPixels`` of every labelled image at its original size, sorted."""
    lines = ["ImageId,EncodedPixels"]
    for record in sorted(records, key=lambda r: r["ImageId"]):
        if record.get("truth_rle") is not None:
            lines.append(f"{record['ImageId']},{record['truth_rle']}")
    return "\n".join(lines) + "\n"


def _rejected_csv(rejected: list[tuple[str, str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(rejected)
    return buffer.getvalue()


def _build_manifest(
    records: list[dict[str, Any]], settings: PreprocessConfig, previous: Any
) -> Any:
    import pandas as pd

    items = [SplitItem(r["ImageId"], r["patient_key"], r["has_pneumothorax"]) for r in records]
    earlier: dict[str, Assignment] = {}
    if previous is not None:
        for image_id, split, fold in zip(
            previous["ImageId"], previous["split"], previous["fold"], strict=True
        ):
            earlier[image_id] = Assignment(split, int(fold))
    assigned = assign_splits(
        items,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        folds=settings.folds,
        seed=settings.seed,
        previous=earlier,
    )
    rows = []
    for record in sorted(records, key=lambda r: r["ImageId"]):
        place = assigned[record["ImageId"]]
        rows.append({**record, "split": place.split, "fold": place.fold})
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for column in _NULLABLE_INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    return frame


def _counts(manifest: Any, rejected: list[tuple[str, str]], unmatched: list[str]) -> dict[str, Any]:
    labels = manifest["has_pneumothorax"]
    folds = manifest.loc[manifest["fold"] >= 0, "fold"].value_counts().sort_index()
    return {
        "images": int(len(manifest)),
        "positive": int((labels == 1).sum()),
        "negative": int((labels == 0).sum()),
        "unlabelled": int(labels.isna().sum()),
        "rejected": len(rejected),
        "labels_without_image": len(unmatched),
        "splits": {s: int((manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        "folds": {str(k): int(v) for k, v in folds.items()},
    }


def load_manifest(cache_dir: str | os.PathLike[str]) -> Any:
    """Read ``CACHE/manifest.csv`` as a pandas DataFrame (columns :data:`MANIFEST_COLUMNS`; text
    columns as str with "" for empty; has_pneumothorax and age as nullable Int64).

    Raises:
        InputError: the cache or its manifest is missing, or the manifest has other columns.
    """
    cache = Path(cache_dir)
    _require_finished(cache)
    return _read_manifest(cache / "manifest.csv")


def _require_finished(cache: Path) -> dict[str, Any]:
    info_path = cache / "preprocess.json"
    if not info_path.is_file() or not (cache / "manifest.csv").is_file():
        raise InputError(
            f"{cache} is not a finished pneumo cache (no preprocess.json or manifest.csv); "
            f"build it with `pneumo preprocess RAW_DIR {cache}`"
        )
    info = _read_json(info_path)
    if not info.get("complete"):
        raise InputError(
            f"{cache} is an unfinished cache; run the same `pneumo preprocess` command again "
            "to finish it"
        )
    return info


def _read_manifest(path: Path) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype={name: str for name in _TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); re-run pneumo preprocess") from None
    if tuple(frame.columns) != MANIFEST_COLUMNS:
        raise InputError(
            f"{path}: unexpected columns {list(frame.columns)[:5]}...; was it written by "
            "`pneumo preprocess`? Re-run it with --overwrite"
        )
    for name in _TEXT_COLUMNS:
        frame[name] = frame[name].fillna("")
    for name in _NULLABLE_INT_COLUMNS:
        frame[name] = frame[name].astype("Int64")
    return frame


def load_cache_settings(cache_dir: str | os.PathLike[str]) -> PreprocessConfig:
    """The :class:`PreprocessConfig` a finished cache was built with.

    Raises:
        InputError: the cache is missing or unfinished (no manifest, preprocess.json not
            complete).
        ConfigError: its settings are unknown to this version of pneumo.
    """
    cache = Path(cache_dir)
    info = _require_finished(cache)
    return from_dict(PreprocessConfig, info.get("settings", {}), str(cache / "preprocess.json"))
