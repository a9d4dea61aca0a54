"""One training call on a built network: datasets, the Keras fit loop, and the recorder that
writes checkpoints, history, state and summary as each epoch ends."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from pneumo_cli.core.config import TrainConfig, parse_pos_fraction
from pneumo_cli.core.errors import ClusterLostError, ConfigError
from pneumo_cli.core.files import atomic_copy, atomic_write_json
from pneumo_cli.data import pipeline as data_pipeline
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.engine.native_log import native_noise_dropped
from pneumo_cli.model import saving
from pneumo_cli.training import checkpoints, runs
from pneumo_cli.training.distribute import (
    COLLECTIVE_TIMEOUT_S,
    HEARTBEAT_TIMEOUT_S,
    Placement,
)
from pneumo_cli.training.settings import TrainReporter, TrainResult
from pneumo_cli.training.setup import load_training_data
from pneumo_cli.training.state import STATE_DIR, STATE_FILE, remove_old_checkpoints


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
        lr = float(tf_engine.import_tf().keras.backend.get_value(self.optimizer.learning_rate))
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
        improved = _better(row["val_dice"], state["best_val_dice"])
        if improved:
            state.update(best_epoch=epoch + 1, best_val_dice=row["val_dice"], since_best=0)
            state["plateau_wait"] = 0
        else:
            state["since_best"] += 1
            state["plateau_wait"] += 1
        checkpoints.update_top(
            self.run_dir, state, self.net, epoch + 1, row["val_dice"], self.config.keep_top
        )
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
        self.save_state(status, best=improved)
        self.reporter.epoch_done(row, self.config.epochs)

    def save_state(self, status: str, best: bool = False) -> None:
        """Write last.keras (copied to best.keras when ``best``: the epoch is the best so far),
        the optimizer checkpoint, history, curves, then state.json."""
        tf = tf_engine.import_tf()
        last = self.run_dir / runs.LAST_MODEL_FILE
        saving.save_model(self.net, last)
        if best:
            atomic_copy(last, self.run_dir / runs.BEST_MODEL_FILE)  # the same network
        prefix = f"{STATE_DIR}/epoch-{self.state['epoch']:04d}"
        checkpoint = tf.train.Checkpoint(model=self.net, optimizer=self.optimizer)
        checkpoint.write(str(self.run_dir / prefix))
        runs.write_history(self.run_dir, self.history)
        if self.history:
            runs.plot_curves(self.run_dir, self.history)
        self.state.update(checkpoint=prefix, status=status)
        atomic_write_json(self.run_dir / STATE_FILE, self.state)
        remove_old_checkpoints(self.run_dir, prefix)
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
    tf = tf_engine.import_tf()

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


def fit_run(
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
    """Train ``net`` from ``state["epoch"]`` to ``config.epochs`` (or early stopping), writing
    checkpoints, history and state as epochs end.

    Raises:
        KeyboardInterrupt: after saving the state (status "interrupted").
        ClusterLostError: another worker of a multi-worker run was lost (the state is saved).
    """
    tf = tf_engine.import_tf()
    global_batch = config.batch_size * placement.replicas
    train_input, val_dataset, steps = _datasets(config, scaling, placement, state, global_batch)
    recorder = _Recorder(
        run_dir, config, net, optimizer, state, history, global_batch, steps, reporter
    )
    state.setdefault("status", "running")
    try:
        with native_noise_dropped():
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
            _save_interrupted(recorder)
        raise
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError) as exc:  # fmt: skip
        if placement.role is None:
            raise
        _save_interrupted(recorder)
        raise _lost_worker(exc, run_dir, state["epoch"], placement.is_chief) from None
    result = recorder.write_summary(saving.weights_sha256(net))
    if placement.is_chief and checkpoints.needs_finishing(run_dir, config):
        checkpoints.finish_top(run_dir, config, scaling, state, reporter.note)
    return result


def result_from_summary(run_dir: Path) -> TrainResult:
    """The :class:`TrainResult` a finished run's ``summary.json`` records.

    Raises:
        ConfigError: the summary is missing or unreadable.
    """
    import json

    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        return TrainResult(
            run_dir=str(run_dir),
            status=str(summary["status"]),
            epochs_done=int(summary["epochs_done"]),
            best_epoch=summary.get("best_epoch"),
            best_val_dice=summary.get("best_val_dice"),
            seconds=float(summary.get("seconds", 0.0)),
            images_per_s=summary.get("images_per_s"),
            weights_sha256=summary.get("weights_sha256"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); train the run again") from None


def _datasets(
    config: TrainConfig,
    scaling: str,
    placement: Placement,
    state: dict[str, Any],
    global_batch: int,
) -> tuple[Any, Any, int]:
    """The training input (distributed across workers when there are several), the validation
    dataset and the steps per epoch."""
    tf = tf_engine.import_tf()
    cache, train_records, val_records = load_training_data(config)
    steps = config.steps_per_epoch or max(1, math.ceil(len(train_records) / global_batch))

    def train_dataset(input_context: Any = None) -> Any:
        return data_pipeline.make_train_dataset(
            train_records,
            cache.image_size,
            scaling,
            global_batch,
            steps,
            seed=config.seed,
            first_epoch=state["epoch"],
            epochs=config.epochs,
            augment=config.augment,
            pos_fraction=parse_pos_fraction(config.pos_fraction),
            input_context=input_context,
        ).dataset

    val_dataset = data_pipeline.make_eval_dataset(
        val_records, cache.image_size, scaling, global_batch
    ).dataset
    if placement.role is None:
        return train_dataset(), val_dataset, steps
    # Each worker builds only its own shard of every global batch.
    train_input = placement.strategy.distribute_datasets_from_function(train_dataset)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return train_input, val_dataset.with_options(options), steps


def _save_interrupted(recorder: _Recorder) -> None:
    recorder.state["status"] = "interrupted"
    atomic_write_json(recorder.run_dir / STATE_FILE, recorder.state)
    recorder.write_summary()


def _lost_worker(exc: Exception, run_dir: Path, epoch: int, is_chief: bool) -> ClusterLostError:
    """The one-line error for a multi-worker run that lost a worker mid-epoch."""
    why = {
        "DeadlineExceededError": f"a collective waited over {COLLECTIVE_TIMEOUT_S} s",
        "UnavailableError": f"a worker died or was silent for {HEARTBEAT_TIMEOUT_S} s",
    }.get(type(exc).__name__, "the cluster aborted the step")
    resume = str(run_dir) if is_chief else "RUN"
    return ClusterLostError(
        f"lost contact with another worker during epoch {epoch + 1} "
        f"({type(exc).__name__}: {why}); the last checkpoint is epoch {epoch}: "
        f"restart every worker with `pneumo train --resume {resume} --multi-worker`, or "
        f"continue here with `pneumo train --resume {resume}`"
    )
