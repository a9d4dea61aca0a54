"""Whole-file RLE work: an RLE CSV to mask PNGs, and a folder of mask PNGs to an RLE CSV.

Both operations validate every input before writing anything, so bad input never leaves partial
output; every file is written atomically, so a killed run can simply be run again.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pneumo_cli import __version__
from pneumo_cli.core.errors import InputError, OutputError, RleError
from pneumo_cli.core.files import (
    atomic_write_text,
    check_image_id,
    ensure_output_dir,
    iter_files,
    remove_stale_temporaries,
    write_mask_png,
)
from pneumo_cli.core.image_files import MAX_IMAGE_PIXELS
from pneumo_cli.core.jobs import claim_job, file_sha256
from pneumo_cli.core.progress import ProgressFactory, stage
from pneumo_cli.io import rle
from pneumo_cli.io.mask_files import MASK_SUFFIXES, mask_image_id, read_mask_file

REJECTED_FILE = "rejected.csv"
# What made a mask folder (hidden: the folder is read as a folder of masks).
JOB_FILE = ".pneumo-job.json"


@dataclass
class Rejection:
    """A CSV row that could not be used: its 1-based line, ImageId and the reason."""

    line: int
    image_id: str
    reason: str


@dataclass
class DecodeSummary:
    """What ``decode_csv`` found and did. ``rows_merged`` counts rows of images with several
    rows (those rows are combined into one mask by union)."""

    rows: int = 0
    images: int = 0
    positive: int = 0
    empty: int = 0
    images_with_several_rows: int = 0
    rows_merged: int = 0
    written: int = 0
    skipped_existing: int = 0
    rejected_rows: int = 0
    rejected_images: int = 0
    out_dir: str = ""
    rejections: list[Rejection] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, int | str]:
        data = asdict(self)
        data.pop("rejections")
        return data


def _group_rows(
    csv_path: Path, rows: Iterable[rle.RleRow], height: int, width: int
) -> tuple[dict[str, list[rle.RleRow]], list[Rejection]]:
    """Validate every row; return valid rows grouped by ImageId (file order) and the rejections.

    An image with any invalid row is rejected as a whole: its union would be incomplete.
    """
    groups: dict[str, list[rle.RleRow]] = defaultdict(list)
    rejections: list[Rejection] = []
    bad_ids: set[str] = set()
    for row in rows:
        try:
            check_image_id(row.image_id, f"{csv_path} line {row.line}")
            rle.parse_runs(row.encoded, height, width)
        except InputError as exc:
            message = str(exc)
            if isinstance(exc, RleError):
                message = f"{rle.row_context(csv_path, row)}: {message}"
            rejections.append(Rejection(row.line, row.image_id, message))
            bad_ids.add(row.image_id)
            continue
        groups[row.image_id].append(row)
    for image_id in bad_ids:
        groups.pop(image_id, None)
    return dict(groups), rejections


def decode_csv(
    csv_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    height: int = 1024,
    width: int = 1024,
    overwrite: bool = False,
    skip_invalid: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> DecodeSummary:
    """Decode an RLE CSV into ``out_dir/<ImageId>.png`` masks (0/255, height x width).

    All rows of an ImageId are combined by union; ``-1`` rows give an all-black mask. Existing
    PNGs are kept (and counted as skipped) unless ``overwrite``. With ``skip_invalid`` bad rows are
    listed in ``out_dir/rejected.csv`` instead of stopping the run.

    Raises:
        RleError: a malformed row (naming file, line and ImageId) when not ``skip_invalid``;
            an empty or unrecognisable CSV.
        OutputError: ``out_dir`` cannot be created or written.
    """
    csv_path = Path(csv_path)
    if height < 1 or width < 1:
        raise InputError(f"mask size {width}x{height} is invalid; --width/--height must be >= 1")
    if height * width > MAX_IMAGE_PIXELS:
        raise InputError(
            f"mask size {width}x{height} is over the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel "
            "limit pneumo decodes; check --width/--height"
        )
    rows = rle.read_rle_csv(csv_path)
    groups, rejections = _group_rows(csv_path, rows, height, width)
    if rejections and not skip_invalid:
        extra = f" ({len(rejections) - 1} more bad rows)" if len(rejections) > 1 else ""
        raise RleError(
            f"{rejections[0].reason}{extra}; fix the CSV or pass --skip-invalid to skip bad rows"
        )
    if not groups and not skip_invalid:
        raise RleError(f"{csv_path}: no rows to decode")

    folder = ensure_output_dir(out_dir)
    remove_stale_temporaries(folder)
    job = {"csv_sha256": file_sha256(csv_path), "height": height, "width": width,
           "pneumo_version": __version__}  # fmt: skip
    earlier = any(folder.glob("*.png"))
    claim_job(
        folder, job, overwrite, command="rle-decode", file_name=JOB_FILE, earlier_outputs=earlier
    )
    summary = _counted(DecodeSummary(rows=len(rows), out_dir=str(folder)), groups, rejections)

    def write_one(item: tuple[str, list[rle.RleRow]]) -> bool:
        image_id, group = item
        target = folder / f"{image_id}.png"
        if target.exists() and not overwrite:
            return False
        mask = rle.decode_union([r.encoded for r in group], height, width)
        write_mask_png(target, mask)
        return True

    threads = workers or os.cpu_count() or 1
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        stage(progress, "decoding masks", len(groups)) as advance,
    ):
        for wrote in pool.map(write_one, groups.items()):
            if wrote:
                summary.written += 1
            else:
                summary.skipped_existing += 1
            advance(1)
    if skip_invalid:
        write_rejections(folder / REJECTED_FILE, rejections)
    return summary


def _counted(
    summary: DecodeSummary, groups: dict[str, list[rle.RleRow]], rejections: list[Rejection]
) -> DecodeSummary:
    """``summary`` with the counts of images, positives, merged rows and rejections."""
    summary.rejections = rejections
    summary.rejected_rows = len(rejections)
    summary.rejected_images = len({r.image_id for r in rejections})
    summary.images = len(groups)
    for group in groups.values():
        if any(r.encoded not in ("", rle.EMPTY) for r in group):
            summary.positive += 1
        if len(group) > 1:
            summary.images_with_several_rows += 1
            summary.rows_merged += len(group)
    summary.empty = summary.images - summary.positive
    return summary


def write_rejections(path: Path, rejections: list[Rejection]) -> None:
    """Write ``line,ImageId,reason`` rows (header included) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["line", "ImageId", "reason"])
    for item in rejections:
        writer.writerow([item.line, item.image_id, item.reason])
    atomic_write_text(path, buffer.getvalue())


@dataclass
class EncodeSummary:
    """What ``encode_folder`` wrote: image count, positives, empties, mask size and the CSV."""

    images: int
    positive: int
    empty: int
    height: int
    width: int
    out_csv: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def encode_folder(
    mask_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    threshold: int | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: ProgressFactory | None = None,
) -> EncodeSummary:
    """Encode every mask image in ``mask_dir`` into a Kaggle-style ``ImageId,EncodedPixels`` CSV.

    Masks are read as ``pneumo preprocess --masks`` reads them
    (:func:`pneumo_cli.io.mask_files.read_mask_file`): ImageId is the name without the suffix
    (PNG, JPEG, BMP, TIFF); a pixel is foreground when its grey value is above ``threshold``, by
    default 0 for lossless files (0/1 and 0/255 masks both work) and 127 for lossy JPEG masks.
    Rows are sorted by ImageId; empty masks are written as ``-1``.

    Raises:
        InputError: ``mask_dir`` missing or without mask images; masks of different sizes; an
            unsafe ImageId; two files with the same stem.
        OutputError: ``out_csv`` exists and not ``overwrite``.
    """
    mask_dir, out_csv = Path(mask_dir), Path(out_csv)
    if not mask_dir.is_dir():
        raise InputError(f"{mask_dir}: mask folder not found")
    if out_csv.exists() and not overwrite:
        raise OutputError(f"{out_csv} exists; pass --overwrite to replace it")
    if threshold is not None and not 0 <= threshold <= 254:
        raise InputError(f"threshold {threshold} is outside 0..254")
    paths = [p for p in iter_files(mask_dir, MASK_SUFFIXES) if p.parent == mask_dir]
    if not paths:
        raise InputError(f"{mask_dir}: no mask images ({', '.join(MASK_SUFFIXES)}) found")
    seen: dict[str, Path] = {}
    for path in paths:
        image_id = check_image_id(mask_image_id(path), str(path))
        if image_id in seen:
            raise InputError(f"{path}: same ImageId as {seen[image_id]}; keep one of them")
        seen[image_id] = path

    def encode_one(path: Path) -> tuple[str, tuple[int, int], str]:
        mask = read_mask_file(path, threshold)
        return mask_image_id(path), mask.shape, rle.encode_rle(mask)

    results: list[tuple[str, tuple[int, int], str]] = []
    first: tuple[Path, tuple[int, int]] | None = None
    threads = workers or os.cpu_count() or 1
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        stage(progress, "encoding masks", len(paths)) as advance,
    ):
        for path, (image_id, shape, encoded) in zip(
            paths, pool.map(encode_one, paths), strict=True
        ):
            if first is None:
                first = (path, shape)
            elif shape != first[1]:
                raise InputError(
                    f"{path} is {shape[1]}x{shape[0]} but {first[0]} is "
                    f"{first[1][1]}x{first[1][0]}; all masks in one call must have one size"
                )
            results.append((image_id, shape, encoded))
            advance(1)
    results.sort(key=lambda item: item[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels"])
    for image_id, _, encoded in results:
        writer.writerow([image_id, encoded])
    if out_csv.parent != Path(""):
        ensure_output_dir(out_csv.parent)
    atomic_write_text(out_csv, buffer.getvalue(), fsync=True)
    positive = sum(1 for _, _, encoded in results if encoded != rle.EMPTY)
    height, width = results[0][1]
    return EncodeSummary(
        images=len(results),
        positive=positive,
        empty=len(results) - positive,
        height=height,
        width=width,
        out_csv=str(out_csv),
    )
