"""The cache format, read in one place.

A cache folder made by ``pneumo preprocess`` holds ``images/`` and ``masks/`` (PNG, model size),
``manifest.csv`` (one row per image, columns :data:`MANIFEST_COLUMNS`), ``truth.csv`` (labelled
masks at original resolution as SIIM RLE), ``preprocess.json`` (settings, counts, versions and a
``complete`` flag) and optionally ``phi.csv``. Every stage opens a cache through this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_cli.core.config import PreprocessConfig, from_dict
from pneumo_cli.core.errors import InputError

MANIFEST_COLUMNS = (
    "ImageId", "image", "mask", "has_pneumothorax", "mask_area_px", "split", "fold",
    "orig_height", "orig_width", "crop_top", "crop_bottom", "crop_left", "crop_right",
    "pixel_spacing_mm", "view_position", "sex", "age", "patient_key", "source",
)  # fmt: skip
_TEXT_COLUMNS = (
    "ImageId", "image", "mask", "split", "view_position", "sex", "patient_key", "source",
)  # fmt: skip
NULLABLE_INT_COLUMNS = ("has_pneumothorax", "mask_area_px", "age")
_INT_COLUMNS = ("orig_height", "orig_width", "crop_top", "crop_bottom", "crop_left", "crop_right")
# Labelled images' masks at original resolution as SIIM RLE (`pneumo evaluate` scores against it).
TRUTH_FILE = "truth.csv"
# Patient-identifying header fields, written only when asked for (--keep-phi).
PHI_FILE = "phi.csv"


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        InputError: unreadable, not JSON, or not an object (names the file).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); delete it or use --overwrite") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; delete it or use --overwrite")
    return data


@dataclass(frozen=True)
class CacheRecord:
    """One labelled cache image. Paths are absolute; ``mask`` is None for an all-empty mask."""

    image_id: str
    image: str
    mask: str | None
    positive: bool
    split: str
    fold: int


@dataclass(frozen=True)
class CacheInfo:
    """A finished cache: its labelled records, preprocess settings and manifest hash."""

    folder: Path
    records: tuple[CacheRecord, ...]
    settings: dict[str, Any]
    manifest_sha256: str

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])


def read_cache(folder: str | os.PathLike[str]) -> CacheInfo:
    """Open a finished cache for training: its labelled records, settings and manifest hash.

    This is the one reader of the cache format: it checks the folder is a finished cache, that
    its settings are ones this pneumo knows, and every manifest value (see :func:`load_manifest`).
    Unlabelled rows (empty ``has_pneumothorax``) are left out: they cannot be trained on.

    Raises:
        InputError: missing folder, manifest or preprocess.json, unfinished cache, manifest with
            wrong columns or bad values (names the line).
        ConfigError: settings unknown to this version of pneumo.
    """
    import pandas as pd

    cache = Path(folder).absolute()
    info = _require_finished(cache)
    settings = info.get("settings", {})
    from_dict(PreprocessConfig, settings, str(cache / "preprocess.json"))
    raw = _read_bytes(cache / "manifest.csv")
    frame = _parse_manifest(cache / "manifest.csv", raw)
    records = tuple(
        CacheRecord(
            image_id=row.ImageId,
            image=str(cache / row.image),
            mask=str(cache / row.mask) if row.mask else None,
            positive=int(row.has_pneumothorax) == 1,
            split=row.split.strip(),
            fold=int(row.fold),
        )
        for row in frame.itertuples(index=False)
        if not pd.isna(row.has_pneumothorax)
    )
    return CacheInfo(cache, records, settings, hashlib.sha256(raw).hexdigest())


def load_manifest(cache_dir: str | os.PathLike[str]) -> Any:
    """Read a finished cache's ``manifest.csv`` as a pandas DataFrame (columns
    :data:`MANIFEST_COLUMNS`; text columns as str with "" for empty; has_pneumothorax,
    mask_area_px and age as nullable Int64, fold as int).

    Raises:
        InputError: the cache or its manifest is missing or unfinished, the manifest has other
            columns, or a value is malformed (names the line).
    """
    cache = Path(cache_dir)
    _require_finished(cache)
    path = cache / "manifest.csv"
    return _parse_manifest(path, _read_bytes(path))


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


_HINT = "create it with `pneumo preprocess RAW_DIR CACHE_DIR`"


def _require_finished(cache: Path) -> dict[str, Any]:
    """``preprocess.json`` of a finished cache (its ``complete`` flag set)."""
    if not cache.is_dir():
        raise InputError(f"cache folder {cache} does not exist; {_HINT}")
    if not (cache / "manifest.csv").is_file():
        raise InputError(f"{cache} has no manifest.csv; is it a pneumo cache? ({_HINT})")
    info_path = cache / "preprocess.json"
    if not info_path.is_file():
        raise InputError(f"{cache} has no preprocess.json; {_HINT}")
    info = read_json_object(info_path)
    if not info.get("complete"):
        raise InputError(
            f"{cache} is an unfinished cache; run the same `pneumo preprocess` command again "
            "to finish it"
        )
    return info


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc.strerror}); re-run pneumo preprocess") from None


def read_manifest_file(path: Path) -> Any:
    """Parse a manifest file (finished or not) as :func:`load_manifest` does."""
    return _parse_manifest(path, _read_bytes(path))


def _parse_manifest(path: Path, raw: bytes) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); re-run pneumo preprocess") from None
    if tuple(frame.columns) != MANIFEST_COLUMNS:
        raise InputError(
            f"{path}: header must start with {', '.join(MANIFEST_COLUMNS[:3])}, ... (found "
            f"{', '.join(list(frame.columns)[:3])}, ...); was it written by `pneumo preprocess`? "
            "Re-run it with --overwrite"
        )
    for index, row in enumerate(frame.itertuples(index=False)):
        _check_row(path, index + 2, row)
    for name in NULLABLE_INT_COLUMNS:
        frame[name] = pd.array([int(v) if v.strip() else None for v in frame[name]], "Int64")
    frame["fold"] = [int(v) if v.strip() else -1 for v in frame["fold"]]
    for name in _INT_COLUMNS:
        try:
            frame[name] = pd.to_numeric(frame[name]).astype("int64")
        except (ValueError, TypeError):
            raise InputError(
                f"{path}: column {name} holds a value that is not an integer"
            ) from None
    frame["pixel_spacing_mm"] = pd.to_numeric(frame["pixel_spacing_mm"], errors="coerce")
    return frame


def _check_row(path: Path, line: int, row: Any) -> None:
    label = row.has_pneumothorax.strip()
    if label not in ("", "0", "1"):
        raise InputError(f"{path} line {line}: has_pneumothorax '{label}' is not 0, 1 or empty")
    for name in ("fold", "mask_area_px", "age"):
        value = getattr(row, name).strip()
        if value and not value.lstrip("-").isdigit():
            raise InputError(f"{path} line {line}: {name} '{value}' is not an integer")
    if label == "1" and not row.mask.strip():
        raise InputError(f"{path} line {line}: positive image without a mask file")


def select_split(cache: CacheInfo, split: str, need_positive: bool = False) -> list[CacheRecord]:
    """The labelled records of ``split``.

    Raises:
        InputError: the split has no labelled image, or (``need_positive``) no positive one.
    """
    if not cache.records:
        raise InputError(
            f"{cache.folder / 'manifest.csv'} has no labelled images (every image is cached "
            "without a mask); re-run `pneumo preprocess` with --rle train-rle.csv or --masks "
            "MASK_DIR to add labels"
        )
    chosen = [r for r in cache.records if r.split == split]
    if not chosen:
        found = sorted({r.split for r in cache.records})
        raise InputError(
            f"{cache.folder / 'manifest.csv'} has no labelled images in split '{split}' "
            f"(splits present: {', '.join(found) or 'none'}); re-run `pneumo preprocess` with "
            "a validation fraction"
        )
    if need_positive and not any(r.positive for r in chosen):
        raise InputError(
            f"{cache.folder / 'manifest.csv'}: split '{split}' has no image with a pneumothorax; "
            "a model cannot learn masks from empty images only"
        )
    return chosen


def cache_folds(cache: CacheInfo) -> int:
    """How many cross-validation folds the cache was made with (0: none)."""
    return int(cache.settings.get("folds") or 0)


def select_fold(cache: CacheInfo, fold: int) -> tuple[list[CacheRecord], list[CacheRecord]]:
    """Cross-validation fold ``fold``: (training records, validation records).

    Training gets the labelled train and val images of every other fold, validation fold
    ``fold``'s; test images (fold -1) are in neither.

    Raises:
        InputError: the cache has no folds, ``fold`` is not one of them, or the training
            records hold no positive image.
    """
    manifest = cache.folder / "manifest.csv"
    folds = cache_folds(cache)
    if folds < 2:
        raise InputError(
            f"cache {cache.folder} has no cross-validation folds; preprocess it again with "
            "--folds N (N >= 2) to train --fold"
        )
    if not 0 <= fold < folds:
        raise InputError(
            f"--fold {fold} is not a fold of cache {cache.folder}: its folds are 0..{folds - 1}"
        )
    pool = [r for r in cache.records if r.split != "test" and r.fold >= 0]
    stray = [r for r in pool if r.fold >= folds]
    if stray:
        raise InputError(
            f"{manifest}: {stray[0].image_id} is in fold {stray[0].fold}, but the cache has "
            f"{folds} folds; recreate the cache"
        )
    val = [r for r in pool if r.fold == fold]
    train = [r for r in pool if r.fold != fold]
    if not val:
        raise InputError(f"{manifest}: fold {fold} holds no labelled image; use fewer --folds")
    if not any(r.positive for r in train):
        raise InputError(
            f"{manifest}: the folds other than {fold} hold no image with a pneumothorax; a "
            "model cannot learn masks from empty images only"
        )
    return train, val


def fold_roles(cache: CacheInfo, fold: int | None) -> list[tuple[str, str]]:
    """(ImageId, role) of every labelled record for a run on ``fold`` (None: the splits): the
    role is the split the run used it as, so `evaluate` never scores a training image as held
    out."""
    if fold is None:
        return [(r.image_id, r.split) for r in cache.records]
    train, val = select_fold(cache, fold)
    roles = {r.image_id: "train" for r in train} | {r.image_id: "val" for r in val}
    return [(r.image_id, roles.get(r.image_id, r.split)) for r in cache.records]


def check_record_files(records: list[CacheRecord], image_size: int) -> None:
    """Check that every record's image and mask is an ``image_size`` square PNG, reading only
    each file's header, so a damaged cache is refused before a run starts (not mid-epoch).

    Raises:
        InputError: the first missing or wrong file, named.
    """
    from pneumo_cli.core.image_files import raster_size

    for record in records:
        for path in (record.image, record.mask):
            if not path:
                continue
            if not os.path.isfile(path):
                raise InputError(f"cache file {path} is missing; recreate the cache")
            if raster_size(path) != (image_size, image_size):
                raise InputError(
                    f"{path}: not a {image_size}x{image_size} PNG; the cache is damaged or was "
                    "made with another image size (recreate it)"
                )
