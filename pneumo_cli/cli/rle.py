"""`pneumo rle-decode` and `pneumo rle-encode`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo_cli.cli.options import Json, Overwrite, Quiet, Workers
from pneumo_cli.cli.render import print_summary


def rle_decode_command(
    csv_path: Annotated[
        Path, typer.Argument(metavar="CSV", help="RLE CSV (train-rle.csv, optionally gzipped).")
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder for the mask PNGs.")],
    width: Annotated[int, typer.Option(min=1, help="Mask width in pixels.")] = 1024,
    height: Annotated[int, typer.Option(min=1, help="Mask height in pixels.")] = 1024,
    skip_invalid: Annotated[
        bool,
        typer.Option("--skip-invalid", help="Skip bad rows and list them in OUT_DIR/rejected.csv."),
    ] = False,
    overwrite: Overwrite = False,
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Decode a SIIM RLE CSV into one mask PNG per ImageId (0/255, union of all its rows).

    Accepts the real-world variants of train-rle.csv: 'ImageId, EncodedPixels' or 'fname,mask'
    headers or none, UTF-8 BOM, CRLF, leading spaces, gzip. Existing PNGs are kept unless
    --overwrite, so an interrupted run is resumed by running it again.
    """
    from pneumo_cli.cli.console import progress_factory
    from pneumo_cli.io.rle_files import decode_csv

    summary = decode_csv(
        csv_path,
        out_dir,
        height=height,
        width=width,
        overwrite=overwrite,
        skip_invalid=skip_invalid,
        workers=workers,
        progress=progress_factory(quiet),
    )
    print_summary("rle-decode", summary.to_dict(), as_json)


def rle_encode_command(
    mask_dir: Annotated[
        Path, typer.Argument(metavar="MASK_DIR", help="Folder of mask images (<ImageId>.png).")
    ],
    out_csv: Annotated[Path, typer.Argument(metavar="OUT_CSV", help="CSV file to write.")],
    threshold: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=254,
            show_default=False,
            help="Foreground is grey value > THRESHOLD in every mask. Default: as `preprocess "
            "--masks` reads masks, > 0 in PNG/BMP/TIFF and > 127 in lossy JPEG masks.",
        ),
    ] = None,
    overwrite: Overwrite = False,
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Encode a folder of mask images into a SIIM RLE CSV (Kaggle submission format).

    Reads PNG, JPEG, BMP and TIFF masks as `preprocess --masks` does: ImageId is the file name
    without its suffix; any non-zero pixel is foreground (above 127 in JPEG masks, whose
    compression smears the edges); empty masks are written as -1.
    """
    from pneumo_cli.cli.console import progress_factory
    from pneumo_cli.io.rle_files import encode_folder

    summary = encode_folder(
        mask_dir,
        out_csv,
        threshold=threshold,
        overwrite=overwrite,
        workers=workers,
        progress=progress_factory(quiet),
    )
    print_summary("rle-encode", summary.to_dict(), as_json)
