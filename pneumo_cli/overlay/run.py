"""Pictures for the doctor: a mask drawn on the original X-ray (numpy and OpenCV, no TensorFlow).

A mask is shown as a translucent fill with an opaque contour along its inner edge, so every
coloured pixel lies inside the mask and the X-ray outside it is left exactly as it was. The
colours come from the Okabe-Ito palette, which stays distinguishable with the common forms of
colour blindness: prediction in vermillion, ground truth in bluish green.

With ground truth the picture is three panels, input | prediction | ground truth, under a title
bar carrying the image's Dice; without it, two panels, input | prediction.

Images are uint8 (H, W) grey; masks uint8 {0, 1} (H, W); pictures uint8 (H, W, 3) BGR, as OpenCV
writes them.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pneumo_cli.core.choices import PictureFormat, check_choice
from pneumo_cli.core.errors import ConfigError, InputError, OutputError
from pneumo_cli.core.files import (
    atomic_write_bytes,
    atomic_write_text,
    ensure_output_dir,
    remove_stale_temporaries,
)
from pneumo_cli.core.jobs import claim_job, file_sha256, folder_state
from pneumo_cli.core.metrics import dice_score
from pneumo_cli.core.progress import ProgressFactory, stage
from pneumo_cli.io import dicom_read, rle, xrays
from pneumo_cli.io.mask_files import find_mask_file, read_mask_file
from pneumo_cli.overlay.render import encode_picture, format_title, render_panels

REJECTED_FILE = "rejected.csv"
JOB_FILE = ".pneumo-job.json"


def _job_of(
    masks_dir: Path, truth_dir: Path | None, rle_csv: Path | None, fmt: str, max_size: int | None
) -> dict[str, object]:
    """What decides the pictures: the mask folder and its files, the ground truth, the format."""
    from pneumo_cli import __version__
    from pneumo_cli.io.mask_files import MASK_SUFFIXES

    return {
        "masks": str(masks_dir.resolve()),
        "masks_state": folder_state(masks_dir, MASK_SUFFIXES),
        "truth": str(truth_dir.resolve()) if truth_dir else None,
        "truth_state": folder_state(truth_dir, MASK_SUFFIXES) if truth_dir else None,
        "rle_sha256": file_sha256(rle_csv) if rle_csv else None,
        "format": fmt,
        "max_size": max_size,
        "pneumo_version": __version__,
    }


# ---------------------------------------------------------------------------------------------
# Files: finding inputs and masks, and the batch run behind `pneumo overlay`.


def load_mask(path: Path, height: int, width: int) -> tuple[np.ndarray, bool]:
    """Read a mask file and bring it to the image's ``height`` x ``width``.

    Masks are read as everywhere in pneumo (:func:`pneumo_cli.io.mask_files.read_mask_file`):
    any non-zero pixel is foreground (0/1 and 0/255 PNGs both work); in JPEG masks only pixels
    above 127, because compression smears values around edges. A mask at the image size is used
    as it is. A square mask smaller than the image is taken to be at the model's size and is
    stretched over the whole image with nearest-neighbour interpolation (without the cache's crop
    box that is the only mapping available; masks from ``pneumo predict`` are already at the
    original size). Returns the uint8 {0,1} (height, width) mask and whether it was stretched.

    Raises:
        InputError: unreadable file, or a size that is neither the image's nor a square model
            size smaller than the image.
    """
    import cv2

    mask = read_mask_file(path)
    if mask.shape == (height, width):
        return mask, False
    mask_h, mask_w = mask.shape
    if mask_h == mask_w and mask_h <= min(height, width):
        stretched = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return stretched, True
    raise InputError(
        f"{path}: mask is {mask_w}x{mask_h} but the image is {width}x{height}; a mask must have "
        "the image's size or a square model size smaller than the image"
    )


def _read_truth_rle(path: Path) -> dict[str, list[rle.RleRow]]:
    grouped: dict[str, list[rle.RleRow]] = defaultdict(list)
    for row in rle.read_rle_csv(path):
        grouped[row.image_id].append(row)
    return dict(grouped)


def _decode_truth(path: Path, rows: list[rle.RleRow], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for row in rows:
        try:
            rle.paint_runs(mask, *rle.parse_runs(row.encoded, height, width))
        except rle.RleError as exc:
            raise rle.RleError(f"{rle.row_context(path, row)}: {exc}") from None
    return mask


@dataclass
class OverlayResult:
    """One written picture: its ImageId, source file, output file, Dice (None without ground
    truth) and whether a model-size mask was stretched to the image."""

    image_id: str
    source: str
    output: str
    dice: float | None
    stretched: bool


@dataclass
class OverlaySummary:
    """What :func:`run_overlay` did. ``rejected`` holds (path, reason) pairs, also written to
    ``OUT/rejected.csv``; ``mean_dice`` averages the written images that had ground truth."""

    out_dir: str
    written: int = 0
    skipped: int = 0
    stretched_masks: int = 0
    without_truth: int = 0
    mean_dice: float | None = None
    rejected_csv: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    results: list[OverlayResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["rejected"] = [{"path": p, "reason": r} for p, r in self.rejected]
        return data


def _check_settings(
    masks_dir: Path,
    truth_dir: Path | None,
    rle_csv: Path | None,
    fmt: str,
    max_size: int | None,
) -> None:
    check_choice(PictureFormat, fmt, "--format")
    if max_size is not None and max_size < 16:
        raise ConfigError(f"max size {max_size} px is too small; use at least 16 or leave it out")
    if truth_dir is not None and rle_csv is not None:
        raise ConfigError("give ground truth as a mask folder or an RLE CSV, not both")
    hint = (
        "point --masks at the masks/ folder written by `pneumo predict` (or any folder of "
        "<ImageId>.png masks)"
    )
    _require_folder(masks_dir, "--masks", "mask folder", hint)
    if truth_dir is not None:
        _require_folder(truth_dir, "--truth", "ground-truth folder", "give a folder of masks")


def _require_folder(folder: Path, option: str, what: str, hint: str) -> None:
    if folder.is_dir():
        return
    if folder.exists():
        raise InputError(f"{option} {folder} is a file, not a folder; {hint}")
    raise InputError(f"{what} {folder} does not exist; {hint}")


def run_overlay(
    images: Sequence[str | Path],
    masks_dir: str | Path,
    out_dir: str | Path,
    truth_dir: str | Path | None = None,
    rle_csv: str | Path | None = None,
    fmt: str = "png",
    max_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> OverlaySummary:
    """Write ``out_dir/<ImageId>.<fmt>`` for every input image that has a mask in ``masks_dir``.

    Inputs are files or folders (searched recursively) of DICOM/PNG/JPEG X-rays; the ImageId is
    formed as ``preprocess`` forms it (:class:`pneumo_cli.io.dicom_read.XRayNamer`: the file
    name without its extension, the SOPInstanceUID for DICOMDIR members such as ``IM000000``).
    Ground truth, if given, comes from ``truth_dir`` (``<ImageId>.png`` masks) or ``rle_csv``
    (SIIM RLE, rows of one image combined); an image without ground truth gets the two-panel
    figure. Existing outputs are kept unless ``overwrite``. An input that cannot be used
    (unreadable, no mask, mask of the wrong size, bad RLE row, duplicate ImageId) is listed in
    ``out_dir/rejected.csv`` and the rest go on.

    Raises:
        ConfigError: bad ``fmt`` or ``max_size``, or both ``truth_dir`` and ``rle_csv``.
        InputError: missing mask/truth folder or inputs, unreadable RLE CSV, no inputs found, or
            no input could be drawn at all (the first reason is named).
        OutputError: the output folder cannot be created or written.
    """
    masks_dir = Path(masks_dir)
    truth_dir = Path(truth_dir) if truth_dir is not None else None
    rle_csv = Path(rle_csv) if rle_csv is not None else None
    _check_settings(masks_dir, truth_dir, rle_csv, fmt, max_size)
    files = xrays.collect_xray_files(images)
    truth_rows = _read_truth_rle(rle_csv) if rle_csv is not None else None
    inputs = [*images, masks_dir] + ([truth_dir] if truth_dir is not None else [])
    out = ensure_output_dir(out_dir, *inputs)
    remove_stale_temporaries(out)
    job_record = _job_of(masks_dir, truth_dir, rle_csv, fmt, max_size)
    earlier = any(out.glob(f"*.{fmt}"))
    claim_job(
        out, job_record, overwrite, command="overlay", file_name=JOB_FILE, earlier_outputs=earlier
    )
    summary = OverlaySummary(out_dir=str(out))
    job = _Job(masks_dir, truth_dir, rle_csv, truth_rows, fmt, max_size)
    namer = dicom_read.XRayNamer()  # the ImageIds `preprocess` and `predict` give
    with stage(progress, "overlay", len(files)) as advance:
        for path in files:
            try:
                image_id = namer.name(path)
                target = out / f"{image_id}.{fmt}"
                if target.exists() and not overwrite:
                    summary.skipped += 1
                else:
                    summary.results.append(_overlay_one(job, path, image_id, target))
                    summary.written += 1
            except InputError as exc:
                # The path has its own column in rejected.csv; keep the reason short.
                reason = " ".join(str(exc).split()).removeprefix(f"{path}: ")
                summary.rejected.append((str(path), reason))
            advance(1)
    _finish(summary, out)
    return summary


@dataclass(frozen=True)
class _Job:
    """The settings shared by every image of one run."""

    masks_dir: Path
    truth_dir: Path | None
    rle_csv: Path | None
    truth_rows: dict[str, list[rle.RleRow]] | None
    fmt: str
    max_size: int | None

    def truth_for(self, image_id: str, height: int, width: int) -> np.ndarray | None:
        """The ground-truth mask at the image's size, or None when there is none for it."""
        if self.truth_dir is not None:
            truth_file = find_mask_file(self.truth_dir, image_id)
            return None if truth_file is None else load_mask(truth_file, height, width)[0]
        if self.rle_csv is not None and self.truth_rows and image_id in self.truth_rows:
            return _decode_truth(self.rle_csv, self.truth_rows[image_id], height, width)
        return None


def _overlay_one(job: _Job, path: Path, image_id: str, target: Path) -> OverlayResult:
    mask_file = find_mask_file(job.masks_dir, image_id)
    if mask_file is None:
        raise InputError(f"{path}: no mask {image_id}.png (or .jpg) in {job.masks_dir}")
    image = dicom_read.read_xray(path).image
    height, width = image.shape
    pred, stretched = load_mask(mask_file, height, width)
    truth = job.truth_for(image_id, height, width)
    dice = dice_score(truth, pred) if truth is not None else None
    figure = render_panels(image, pred, truth, format_title(image_id, dice), job.max_size)
    atomic_write_bytes(target, encode_picture(figure, job.fmt))
    return OverlayResult(image_id, str(path), str(target), dice, stretched)


def _finish(summary: OverlaySummary, out: Path) -> None:
    scored = [r.dice for r in summary.results if r.dice is not None]
    summary.without_truth = len(summary.results) - len(scored)
    summary.stretched_masks = sum(r.stretched for r in summary.results)
    summary.mean_dice = sum(scored) / len(scored) if scored else None
    rejected_path = out / REJECTED_FILE
    if summary.rejected:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(summary.rejected)
        atomic_write_text(rejected_path, buffer.getvalue())
        summary.rejected_csv = str(rejected_path)
    else:
        # A list from an earlier run would describe inputs that are fine now.
        try:
            rejected_path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove stale {rejected_path}: {exc.strerror}") from None
    if summary.rejected and not summary.written and not summary.skipped:
        source, reason = summary.rejected[0]
        raise InputError(
            f"no overlay could be drawn ({len(summary.rejected)} input(s) rejected, reasons in "
            f"{rejected_path}); the first: {source}: {reason}"
        )
