"""TODO: split-out module docstring."""

from __future__ import annotations

import csv
import hashlib
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
_NULLABLE_INT_COLUMNS = ("has_pneumothorax", "mask_area_px", "age")
# Labelled images' masks at original resolution as SIIM RLE (`pneumo evaluate` scores against it).
TRUTH_FILE = "truth.csv"
# Patient-identifying header fields, written only when asked for (--keep-phi).
PHI_FILE = "phi.csv"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); delete it or use --overwrite") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; delete it or use --overwrite")
    return data


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


MANIFEST_COLUMNS = (
    "ImageId", "image", "mask", "has_pneumothorax", "mask_area_px", "split", "fold",
    "orig_height", "orig_width", "crop_top", "crop_bottom", "crop_left", "crop_right",
    "pixel_spacing_mm", "view_position", "sex", "age", "patient_key", "source",
)  # fmt: skip


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
    """A cache folder: its labelled records, preprocess settings and manifest hash."""

    folder: Path
    records: tuple[CacheRecord, ...]
    settings: dict[str, Any]
    manifest_sha256: str

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])


def read_cache(folder: str | os.PathLike[str]) -> CacheInfo:
    """Read a cache's ``manifest.csv`` and ``preprocess.json``.

    Unlabelled rows (empty ``has_pneumothorax``) are left out: they cannot be trained on.

    Raises:
        InputError: missing folder, manifest or preprocess.json; manifest with wrong columns
            or bad values (names the line).
    """
    folder = Path(folder).absolute()
    hint = "create it with `pneumo preprocess RAW_DIR CACHE_DIR`"
    if not folder.is_dir():
        raise InputError(f"cache folder {folder} does not exist; {hint}")
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise InputError(f"{folder} has no manifest.csv; is it a pneumo cache? ({hint})")
    settings_file = folder / "preprocess.json"
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))["settings"]
        int(settings["image_size"])
    except FileNotFoundError:
        raise InputError(f"{folder} has no preprocess.json; {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{settings_file}: no readable settings.image_size ({exc})") from None
    raw = manifest.read_bytes()
    rows = list(csv.reader(raw.decode("utf-8-sig").splitlines()))
    if not rows or tuple(c.strip() for c in rows[0][: len(MANIFEST_COLUMNS)]) != MANIFEST_COLUMNS:
        raise InputError(
            f"{manifest}: header must start with {', '.join(MANIFEST_COLUMNS)}; "
            "recreate the cache with `pneumo preprocess`"
        )
    records = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        values = dict(zip(MANIFEST_COLUMNS, row, strict=False))
        label = values.get("has_pneumothorax", "").strip()
        if label == "":
            continue
        if label not in ("0", "1"):
            raise InputError(
                f"{manifest} line {line}: has_pneumothorax '{label}' is not 0, 1 or empty"
            )
        try:
            fold = int(values.get("fold") or -1)
        except ValueError:
            raise InputError(
                f"{manifest} line {line}: fold '{values['fold']}' is not an integer"
            ) from None
        mask = values.get("mask", "").strip()
        if label == "1" and not mask:
            raise InputError(f"{manifest} line {line}: positive image without a mask file")
        records.append(
            CacheRecord(
                image_id=values["ImageId"],
                image=str(folder / values["image"]),
                mask=str(folder / mask) if mask else None,
                positive=label == "1",
                split=values.get("split", "").strip(),
                fold=fold,
            )
        )
    digest = hashlib.sha256(raw).hexdigest()
    return CacheInfo(folder, tuple(records), settings, digest)


def select_split(cache: CacheInfo, split: str, need_positive: bool = False) -> list[CacheRecord]:
    """The labelled records of ``split``.

    Raises:
        InputError: the split has no labelled image, or (``need_positive``) no positive one.
    """
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
