"""Splits: deterministic for a seed, stratified, patient-grouped, stable when images are added."""

from __future__ import annotations

from collections import Counter

from pneumo_cli.data.splits import Assignment, SplitItem, assign_splits


def _items(n_pos: int, n_neg: int, per_patient: int = 1, prefix: str = "img") -> list[SplitItem]:
    items = []
    for i in range(n_pos + n_neg):
        patient = f"{prefix}p{i // per_patient}" if per_patient > 1 else ""
        # A patient's images share a label here (labels are per image in reality; see below).
        label = 1 if (i // per_patient) * per_patient < n_pos else 0
        items.append(SplitItem(f"{prefix}{i:05d}", patient, label))
    return items


def _count(assigned: dict[str, Assignment], items: list[SplitItem], label: int | None = None):
    return Counter(
        assigned[item.image_id].split for item in items if label is None or item.label == label
    )


def test_ten_singletons_split_exactly_8_1_1() -> None:
    items = _items(0, 10)
    assert _count(assign_splits(items), items) == {"train": 8, "val": 1, "test": 1}


def test_same_seed_same_split_other_seed_other_split() -> None:
    items = _items(50, 450)
    first = assign_splits(items, seed=7)
    assert assign_splits(list(reversed(items)), seed=7) == first
    other = assign_splits(items, seed=8)
    moved = sum(first[k].split != other[k].split for k in first)
    assert moved > 20


def test_each_stratum_gets_its_share() -> None:
    items = _items(100, 900)
    assigned = assign_splits(items, val_fraction=0.1, test_fraction=0.1)
    assert _count(assigned, items, label=1) == {"train": 80, "val": 10, "test": 10}
    assert _count(assigned, items, label=0) == {"train": 720, "val": 90, "test": 90}


def test_unlabelled_images_form_their_own_stratum() -> None:
    items = [SplitItem(f"u{i}", "", None) for i in range(20)] + _items(0, 20)
    assigned = assign_splits(items)
    unlabelled = Counter(assigned[f"u{i}"].split for i in range(20))
    assert unlabelled == {"train": 16, "val": 2, "test": 2}


def test_a_patient_never_spans_two_splits_or_folds() -> None:
    items = _items(60, 240, per_patient=3)
    assigned = assign_splits(items, folds=5)
    by_patient: dict[str, set[tuple[str, int]]] = {}
    for item in items:
        by_patient.setdefault(item.group, set()).add(
            (assigned[item.image_id].split, assigned[item.image_id].fold)
        )
    assert len(by_patient) == 100
    assert all(len(places) == 1 for places in by_patient.values())
    # Whole patients of 3 images: each split is within one patient of its target.
    counts = _count(assigned, items)
    assert abs(counts["val"] - 30) <= 3 and abs(counts["test"] - 30) <= 3


def test_positive_patient_with_a_negative_image_counts_as_positive() -> None:
    items = [SplitItem("a", "p1", 0), SplitItem("b", "p1", 1)] + _items(0, 8)
    assigned = assign_splits(items)
    assert assigned["a"] == assigned["b"]


def test_folds_cover_train_and_val_evenly_and_test_has_none() -> None:
    items = _items(100, 400)
    assigned = assign_splits(items, folds=5)
    test_folds = {a.fold for a in assigned.values() if a.split == "test"}
    assert test_folds == {-1}
    folds = Counter(a.fold for a in assigned.values() if a.split != "test")
    assert sorted(folds) == [0, 1, 2, 3, 4]
    assert all(count == 90 for count in folds.values())  # (500 - 50 test) / 5


def test_no_folds_means_minus_one() -> None:
    assigned = assign_splits(_items(5, 5))
    assert {a.fold for a in assigned.values()} == {-1}


def test_growing_the_data_keeps_every_earlier_image_in_place() -> None:
    old = _items(40, 360, prefix="old")
    before = assign_splits(old, folds=4, seed=3)
    new = _items(10, 90, prefix="new")
    after = assign_splits(old + new, folds=4, seed=3, previous=before)
    assert all(after[key] == before[key] for key in before)
    counts = _count(after, old + new)
    assert abs(counts["val"] - 50) <= 2 and abs(counts["test"] - 50) <= 2
    assert _count(after, old + new, label=1) == {"train": 40, "val": 5, "test": 5}


def test_new_image_of_a_known_patient_joins_that_patients_split() -> None:
    old = [SplitItem(f"i{k}", f"p{k}", 0) for k in range(30)]
    before = assign_splits(old)
    patient_in_test = next(item for item in old if before[item.image_id].split == "test")
    extra = SplitItem("late", patient_in_test.group, 0)
    after = assign_splits([*old, extra], previous=before)
    assert after["late"].split == "test"


def test_the_split_does_not_depend_on_the_patient_key_secret() -> None:
    """Patient keys are HMACs under an installation's secret: another secret renames every
    group but groups the same images, and must give the same split."""
    import hashlib

    items = [SplitItem(f"img{i:03d}", f"p{i // 3}", i % 4 == 0) for i in range(90)]

    def renamed(item: SplitItem) -> SplitItem:
        return SplitItem(item.image_id, hashlib.sha256(item.group.encode()).hexdigest(), item.label)

    first = assign_splits(items, seed=5, folds=3)
    assert assign_splits([renamed(i) for i in items], seed=5, folds=3) == first
    assert assign_splits(items, seed=6, folds=3) != first  # the seed still decides
