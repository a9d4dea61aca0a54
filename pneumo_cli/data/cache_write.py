"""Writing a cache (the other half of :mod:`pneumo_cli.data.cache`): starting or resuming
it, the settings file, the manifest, truth.csv and rejected.csv."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumo_cli import __version__
from pneumo_cli.core.config import PreprocessConfig, to_dict
from pneumo_cli.core.errors import ConfigError, OutputError
from pneumo_cli.core.files import (
    atomic_write_json,
    ensure_output_dir,
    remove_stale_temporaries,
)
from pneumo_cli.core.patient_key import PatientKeySecret, check_same_secret, secret_record
from pneumo_cli.core.provenance import IMAGE_PACKAGES, package_versions
from pneumo_cli.data.cache import (
    MANIFEST_COLUMNS,
    NULLABLE_INT_COLUMNS,
    PHI_FILE,
    TRUTH_FILE,
    read_json_object,
    read_manifest_file,
)
from pneumo_cli.data.splits import Assignment, SplitItem, assign_splits

PATIENT_KEY_FIELD = "patient_key_secret"
_OUR_FOLDERS = {"images": ".png", "masks": ".png", "records": ".json"}


def remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot remove {path}: {exc.strerror}") from None


def previous_sources(previous: Any) -> dict[str, str]:
    """ImageId -> source of an earlier manifest (that source wins a duplicate-id contest)."""
    if previous is None:
        return {}
    return dict(zip(previous["ImageId"], previous["source"], strict=True))


def refuse_cache_inside_inputs(
    cache: Path, raw: Path, masks_dir: str | os.PathLike[str] | None
) -> None:
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


def check_existing_cache(
    cache: Path, settings: PreprocessConfig, labels: dict[str, str], secret: PatientKeySecret
) -> Any:
    """Refuse a cache made with other settings, labels or patient-key secret; return its
    earlier manifest (or None).

    Reads only: nothing is written before the whole run is known to be possible.
    """
    info_path = cache / "preprocess.json"
    ours_exist = any((cache / name).is_dir() for name in _OUR_FOLDERS)
    if info_path.is_file():
        info = read_json_object(info_path)
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
    previous = None
    if (cache / "manifest.csv").is_file():
        previous = read_manifest_file(cache / "manifest.csv")
    if info_path.is_file():
        recorded = read_json_object(info_path).get(PATIENT_KEY_FIELD)
        # A cache of an older pneumo without any patient key has nothing to keep consistent.
        keyless = recorded is None and (
            previous is None or not (previous["patient_key"] != "").any()
        )
        if not keyless:
            check_same_secret(recorded, secret, cache)
    return previous


def start_cache(
    cache: Path,
    settings: PreprocessConfig,
    labels: dict[str, str],
    secret: PatientKeySecret,
    overwrite: bool,
) -> None:
    """Create the folders (emptied with ``overwrite``) and record the settings, marked
    incomplete, before any image is written."""
    ensure_output_dir(cache)
    if overwrite:
        _wipe(cache)
    for name in _OUR_FOLDERS:
        ensure_output_dir(cache / name)
    sweep_temporaries(cache)
    write_settings(cache, settings, labels, secret, {}, complete=False)


def sweep_temporaries(cache: Path) -> None:
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


def write_settings(
    cache: Path,
    settings: PreprocessConfig,
    labels: dict[str, str],
    secret: PatientKeySecret,
    counts: dict[str, Any],
    complete: bool,
) -> None:
    atomic_write_json(
        cache / "preprocess.json",
        {
            "settings": to_dict(settings),
            "labels": labels,
            # Which secret made the patient keys (its identifier only, never the secret).
            PATIENT_KEY_FIELD: secret_record(secret),
            "versions": package_versions(IMAGE_PACKAGES),
            "pneumo_version": __version__,
            "counts": counts,
            "complete": complete,
        },
    )


def truth_csv(records: list[dict[str, Any]]) -> str:
    """``ImageId,EncodedPixels`` of every labelled image at its original size, sorted (an
    ImageId holding a comma or a quote is quoted)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    for record in sorted(records, key=lambda r: r["ImageId"]):
        if record.get("truth_rle") is not None:
            writer.writerow([record["ImageId"], record["truth_rle"]])
    return buffer.getvalue()


def rejected_csv(rejected: list[tuple[str, str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(rejected)
    return buffer.getvalue()


def build_manifest(records: list[dict[str, Any]], settings: PreprocessConfig, previous: Any) -> Any:
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
    for column in NULLABLE_INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    return frame


def count_outcomes(
    manifest: Any, rejected: list[tuple[str, str]], unmatched: list[str]
) -> dict[str, Any]:
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
