"""Training the U-Net on a cache: `pneumo train` as a library function.

:func:`train_model` starts a run and :mod:`~pneumo_cli.training.resume` continues one; both end
in :func:`~pneumo_cli.training.fit.fit_run`, which runs Keras ``fit`` under the strategy
:mod:`pneumo_cli.training.distribute` chose and records every epoch in the run folder (history,
last/best model, optimizer checkpoint, curves, summary). Validation reports the SIIM per-image
Dice (:mod:`pneumo_cli.model.losses`), which also drives model selection, early stopping and
the optional learning-rate reduction.

In a multi-worker run every process executes the same steps - saving included, because reading
the synchronised batch-norm statistics is itself a collective operation - but only the chief
writes into the run folder; the other workers write into a temporary folder that is removed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pneumo_cli import __version__
from pneumo_cli.core import provenance
from pneumo_cli.core.config import to_dict
from pneumo_cli.core.files import atomic_write_json
from pneumo_cli.data import cache as data_cache
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build, encoders
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
)
from pneumo_cli.training.setup import (
    compile_model,
    effective_lr,
    load_training_data,
    output_dir_for,
    resolve_precision,
)
from pneumo_cli.training.state import first_state, remove_leftovers, remove_stale_results


def train_model(
    config: TrainConfig,
    runs_dir: str | Path = runs.DEFAULT_RUNS_DIR,
    name: str | None = None,
    exist_ok: bool = False,
    reporter: TrainReporter | None = None,
    cpu_replicas: int = 1,
    multi_worker: bool = False,
    mark_as_latest: bool = True,
) -> TrainResult:
    """Train a new run on ``config.cache`` and write it under ``runs_dir``.

    Args:
        multi_worker: join the cluster in ``TF_CONFIG`` (MultiWorkerMirroredStrategy); the chief
            writes the run, the other workers a temporary folder removed at the end.
        mark_as_latest: point ``runs_dir/latest`` at the run (a sweep's folds do not).

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
    cache, train_records, val_records = load_training_data(config)
    config = dataclasses.replace(config, cache=str(cache.folder), image_size=cache.image_size)
    if placement is None or placement.is_chief:
        runs.check_run_name(runs_dir, name, exist_ok)  # before the slow model build
    if placement is None:
        placement = Placement(*make_strategy(config.gpus, cpu_replicas))
    precision, reason = resolve_precision(config.precision, placement)
    config = dataclasses.replace(config, precision=precision)
    strategy, replicas = placement.strategy, placement.replicas
    scaling = encoders.input_scaling_for(config.encoder)
    tf_engine.import_tf().keras.utils.set_random_seed(config.seed)  # initial decoder weights
    with strategy.scope():
        net = build.build_model(
            config.encoder,
            cache.image_size,
            config.encoder_weights,
            config.precision,
            notify=reporter.note,
            input_norm=config.input_norm,
        )
        optimizer = compile_model(net, config, replicas)
    with output_dir_for(placement, runs_dir, name, exist_ok, reporter) as run_dir:
        saved = {
            **to_dict(config),
            "precision_reason": reason,
            "effective_lr": effective_lr(config, replicas),
            "input_scaling": scaling,
            "keras_engine": tf_engine.keras_engine(),
            "cache_manifest_sha256": cache.manifest_sha256,
            "preprocess": cache.settings,
            "replicas": replicas,
            "workers": placement.workers,
            "global_batch_size": config.batch_size * replicas,
            "strategy": placement.description,
            "train_images": len(train_records),
            "val_images": len(val_records),
            "folds": data_cache.cache_folds(cache) if config.fold is not None else 0,
            "versions": provenance.package_versions(),
            "pneumo_version": __version__,
        }
        atomic_write_json(run_dir / runs.CONFIG_FILE, saved)
        runs.write_splits(run_dir, data_cache.fold_roles(cache, config.fold))
        remove_stale_results(run_dir)
        if placement.is_chief:
            remove_leftovers(run_dir, None)  # of a killed run this one writes over
            if mark_as_latest:
                runs.mark_latest(run_dir)
        reporter.note(
            f"training {config.encoder} U-Net in {precision} ({reason}) on "
            f"{placement.description}; writing {run_dir}"
        )
        state = first_state()
        return fit_run(run_dir, config, scaling, placement, net, optimizer, state, [], reporter)
