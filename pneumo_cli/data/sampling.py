"""Which cache images an epoch trains on, in which order: seeded per epoch, with an optional
share of positive images that can fall linearly over the epochs (``--pos-fraction``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pos_fraction_at(fractions: tuple[float, float], epoch: int, epochs: int) -> float:
    """The positive fraction for ``epoch`` (0-based) of ``epochs``, linear between the ends."""
    start, end = fractions
    if epochs <= 1:
        return start
    return start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


def _cycled_permutations(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    if count == 0 or pool.size == 0:
        return np.zeros(0, dtype=np.int64)
    rounds = math.ceil(count / pool.size)
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:count]


def epoch_order(
    positive: Sequence[bool],
    count: int,
    seed: int,
    epoch: int,
    pos_fraction: float | None = None,
) -> np.ndarray:
    """Indices of the ``count`` samples of ``epoch``, a function of (seed, epoch) only.

    Without ``pos_fraction`` the images are shuffled (and reshuffled to fill ``count``). With
    it, each sample is positive with that probability, drawn from the positives and negatives
    in shuffled rounds so every image is used before any repeats.
    """
    flags = np.asarray(positive, dtype=bool)
    rng = np.random.default_rng([seed, epoch])
    if pos_fraction is None:
        return _cycled_permutations(rng, np.arange(flags.size), count)
    pos_pool, neg_pool = np.flatnonzero(flags), np.flatnonzero(~flags)
    if neg_pool.size == 0:
        take_positive = np.ones(count, dtype=bool)
    elif pos_pool.size == 0:
        take_positive = np.zeros(count, dtype=bool)
    else:
        take_positive = rng.random(count) < pos_fraction
    order = np.empty(count, dtype=np.int64)
    order[take_positive] = _cycled_permutations(rng, pos_pool, int(take_positive.sum()))
    order[~take_positive] = _cycled_permutations(rng, neg_pool, int((~take_positive).sum()))
    return order
