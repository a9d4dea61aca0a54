"""Training the U-Net on a cache: `pneumo train` as a library function.

:func:`train` starts a run and :func:`resume_training` continues one; both end in :func:`_fit`,
which runs Keras ``fit`` under the strategy :mod:`pneumo_cli.distribute` chose and records every
epoch in the run folder (history, last/best model, optimizer checkpoint, curves, summary).
Validation reports the SIIM per-image Dice (:mod:`pneumo_cli.losses`), which also drives model
selection, early stopping and the optional learning-rate reduction.

In a multi-worker run every process executes the same steps - saving included, because reading
the synchronised batch-norm statistics is itself a collective operation - but only the chief
writes into the run folder; the other workers write into a temporary folder that is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pneumo_cli import __version__, data, losses, model, runs
from pneumo_cli.config import from_dict, to_dict
from pneumo_cli.distribute import (
    COLLECTIVE_TIMEOUT_S,
    HEARTBEAT_TIMEOUT_S,
    Placement,
    choose_precision,
    make_multi_worker_strategy,
    make_strategy,
)
from pneumo_cli.errors import ConfigError
from pneumo_cli.files import TEMP_PREFIX, atomic_write_json, remove_stale_temporaries

STATE_FILE = "state.json"
STATE_DIR = "state"
FINISHED = ("completed", "early_stopped")


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting with its default (the paper's where it has one)."""

    cache: str = "cache"
    encoder: str = model.DEFAULT_ENCODER
    encoder_weights: str = "imagenet"
    image_size: int | None = None  # None: the cache's image size
    loss: str = "bce"
    lr: float = 1e-4
    epochs: int = 50
    batch_size: int = 16  # per replica
    steps_per_epoch: int | None = None  # None: one pass over the training images
    patience: int = 10  # epochs without a better val Dice before stopping; 0 = never
    reduce_lr_patience: int = 0  # epochs without improvement before halving lr; 0 = off
    reduce_lr_factor: float = 0.5
    min_lr: float = 1e-6
    seed: int = 0
    augment: bool = True
    pos_fraction: str | None = None  # "0.8" or "0.8:0.4"; None: natural frequency
    precision: str = "auto"  # fp32, bf16, fp16 or auto (config.json records the resolved one)
    input_norm: str = "frozen"  # the encoder's input BatchNormalization: frozen or trainable
    scale_lr: bool = False  # lr x replicas in sync (the linear scaling rule)
    gpus: int | None = None  # None: first GPU if one is visible, else CPU
    train_split: str = "train"
    val_split: str = "val"


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) training call reports."""

    run_dir: str
    status: str
    epochs_done: int
    best_epoch: int | None
    best_val_dice: float | None
    seconds: float
    images_per_s: float | None
    weights_sha256: str | None = None  # of the final network; equal on every worker


class TrainReporter(Protocol):
    """Receives progress; the command layer renders it (library code never prints)."""

    def note(self, message: str) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step_done(self, step: int, logs: dict[str, float]) -> None: ...

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None: ...


class SilentReporter:
    """A reporter that ignores everything."""

    def note(self, message: str) -> None:
        pass

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step_done(self, step: int, logs: dict[str, float]) -> None:
        pass

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None:
        pass


def config_from_run(saved: dict[str, Any], source: str = "config.json") -> TrainConfig:
    """The :class:`TrainConfig` recorded in a run's config.json."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in names}
    values.setdefault("input_norm", "trainable")  # runs from before --input-norm existed
    return from_dict(TrainConfig, values, source)


def _check_settings(config: TrainConfig) -> None:
    model.check_encoder(config.encoder)
    losses.get_loss(config.loss)
    data.parse_pos_fraction(config.pos_fraction)
    model.check_input_norm(config.input_norm)
    if config.precision not in (*model.PRECISIONS, "auto"):
        raise ConfigError(
            f"--precision {config.precision}: choose one of {', '.join(model.PRECISIONS)}, auto"
        )
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ConfigError("--steps-per-epoch must be at least 1")
    if not config.lr > 0:
        raise ConfigError(f"--lr {config.lr} must be positive")
    for name in ("patience", "reduce_lr_patience", "seed"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 0")


def _load_data(config: TrainConfig) -> tuple[data.CacheInfo, list, list]:
    cache = data.read_cache(config.cache)
    if config.image_size is not None and config.image_size != cache.image_size:
        raise ConfigError(
            f"cache {cache.folder} holds {cache.image_size} px images but --image-size is "
            f"{config.image_size}; drop --image-size or preprocess again at that size"
        )
    train_records = data.select_split(cache, config.train_split, need_positive=True)
    val_records = data.select_split(cache, config.val_split)
    return cache, train_records, val_records


def effective_lr(config: TrainConfig, replicas: int) -> float:
    """The learning rate Adam starts with: ``lr``, times the replicas with ``scale_lr``."""
    return config.lr * replicas if config.scale_lr else config.lr


def _compile(net: Any, config: TrainConfig, replicas: int) -> Any:
    tf = model.import_tf()
    from pneumo_cli.fastpaths import FusedAdam

    optimizer = FusedAdam(learning_rate=effective_lr(config, replicas))
    if config.precision == "fp16":
        # float16 gradients underflow without it; bfloat16 has float32's range and needs none.
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    net.compile(
        optimizer=optimizer,
        loss=losses.get_loss(config.loss),
        metrics=[losses.make_dice_metric(), losses.make_dice_metric(positives_only=True)],
    )
    optimizer.build(net.trainable_variables)
    return optimizer


def train(
    config: TrainConfig,
    runs_dir: str | Path = runs.DEFAULT_RUNS_DIR,
    name: str | None = None,
    exist_ok: bool = False,
    reporter: TrainReporter | None = None,
    cpu_replicas: int = 1,
    multi_worker: bool = False,
) -> TrainResult:
    """Train a new run on ``config.cache`` and write it under ``runs_dir``.

    Args:
        multi_worker: join the cluster in ``TF_CONFIG`` (MultiWorkerMirroredStrategy); the chief
            writes the run, the other workers a temporary folder removed at the end.

    Returns:
        The run's :class:`TrainResult`.

    Raises:
        InputError: missing/malformed cache, missing split, no positive training image.
        ConfigError: bad setting, image size mismatch, unknown encoder, weights that do not fit
            or cannot be obtained, too many GPUs, fp16 without a GPU, bad ``TF_CONFIG``, a
            worker lost during training.
        OutputError: run name taken (without ``exist_ok``), unwritable runs folder.
        KeyboardInterrupt: after saving last.keras and the state (status "interrupted").
    """
    reporter = reporter or SilentReporter()
    # TensorFlow must create the multi-worker strategy before it runs anything else.
    placement = make_multi_worker_strategy(config.gpus) if multi_worker else None
    _check_settings(config)
    cache, train_records, val_records = _load_data(config)
    config = dataclasses.replace(config, cache=str(cache.folder), image_size=cache.image_size)
    if placement is None or placement.is_chief:
        runs.check_run_name(runs_dir, name, exist_ok)  # before the slow model build
    if placement is None:
        placement = Placement(*make_strategy(config.gpus, cpu_replicas))
    precision, reason = _resolve_precision(config.precision, placement)
    config = dataclasses.replace(config, precision=precision)
    strategy, replicas = placement.strategy, placement.replicas
    scaling = model.input_scaling_for(config.encoder)
    model.import_tf().keras.utils.set_random_seed(config.seed)  # initial decoder weights
    with strategy.scope():
        net = model.build_model(
            config.encoder,
            cache.image_size,
            config.encoder_weights,
            config.precision,
            notify=reporter.note,
            input_norm=config.input_norm,
        )
        optimizer = _compile(net, config, replicas)
    with _output_dir(placement, runs_dir, name, exist_ok, reporter) as run_dir:
        saved = {
            **to_dict(config),
            "precision_reason": reason,
            "effective_lr": effective_lr(config, replicas),
            "input_scaling": scaling,
            "keras_engine": model.keras_engine(),
            "cache_manifest_sha256": cache.manifest_sha256,
            "preprocess": cache.settings,
            "replicas": replicas,
            "workers": placement.workers,
            "global_batch_size": config.batch_size * replicas,
            "strategy": placement.description,
            "train_images": len(train_records),
            "val_images": len(val_records),
            "versions": model.package_versions(),
            "pneumo_version": __version__,
        }
        atomic_write_json(run_dir / runs.CONFIG_FILE, saved)
        _remove_stale_results(run_dir)
        if placement.is_chief:
            _remove_leftovers(run_dir, None)  # of a killed run this one writes over
            runs.mark_latest(run_dir)
        reporter.note(
            f"training {config.encoder} U-Net in {precision} ({reason}) on "
            f"{placement.description}; writing {run_dir}"
        )
        state = _first_state()
        return _fit(run_dir, config, scaling, placement, net, optimizer, state, [], reporter)


def _resolve_precision(requested: str, placement: Placement) -> tuple[str, str]:
    tf = model.import_tf()
    names = []
    if placement.gpus:
        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            names.append(str(details.get("device_name", device.name)))
    return choose_precision(requested, placement.gpus, names)


@contextlib.contextmanager
def _output_dir(
    placement: Placement,
    runs_dir: str | Path,
    name: str | None,
    exist_ok: bool,
    reporter: TrainReporter,
    existing: Path | None = None,
) -> Iterator[Path]:
    """The folder this process writes the run into: the run itself on the chief (``existing``
    when resuming), a temporary folder on any other worker, removed afterwards."""
    if placement.is_chief:
        yield existing if existing is not None else runs.create_run_dir(runs_dir, name, exist_ok)
        return
    role = placement.role
    scratch = Path(tempfile.mkdtemp(prefix=f"pneumo-{role.task_type}{role.task_index}-"))
    reporter.note(
        f"{role.task_type} {role.task_index} of {role.workers}: the chief writes the run; "
        f"this worker writes into {scratch} (removed at the end)"
    )
    try:
        if existing is not None:
            shutil.copy2(existing / runs.CONFIG_FILE, scratch / runs.CONFIG_FILE)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def resume_training(
    run: str | Path | None,
    runs_dir: str | Path = runs.DEFAULT_RUNS_DIR,
    reporter: TrainReporter | None = None,
    gpus: int | None = None,
    cpu_replicas: int = 1,
    multi_worker: bool = False,
) -> TrainResult:
    """Continue an unfinished run from its last epoch: weights, optimizer state, epoch count.

    A run stopped before its first epoch ended (no ``state.json`` yet) starts again from epoch
    0 with its recorded settings, as ``pneumo train`` started it. Temporary files and partial
    checkpoints a killed run left are removed first.

    Args:
        run: the run folder (None = the latest run under ``runs_dir``).
        gpus: override the run's device choice (the global batch then changes with it).
        multi_worker: continue on the ``TF_CONFIG`` cluster (the run folder must be on a
            filesystem every worker sees); without it the run continues on this machine.

    Raises:
        ConfigError: not a run, a config.json or state.json that is incomplete or has values
            of the wrong type, a finished run, or a cache whose manifest changed since the run
            started.
    """
    reporter = reporter or SilentReporter()
    placement = make_multi_worker_strategy(gpus) if multi_worker else None
    run_dir = runs.resolve_run(run, runs_dir)
    saved = runs.load_run_config(run_dir)
    config = _config_to_resume(saved, run_dir / runs.CONFIG_FILE)
    # No state.json: the run was stopped before its first epoch ended. Its config.json holds
    # every setting, so it starts again from epoch 0 exactly as `pneumo train` started it.
    state = _read_state(run_dir) if (run_dir / STATE_FILE).exists() else None
    if state is not None and state["status"] in FINISHED:
        raise ConfigError(
            f"{run_dir} has finished already ({state['status'].replace('_', ' ')} after "
            f"{state['epoch']} epoch(s)); start a new run instead of --resume"
        )
    if gpus is not None:
        config = dataclasses.replace(config, gpus=gpus)
    cache, _, _ = _load_data(config)
    if cache.manifest_sha256 != saved.get("cache_manifest_sha256"):
        raise ConfigError(
            f"{cache.folder / 'manifest.csv'} changed since {run_dir} started; resuming would "
            "train on other data: start a new run"
        )
    if placement is None:
        placement = Placement(*make_strategy(config.gpus, cpu_replicas))
    if config.precision == "fp16" and not placement.gpus:
        raise ConfigError(
            f"{run_dir} trained in fp16, which needs a GPU, and this machine trains on the CPU"
        )
    if placement.is_chief:
        _remove_leftovers(run_dir, state["checkpoint"] if state else None)
    tf = model.import_tf()
    if state is None:
        tf.keras.utils.set_random_seed(config.seed)  # initial decoder weights, as train did
    with placement.strategy.scope():
        weights = config.encoder_weights if state is None else "none"  # else: checkpoint's
        net = model.build_model(
            config.encoder,
            cache.image_size,
            weights,
            config.precision,
            notify=reporter.note,
            input_norm=config.input_norm,
        )
        optimizer = _compile(net, config, placement.replicas)
        if state is not None:
            checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer)
            checkpoint.read(str(run_dir / state["checkpoint"])).assert_existing_objects_matched()
    if state is None:
        state, history = _first_state(), []
        if placement.is_chief:
            _remove_stale_results(run_dir)
        reporter.note(
            f"{run_dir} stopped before its first epoch ended; starting it again from epoch 1 "
            f"on {placement.description}"
        )
    else:
        history = [row for row in runs.read_history(run_dir) if row["epoch"] <= state["epoch"]]
        reporter.note(
            f"resuming {run_dir} at epoch {state['epoch'] + 1} on {placement.description}"
        )
    scaling = saved["input_scaling"]
    with _output_dir(placement, runs_dir, None, True, reporter, existing=run_dir) as out_dir:
        if placement.is_chief:
            runs.mark_latest(run_dir)
        return _fit(out_dir, config, scaling, placement, net, optimizer, state, history, reporter)


def _config_to_resume(saved: dict[str, Any], path: Path) -> TrainConfig:
    """The settings of a run to resume, checked as `pneumo train` checked them.

    Raises:
        ConfigError: naming ``path``: a setting --resume needs is missing (a default would
            silently replace it), or has the wrong type or an impossible value.
    """
    needed = [f.name for f in dataclasses.fields(TrainConfig)]
    needed += ["input_scaling", "cache_manifest_sha256"]
    missing = [key for key in needed if key not in saved]
    if missing:
        raise ConfigError(
            f"{path} lacks {', '.join(missing)}: it was not written by `pneumo train` of this "
            "version; start a new run"
        )
    config = config_from_run(saved, str(path))
    try:
        _check_settings(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _first_state() -> dict[str, Any]:
    """The training state of a run before its first epoch."""
    return {
        "epoch": 0,
        "best_epoch": None,
        "best_val_dice": None,
        "since_best": 0,
        "plateau_wait": 0,
        "seconds": 0.0,
    }


def _remove_stale_results(run_dir: Path) -> None:
    """Delete what an earlier start of the run wrote that a fresh start must not inherit."""
    for stale in (STATE_FILE, runs.HISTORY_FILE, "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / stale).unlink()


# What a checkpoint write leaves in state/: PREFIX.index, PREFIX.data-00000-of-00001, and,
# while TensorFlow writes, a PREFIX_temp/ folder that a kill leaves behind.
_CHECKPOINT_ENTRY = re.compile(r"^epoch-\d{4}[._]")
_LATEST_TEMPORARY = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-{runs.LATEST}$")


def _remove_leftovers(run_dir: Path, keep: str | None) -> None:
    """Delete what a killed run left: pneumo's temporary files in the run folder, the
    ``latest`` pointer temporaries of dead processes in the runs folder, and every checkpoint
    file or folder under ``state/`` other than those of the checkpoint ``keep`` (a prefix such
    as ``state/epoch-0002``; None keeps none). Only pneumo's and TensorFlow's own name
    patterns are touched."""
    remove_stale_temporaries(run_dir)
    for pointer in run_dir.parent.glob(f"{TEMP_PREFIX}*-{runs.LATEST}"):
        found = _LATEST_TEMPORARY.match(pointer.name)
        if found and not _process_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                pointer.unlink()
    _remove_old_checkpoints(run_dir, keep)


def _remove_old_checkpoints(run_dir: Path, keep: str | None) -> None:
    kept = Path(keep).name + "." if keep else None
    folder = run_dir / STATE_DIR
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not _CHECKPOINT_ENTRY.match(entry.name) or (kept and entry.name.startswith(kept)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or not ours to judge: leave its file alone
    return True


_CHECKPOINT = re.compile(rf"^{STATE_DIR}/epoch-\d{{4}}$")
_STATUSES = ("running", "interrupted", *FINISHED)


def _read_state(run_dir: Path) -> dict[str, Any]:
    """The training state saved after the last finished epoch (``state.json``), checked.

    Raises:
        ConfigError: one line naming the file when it is unreadable, or a value has the wrong
            type or range (the checkpoint must be ``state/epoch-NNNN`` inside the run).
    """
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{run_dir} has no {STATE_FILE}: it stopped before saving any state; start a new run"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable training state ({exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: unreadable training state (not a JSON object)")
    problem = _state_problem(state)
    if problem:
        raise ConfigError(
            f"{path}: unreadable training state ({problem}); was it edited? restore it, or "
            "start a new run"
        )
    return state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a parsed state.json, or None."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks = {
        "epoch": (count, "an integer >= 0"),
        "checkpoint": (
            lambda v: isinstance(v, str) and bool(_CHECKPOINT.match(v)),
            f"'{STATE_DIR}/epoch-NNNN'",
        ),
        "status": (lambda v: v in _STATUSES, f"one of {', '.join(_STATUSES)}"),
        "best_epoch": (lambda v: v is None or count(v), "an integer or null"),
        "best_val_dice": (lambda v: v is None or number(v), "a number or null"),
        "since_best": (count, "an integer >= 0"),
        "plateau_wait": (count, "an integer >= 0"),
        "seconds": (lambda v: number(v) and v >= 0, "a number >= 0"),
    }
    for key, (ok, described) in checks.items():
        if key not in state:
            return f"no '{key}'"
        if not ok(state[key]):
            shown = " ".join(json.dumps(state[key]).split())[:60]
            return f"'{key}' must be {described}, got {shown}"
    return None


def _better(value: float, best: float | None) -> bool:
    return not math.isnan(value) and (best is None or value > best)


class _Recorder:
    """Everything that happens at the end of an epoch, independent of Keras."""

    def __init__(
        self,
        run_dir: Path,
        config: TrainConfig,
        net: Any,
        optimizer: Any,
        state: dict[str, Any],
        history: list[dict[str, Any]],
        global_batch: int,
        steps: int,
        reporter: TrainReporter,
    ) -> None:
        self.run_dir, self.config, self.net, self.optimizer = run_dir, config, net, optimizer
        self.state, self.history = state, history
        self.global_batch, self.steps, self.reporter = global_batch, steps, reporter
        self.epoch_start = self.train_end = time.perf_counter()
        self.stop = False

    def begin_epoch(self, epoch: int) -> None:
        self.epoch_start = time.perf_counter()
        self.reporter.epoch_started(epoch, self.config.epochs, self.steps)

    def end_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        seconds = self.train_end - self.epoch_start
        lr = float(model.import_tf().keras.backend.get_value(self.optimizer.learning_rate))
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "seconds": round(time.perf_counter() - self.epoch_start, 3),
            "images_per_s": round(self.steps * self.global_batch / max(seconds, 1e-9), 3),
        }
        for key in runs.HISTORY_COLUMNS[1:7]:
            row[key] = float(logs.get(key, float("nan")))
        state = self.state
        state["epoch"], state["seconds"] = epoch + 1, state["seconds"] + row["seconds"]
        if _better(row["val_dice"], state["best_val_dice"]):
            state.update(best_epoch=epoch + 1, best_val_dice=row["val_dice"], since_best=0)
            state["plateau_wait"] = 0
            model.save_model(self.net, self.run_dir / "best.keras")
        else:
            state["since_best"] += 1
            state["plateau_wait"] += 1
        self.history.append(row)
        status = "running"
        if epoch + 1 >= self.config.epochs:
            status = "completed"
        elif self.config.patience and state["since_best"] >= self.config.patience:
            status, self.stop = "early_stopped", True
        elif (
            self.config.reduce_lr_patience
            and state["plateau_wait"] >= self.config.reduce_lr_patience
        ):
            new_lr = max(lr * self.config.reduce_lr_factor, self.config.min_lr)
            self.optimizer.learning_rate.assign(new_lr)
            state["plateau_wait"] = 0
            self.reporter.note(f"validation Dice flat: learning rate {lr:.3g} -> {new_lr:.3g}")
        self.save_state(status)
        self.reporter.epoch_done(row, self.config.epochs)

    def save_state(self, status: str) -> None:
        """Write last.keras, the optimizer checkpoint, history, curves, then state.json."""
        tf = model.import_tf()
        model.save_model(self.net, self.run_dir / "last.keras")
        prefix = f"{STATE_DIR}/epoch-{self.state['epoch']:04d}"
        checkpoint = tf.train.Checkpoint(model=self.net, optimizer=self.optimizer)
        checkpoint.write(str(self.run_dir / prefix))
        runs.write_history(self.run_dir, self.history)
        if self.history:
            runs.plot_curves(self.run_dir, self.history)
        self.state.update(checkpoint=prefix, status=status)
        atomic_write_json(self.run_dir / STATE_FILE, self.state)
        _remove_old_checkpoints(self.run_dir, prefix)
        self.write_summary()

    def write_summary(self, weights_sha256: str | None = None) -> TrainResult:
        speeds = [row["images_per_s"] for row in self.history]
        best = self.state["best_epoch"]
        best_row = self.history[best - 1] if best and best <= len(self.history) else {}
        result = TrainResult(
            run_dir=str(self.run_dir),
            status=self.state["status"],
            epochs_done=self.state["epoch"],
            best_epoch=best,
            best_val_dice=self.state["best_val_dice"],
            seconds=round(self.state["seconds"], 3),
            images_per_s=round(sum(speeds) / len(speeds), 3) if speeds else None,
            weights_sha256=weights_sha256,
        )
        summary = {
            **dataclasses.asdict(result),
            "best_val_pos_dice": best_row.get("val_pos_dice"),
            "best_val_loss": best_row.get("val_loss"),
            "epochs": self.config.epochs,
        }
        atomic_write_json(self.run_dir / "summary.json", _json_safe(summary))
        return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _keras_callback(recorder: _Recorder) -> Any:
    tf = model.import_tf()

    class _Bridge(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            recorder.begin_epoch(epoch)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            recorder.train_end = time.perf_counter()
            recorder.reporter.step_done(batch + 1, {k: float(v) for k, v in (logs or {}).items()})

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            recorder.end_epoch(epoch, logs or {})
            if recorder.stop:
                self.model.stop_training = True

    return _Bridge()


def _fit(
    run_dir: Path,
    config: TrainConfig,
    scaling: str,
    placement: Placement,
    net: Any,
    optimizer: Any,
    state: dict[str, Any],
    history: list[dict[str, Any]],
    reporter: TrainReporter,
) -> TrainResult:
    tf = model.import_tf()
    cache, train_records, val_records = _load_data(config)
    global_batch = config.batch_size * placement.replicas
    steps = config.steps_per_epoch or max(1, math.ceil(len(train_records) / global_batch))

    def train_dataset(input_context: Any = None) -> Any:
        return data.make_train_dataset(
            train_records,
            cache.image_size,
            scaling,
            global_batch,
            steps,
            seed=config.seed,
            first_epoch=state["epoch"],
            epochs=config.epochs,
            augment=config.augment,
            pos_fraction=data.parse_pos_fraction(config.pos_fraction),
            input_context=input_context,
        ).dataset

    val_dataset = data.make_eval_dataset(
        val_records, cache.image_size, scaling, global_batch
    ).dataset
    if placement.role is None:
        train_input = train_dataset()
    else:
        # Each worker builds only its own shard of every global batch.
        train_input = placement.strategy.distribute_datasets_from_function(train_dataset)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        val_dataset = val_dataset.with_options(options)
    recorder = _Recorder(
        run_dir, config, net, optimizer, state, history, global_batch, steps, reporter
    )
    state.setdefault("status", "running")
    try:
        net.fit(
            train_input,
            validation_data=val_dataset,
            epochs=config.epochs,
            initial_epoch=state["epoch"],
            steps_per_epoch=steps,
            callbacks=[_keras_callback(recorder)],
            verbose=0,
        )
    except KeyboardInterrupt:
        if state["epoch"] == 0:
            recorder.save_state("interrupted")  # keep what the first partial epoch learnt
        else:
            state["status"] = "interrupted"
            atomic_write_json(run_dir / STATE_FILE, state)
            recorder.write_summary()
        raise
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError) as exc:  # fmt: skip
        if placement.role is None:
            raise
        state["status"] = "interrupted"
        atomic_write_json(run_dir / STATE_FILE, state)
        recorder.write_summary()
        why = {
            "DeadlineExceededError": f"a collective waited over {COLLECTIVE_TIMEOUT_S} s",
            "UnavailableError": f"a worker died or was silent for {HEARTBEAT_TIMEOUT_S} s",
        }.get(type(exc).__name__, "the cluster aborted the step")
        resume = str(run_dir) if placement.is_chief else "RUN"
        raise ConfigError(
            f"lost contact with another worker during epoch {state['epoch'] + 1} "
            f"({type(exc).__name__}: {why}); the last checkpoint is epoch {state['epoch']}: "
            f"restart every worker with `pneumo train --resume {resume} --multi-worker`, or "
            f"continue here with `pneumo train --resume {resume}`"
        ) from None
    return recorder.write_summary(model.weights_sha256(net))
