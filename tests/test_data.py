"""Cache reading, epoch plans and the tf.data pipelines."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo_cli.core.config import parse_pos_fraction
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.data import augment, sampling
from pneumo_cli.data import cache as data_cache
from pneumo_cli.data import pipeline as data_pipeline
from pneumo_cli.engine.tf import import_tf
from pneumo_cli.model.encoders import scale_input
from tests.cachefactory import synthetic_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache"), image_size=64, n_train=6, n_val=3,
                           train_positive_every=2)  # fmt: skip


def test_read_cache_keeps_labelled_rows_and_hashes_the_manifest(cache: Path) -> None:
    info = data_cache.read_cache(cache)
    assert info.image_size == 64 and info.settings["clahe"] is True
    assert [r.image_id for r in info.records] == [f"train{i:03d}" for i in range(6)] + [
        "val000",
        "val001",
        "val002",
    ]  # the unlabelled test image is left out
    assert [r.positive for r in info.records[:6]] == [True, False] * 3
    assert info.records[0].image == str(cache.absolute() / "images" / "train000.png")
    assert info.manifest_sha256 == hashlib.sha256((cache / "manifest.csv").read_bytes()).hexdigest()
    assert [r.image_id for r in data_cache.select_split(info, "val")] == [
        "val000",
        "val001",
        "val002",
    ]


def test_cache_errors_name_the_problem(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; create it with `pneumo preprocess"):
        data_cache.read_cache(tmp_path / "nope")
    with pytest.raises(InputError, match="has no manifest.csv"):
        data_cache.read_cache(tmp_path)
    (tmp_path / "manifest.csv").write_text("ImageId,image\n")
    with pytest.raises(InputError, match="has no preprocess.json"):
        data_cache.read_cache(tmp_path)
    (tmp_path / "preprocess.json").write_text('{"settings": {"image_size": 64}, "complete": true}')
    with pytest.raises(InputError, match="header must start with ImageId, image, mask"):
        data_cache.read_cache(tmp_path)
    info = data_cache.read_cache(cache)
    with pytest.raises(
        InputError, match="no labelled images in split 'holdout' .splits present: train, val"
    ):
        data_cache.select_split(info, "holdout")
    negatives_only = data_cache.CacheInfo(info.folder, info.records[1:2], info.settings, "")
    with pytest.raises(InputError, match="split 'train' has no image with a pneumothorax"):
        data_cache.select_split(negatives_only, "train", need_positive=True)


def test_bad_label_value_names_the_line(cache: Path, tmp_path: Path) -> None:
    rows = list(csv.reader((cache / "manifest.csv").read_text().splitlines()))
    rows[3][3] = "yes"
    with open(tmp_path / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (tmp_path / "preprocess.json").write_text('{"settings": {"image_size": 64}, "complete": true}')
    with pytest.raises(InputError, match="manifest.csv line 4: has_pneumothorax 'yes'"):
        data_cache.read_cache(tmp_path)


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    positive = [True, False, False, True, False]
    first = sampling.epoch_order(positive, 5, seed=3, epoch=0)
    assert sorted(first) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(first, sampling.epoch_order(positive, 5, seed=3, epoch=0))
    assert not np.array_equal(first, sampling.epoch_order(positive, 5, seed=3, epoch=1))
    assert not np.array_equal(first, sampling.epoch_order(positive, 5, seed=4, epoch=0))
    twelve = sampling.epoch_order(positive, 12, seed=3, epoch=0)
    assert sorted(twelve[:5]) == sorted(twelve[5:10]) == [0, 1, 2, 3, 4]  # full rounds first


def test_pos_fraction_oversamples_positives() -> None:
    positive = [True] + [False] * 9
    order = sampling.epoch_order(positive, 1000, seed=0, epoch=0, pos_fraction=0.5)
    share = np.mean(np.asarray(positive)[order])
    assert 0.45 < share < 0.55  # natural share 0.1
    negatives = order[~np.asarray(positive)[order]]
    assert set(negatives[:9]) == set(range(1, 10))  # every negative used before repeats
    assert (np.asarray(positive)[sampling.epoch_order(positive, 50, 0, 0, 1.0)]).all()


def test_parse_pos_fraction() -> None:
    assert parse_pos_fraction(None) is None
    assert parse_pos_fraction("0.8") == (0.8, 0.8)
    assert parse_pos_fraction("0.8:0.4") == (0.8, 0.4)
    assert sampling.pos_fraction_at((0.8, 0.4), 0, 5) == 0.8
    assert sampling.pos_fraction_at((0.8, 0.4), 2, 5) == pytest.approx(0.6)
    assert sampling.pos_fraction_at((0.8, 0.4), 4, 5) == pytest.approx(0.4)
    for bad in ("1.5", "a", "0.1:0.2:0.3", "-0.1"):
        with pytest.raises(ConfigError, match="--pos-fraction"):
            parse_pos_fraction(bad)


def test_load_arrays_decodes_the_pngs_exactly(cache: Path) -> None:
    records = data_cache.read_cache(cache).records
    images, masks = data_pipeline.load_arrays(records, 64)
    assert images.shape == masks.shape == (9, 64, 64, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(
        images[2, :, :, 0], cv2.imread(str(cache / "images/train002.png"), 0)
    )
    expected_mask = cv2.imread(str(cache / "masks/train002.png"), 0) // 255
    np.testing.assert_array_equal(masks[2, :, :, 0], expected_mask)
    assert expected_mask.sum() > 20 and set(np.unique(masks)) == {0, 1}
    with pytest.raises(InputError, match="is not a 32x32 grey PNG|not a 32x32 grey PNG"):
        data_pipeline.load_arrays(records[:1], 32)


def _batches(pipeline: data_pipeline.Pipeline) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in pipeline.dataset]


def test_train_pipeline_is_deterministic_and_resumable(cache: Path) -> None:
    records = data_cache.select_split(data_cache.read_cache(cache), "train")
    kwargs = dict(seed=5, epochs=2, pos_fraction=(0.8, 0.8))
    full = _batches(data_pipeline.make_train_dataset(records, 64, "raw-0-255", 2, 3, **kwargs))
    again = _batches(data_pipeline.make_train_dataset(records, 64, "raw-0-255", 2, 3, **kwargs))
    assert len(full) == 6
    x, y = full[0]
    assert x.shape == (2, 64, 64, 3) and x.dtype == np.float32 and y.shape == (2, 64, 64, 1)
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert x.min() >= 0 and x.max() <= 255
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    resumed = _batches(
        data_pipeline.make_train_dataset(records, 64, "raw-0-255", 2, 3, first_epoch=1, **kwargs)
    )
    assert len(resumed) == 3
    for (xa, _), (xb, _) in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
    other_seed = _batches(
        data_pipeline.make_train_dataset(records, 64, "raw-0-255", 2, 3, seed=6, epochs=2)
    )
    assert not np.array_equal(other_seed[0][0], full[0][0])


def test_streaming_and_in_memory_pipelines_agree(cache: Path) -> None:
    records = data_cache.select_split(data_cache.read_cache(cache), "train")
    memory = data_pipeline.make_train_dataset(records, 64, "imagenet-mean-std", 3, 2, seed=1)
    stream = data_pipeline.make_train_dataset(
        records, 64, "imagenet-mean-std", 3, 2, seed=1, memory_limit=0
    )
    assert memory.in_memory and not stream.in_memory
    for (xa, ya), (xb, yb) in zip(_batches(memory), _batches(stream), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_augmentation_moves_image_and_mask_together() -> None:
    tf = import_tf()
    mask = np.zeros((64, 64, 1), np.float32)
    mask[10:30, 5:25] = 1  # off-centre, so a flip or shift changes it
    image = mask * 255.0
    changed = 0
    for i in range(8):
        aug_image, aug_mask = augment.augment_pair(tf.constant(image), tf.constant(mask), [9, i])
        aug_image, aug_mask = aug_image.numpy(), aug_mask.numpy()
        assert set(np.unique(aug_mask)) <= {0.0, 1.0}
        agreement = np.mean((aug_image > 127) == (aug_mask > 0.5))
        assert agreement > 0.97
        changed += int(np.mean(aug_mask != mask) > 0.02)
    assert changed >= 6
    again = augment.augment_pair(tf.constant(image), tf.constant(mask), [9, 0])[0].numpy()
    first = augment.augment_pair(tf.constant(image), tf.constant(mask), [9, 0])[0].numpy()
    np.testing.assert_array_equal(again, first)


def test_eval_pipeline_is_every_record_in_order_unaugmented(cache: Path) -> None:
    records = data_cache.select_split(data_cache.read_cache(cache), "val")
    batches = _batches(data_pipeline.make_eval_dataset(records, 64, "symmetric-1", 2))
    assert [len(x) for x, _ in batches] == [2, 1]
    grey = cv2.imread(str(cache / "images/val002.png"), 0)
    np.testing.assert_allclose(batches[1][0][0], scale_input(grey, "symmetric-1").numpy())
    np.testing.assert_array_equal(
        batches[1][1][0, :, :, 0], cv2.imread(str(cache / "masks/val002.png"), 0) / 255
    )
