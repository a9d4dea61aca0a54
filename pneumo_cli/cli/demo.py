"""`pneumo demo-data`: a synthetic dataset in the SIIM layout, for the demo and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo_cli.cli.options import Json, Overwrite, Quiet
from pneumo_cli.cli.render import print_summary


def demo_data_command(
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT_DIR", help="Folder to write the dataset into.")
    ],
    n: Annotated[
        int, typer.Option("--n", min=1, max=100_000, help="Number of valid X-rays to write.")
    ] = 300,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed; the same seed gives the same bytes.")
    ] = 0,
    size: Annotated[
        int, typer.Option("--size", min=128, max=2048, help="Image side in pixels (square).")
    ] = 512,
    overwrite: Overwrite = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Write synthetic chest X-rays with pneumothorax masks, laid out like the SIIM data.

    OUT_DIR/dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm are 8-bit JPEG
    DICOMs (a few MONOCHROME1); OUT_DIR/train-rle.csv holds the masks in the stage-1 format
    ('ImageId, EncodedPixels', -1 for no pneumothorax, two rows for some images). About 22% of
    the images show a pneumothorax. Four extra .dcm files are corrupt on purpose so that
    `pneumo preprocess` has something to reject. Phantoms, not patients: never use them to judge
    a model for clinical data. OUT_DIR must be empty unless --overwrite.
    """
    from pneumo_cli.cli.console import progress_factory
    from pneumo_cli.data.demo import write_demo_dataset

    summary = write_demo_dataset(
        out_dir, n=n, seed=seed, size=size, overwrite=overwrite, progress=progress_factory(quiet)
    )
    values = summary.to_dict()
    if not as_json:
        # The corrupt files' UID paths are long; the JSON output lists them.
        values.pop("corrupted_files")
    print_summary("demo-data", values, as_json)
