"""`pneumo export`: a trained run as a verified SavedModel, TFLite or ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo_cli.cli.options import Json, Overwrite, Quiet, plain
from pneumo_cli.cli.render import print_summary
from pneumo_cli.core.choices import ExportFormat, Precision, Quantization


def export_command(
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="Deployable model format.", show_default=False),
    ],
    run: Annotated[
        list[Path] | None,
        typer.Option(
            "--run",
            help="Run folder written by `pneumo train` (default: runs/latest). Several times, "
            "or a `train --cv` folder, for one graph averaging the members' probabilities "
            "(same image size and encoder scaling).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Export folder (default: RUN/exports/<format>[-<quantize>])."
        ),
    ] = None,
    quantize: Annotated[
        Quantization | None,
        typer.Option(
            "--quantize",
            help="TFLite only: float16 (half-size weights) or int8 (calibrated on the run "
            "cache's training images).",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="Compute precision of the exported graph: auto (= fp32, which runs on every "
            "machine) or fp32 for every format; bf16 for --format savedmodel only (checked on "
            ">= 99.9% of mask pixels); fp16 and other combinations are usage errors.",
        ),
    ] = Precision.auto,
    overwrite: Overwrite = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Export a run's best.keras for deployment, verified against Keras before it is kept.

    Writes OUT/model.onnx, OUT/model.tflite or OUT/saved_model/, plus OUT/pneumo-model.json
    (input size and range, preprocessing settings, post-processing gate, versions, parity). The
    exported graph takes float32 grey pixels 0..255 shaped (batch, S, S, 1) as input 'image' (the
    encoder's input scaling is inside the graph) and returns 'probability' (batch, S, S, 1).
    The export is compared with the Keras model on the run cache's images (synthetic phantoms
    when the cache is gone): float32 exports must agree within 1e-3 per pixel and on >= 99.9% of
    mask pixels, float16 within 0.05 (mean 1e-3) and 99.9%, int8 within a mean of 0.02 and 99%.
    An export that fails exits 1 and leaves nothing behind. Use it with
    `pneumo predict --model OUT`. ONNX needs the extra: pip install 'pneumo-cli[onnx]'.
    """
    from pneumo_cli.cli.console import print_note
    from pneumo_cli.export.export import export_run

    summary = export_run(
        run,
        fmt.value,
        out,
        quantize=plain(quantize),
        precision=precision.value,
        overwrite=overwrite,
        notify=None if quiet else print_note,
    )
    print_summary("pneumo export", summary.to_dict(), as_json)
