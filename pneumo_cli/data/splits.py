"""Train/val/test splits and cross-validation folds: seeded, stratified, grouped by patient.

The assignment is a pure function of the images' (id, group, label) and the previous assignment,
so it can be tested on hand-made tables and reproduced by anyone with the manifest.

Algorithm, per stratum (positive, negative, unlabelled; a group's stratum is positive if any of
its images is):

1. every group already assigned (an image of it is in the previous manifest) keeps its split;
2. the other groups are ordered by a seeded hash of their key, so the order depends on the seed
   but not on which other images exist (adding images never reshuffles earlier decisions);
3. each group in turn goes to the split furthest below its target image count
   (``fraction x stratum size``), ties to train, then val, then test.

A group is a patient (``patient_key``) or, without a PatientID, the single image. Folds are
assigned the same way, with equal targets, over the train and val images; test images get -1.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pneumo_cli.core.choices import Split, values

SPLITS = values(Split)


@dataclass(frozen=True)
class SplitItem:
    """One image to place: ``label`` 1/0, or None when unlabelled; ``group`` its patient key
    ("" when unknown: the image is its own group)."""

    image_id: str
    group: str
    label: int | None


@dataclass(frozen=True)
class Assignment:
    split: str
    fold: int


def group_of(item: SplitItem) -> str:
    return f"patient:{item.group}" if item.group else f"image:{item.image_id}"


def _order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _stratum(labels: list[int | None]) -> str:
    if any(label == 1 for label in labels):
        return "positive"
    if any(label == 0 for label in labels):
        return "negative"
    return "unlabelled"


def _fill(
    groups: dict[str, list[str]],
    fixed: dict[str, str],
    names: Sequence[str],
    fractions: Sequence[float],
    seed: int,
) -> dict[str, str]:
    """Assign each group (key -> image ids) to one of ``names``; ``fixed`` groups keep theirs."""
    total = sum(len(ids) for ids in groups.values())
    counts = dict.fromkeys(names, 0)
    result: dict[str, str] = {}
    for key, ids in groups.items():
        if key in fixed:
            result[key] = fixed[key]
            counts[fixed[key]] += len(ids)
    # Groups are ordered by their first ImageId, not by their key: a patient key is an HMAC under
    # an installation's secret, and the same data and seed must give the same split everywhere.
    free = (k for k in groups if k not in fixed)
    for key in sorted(free, key=lambda k: (_order_key(seed, min(groups[k])), k)):
        targets = zip(names, fractions, strict=True)
        deficits = [fraction * total - counts[name] for name, fraction in targets]
        # max() keeps the first of equal deficits, i.e. the order of `names`.
        choice = names[max(range(len(names)), key=lambda i: deficits[i])]
        result[key] = choice
        counts[choice] += len(groups[key])
    return result


def _by_stratum(items: Sequence[SplitItem]) -> dict[str, dict[str, list[str]]]:
    members: dict[str, list[SplitItem]] = defaultdict(list)
    for item in items:
        members[group_of(item)].append(item)
    strata: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for key, group in members.items():
        stratum = _stratum([item.label for item in group])
        strata[stratum][key] = [item.image_id for item in group]
    return strata


def assign_splits(
    items: Sequence[SplitItem],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    folds: int = 0,
    seed: int = 42,
    previous: dict[str, Assignment] | None = None,
) -> dict[str, Assignment]:
    """Place every image in train/val/test (and a fold when ``folds`` >= 2).

    Args:
        items: the images; ImageIds must be unique.
        previous: ImageId -> Assignment from an earlier manifest: those images, and every other
            image of their patients, keep that split and fold.

    Returns:
        ImageId -> Assignment (fold -1 without folds and for test images).
    """
    previous = previous or {}
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    fixed_split: dict[str, str] = {}
    fixed_fold: dict[str, int] = {}
    for item in items:
        earlier = previous.get(item.image_id)
        if earlier is not None:
            fixed_split.setdefault(group_of(item), earlier.split)
            if earlier.fold >= 0:
                fixed_fold.setdefault(group_of(item), earlier.fold)
    result: dict[str, Assignment] = {}
    fold_names = [str(k) for k in range(folds)] if folds >= 2 else []
    for _, groups in sorted(_by_stratum(items).items()):
        split_of = _fill(groups, fixed_split, SPLITS, fractions, seed)
        fold_of: dict[str, str] = {}
        if fold_names:
            pool = {key: ids for key, ids in groups.items() if split_of[key] != "test"}
            fixed = {k: str(v) for k, v in fixed_fold.items() if k in pool}
            even = [1.0 / folds] * folds
            fold_of = _fill(pool, fixed, fold_names, even, seed + 1)
        for key, ids in groups.items():
            fold = int(fold_of[key]) if key in fold_of else -1
            for image_id in ids:
                result[image_id] = Assignment(split_of[key], fold)
    return result
