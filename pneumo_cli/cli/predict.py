"""`pneumo predict`: masks, probabilities and a submission CSV for new X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo_cli.cli.options import (
    InferenceEngine,
    InferencePrecision,
    Json,
    Overwrite,
    Quiet,
    Workers,
    checked_by,
)
from pneumo_cli.cli.render import print_summary
from pneumo_cli.core.choices import Engine, Precision, Split, Tta


def _parse_shard(text: str) -> tuple[int, int]:
    from pneumo_cli.inference.shards import parse_shard

    return parse_shard(text)


RunOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--run",
        help="Run folder written by `pneumo train` (default: runs/latest). Give it several "
        "times, or a `train --cv` folder, for an ensemble: the members' probability maps are "
        "averaged before the gate.",
    ),
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Predict with a model written by `pneumo export` (its folder, or the model.onnx, "
        "model.tflite or saved_model in it) instead of a run; ONNX needs onnxruntime only.",
    ),
]
TtaOption = Annotated[
    Tta, typer.Option("--tta", help="Test-time augmentation: none, or hflip (mirror average).")
]
TopThreshold = Annotated[
    float | None,
    typer.Option(
        "--top-threshold", min=0.0, max=1.0, help="Gate: probability a pixel must exceed to count."
    ),
]
MinArea = Annotated[
    float | None,
    typer.Option(
        "--min-area",
        min=0.0,
        help="Gate: the image is empty unless this many original pixels exceed --top-threshold.",
    ),
]
BottomThreshold = Annotated[
    float | None,
    typer.Option(
        "--bottom-threshold", min=0.0, max=1.0, help="Gate: mask = pixels above this probability."
    ),
]
MinComponentArea = Annotated[
    float | None,
    typer.Option(
        "--min-component-area",
        min=0.0,
        help="Gate: remove connected regions smaller than this many original pixels.",
    ),
]


def predict_command(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="INPUT",
            help="DICOM, PNG or JPEG files, or folders searched recursively.",
            show_default=False,
        ),
    ] = None,
    run: RunOption = None,
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Predict cached images instead of files.")
    ] = None,
    split: Annotated[Split, typer.Option("--split", help="With --cache: the split.")] = Split.test,
    tta: TtaOption = Tta.none,
    precision: InferencePrecision = Precision.auto,
    engine: InferenceEngine = Engine.auto,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N",
            callback=checked_by(_parse_shard),
            help="Predict only part K of N (1 <= K <= N) of the inputs, chosen by a hash of "
            "each ImageId: N machines (a Slurm job array, a Kubernetes indexed Job) each run one "
            "part into its own folder; `pneumo merge-predictions PART... --out OUT` then gives "
            "the same files as one run over all inputs.",
        ),
    ] = None,
    top_threshold: TopThreshold = None,
    min_area: MinArea = None,
    bottom_threshold: BottomThreshold = None,
    min_component_area: MinComponentArea = None,
    save_probs: Annotated[
        bool, typer.Option("--save-probs", help="Also write probability maps (x255) as PNG.")
    ] = False,
    dicom_seg: Annotated[
        bool,
        typer.Option(
            "--dicom-seg",
            help="Also write OUT/dicom-seg/<ImageId>.dcm, a DICOM Segmentation of each DICOM "
            "input for a PACS or viewer: same study, one new AI series per job, segment "
            "'Pneumothorax' (SNOMED CT 36118008). A negative prediction writes a SEG with an "
            "empty segment, so the PACS shows that the AI ran and found nothing. PNG/JPEG "
            "inputs get none. A SEG carries the source's patient module (name, ID, birth date) "
            "so that it is filed with the patient.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 8,
    overwrite: Overwrite = False,
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Predict pneumothorax masks with a trained run, at each X-ray's original resolution.

    Applies the preprocessing recorded in the run, then the post-processing gate (the run's
    postprocess.json from `pneumo evaluate --tune`, else 0.5 / 0 / 0.5 / 0; each value can be
    overridden). With --model, an exported model is used instead, with the preprocessing and
    gate recorded in its pneumo-model.json. Writes OUT/masks/<ImageId>.png (0/255),
    OUT/predictions.csv (ImageId, has_pneumothorax, max_prob, area_px, EncodedPixels) and
    OUT/submission.csv (Kaggle format).
    Unreadable inputs are listed in OUT/rejected.csv; finished images are skipped on a re-run
    unless --overwrite.
    """

    from pneumo_cli.cli.console import print_notes, print_warning, progress_factory
    from pneumo_cli.inference.predict import predict_inputs

    if bool(inputs) == (cache is not None):
        raise typer.BadParameter(
            "give INPUT files/folders or --cache CACHE (exactly one of the two)"
        )
    if dicom_seg and cache is not None:
        raise typer.BadParameter(
            "--dicom-seg needs the DICOM files as INPUT: a cache keeps no DICOM headers"
        )
    summary = predict_inputs(
        inputs or [],
        run=run,
        model=model,
        out_dir=out,
        cache=cache,
        split=split.value,
        tta=tta.value,
        precision=precision.value,
        engine=engine.value,
        shard=_parse_shard(shard) if shard else None,
        gate_overrides={
            "top_threshold": top_threshold,
            "min_area_px": min_area,
            "bottom_threshold": bottom_threshold,
            "min_component_area_px": min_component_area,
        },
        save_probs=save_probs,
        dicom_seg=dicom_seg,
        overwrite=overwrite,
        batch_size=batch_size,
        workers=workers,
        progress=progress_factory(quiet),
    )
    print_notes(summary.notes, quiet)
    if summary.rejected:
        print_warning(f"{summary.rejected} input(s) rejected; reasons in {out / 'rejected.csv'}")
    if not quiet:
        _dicom_seg_notes(summary.outputs, out)
    print_summary("pneumo predict", summary.to_dict(), as_json)


def _dicom_seg_notes(counts: dict[str, int], out: Path) -> None:
    """Say on stderr which inputs got no DICOM SEG, and why."""
    from pneumo_cli.cli.console import print_note, print_warning

    if counts.get("dicom_seg_not_dicom"):
        print_note(f"{counts['dicom_seg_not_dicom']} input(s) are PNG/JPEG and got no DICOM SEG")
    if counts.get("dicom_seg_refused"):
        print_warning(
            f"{counts['dicom_seg_refused']} DICOM input(s) got no SEG (their headers cannot make "
            f"a valid one; masks and CSV rows are written); reasons in "
            f"{out / 'dicom-seg' / 'rejected.csv'}"
        )


def merge_predictions_command(
    parts: Annotated[
        list[Path],
        typer.Argument(
            metavar="PART...",
            help="The output folders of `pneumo predict --shard 1/N` ... `--shard N/N`.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New output folder.")] = Path(
        "predictions"
    ),
    as_json: Json = False,
) -> None:
    """Join the N parts of a sharded `pneumo predict` into one output folder.

    Every part must be a finished output of the same job (same model, gate, TTA, precision,
    preprocessing and pneumo version) and parts 1..N must all be there, each once. OUT then
    holds exactly the files one `pneumo predict` over all inputs writes, byte for byte:
    masks/, probs/ and records/ copied, predictions.csv, submission.csv and rejected.csv
    written from the records, job.json without the shard. OUT must be new or empty; it appears
    only when complete.
    """
    from pneumo_cli.inference.shards import merge_parts

    summary = merge_parts(parts, out)
    print_summary("pneumo merge-predictions", summary.to_dict(), as_json)
