"""`pneumo evaluate`: score predictions with the SIIM metric and write an evaluation folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo_cli.cli.options import InferenceEngine, InferencePrecision, Json, Quiet
from pneumo_cli.core.choices import Engine, Precision, Resolution, Split, Tta


def default_out_dir(predictions: Path) -> Path:
    """``eval-<predictions stem>/`` beside the predictions file (``.gz`` stripped too)."""
    name = predictions.name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return predictions.parent / f"eval-{name}"


def evaluate_command(
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Offline mode: a SIIM submission CSV (ImageId,EncodedPixels; an optional "
            "max_prob column gives the ROC AUC). Needs --truth; no TensorFlow.",
        ),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="Offline mode: the RLE truth CSV (e.g. train-rle.csv)."),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Score the ImageIds the two files share instead of failing when some are missing.",
        ),
    ] = False,
    height: Annotated[
        int, typer.Option("--height", min=1, help="Offline mode: image height of the RLE.")
    ] = 1024,
    width: Annotated[
        int, typer.Option("--width", min=1, help="Offline mode: image width of the RLE.")
    ] = 1024,
    run: Annotated[
        list[Path] | None,
        typer.Option(
            "--run",
            help="Model mode: the run folder to evaluate [default: runs/latest]; several times "
            "for an ensemble (needs --out), or a `train --cv` folder: scored out of fold "
            "without --split (each fold's model on its own fold), the ensemble with --split "
            "test.",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Model mode: cache folder [default: the run's cache]."),
    ] = None,
    split: Annotated[
        Split | None,
        typer.Option(
            "--split",
            help="Model mode: split to score [default: the run's val split; out of fold for a "
            "`train --cv` folder].",
        ),
    ] = None,
    tta: Annotated[
        Tta, typer.Option("--tta", help="Model mode: test-time augmentation.")
    ] = Tta.none,
    precision: InferencePrecision = Precision.auto,
    engine: InferenceEngine = Engine.auto,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Model mode, val only (out of fold for a `train --cv` folder): grid-search the "
            "post-processing gate and save the best as <run>/postprocess.json.",
        ),
    ] = False,
    at: Annotated[
        Resolution,
        typer.Option("--at", help="Model mode: score at the original or the model resolution."),
    ] = Resolution.original,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output folder [default: eval-<predictions name>/ beside the predictions file "
            "offline, <run>/eval-<split>/ in model mode]. Existing files are replaced.",
        ),
    ] = None,
    json_output: Json = False,
    quiet: Quiet = False,
) -> None:
    """Score predictions with the SIIM metric (mean Dice, empty vs empty = 1) and image-level
    metrics; write metrics.json, per_image.csv, roc.png, pr.png, dice_hist.png and report.html.

    Offline: pneumo evaluate --predictions submission.csv --truth train-rle.csv
    """
    offline = predictions is not None or truth is not None
    if offline:
        model_options = {
            "--run": bool(run),
            "--cache": cache is not None,
            "--split": split is not None,
            "--tta": tta is not Tta.none,
            "--precision": precision is not Precision.auto,
            "--engine": engine is not Engine.auto,
            "--tune": tune,
            "--at": at is not Resolution.original,
        }
        used = [name for name, given in model_options.items() if given]
        if used:
            raise typer.BadParameter(
                f"{', '.join(used)} belong(s) to model mode; offline scoring takes "
                "--predictions and --truth only"
            )
        if predictions is None or truth is None:
            missing = "--truth" if truth is None else "--predictions"
            raise typer.BadParameter(
                f"offline scoring needs both --predictions and --truth ({missing} missing)"
            )
        _evaluate_offline(predictions, truth, allow_missing, height, width, out, json_output, quiet)
    else:
        _evaluate_model(
            run, cache, split, tta, (precision, engine), tune, at, out, json_output, quiet
        )


def _evaluate_offline(
    predictions: Path,
    truth: Path,
    allow_missing: bool,
    height: int,
    width: int,
    out: Path | None,
    json_output: bool,
    quiet: bool,
) -> None:
    from pneumo_cli.cli.console import print_note, print_warning
    from pneumo_cli.evaluation.scoring import score_submission, write_evaluation

    evaluation = score_submission(predictions, truth, allow_missing, height, width)
    missing = evaluation.metrics["missing"]
    if missing["not_in_predictions"] or missing["not_in_truth"]:
        print_warning(
            f"scored {evaluation.metrics['n_images']} images in common; "
            f"{missing['not_in_predictions']} truth ImageIds have no prediction and "
            f"{missing['not_in_truth']} predicted ImageIds have no truth"
        )
    out_dir = out if out is not None else default_out_dir(predictions)
    written = write_evaluation(evaluation, out_dir)
    _render(evaluation.metrics, json_output)
    if not quiet:
        print_note(f"wrote {len(written)} files to {out_dir}/ (open {written['report.html']})")


def _evaluate_model(
    run: list[Path] | None,
    cache: Path | None,
    split: Split | None,
    tta: Tta,
    precision: tuple[Precision, Engine],
    tune: bool,
    at: Resolution,
    out: Path | None,
    json_output: bool,
    quiet: bool,
) -> None:
    from pneumo_cli.cli.console import print_note, print_notes, progress_factory
    from pneumo_cli.evaluation.model_eval import evaluate_run

    result = evaluate_run(
        run,
        cache=cache,
        split=split.value if split is not None else None,
        tta=tta.value,
        precision=precision[0].value,
        engine=precision[1].value,
        tune=tune,
        at=at.value,
        out_dir=out,
        progress=progress_factory(quiet),
    )
    print_notes(result.notes, quiet)
    if result.tuned and not json_output:
        _render_tuning(result.tuned)
    _render(result.evaluation.metrics, json_output)
    if not json_output and result.evaluation.metrics.get("members"):
        _render_members(result.evaluation.metrics)
    if not quiet:
        if result.tuned:
            print_note(f"saved the best gate as {result.run_dir / 'postprocess.json'}")
        print_note(
            f"wrote the evaluation to {result.out_dir}/ (open {result.written['report.html']})"
        )


def _render_members(metrics: dict[str, Any]) -> None:
    from rich.table import Table

    from pneumo_cli.cli.console import stdout_console

    title = f"members and ensemble ({metrics['split']})"
    if metrics["mode"] == "out-of-fold":
        title = "out of fold: each fold's model on its own fold"
    table = Table(title=title)
    for column in ("model", "images", "mean Dice", "Dice, positives", "mean IoU"):
        table.add_column(column, justify="right")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for row in metrics["members"]:
        table.add_row(row["run"], str(row["images"]), number(row["mean_dice"]),
                      number(row["positive_mean_dice"]), number(row["mean_iou"]))  # fmt: skip
    whole = "all folds" if metrics["mode"] == "out-of-fold" else "ensemble"
    table.add_row(whole, str(metrics["n_images"]), number(metrics["mean_dice"]),
                  number(metrics["positive_mean_dice"]), number(metrics["mean_iou"]),
                  style="bold")  # fmt: skip
    stdout_console().print(table)


def _render_tuning(tuned: list[Any]) -> None:
    from rich.table import Table

    from pneumo_cli.cli.console import stdout_console

    table = Table(title="best post-processing gates (val)")
    for column in ("top thr", "min area px", "bottom thr", "min comp px", "mean Dice"):
        table.add_column(column, justify="right")
    for score in tuned[:5]:
        gate = score.gate
        table.add_row(
            f"{gate.top_threshold:g}",
            f"{gate.min_area_px:g}",
            f"{gate.bottom_threshold:g}",
            f"{gate.min_component_area_px:g}",
            f"{score.mean_dice:.4f}",
        )
    stdout_console().print(table)


def _render(metrics: dict[str, Any], json_output: bool) -> None:
    from rich.table import Table

    from pneumo_cli.cli.console import stdout_console
    from pneumo_cli.cli.render import print_json

    if json_output:
        print_json(metrics)
        return
    table = Table(title="pneumo evaluate", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def number(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    table.add_row("Mean Dice (SIIM)", number("mean_dice"))
    table.add_row("Mean IoU (SIIM)", number("mean_iou"))
    table.add_row("Dice, positives only", number("positive_mean_dice"))
    table.add_row("IoU, positives only", number("positive_mean_iou"))
    table.add_row("Sensitivity", number("sensitivity"))
    table.add_row("Specificity", number("specificity"))
    table.add_row("Precision", number("precision"))
    table.add_row("Accuracy", number("accuracy"))
    table.add_row("ROC AUC", number("roc_auc"))
    cm = metrics["confusion_matrix"]
    table.add_row("TP / FP / FN / TN", f"{cm['tp']} / {cm['fp']} / {cm['fn']} / {cm['tn']}")
    table.add_row(
        "Images (pos / neg)",
        f"{metrics['n_images']} ({metrics['n_positive']} / {metrics['n_negative']})",
    )
    stdout_console().print(table)
