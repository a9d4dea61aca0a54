"""A small synthetic dataset laid out like the SIIM-ACR Kaggle archive (``pneumo demo-data``).

Layout written under ``OUT_DIR``::

    dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
    train-rle.csv        stage-1 format: "ImageId, EncodedPixels", values after ", "

The DICOMs are 8-bit JPEG Baseline like the real ones; about 6% are MONOCHROME1 (pixel values
inverted, so a correct reader shows air dark again). PatientIDs are random UUIDs shared by one to
four images, so a split that ignores patients leaks. PatientName is ``SYNTHETIC^PHANTOM``. Four
extra files named like DICOMs are broken on purpose (truncated, empty, an HTML error page, random
bytes) and have no CSV row; a reader must reject them. Some positive images have two overlapping
RLE rows whose union is the mask, as in the real CSV.

Every value comes from one seeded generator and no timestamp is written, so the same
``(n, seed, size)`` gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, OutputError
from pneumo_cli.core.progress import ProgressFactory, stage
from pneumo_cli.data.synthetic import Anatomy, Phantom, draw_anatomy, draw_phantom

IMAGES_FOLDER = "dicom-images-train"
CSV_NAME = "train-rle.csv"
CSV_HEADER = "ImageId, EncodedPixels"
POSITIVE_FRACTION = 0.22
MONOCHROME1_FRACTION = 0.06
SPLIT_ROWS_FRACTION = 0.4  # positives written as two overlapping RLE rows
CORRUPTION_KINDS = ("truncated", "empty", "html", "garbage")
MIN_SIZE, MAX_SIZE = 128, 2048
MAX_IMAGES = 100_000
PATIENT_NAME = "SYNTHETIC^PHANTOM"
# Real SIIM files are 1024 px at about 0.14-0.17 mm; keep the field of view when scaling down.
FIELD_OF_VIEW_MM = 1024 * 0.15


@dataclass(frozen=True)
class DemoImage:
    """One valid demo image: its identifiers, header values, phantom and CSV strings.

    ``rle_rows`` are the EncodedPixels strings written for the image (``("-1",)`` for a
    negative; one or two strings whose union is ``phantom.mask`` for a positive).
    ``phantom.image`` is the MONOCHROME2 picture; a MONOCHROME1 file stores ``255 - image``.
    """

    image_id: str
    study_uid: str
    series_uid: str
    patient_id: str
    photometric: str
    header: dict[str, Any]
    phantom: Phantom
    rle_rows: tuple[str, ...]

    @property
    def relative_path(self) -> str:
        return f"{IMAGES_FOLDER}/{self.study_uid}/{self.series_uid}/{self.image_id}.dcm"


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`write_demo_dataset` wrote (counts are of files and CSV rows)."""

    out_dir: str
    csv: str
    seed: int
    size: int
    images: int
    positives: int
    negatives: int
    rle_rows: int
    multi_row_images: int
    monochrome1: int
    patients: int
    corrupted: int
    positive_area_fraction_mean: float
    corrupted_files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    anatomy: Anatomy
    sex: str
    age: int


def check_demo_settings(n: int, size: int) -> None:
    """Raise :class:`ConfigError` unless ``1 <= n <= 100000`` and ``128 <= size <= 2048``."""
    if not 1 <= n <= MAX_IMAGES:
        raise ConfigError(f"number of images {n} not in 1..{MAX_IMAGES}; try --n 300")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(
            f"image size {size} not in {MIN_SIZE}..{MAX_SIZE} px (preprocess rejects images "
            f"under {MIN_SIZE} px); try --size 512"
        )


def iter_demo_images(rng: np.random.Generator, n: int, size: int) -> Iterator[DemoImage]:
    """Yield the ``n`` valid demo images drawn from ``rng``, in CSV order.

    The plan (which images are positive or MONOCHROME1, who the patients are, every UID) is
    drawn first; each image then draws its pixels from its own child generator, so the sequence
    depends only on ``rng``'s state, ``n`` and ``size``.

    Raises:
        ConfigError: see :func:`check_demo_settings`.
    """
    check_demo_settings(n, size)
    positives = _choose(rng, n, round(POSITIVE_FRACTION * n))
    monochrome1 = _choose(rng, n, max(1, round(MONOCHROME1_FRACTION * n)) if n > 1 else 0)
    patients = _draw_patients(rng, n)
    uids = [tuple(_random_uid(rng) for _ in range(3)) for _ in range(n)]
    views = rng.random(n) < 0.4
    split_rows = np.zeros(n, dtype=bool)
    positive_indices = np.flatnonzero(positives)
    if positive_indices.size:
        count = max(1, round(SPLIT_ROWS_FRACTION * positive_indices.size))
        split_rows[positive_indices[_choose(rng, positive_indices.size, count)]] = True
    spacing_mm = f"{FIELD_OF_VIEW_MM / size:.4f}"
    for index, child in enumerate(rng.spawn(n)):
        patient = patients[index]
        phantom = draw_phantom(
            child, size, pneumothorax=bool(positives[index]), anatomy=patient.anatomy
        )
        rows = _rle_rows(child, phantom.mask, bool(split_rows[index]))
        study_uid, series_uid, sop_uid = uids[index]
        yield DemoImage(
            image_id=sop_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient.patient_id,
            photometric="MONOCHROME1" if monochrome1[index] else "MONOCHROME2",
            header={
                "PatientName": PATIENT_NAME,
                "PatientSex": patient.sex,
                "PatientAge": f"{patient.age:03d}Y",
                "ViewPosition": "AP" if views[index] else "PA",
                "PixelSpacing": [spacing_mm, spacing_mm],
                "StudyDescription": "SYNTHETIC PHANTOM - NOT A PATIENT",
            },
            phantom=phantom,
            rle_rows=rows,
        )


def write_corrupt_files(rng: np.random.Generator, out: Path, size: int) -> dict[str, str]:
    """Write one broken file per kind in :data:`CORRUPTION_KINDS` under ``out``, each at a UID
    path of its own; return ``{relative path: kind}``."""
    from pneumo_cli.core.files import atomic_write_bytes
    from pneumo_cli.io.dicom_write import write_dicom

    written = {}
    for kind in CORRUPTION_KINDS:
        study, series, sop = (_random_uid(rng) for _ in range(3))
        relative = f"{IMAGES_FOLDER}/{study}/{series}/{sop}.dcm"
        path = out / relative
        _make_folder(path.parent)
        if kind == "truncated":
            phantom = draw_phantom(rng, size)
            write_dicom(path, phantom.image, study_uid=study, series_uid=series, sop_uid=sop)
            data = path.read_bytes()
            # Cut inside the JPEG stream, as an interrupted download or copy would.
            data = data[: len(data) * 3 // 5]
        elif kind == "empty":
            data = b""
        elif kind == "html":
            data = b"<html><body><h1>503 Service Unavailable</h1></body></html>\n"
        else:
            data = rng.bytes(4096)
        atomic_write_bytes(path, data)
        written[relative] = kind
    return written


def write_demo_dataset(
    out_dir: str | Path,
    *,
    n: int = 300,
    seed: int = 0,
    size: int = 512,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> DemoSummary:
    """Write ``n`` synthetic X-rays, their RLE CSV and four corrupt files under ``out_dir``.

    Progress is reported as files are written (:mod:`pneumo_cli.core.progress`). With
    ``overwrite`` an existing ``dicom-images-train`` folder and ``train-rle.csv`` in ``out_dir``
    are replaced; other files there are left alone.

    Raises:
        ConfigError: ``n`` or ``size`` out of range.
        OutputError: ``out_dir`` is not empty and ``overwrite`` is False, or cannot be written.
    """
    from pneumo_cli.core.files import atomic_write_text, ensure_output_dir

    check_demo_settings(n, size)
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    ensure_output_dir(out)
    rng = np.random.default_rng(seed)
    lines = [CSV_HEADER]
    counts = {"positives": 0, "multi": 0, "mono1": 0, "area": 0.0}
    patients = set()
    with stage(progress, "writing demo X-rays", n + len(CORRUPTION_KINDS)) as advance:
        for item in iter_demo_images(rng, n, size):
            _write_demo_image(out, item)
            lines.extend(f"{item.image_id}, {encoded}" for encoded in item.rle_rows)
            patients.add(item.patient_id)
            counts["mono1"] += item.photometric == "MONOCHROME1"
            if item.phantom.mask.any():
                counts["positives"] += 1
                counts["area"] += float(item.phantom.mask.mean())
                counts["multi"] += len(item.rle_rows) > 1
            advance(1)
        corrupt = write_corrupt_files(rng, out, size)
        advance(len(corrupt))
    # The CSV is written last: its presence means the image folder is complete.
    atomic_write_text(out / CSV_NAME, "\n".join(lines) + "\n", fsync=True)
    positives = int(counts["positives"])
    return DemoSummary(
        out_dir=str(out),
        csv=str(out / CSV_NAME),
        seed=seed,
        size=size,
        images=n,
        positives=positives,
        negatives=n - positives,
        rle_rows=len(lines) - 1,
        multi_row_images=int(counts["multi"]),
        monochrome1=int(counts["mono1"]),
        patients=len(patients),
        corrupted=len(corrupt),
        positive_area_fraction_mean=round(counts["area"] / positives, 4) if positives else 0.0,
        corrupted_files=corrupt,
    )


def _write_demo_image(out: Path, item: DemoImage) -> None:
    """One phantom as a JPEG Baseline DICOM in the Kaggle archive's folder layout."""
    from pneumo_cli.io.dicom_write import write_dicom

    path = out / item.relative_path
    _make_folder(path.parent)
    pixels = item.phantom.image
    if item.photometric == "MONOCHROME1":
        pixels = 255 - pixels
    write_dicom(
        path,
        pixels,
        photometric=item.photometric,
        jpeg=True,
        patient_id=item.patient_id,
        study_uid=item.study_uid,
        series_uid=item.series_uid,
        sop_uid=item.image_id,
        extra=item.header,
    )


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputError(
            f"{out} is not empty; choose an empty folder or pass --overwrite to replace "
            f"its {IMAGES_FOLDER}/ and {CSV_NAME}"
        )
    try:
        if (out / IMAGES_FOLDER).is_dir():
            shutil.rmtree(out / IMAGES_FOLDER)
        (out / CSV_NAME).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot clear {out} for --overwrite: {exc.strerror or exc}") from None


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None


def _choose(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """A boolean array of length ``n`` with exactly ``count`` True values at random places."""
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[:count]] = True
    return chosen


def _draw_patients(rng: np.random.Generator, n: int) -> list[_Patient]:
    """Assign the ``n`` images to patients with one to four images each, in random order."""
    patients: list[_Patient] = []
    while len(patients) < n:
        patient = _Patient(
            patient_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            anatomy=draw_anatomy(rng),
            sex="F" if rng.random() < 0.45 else "M",
            age=int(rng.integers(18, 86)),
        )
        patients.extend([patient] * int(rng.integers(1, 5)))
    order = rng.permutation(len(patients))[:n]
    return [patients[i] for i in order]


def _random_uid(rng: np.random.Generator) -> str:
    """A DICOM UID under the 2.25 root (an integer form of a UUID, PS3.5 B.2)."""
    return "2.25." + str(uuid.UUID(bytes=rng.bytes(16), version=4).int)


def _rle_rows(rng: np.random.Generator, mask: np.ndarray, split: bool) -> tuple[str, ...]:
    """EncodedPixels strings for ``mask``: one, or two overlapping parts whose union is it."""
    from pneumo_cli.io.rle import EMPTY, encode_rle

    if not mask.any():
        return (EMPTY,)
    if not split:
        return (encode_rle(mask),)
    rows = np.flatnonzero(mask.any(axis=1))
    cut = int(rows[0] + (rows[-1] - rows[0]) * rng.uniform(0.35, 0.65))
    overlap = max(1, mask.shape[0] // 64)
    upper, lower = mask.copy(), mask.copy()
    upper[cut + overlap :] = 0
    lower[: max(0, cut - overlap)] = 0
    if not upper.any() or not lower.any():
        return (encode_rle(mask),)
    return (encode_rle(upper), encode_rle(lower))
