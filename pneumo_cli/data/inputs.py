"""Inputs of ``pneumo preprocess``: walking RAW_DIR, matching labels, processing images.

The orchestration lives in :mod:`pneumo_cli.data.preprocess`, the cache format in
:mod:`pneumo_cli.data.cache`; this module does the per-file work, the part that runs in worker
processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import InputError, PneumoError
from pneumo_cli.core.files import atomic_write_text
from pneumo_cli.core.patient_key import PatientKeySecret
from pneumo_cli.core.progress import ProgressFn
from pneumo_cli.core.workers import MapFn
from pneumo_cli.data.imaging import decoded_min_side, prepare_image, prepare_mask


@dataclass(frozen=True)
class Candidate:
    """An X-ray accepted by the scan: ``source`` is its path relative to RAW_DIR (POSIX);
    ``uids`` are its header's SOPInstanceUID and MediaStorageSOPInstanceUID (none for PNG/JPEG),
    by which labels are matched too."""

    path: Path
    source: str
    image_id: str
    rows: int
    cols: int
    uids: tuple[str, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        """The names a label may be filed under: the ImageId, then the header's UIDs."""
        return tuple(dict.fromkeys((self.image_id, *self.uids)))


def _header_task(path: Path) -> tuple[Path, Any, str]:
    from pneumo_cli.io.dicom_read import read_header

    try:
        return path, read_header(path), ""
    except PneumoError as exc:
        return path, None, _reason(exc, path)


def _reason(exc: Exception, path: Path | str) -> str:
    """The error message without its leading '<path>: ' (rejected.csv has a path column)."""
    text = " ".join(str(exc).split())
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def list_xray_files(raw: str | os.PathLike[str]) -> list[Path]:
    """DICOM (by suffix or preamble), PNG and JPEG files under ``raw``, recursively, sorted;
    hidden files and folders are skipped."""
    from pneumo_cli.core.files import iter_files
    from pneumo_cli.io.xrays import is_xray_file

    return [path for path in iter_files(raw) if is_xray_file(path)]


def scan_raw_dir(
    raw: Path, pool_map: MapFn, keep: dict[str, str]
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """List the X-rays under ``raw``, give each its ImageId and drop duplicates (see
    :class:`pneumo_cli.io.xrays.ImageIdRegistry`: a repeated SOPInstanceUID is a duplicate; a
    taken ImageId falls back to the SOPInstanceUID). Files named in the earlier manifest
    (``keep``) are seen first, then the rest in path order, so a grown RAW_DIR never displaces
    an image already in the cache or changes its ImageId."""
    from pneumo_cli.core.files import check_image_id
    from pneumo_cli.io.xrays import ImageIdRegistry

    paths = list_xray_files(raw)
    if not paths:
        raise InputError(f"RAW_DIR {raw} holds no DICOM, PNG or JPEG files")
    kept_sources = set(keep.values())
    headers = sorted(
        pool_map(_header_task, paths),
        key=lambda h: (h[0].relative_to(raw).as_posix() not in kept_sources, h[0]),
    )
    candidates, rejected = [], []
    registry = ImageIdRegistry()
    for path, header, error in headers:
        source = path.relative_to(raw).as_posix()
        if header is None:
            rejected.append((source, error))
            continue
        try:
            check_image_id(header.image_id, source)
            image_id = registry.claim(source, header.image_id, header.uids)
        except InputError as exc:
            rejected.append((source, _reason(exc, source)))
            continue
        candidates.append(Candidate(path, source, image_id, header.rows, header.cols, header.uids))
    return candidates, rejected


def process_images(
    candidates: list[Candidate],
    label_of: dict[str, tuple],
    cache: Path,
    settings: PreprocessConfig,
    secret: PatientKeySecret,
    pool_map: MapFn,
    progress: ProgressFn | None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """Process every candidate not finished by an earlier run; returns (records, rejected,
    number processed now). ``secret`` turns PatientIDs into ``patient_key`` values."""
    advance = progress or (lambda n: None)
    records, tasks = [], []
    for item in candidates:
        label = label_of.get(item.image_id)
        record = _finished_record(cache, item, label is not None)
        if record is not None:
            records.append(record)
        else:
            tasks.append((item, label, cache, settings, secret))
    advance(len(records))
    rejected = []
    for status, value in pool_map(_process_task, tasks):
        if status == "done":
            records.append(value)
        else:
            rejected.append(value)
        advance(1)
    return records, rejected, len(tasks) - len(rejected)


def _finished_record(cache: Path, item: Candidate, labelled: bool) -> dict[str, Any] | None:
    path = cache / "records" / f"{item.image_id}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("source") != item.source or bool(record.get("mask")) != labelled:
        return None
    needed = [record.get("image"), record.get("mask")]
    if all((cache / name).is_file() for name in needed if name):
        return record
    return None


def _process_task(task: tuple) -> tuple[str, Any]:
    item, label, cache, settings, secret = task
    try:
        return "done", _process_one(item, label, cache, settings, secret)
    except InputError as exc:
        # Only a bad input is a rejection; an OutputError (disk full, read-only cache) stops
        # the run, or the cache would silently lose every image written after the disk filled.
        return "rejected", (item.source, _reason(exc, item.path))


def _process_one(
    item: Candidate,
    label: tuple | None,
    cache: Path,
    settings: PreprocessConfig,
    secret: PatientKeySecret,
) -> dict[str, Any]:
    """Decode, check, prepare and write one image (and its mask); the record goes last."""
    from pneumo_cli.core.files import write_mask_png, write_png
    from pneumo_cli.io.dicom_read import read_xray
    from pneumo_cli.io.rle import encode_rle

    xray = read_xray(item.path, patient_secret=secret, min_side=decoded_min_side(settings))
    image = xray.image
    height, width = xray.original_shape
    if min(height, width) < settings.min_image_px:
        raise InputError(
            f"too small ({width}x{height} px; the minimum side is {settings.min_image_px} px)"
        )
    if int(image.min()) == int(image.max()):
        raise InputError(_constant_reason(xray))
    mask = _load_mask(label, height, width, item)
    prepared = prepare_image(
        image, settings, reduction=xray.reduction, original_shape=xray.original_shape
    )
    image_name = f"images/{item.image_id}.png"
    write_png(cache / image_name, prepared.image)
    mask_name = ""
    if mask is not None:
        mask_name = f"masks/{item.image_id}.png"
        write_mask_png(cache / mask_name, prepare_mask(mask, prepared.crop, settings))
    top, bottom, left, right = prepared.crop
    meta = xray.meta
    record = {
        "ImageId": item.image_id,
        "image": image_name,
        "mask": mask_name,
        "has_pneumothorax": None if mask is None else int(mask.any()),
        "mask_area_px": None if mask is None else int(mask.sum()),
        "orig_height": height,
        "orig_width": width,
        "crop_top": top,
        "crop_bottom": bottom,
        "crop_left": left,
        "crop_right": right,
        "pixel_spacing_mm": meta["pixel_spacing_mm"],
        "view_position": meta["view_position"],
        "sex": meta["sex"],
        "age": meta["age"],
        "patient_key": meta["patient_key"],
        "source": item.source,
        # The mask at original resolution, for scoring predictions as Kaggle did.
        "truth_rle": None if mask is None else encode_rle(mask),
    }
    text = json.dumps(record, sort_keys=True)
    atomic_write_text(cache / "records" / f"{item.image_id}.json", text)
    return record


def _constant_reason(xray: Any) -> str:
    """Why a constant image is refused, in the values the file stores (a constant 16-bit image
    of 77 is 0 once scaled to 8 bits; the reason says 77)."""
    low, high = xray.stored_range or (int(xray.image.min()),) * 2
    shown = [f"{value:g}" for value in (low, high)]
    if low == high:
        return f"constant image (every stored pixel value is {shown[0]}); nothing to learn"
    return (
        f"constant image once converted to 8 bits (every pixel is {int(xray.image.min())}, "
        f"from stored values {shown[0]}..{shown[1]}: see its window or padding); nothing to learn"
    )


def _load_mask(label: tuple | None, height: int, width: int, item: Candidate) -> Any:
    """The uint8 {0,1} (H, W) mask of an image at its original size, or None if unlabelled."""
    if label is None:
        return None
    if label[0] == "rle":
        from pneumo_cli.io.rle import decode_union

        return decode_union(label[1], height, width)
    from pneumo_cli.io.mask_files import read_mask_file

    mask = read_mask_file(label[1], label[2])
    if mask.shape != (height, width):
        raise InputError(
            f"mask {label[1]} is {mask.shape[1]}x{mask.shape[0]} but the decoded image is "
            f"{width}x{height}"
        )
    return mask


# --- patient fields (--keep-phi only) ----------------------------------------------------------


def read_phi_rows(raw: Path, records: list[dict[str, Any]], pool_map: Any) -> list[list[str]]:
    """``[ImageId, source, *PHI_FIELDS]`` for every cached image, sorted by ImageId (only for
    ``pneumo preprocess --keep-phi``)."""
    from pneumo_cli.io.dicom_read import PHI_FIELDS

    jobs = sorted((r["ImageId"], r["source"]) for r in records)
    fields = pool_map(_phi_task, [raw / source for _, source in jobs])
    found = dict(fields)
    return [
        [image_id, source, *(found[raw / source].get(name, "") for name in PHI_FIELDS)]
        for image_id, source in jobs
    ]


def _phi_task(path: Path) -> tuple[Path, dict[str, str]]:
    from pneumo_cli.io.dicom_read import read_phi

    try:
        return path, read_phi(path)
    except PneumoError:
        return path, {}  # the image was readable a moment ago; leave its fields empty


def phi_csv(rows: list[list[str]]) -> str:
    """The text of ``CACHE/phi.csv``: a header, then :func:`read_phi_rows`' rows."""
    import csv
    import io

    from pneumo_cli.io.dicom_read import PHI_FIELDS

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "source", *PHI_FIELDS])
    writer.writerows(rows)
    return buffer.getvalue()
