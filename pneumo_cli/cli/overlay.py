"""`pneumo overlay`: masks drawn on the original X-rays, as pictures a doctor can read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo_cli.cli.options import Json, Overwrite, Quiet
from pneumo_cli.cli.render import print_json
from pneumo_cli.core.choices import PictureFormat


def overlay_command(
    images: Annotated[
        list[Path],
        typer.Argument(
            help="DICOM, PNG or JPEG X-rays, or folders of them (searched recursively). "
            "The ImageId is the file name without its extension.",
            show_default=False,
            metavar="IMAGE",
        ),
    ],
    masks: Annotated[
        Path,
        typer.Option(
            "--masks",
            "-m",
            help="Folder of predicted masks <ImageId>.png (0/255 or 0/1; e.g. OUT/masks from "
            "`pneumo predict`). Masks at a square model size are stretched over the whole image.",
            show_default=False,
        ),
    ],
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="Folder of ground-truth masks <ImageId>.png."),
    ] = None,
    rle: Annotated[
        Path | None,
        typer.Option("--rle", help="Ground truth as a SIIM RLE CSV (e.g. train-rle.csv)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("overlays"),
    fmt: Annotated[
        PictureFormat, typer.Option("--format", help="Picture format.")
    ] = PictureFormat.png,
    max_size: Annotated[
        int | None,
        typer.Option(
            "--max-size",
            min=16,
            help="Downscale each panel so its longest side is at most this many pixels.",
        ),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Draw predicted masks on the original X-rays: input | prediction [| ground truth].

    Writes OUT/<ImageId>.png (or .jpg) at the X-ray's own resolution (or --max-size): the mask
    as a translucent fill with a contour, prediction in vermillion and ground truth in bluish
    green (Okabe-Ito colours, safe for colour-blind readers); with --truth or --rle a third panel
    and the image's Dice in the title. Existing pictures are kept unless --overwrite. Inputs that
    cannot be used (unreadable, no mask, mask of the wrong size) are listed in OUT/rejected.csv
    and the rest are still drawn.
    """
    from pneumo_cli.cli.console import print_note, print_warning, progress_factory, stdout_console
    from pneumo_cli.overlay.run import run_overlay

    if truth is not None and rle is not None:
        raise typer.BadParameter("give ground truth with --truth or --rle, not both")
    summary = run_overlay(
        images,
        masks,
        out,
        truth_dir=truth,
        rle_csv=rle,
        fmt=fmt.value,
        max_size=max_size,
        overwrite=overwrite,
        progress=progress_factory(quiet),
    )
    if summary.rejected:
        print_warning(
            f"{len(summary.rejected)} input(s) rejected; reasons in {summary.rejected_csv}"
        )
    if (truth is not None or rle is not None) and summary.without_truth and not quiet:
        print_note(f"{summary.without_truth} image(s) had no ground truth; drawn with two panels")
    if json_out:
        print_json(summary.to_dict())
        return
    from rich.table import Table

    table = Table(title="pneumo overlay", show_header=False)
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("written", str(summary.written))
    table.add_row("skipped (already there)", str(summary.skipped))
    table.add_row("rejected", str(len(summary.rejected)))
    if summary.stretched_masks:
        table.add_row("model-size masks stretched", str(summary.stretched_masks))
    if summary.mean_dice is not None:
        table.add_row("mean Dice (written)", f"{summary.mean_dice:.4f}")
    table.add_row("output folder", summary.out_dir)
    stdout_console().print(table)
