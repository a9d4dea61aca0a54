"""`pneumo train`: train the ResNet-U-Net on a preprocessed cache."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo_cli.cli.console import bars_enabled, print_note, stderr_console, stdout_console
from pneumo_cli.cli.options import Json, Quiet, checked_by, plain
from pneumo_cli.cli.render import print_json
from pneumo_cli.core.choices import Encoder, InputNorm, Loss, Precision, TopUse
from pneumo_cli.core.config import TrainConfig, check_image_size, parse_pos_fraction

_DEFAULTS = TrainConfig()

_TUNABLE = (
    "encoder", "encoder_weights", "image_size", "loss", "lr", "epochs", "batch_size",
    "steps_per_epoch", "patience", "reduce_lr_patience", "pos_fraction", "augment", "seed",
    "precision", "input_norm", "scale_lr", "fold", "keep_top", "top_use",
)  # fmt: skip


class RichReporter:
    """Training progress on stderr: a live bar per epoch on a terminal, else one line each."""

    def __init__(self, quiet: bool) -> None:
        self.live = bars_enabled(quiet)
        self.console = stderr_console()
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None

    def note(self, message: str) -> None:
        if not self.quiet:
            print_note(message)

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} dice {task.fields[dice]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=steps, epoch=epoch + 1, epochs=epochs, loss="-", dice="-"
        )

    def step_done(self, step: int, logs: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                loss=f"{logs.get('loss', float('nan')):.4f}",
                dice=f"{logs.get('dice', float('nan')):.3f}",
            )

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(
            f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  dice {row['dice']:.3f}  "
            f"val_loss {row['val_loss']:.4f}  val_dice {row['val_dice']:.3f}  "
            f"val_pos_dice {row['val_pos_dice']:.3f}  lr {row['lr']:.2g}  "
            f"{row['images_per_s']:.1f} img/s  {row['seconds']:.0f} s",
            highlight=False,
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def train_command(
    cache: Annotated[
        Path, typer.Option("--cache", help="Cache folder written by `pneumo preprocess`.")
    ] = Path("cache"),
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", help="Folder that holds the runs (train, train2...).")
    ] = Path("runs"),
    name: Annotated[
        str | None, typer.Option("--name", help="Run folder name (default: train, train2...).")
    ] = None,
    exist_ok: Annotated[
        bool, typer.Option("--exist-ok", help="Allow writing into an existing --name run.")
    ] = False,
    encoder: Annotated[
        Encoder | None,
        typer.Option("--encoder", help=f"Encoder backbone [default: {_DEFAULTS.encoder}]."),
    ] = None,
    encoder_weights: Annotated[
        str | None,
        typer.Option(
            "--encoder-weights",
            help="imagenet (Keras cache; downloaded if absent), none, or PATH of an .h5 file "
            f"with the encoder's layers [default: {_DEFAULTS.encoder_weights}].",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            callback=checked_by(check_image_size),
            help="Must match the cache [default: cache's].",
        ),
    ] = None,
    loss: Annotated[
        Loss | None, typer.Option("--loss", help=f"Training loss [default: {_DEFAULTS.loss}].")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help=f"Adam learning rate, > 0 [default: {_DEFAULTS.lr:g}]."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help=f"Epochs [default: {_DEFAULTS.epochs}].")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help=f"Images per step per device [default: {_DEFAULTS.batch_size}].",
        ),
    ] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            "--steps-per-epoch", min=1, help="Steps per epoch [default: one pass over train]."
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            min=0,
            help="Stop after this many epochs without a better val Dice; 0 = never "
            f"[default: {_DEFAULTS.patience}].",
        ),
    ] = None,
    reduce_lr_patience: Annotated[
        int | None,
        typer.Option(
            "--reduce-lr-patience",
            min=0,
            help="Halve the learning rate after this many flat epochs; 0 = off "
            f"[default: {_DEFAULTS.reduce_lr_patience}].",
        ),
    ] = None,
    pos_fraction: Annotated[
        str | None,
        typer.Option(
            "--pos-fraction",
            callback=checked_by(parse_pos_fraction),
            help="Share of positive images per epoch: 0.8, or 0.8:0.4 falling linearly "
            "[default: natural].",
        ),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Flip, shift/scale/rotate, border crop, brightness/contrast [default: on].",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            min=0,
            help=f"Seed for order, augmentation and initial weights [default: {_DEFAULTS.seed}].",
        ),
    ] = None,
    precision: Annotated[
        Precision | None,
        typer.Option(
            "--precision",
            help="fp32, bf16 (mixed bfloat16), fp16 (mixed float16 with loss scaling; GPU only) "
            "or auto: fp16 on NVIDIA GPUs, bf16 on CPUs with bfloat16 instructions, else fp32 "
            f"[default: {_DEFAULTS.precision}].",
        ),
    ] = None,
    input_norm: Annotated[
        InputNorm | None,
        typer.Option(
            "--input-norm",
            help="The ResNet encoders' input BatchNormalization: frozen (a fixed shift and "
            "scale, ImageNet's with pretrained weights; faster steps, see "
            f"benchmarks/bench_train.py) or trainable [default: {_DEFAULTS.input_norm}].",
        ),
    ] = None,
    scale_lr: Annotated[
        bool | None,
        typer.Option(
            "--scale-lr/--no-scale-lr",
            help="Multiply --lr by the number of replicas in sync (linear scaling rule) "
            "[default: off].",
        ),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            min=0,
            help="0 = CPU; N = MirroredStrategy on the first N GPUs (per machine with "
            "--multi-worker) [default: 1 GPU if visible, else CPU; all GPUs with "
            "--multi-worker].",
        ),
    ] = None,
    multi_worker: Annotated[
        bool,
        typer.Option(
            "--multi-worker",
            help="Train on the cluster in TF_CONFIG (MultiWorkerMirroredStrategy): start the "
            "same command on every machine; the chief writes the run.",
        ),
    ] = False,
    fold: Annotated[
        int | None,
        typer.Option(
            "--fold",
            min=0,
            help="Cross-validation fold K of a cache made with --folds N: train on the other "
            "folds' train and val images, validate on fold K's; test images are never used.",
        ),
    ] = None,
    keep_top: Annotated[
        int | None,
        typer.Option(
            "--keep-top",
            min=1,
            help="Keep the N best epochs (RUN/top); when the run ends, average their weights "
            "into averaged.keras (BatchNorm statistics recomputed on training images) and "
            "measure best, averaged and their ensemble on val (checkpoints.json) "
            f"[default: {_DEFAULTS.keep_top}: best.keras only].",
        ),
    ] = None,
    top_use: Annotated[
        TopUse | None,
        typer.Option(
            "--top-use",
            help="With --keep-top: what every later command uses: the averaged model (one "
            "network), the ensemble of the N checkpoints (N networks) or best.keras "
            f"[default: {_DEFAULTS.top_use}].",
        ),
    ] = None,
    cv: Annotated[
        bool,
        typer.Option(
            "--cv",
            help="Train every fold of the cache in turn into one folder (--name, default "
            "runs/cv: fold0, fold1, ...), usable wherever a run is accepted as the ensemble of "
            "its folds. The same command, or --resume on the folder, continues a killed sweep.",
        ),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue this unfinished run (its own settings) from its last epoch."
        ),
    ] = None,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Train the ResNet-U-Net on a preprocessed cache and write a run folder.

    Reads CACHE (default ./cache) and writes runs/train, runs/train2, ... (or --name) with
    config.json, best.keras, last.keras, history.csv, curves.png and summary.json, and points
    runs/latest at it. Validation Dice is the SIIM per-image Dice at threshold 0.5 (an empty
    prediction on an empty mask scores 1). Ctrl-C saves the state; --resume continues.

    The global batch is --batch-size x replicas (GPUs, or 1 per CPU machine) x machines.
    A run stopped before its first epoch ended starts again from epoch 1 with --resume.
    Exit codes: 0 done, 1 bad input or a lost worker (one line on stderr), 2 usage error
    (an impossible value, or settings given with --resume), 130 Ctrl-C.
    """
    options = dict(locals())
    given = {
        key: plain(value) for key, value in options.items() if key in _TUNABLE and value is not None
    }
    _check_usage(given, resume, name, exist_ok)
    _check_cv_usage(cv, given, exist_ok, multi_worker)
    from pneumo_cli.training import cv as sweeps
    from pneumo_cli.training.resume import resume_training
    from pneumo_cli.training.runs import resolve_run
    from pneumo_cli.training.train import train_model

    reporter = RichReporter(quiet)
    try:
        if resume is not None and sweeps.is_sweep(resolve_run(resume, runs_dir)):
            if multi_worker:
                raise typer.BadParameter(
                    "a sweep continues fold by fold on this machine; drop --multi-worker",
                    param_hint="'--resume'",
                )
            result = sweeps.resume_cross_validation(resolve_run(resume, runs_dir), reporter, gpus)
        elif cv:
            config = TrainConfig(cache=str(cache), gpus=gpus, **given)
            result = sweeps.train_cross_validation(config, runs_dir, name, reporter)
        elif resume is not None:
            result = resume_training(
                resume, runs_dir, reporter, gpus=gpus, multi_worker=multi_worker
            )
        else:
            config = TrainConfig(cache=str(cache), gpus=gpus, **given)
            result = train_model(
                config, runs_dir, name, exist_ok, reporter, multi_worker=multi_worker
            )
    finally:
        reporter.close()
    _render(result, json_output)


def _check_usage(
    given: dict[str, Any], resume: Path | None, name: str | None, exist_ok: bool
) -> None:
    """Refuse impossible values and option combinations as usage errors (exit 2).

    Raises:
        typer.BadParameter: a learning rate that is not a positive number, or settings given with
            --resume (it continues with the run's own settings).
    """
    lr = given.get("lr")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise typer.BadParameter(
            f"{lr} is not a positive, finite learning rate", param_hint="'--lr'"
        )
    if resume is None:
        return
    flags = ["--" + key.replace("_", "-") for key in sorted(given)]
    flags += [flag for flag, used in (("--name", name), ("--exist-ok", exist_ok)) if used]
    if flags:
        raise typer.BadParameter(
            f"it continues the run in its own folder with its own settings; drop "
            f"{', '.join(flags)} (or start a new run with them)",
            param_hint="'--resume'",
        )


def _check_cv_usage(cv: bool, given: dict[str, Any], exist_ok: bool, multi_worker: bool) -> None:
    """``--cv`` trains every fold on this machine into its own folder.

    Raises:
        typer.BadParameter: --cv with --fold, --exist-ok or --multi-worker.
    """
    if not cv:
        return
    flags = [flag for flag, used in (("--fold", "fold" in given), ("--exist-ok", exist_ok),
                                     ("--multi-worker", multi_worker)) if used]  # fmt: skip
    if flags:
        raise typer.BadParameter(
            f"it trains every fold in turn on this machine, continuing the sweep the folder "
            f"holds; drop {', '.join(flags)} (or train one fold with --fold K)",
            param_hint="'--cv'",
        )


def _render(result: Any, json_output: bool) -> None:
    values = dataclasses.asdict(result)
    console = stdout_console()
    if json_output:
        print_json(values)
        return
    from rich.table import Table

    if "folds" in values:
        _render_sweep(values)
        return

    table = Table(title="pneumo train", show_header=True)
    table.add_column("field")
    table.add_column("value")
    shown = {
        "run": values["run_dir"],
        "status": values["status"].replace("_", " "),
        "epochs done": str(values["epochs_done"]),
        "best epoch": str(values["best_epoch"] or "-"),
        "best val Dice (per image)": _number(values["best_val_dice"], 4),
        "training time": f"{values['seconds']:.0f} s",
        "images/s (train)": _number(values["images_per_s"], 1),
    }
    for key, value in shown.items():
        table.add_row(key, value)
    console.print(table)


def _render_sweep(values: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"pneumo train --cv: {values['run_dir']}", show_header=True)
    for column in ("fold", "run", "status", "epochs", "best epoch", "best val Dice"):
        table.add_column(column)
    for fold, row in enumerate(values["folds"]):
        status = row["status"].replace("_", " ")
        if fold in values["kept"]:
            status += " (earlier)"
        table.add_row(
            str(fold), row["run_dir"], status, str(row["epochs_done"]),
            str(row["best_epoch"] or "-"), _number(row["best_val_dice"], 4),
        )  # fmt: skip
    stdout_console().print(table)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
