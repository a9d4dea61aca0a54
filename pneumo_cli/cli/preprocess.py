"""`pneumo preprocess`: raw chest X-rays to a training cache with persisted splits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo_cli.cli.options import Json, Overwrite, Quiet, Workers, checked_by
from pneumo_cli.core.config import PreprocessConfig, check_image_size

_DEFAULTS = PreprocessConfig()


def preprocess_command(
    raw_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of X-rays, searched recursively: DICOM (.dcm, or no extension with a "
            "DICOM preamble), PNG or JPEG. The ImageId is the file name without its extension; "
            "for DICOMDIR/PACS files named like IM000000, and for a name another file has "
            "already, the SOPInstanceUID.",
            show_default=False,
        ),
    ],
    cache_dir: Annotated[
        Path,
        typer.Argument(help="Cache folder to create, finish or extend.", show_default=False),
    ],
    rle: Annotated[
        Path | None,
        typer.Option("--rle", help="Masks from a SIIM RLE CSV (e.g. train-rle.csv)."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks", help="Masks from a folder of images named <ImageId>.png (or .jpg)."
        ),
    ] = None,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size",
            callback=checked_by(check_image_size),
            help="Side of the cached images: a multiple of 32 (the network's rule).",
        ),
    ] = _DEFAULTS.image_size,
    no_crop: Annotated[
        bool, typer.Option("--no-crop", help="Keep the uniform dark border.")
    ] = False,
    crop_threshold: Annotated[
        int,
        typer.Option(
            "--crop-threshold",
            min=0,
            max=254,
            help="Grey level at or below which an edge row/column counts as border.",
        ),
    ] = _DEFAULTS.crop_threshold,
    clahe_clip: Annotated[
        float, typer.Option("--clahe-clip", min=0.01, help="CLAHE clip limit.")
    ] = _DEFAULTS.clahe_clip,
    clahe_grid: Annotated[
        int, typer.Option("--clahe-grid", min=1, max=64, help="CLAHE tiles per side.")
    ] = _DEFAULTS.clahe_grid,
    no_clahe: Annotated[bool, typer.Option("--no-clahe", help="No contrast correction.")] = False,
    downscale_first: Annotated[
        bool,
        typer.Option(
            "--downscale-first",
            help="Shrink each X-ray by a power of two (JPEG DICOMs decoded at 1/2, 1/4 or 1/8 "
            "scale) before the crop and apply CLAHE after the resize: about half the CPU per image "
            "in preprocess, predict and serve, different pixels than the default order. "
            "Runs trained on such a cache predict the same way.",
        ),
    ] = False,
    min_size: Annotated[
        int,
        typer.Option("--min-size", min=1, help="Reject images with a side shorter than this."),
    ] = _DEFAULTS.min_image_px,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0.0, max=0.99, help="Share of images in val.")
    ] = _DEFAULTS.val_fraction,
    test_fraction: Annotated[
        float,
        typer.Option("--test-fraction", min=0.0, max=0.99, help="Share of images in test."),
    ] = _DEFAULTS.test_fraction,
    folds: Annotated[
        int,
        typer.Option(
            "--folds", min=0, max=100, help="Also assign K cross-validation folds (0: none)."
        ),
    ] = _DEFAULTS.folds,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split assignment.")
    ] = _DEFAULTS.seed,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any file is rejected.")
    ] = False,
    keep_phi: Annotated[
        bool,
        typer.Option(
            "--keep-phi",
            help="Also write CACHE/phi.csv with each image's PatientID, PatientName, "
            "PatientBirthDate, InstitutionName and AccessionNumber. Without it no "
            "patient-identifying field is written anywhere (an old phi.csv is deleted).",
        ),
    ] = False,
    patient_key_secret: Annotated[
        Path | None,
        typer.Option(
            "--patient-key-secret",
            metavar="FILE",
            help="Secret that turns each PatientID into patient_key (an HMAC; the splits keep "
            "a patient's images together). Default: a per-installation secret created on first "
            "use in ~/.config/pneumo/patient-key.secret (or $PNEUMO_PATIENT_KEY_SECRET_FILE). "
            "The cache records only its identifier; re-runs into it need the same secret.",
            show_default=False,
        ),
    ] = None,
    workers: Workers = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Turn raw chest X-rays into a training cache with fixed train/val/test splits.

    Each image is cropped of its uniform dark border, contrast-corrected with CLAHE and resized
    to --image-size (area interpolation), then written to CACHE/images/<ImageId>.png; masks (from
    --rle or --masks, decoded at the image's own size) go to CACHE/masks/<ImageId>.png. Splits
    (default 0.8/0.1/0.1) are seeded, stratified by pneumothorax and kept per patient, and stored
    in CACHE/manifest.csv with the crop box, original size and non-identifying header fields.
    Files that cannot be used (unreadable, truncated, constant, too small, duplicate ImageId) are
    listed in CACHE/rejected.csv. Normalisation to the network's input range happens later, in
    the data pipeline.

    Re-running finishes an interrupted run and adds new images without moving old ones between
    splits; other settings are refused unless --overwrite.
    """
    from pneumo_cli.cli.console import progress_factory
    from pneumo_cli.cli.render import print_summary
    from pneumo_cli.core.config import PreprocessConfig
    from pneumo_cli.core.errors import ConfigError
    from pneumo_cli.data.preprocess import run_preprocess

    if rle is not None and masks is not None:
        raise typer.BadParameter("give masks with --rle or --masks, not both")
    try:
        settings = PreprocessConfig(
            image_size=image_size,
            crop_border=not no_crop,
            crop_threshold=crop_threshold,
            clahe=not no_clahe,
            clahe_clip=clahe_clip,
            clahe_grid=clahe_grid,
            downscale_first=downscale_first,
            min_image_px=min_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
        )
    except ConfigError as exc:
        # A combination of options that cannot work is a usage error (exit 2), like a bad value.
        raise typer.BadParameter(str(exc).removeprefix("preprocess settings: ")) from None
    summary = run_preprocess(
        raw_dir,
        cache_dir,
        settings,
        rle_csv=rle,
        masks_dir=masks,
        workers=workers,
        overwrite=overwrite,
        strict=strict,
        keep_phi=keep_phi,
        patient_key_secret=patient_key_secret,
        progress=progress_factory(quiet),
    )
    if not quiet:
        _notes(summary, raw_dir, cache_dir, labelled=bool(rle or masks))
    print_summary("pneumo preprocess", summary.to_dict() if json_out else _table(summary), json_out)


def _notes(summary: Any, raw_dir: Path, cache_dir: Path, labelled: bool) -> None:
    """Warnings and notes on stderr about files that were left out."""
    from pneumo_cli.cli.console import print_note, print_warning

    if summary.rejected:
        print_warning(
            f"{summary.rejected} file(s) rejected (first: {summary.rejected_examples[0][0]}: "
            f"{summary.rejected_examples[0][1]}); see {Path(cache_dir) / 'rejected.csv'}"
        )
    if summary.labels_without_image:
        shown = ", ".join(summary.labels_without_image[:3])
        print_note(
            f"{len(summary.labels_without_image)} labelled ImageId(s) have no image in "
            f"{raw_dir} (e.g. {shown}); they are ignored"
        )
    if labelled and summary.unlabelled:
        print_note(f"{summary.unlabelled} image(s) have no mask and are cached unlabelled")


def _table(summary: Any) -> dict[str, object]:
    """The summary as table rows (the JSON output has every field)."""
    values: dict[str, object] = {
        "cache": summary.cache_dir,
        "images": summary.images,
        "processed now": summary.processed,
        "already done": summary.reused,
        "rejected": summary.rejected,
        "positive": summary.positive,
        "negative": summary.negative,
        "unlabelled": summary.unlabelled,
        "labels without image": len(summary.labels_without_image),
        "train / val / test": " / ".join(str(n) for n in summary.splits.values()),
        "seconds": summary.seconds,
    }
    if summary.phi_csv:
        values["patient fields (--keep-phi)"] = summary.phi_csv
    if summary.folds:
        values["folds"] = ", ".join(f"{k}: {n}" for k, n in summary.folds.items())
    return values
