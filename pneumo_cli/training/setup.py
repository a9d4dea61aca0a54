"""What `pneumo train` and `--resume` share before fitting: the cache's splits, the
compiled optimizer and loss, the precision, and the run folder."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pneumo_cli.core.config import TrainConfig
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.data import cache as data_cache
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.engine.precision import choose_precision, gpu_names
from pneumo_cli.model import losses
from pneumo_cli.training import runs
from pneumo_cli.training.distribute import (
    Placement,
)
from pneumo_cli.training.settings import TrainReporter


def load_training_data(config: TrainConfig) -> tuple[data_cache.CacheInfo, list, list]:
    cache = data_cache.read_cache(config.cache)
    if config.image_size is not None and config.image_size != cache.image_size:
        raise ConfigError(
            f"cache {cache.folder} holds {cache.image_size} px images but --image-size is "
            f"{config.image_size}; drop --image-size or preprocess again at that size"
        )
    if config.fold is not None:
        train_records, val_records = data_cache.select_fold(cache, config.fold)
    else:
        train_records = data_cache.select_split(cache, config.train_split, need_positive=True)
        val_records = data_cache.select_split(cache, config.val_split)
    # Before the run folder exists: a damaged cache must not leave a run of config.json alone.
    data_cache.check_record_files(train_records + val_records, cache.image_size)
    return cache, train_records, val_records


def effective_lr(config: TrainConfig, replicas: int) -> float:
    """The learning rate Adam starts with: ``lr``, times the replicas with ``scale_lr``."""
    return config.lr * replicas if config.scale_lr else config.lr


def compile_model(net: Any, config: TrainConfig, replicas: int) -> Any:
    tf = tf_engine.import_tf()
    from pneumo_cli.model.fastpaths import FusedAdam

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


def resolve_precision(requested: str, placement: Placement) -> tuple[str, str]:
    names = gpu_names() if placement.gpus else []
    return choose_precision(requested, placement.gpus, names)


@contextlib.contextmanager
def output_dir_for(
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
