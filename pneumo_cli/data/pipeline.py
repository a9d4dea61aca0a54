"""The cache as training data: manifest reading, epoch plans and tf.data pipelines.

The cache written by ``pneumo preprocess`` holds square grey PNGs and 0/255 mask PNGs plus
``manifest.csv`` (one row per image, with its split). Training draws samples in an order fixed
by (seed, epoch) alone - a resumed run sees exactly the batches an uninterrupted one would - and
augments every sample with stateless random ops seeded from its place in that order, so image and
mask get identical geometry and a seed reproduces a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.data.augment import augment_pair
from pneumo_cli.data.cache import CacheRecord
from pneumo_cli.data.sampling import epoch_order, pos_fraction_at
from pneumo_cli.engine.tf import import_tf
from pneumo_cli.model.encoders import scale_input

_DEFAULT_MEMORY_LIMIT = 4 << 30


def memory_limit_bytes() -> int:
    """How much decoded data may be kept in memory: a quarter of RAM, at most 4 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _DEFAULT_MEMORY_LIMIT
    return min(_DEFAULT_MEMORY_LIMIT, physical // 4)


def _decode_pair(tf: Any, image_path: Any, mask_path: Any, image_size: int) -> tuple[Any, Any]:
    image = tf.io.decode_png(tf.io.read_file(image_path), channels=1)
    image = tf.ensure_shape(image, [image_size, image_size, 1])

    def read_mask() -> Any:
        return tf.io.decode_png(tf.io.read_file(mask_path), channels=1)

    def empty_mask() -> Any:
        return tf.zeros([image_size, image_size, 1], tf.uint8)

    mask = tf.cond(tf.strings.length(mask_path) > 0, read_mask, empty_mask)
    mask = tf.ensure_shape(tf.cast(mask > 127, tf.uint8), [image_size, image_size, 1])
    return image, mask


def _paths(records: Sequence[CacheRecord]) -> tuple[list[str], list[str]]:
    return [r.image for r in records], [r.mask or "" for r in records]


def load_arrays(records: Sequence[CacheRecord], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every record's PNGs in parallel.

    Returns:
        images uint8 (N, S, S, 1) in [0, 255] and masks uint8 (N, S, S, 1) in {0, 1}.

    Raises:
        InputError: a PNG is missing or not ``image_size`` square (names the first such file).
    """
    tf = import_tf()
    for record in records:
        for path in (record.image, record.mask):
            if path and not os.path.isfile(path):
                raise InputError(f"cache file {path} is missing; recreate the cache")
    images, masks = _paths(records)
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).map(
        lambda i, m: _decode_pair(tf, i, m, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    out_images = np.zeros((len(records), image_size, image_size, 1), np.uint8)
    out_masks = np.zeros_like(out_images)
    start = 0
    try:
        for image_batch, mask_batch in dataset.batch(64):
            stop = start + len(image_batch)
            out_images[start:stop] = image_batch.numpy()
            out_masks[start:stop] = mask_batch.numpy()
            start = stop
    except tf.errors.InvalidArgumentError:
        bad = _first_bad_file(records, image_size)
        raise InputError(
            f"{bad}: not a {image_size}x{image_size} grey PNG; the cache is damaged or was made "
            "with another image size"
        ) from None
    return out_images, out_masks


def _first_bad_file(records: Sequence[CacheRecord], image_size: int) -> str:
    from pneumo_cli.core.files import read_grey_png

    for record in records:
        for path in (record.image, record.mask):
            if not path:
                continue
            try:
                if read_grey_png(path).shape != (image_size, image_size):
                    return path
            except InputError:
                return path
    return "a cache PNG"


@dataclass(frozen=True)
class Pipeline:
    """A tf.data pipeline and what it yields."""

    dataset: Any
    steps: int
    in_memory: bool


def _source(
    records: Sequence[CacheRecord], image_size: int, memory_limit: int | None
) -> tuple[Any, bool]:
    """A function index -> (image uint8 (S,S,1), mask uint8 (S,S,1)), and whether in memory."""
    tf = import_tf()
    limit = memory_limit_bytes() if memory_limit is None else memory_limit
    if 2 * len(records) * image_size * image_size <= limit:
        images, masks = load_arrays(records, image_size)
        images_t, masks_t = tf.constant(images), tf.constant(masks)
        return (lambda i: (tf.gather(images_t, i), tf.gather(masks_t, i))), True
    images, masks = _paths(records)
    images_t, masks_t = tf.constant(images), tf.constant(masks)
    return (
        lambda i: _decode_pair(tf, tf.gather(images_t, i), tf.gather(masks_t, i), image_size)
    ), False


def make_train_dataset(
    records: Sequence[CacheRecord],
    image_size: int,
    scaling: str,
    batch_size: int,
    steps_per_epoch: int,
    *,
    seed: int,
    first_epoch: int = 0,
    epochs: int = 1,
    augment: bool = True,
    pos_fraction: tuple[float, float] | None = None,
    memory_limit: int | None = None,
    input_context: Any = None,
) -> Pipeline:
    """Training batches for epochs ``first_epoch`` .. ``epochs - 1``, back to back.

    Each epoch is ``steps_per_epoch`` full batches whose order and augmentation depend only on
    (seed, epoch), so a resumed run continues exactly where an uninterrupted one would be.

    With a ``tf.distribute.InputContext`` (multi-worker training, through the strategy's
    ``distribute_datasets_from_function``) ``batch_size`` is the GLOBAL batch: this input
    pipeline takes only its own slice of every global batch (pipeline ``i`` of ``n`` the
    samples ``i * B / n .. (i + 1) * B / n - 1``), so it decodes and augments just its share,
    and batches them per replica. The samples of a global step are the ones a single-process
    run with the same global batch would see.

    Yields:
        (x float32 (B, S, S, 3) scaled for the encoder, y float32 (B, S, S, 1) in {0, 1}), B
        the per-replica batch with an input context, else ``batch_size``.
    """
    tf = import_tf()
    load, in_memory = _source(records, image_size, memory_limit)
    positive = [r.positive for r in records]
    count = steps_per_epoch * batch_size
    orders, seeds = [], []
    for epoch in range(first_epoch, epochs):
        fraction = None if pos_fraction is None else pos_fraction_at(pos_fraction, epoch, epochs)
        orders.append(epoch_order(positive, count, seed, epoch, fraction))
        seeds.append(
            np.stack(
                [
                    np.full(count, seed, np.int64),
                    epoch * 1_000_003 + np.arange(count, dtype=np.int64),
                ],
                axis=1,
            )
        )
    plan = np.concatenate(orders) if orders else np.zeros(0, np.int64)
    plan_seeds = np.concatenate(seeds) if seeds else np.zeros((0, 2), np.int64)
    out_batch = batch_size
    if input_context is not None:
        plan, plan_seeds = shard_plan(
            plan,
            plan_seeds,
            batch_size,
            input_context.num_input_pipelines,
            input_context.input_pipeline_id,
        )
        out_batch = input_context.get_per_replica_batch_size(batch_size)

    def sample(index: Any, sample_seed: Any) -> tuple[Any, Any]:
        image, mask = load(index)
        image, mask = tf.cast(image, tf.float32), tf.cast(mask, tf.float32)
        if augment:
            image, mask = augment_pair(image, mask, sample_seed)
        return scale_input(image, scaling), mask

    dataset = (
        tf.data.Dataset.from_tensor_slices((plan, plan_seeds))
        .map(sample, num_parallel_calls=_parallel_calls(), deterministic=True)
        .batch(out_batch, drop_remainder=True)
        .prefetch(PREFETCH_BATCHES)
    )
    return Pipeline(_without_autotune(dataset), steps_per_epoch, in_memory)


def shard_plan(
    plan: np.ndarray, seeds: np.ndarray, global_batch: int, shards: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shard ``index``'s slice of every global batch of a sample plan.

    Args:
        plan: int64 (steps x global_batch,) sample indices; seeds: int64 (same, 2).

    Returns:
        (plan, seeds) holding, for every global batch in turn, its samples
        ``index * global_batch / shards`` up to ``(index + 1) * global_batch / shards - 1``.

    Raises:
        ConfigError: the global batch does not split evenly over the shards.
    """
    if global_batch % shards:
        raise ConfigError(
            f"global batch {global_batch} does not split over {shards} input pipelines; "
            "choose a --batch-size that makes it a multiple"
        )
    share = global_batch // shards
    rows = plan.reshape(-1, global_batch)[:, index * share : (index + 1) * share]
    seed_rows = seeds.reshape(-1, global_batch, 2)[:, index * share : (index + 1) * share]
    return rows.reshape(-1), seed_rows.reshape(-1, 2)


def make_eval_dataset(
    records: Sequence[CacheRecord],
    image_size: int,
    scaling: str,
    batch_size: int,
    memory_limit: int | None = None,
) -> Pipeline:
    """Every record once, in manifest order, not augmented; same element format as training."""
    tf = import_tf()
    load, in_memory = _source(records, image_size, memory_limit)

    def sample(index: Any) -> tuple[Any, Any]:
        image, mask = load(index)
        return scale_input(image, scaling), tf.cast(mask, tf.float32)

    dataset = (
        tf.data.Dataset.range(len(records))
        .map(sample, num_parallel_calls=_parallel_calls(), deterministic=True)
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
    )
    return Pipeline(_without_autotune(dataset), math.ceil(len(records) / batch_size), in_memory)


PREFETCH_BATCHES = 2


def _parallel_calls() -> int:
    return max(1, os.cpu_count() or 1)


def _without_autotune(dataset: Any) -> Any:
    """Fixed parallelism instead of tf.data's autotuner.

    On a machine with few cores the autotuner's background tuning competes with the network's
    own threads and roughly halved training speed (``benchmarks/bench_train.py`` measures the
    pipeline against the network alone). Decoding and augmenting a batch is a small fraction
    of a training step, so fixed settings lose nothing.
    """
    tf = import_tf()
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
