"""`pneumo train --resume`: continue an unfinished run from its last checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build
from pneumo_cli.training import runs
from pneumo_cli.training.distribute import (
    Placement,
    make_multi_worker_strategy,
    make_strategy,
)
from pneumo_cli.training.fit import fit_run
from pneumo_cli.training.settings import (
    SilentReporter,
    TrainConfig,
    TrainReporter,
    TrainResult,
    config_from_run,
)
from pneumo_cli.training.setup import compile_model, load_training_data, output_dir_for
from pneumo_cli.training.state import (
    FINISHED,
    STATE_FILE,
    first_state,
    read_state,
    remove_leftovers,
    remove_stale_results,
)


def resume_training(
    run: str | Path | None,
    runs_dir: str | Path = runs.DEFAULT_RUNS_DIR,
    reporter: TrainReporter | None = None,
    gpus: int | None = None,
    cpu_replicas: int = 1,
    multi_worker: bool = False,
    mark_as_latest: bool = True,
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
    finished = _finish_top_only(run_dir, reporter)
    if finished is not None:
        return finished
    config, state, cache, scaling = _resumable(run_dir, gpus)
    if placement is None:
        placement = Placement(*make_strategy(config.gpus, cpu_replicas))
    if config.precision == "fp16" and not placement.gpus:
        raise ConfigError(
            f"{run_dir} trained in fp16, which needs a GPU, and this machine trains on the CPU"
        )
    if placement.is_chief:
        remove_leftovers(run_dir, state["checkpoint"] if state else None)
    tf = tf_engine.import_tf()
    if state is None:
        tf.keras.utils.set_random_seed(config.seed)  # initial decoder weights, as train did
    with placement.strategy.scope():
        weights = config.encoder_weights if state is None else "none"  # else: checkpoint's
        net = build.build_model(
            config.encoder,
            cache.image_size,
            weights,
            config.precision,
            notify=reporter.note,
            input_norm=config.input_norm,
        )
        optimizer = compile_model(net, config, placement.replicas)
        if state is not None:
            checkpoint = tf.train.Checkpoint(model=net, optimizer=optimizer)
            checkpoint.read(str(run_dir / state["checkpoint"])).assert_existing_objects_matched()
    if state is None:
        state, history = first_state(), []
        if placement.is_chief:
            remove_stale_results(run_dir)
        reporter.note(
            f"{run_dir} stopped before its first epoch ended; starting it again from epoch 1 "
            f"on {placement.description}"
        )
    else:
        history = [row for row in runs.read_history(run_dir) if row["epoch"] <= state["epoch"]]
        reporter.note(
            f"resuming {run_dir} at epoch {state['epoch'] + 1} on {placement.description}"
        )
    with output_dir_for(placement, runs_dir, None, True, reporter, existing=run_dir) as out_dir:
        if placement.is_chief and mark_as_latest:
            runs.mark_latest(run_dir)
        return fit_run(
            out_dir, config, scaling, placement, net, optimizer, state, history, reporter
        )


def _finish_top_only(run_dir: Path, reporter: TrainReporter) -> TrainResult | None:
    """A finished ``--keep-top`` run killed before it wrote ``averaged.keras`` and
    ``checkpoints.json``: write them now (nothing is trained). None for any other run."""
    from pneumo_cli.training import checkpoints
    from pneumo_cli.training.fit import result_from_summary

    if not (run_dir / STATE_FILE).is_file() or not (run_dir / runs.CONFIG_FILE).is_file():
        return None
    state = read_state(run_dir)
    saved = runs.load_run_config(run_dir)
    config = config_from_run(saved, str(run_dir / runs.CONFIG_FILE))
    if state["status"] not in FINISHED or not checkpoints.needs_finishing(run_dir, config):
        return None
    reporter.note(f"{run_dir} finished training; averaging its top {config.keep_top} epochs")
    checkpoints.finish_top(run_dir, config, saved["input_scaling"], state, reporter.note)
    return result_from_summary(run_dir)


def _resumable(run_dir: Path, gpus: int | None) -> tuple[TrainConfig, dict | None, Any, str]:
    """The run's settings, its state (None before the first epoch ended), its cache and its
    input scaling, each checked: an unfinished run whose cache is unchanged since it started.

    Raises:
        ConfigError: a finished run, a bad config.json or state.json, a changed cache.
    """
    saved = runs.load_run_config(run_dir)
    config = _config_to_resume(saved, run_dir / runs.CONFIG_FILE)
    # No state.json: the run was stopped before its first epoch ended. Its config.json holds
    # every setting, so it starts again from epoch 0 exactly as `pneumo train` started it.
    state = read_state(run_dir) if (run_dir / STATE_FILE).exists() else None
    if state is not None and state["status"] in FINISHED:
        raise ConfigError(
            f"{run_dir} has finished already ({state['status'].replace('_', ' ')} after "
            f"{state['epoch']} epoch(s)); start a new run instead of --resume"
        )
    if gpus is not None:
        config = dataclasses.replace(config, gpus=gpus)
    cache, _, _ = load_training_data(config)
    if cache.manifest_sha256 != saved.get("cache_manifest_sha256"):
        raise ConfigError(
            f"{cache.folder / 'manifest.csv'} changed since {run_dir} started; resuming would "
            "train on other data: start a new run"
        )
    return config, state, cache, saved["input_scaling"]


def _config_to_resume(saved: dict[str, Any], path: Path) -> TrainConfig:
    """The settings of a run to resume, checked as `pneumo train` checked them.

    Raises:
        ConfigError: naming ``path``: a setting --resume needs is missing (a default would
            silently replace it), or has the wrong type or an impossible value.
    """
    # A run from before --fold existed trained on the train/val splits (fold None).
    later = ("fold", "keep_top", "top_use")  # options newer than some runs
    needed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in later]
    needed += ["input_scaling", "cache_manifest_sha256"]
    missing = [key for key in needed if key not in saved]
    if missing:
        raise ConfigError(
            f"{path} lacks {', '.join(missing)}: it was not written by `pneumo train` of this "
            "version; start a new run"
        )
    try:
        return config_from_run(saved, str(path))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
