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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import InputError
from pneumo_cli.core.files import (
    atomic_write_text,
    ensure_output_dir,
)
from pneumo_cli.core.locks import folder_lock
from pneumo_cli.core.patient_key import PatientKeySecret, load_secret
from pneumo_cli.core.progress import ProgressFactory, stage
from pneumo_cli.core.workers import worker_pool
from pneumo_cli.data.cache import PHI_FILE, TRUTH_FILE
from pneumo_cli.data.cache_write import (
    build_manifest,
    check_existing_cache,
    count_outcomes,
    previous_sources,
    refuse_cache_inside_inputs,
    rejected_csv,
    remove_file,
    start_cache,
    sweep_temporaries,
    truth_csv,
    write_settings,
)
from pneumo_cli.data.inputs import phi_csv, process_images, read_phi_rows, scan_raw_dir
from pneumo_cli.data.labels import read_labels


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
    patient_key_secret: str | os.PathLike[str] | None = None,
    progress: ProgressFactory | None = None,
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
        patient_key_secret: file holding the secret that turns PatientIDs into
            ``patient_key`` values (HMAC); default: the per-installation secret, created on
            first use (see :mod:`pneumo_cli.core.patient_key`). The cache records only its
            identifier, and a later run into it must use the same secret.
        progress: called with the number of images finished since the last call.

    Raises:
        InputError: RAW_DIR missing or without images, a label that does not fit its image,
            rejections under ``strict``.
        ConfigError: the cache was made with other settings, or another patient-key secret,
            and ``overwrite`` is False.
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
    refuse_cache_inside_inputs(cache, raw, masks_dir)
    labels = read_labels(rle_csv, masks_dir)
    secret = load_secret(patient_key_secret)
    created = not cache.exists()
    ensure_output_dir(cache)
    try:
        with folder_lock(cache, "preprocess"):
            return _build_cache(
                raw, cache, settings, labels, secret, workers=workers, overwrite=overwrite,
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
    secret: PatientKeySecret,
    *,
    workers: int,
    overwrite: bool,
    strict: bool,
    keep_phi: bool,
    progress: ProgressFactory | None,
    started: float,
) -> PreprocessSummary:
    """The body of :func:`run_preprocess`, run while holding the cache's lock."""
    # Everything that can refuse the run happens before the first write.
    previous = None
    if not overwrite:
        previous = check_existing_cache(cache, settings, labels.fingerprint(), secret)
    try:
        with worker_pool(workers) as pool_map:
            candidates, rejected = scan_raw_dir(raw, pool_map, previous_sources(previous))
            label_of, unmatched = labels.match(candidates)
            start_cache(cache, settings, labels.fingerprint(), secret, overwrite)
            with stage(progress, "preprocess", len(candidates) + len(rejected)) as advance:
                advance(len(rejected))
                records, newly_rejected, processed = process_images(
                    candidates, label_of, cache, settings, secret, pool_map, advance
                )
            phi_rows = read_phi_rows(raw, records, pool_map) if keep_phi else None
    except BaseException:
        # The pool is stopped (its workers terminated and joined) by now. A worker stopped in
        # the middle of a write leaves its temporary file; we hold the lock, so every
        # temporary in our folders is ours to delete.
        sweep_temporaries(cache)
        raise
    rejected = sorted(rejected + newly_rejected)
    atomic_write_text(cache / "rejected.csv", rejected_csv(rejected))
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
    manifest = build_manifest(records, settings, previous)
    counts = count_outcomes(manifest, rejected, unmatched)
    atomic_write_text(cache / TRUTH_FILE, truth_csv(records))
    phi_path = cache / PHI_FILE
    if phi_rows is not None:
        atomic_write_text(phi_path, phi_csv(phi_rows), fsync=True)
    else:
        remove_file(phi_path)
    write_settings(cache, settings, labels.fingerprint(), secret, counts, complete=True)
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
