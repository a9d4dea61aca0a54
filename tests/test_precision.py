"""Mixed precision: policies, float32 outputs and saved models, loss scaling, fp32/bf16 parity.

Models are resnet18 U-Nets at 64 px with random starts (no downloads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumo_cli.core.config import TrainConfig
from pneumo_cli.engine import precision as precisions
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build, encoders, saving
from pneumo_cli.training import runs, settings, setup, train
from tests.cachefactory import synthetic_cache

pytestmark = pytest.mark.slow

FAST = dict(encoder="resnet18", encoder_weights="none", batch_size=4, lr=1e-3, augment=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_cache(
        tmp_path_factory.mktemp("cache"), image_size=64, n_train=12, n_val=8, seed=1
    )


def test_policy_is_scoped_idempotent_and_survives_clear_session() -> None:
    tf = tf_engine.import_tf()
    assert precisions.current_precision() == "fp32"
    with precisions.precision_policy("bf16"):
        with precisions.precision_policy("bf16"):  # nested and repeated: no change
            assert tf.keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        precisions.clear_session()
        assert tf.keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    # A global policy left behind by someone else does not leak into the built model.
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        net = build.build_model("resnet18", 64, encoder_weights=None, precision="fp32")
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert {layer.compute_dtype for layer in net.layers} == {"float32"}


@pytest.mark.parametrize(("precision", "compute"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_mixed_models_output_float32(precision: str, compute: str) -> None:
    tf = tf_engine.import_tf()
    net = build.build_model("resnet18", 64, encoder_weights=None, precision=precision)
    assert net.get_layer("final_conv").compute_dtype == compute
    assert net.get_layer("final_conv").variable_dtype == "float32"
    assert net.output.dtype == tf.float32
    assert net.layers[-1].name == "pneumo_sigmoid_float32"
    assert tf.keras.mixed_precision.global_policy().name == "float32"


def test_fp16_training_uses_loss_scaling_and_fp32_does_not() -> None:
    tf = tf_engine.import_tf()
    config = TrainConfig(precision="fp16", **FAST)
    net = build.build_model("resnet18", 64, encoder_weights=None, precision="fp16")
    optimizer = setup.compile_model(net, config, replicas=1)
    assert isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert optimizer.dynamic and float(optimizer.loss_scale) == 2.0**15
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    y = np.zeros((2, 64, 64, 1), np.float32)
    loss = net.train_on_batch(x, y)[0]  # [loss, dice, positives-only dice]
    assert np.isfinite(loss)
    plain = build.build_model("resnet18", 64, encoder_weights=None, precision="fp32")
    assert not isinstance(
        setup.compile_model(plain, TrainConfig(precision="fp32", **FAST), 1),
        tf.keras.mixed_precision.LossScaleOptimizer,
    )


def _inputs(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from pneumo_cli.data import cache as data_cache
    from pneumo_cli.data import pipeline as data_pipeline

    info = data_cache.read_cache(cache)
    images, masks = data_pipeline.load_arrays(data_cache.select_split(info, split), 64)
    return encoders.scale_input(images, "raw-0-255").numpy(), masks[..., 0]


def _siim_dice(probabilities: np.ndarray, masks: np.ndarray) -> float:
    predicted = probabilities[..., 0] > 0.5
    scores = []
    for p, t in zip(predicted, masks.astype(bool), strict=True):
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * (p & t).sum() / total)
    return float(np.mean(scores))


def test_fp32_and_bf16_train_alike_and_bf16_saves_a_float32_model(
    cache: Path, tmp_path: Path
) -> None:
    """Same seed and data, 30 steps each: training loss and training Dice agree; the saved bf16
    model is float32 and predicts like the bf16 network. Validation-Dice parity is NOT asserted
    here: after 30 steps the batch-norm moving statistics have not settled and validation Dice
    is still far from a plateau in both precisions (measured at 64 px: 150 steps gave 0.59 in
    fp32 and 0.66 in bf16); benchmarks/bench_precision.py --parity measures it at a plateau."""
    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(
            cache=str(cache), epochs=2, steps_per_epoch=15, patience=0, precision=precision,
            **FAST,
        )  # fmt: skip
        result = train.train_model(config, tmp_path, name=precision)
        saved = runs.load_run_config(result.run_dir)
        assert saved["precision"] == precision
        assert saved["precision_reason"] == "asked for with --precision"
        results[precision] = runs.read_history(result.run_dir)[-1]
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32["dice"] > 0.8 and bf16["dice"] > 0.8  # both learnt the ellipses
    assert abs(fp32["dice"] - bf16["dice"]) <= 0.05
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.25)

    tf = tf_engine.import_tf()
    last = saving.load_model(tmp_path / "bf16" / "last.keras")
    assert {layer.compute_dtype for layer in last.layers} == {"float32"}
    x, masks = _inputs(cache, "val")
    loaded = last.predict(x, verbose=0)
    assert loaded.dtype == np.float32 and last.output.dtype == tf.float32
    # The same weights in bf16, as training had them in memory.
    in_memory = build.build_model("resnet18", 64, encoder_weights=None, precision="bf16")
    in_memory.set_weights(last.get_weights())
    assert in_memory.get_layer("final_conv").compute_dtype == "bfloat16"
    mixed = in_memory.predict(x, verbose=0)
    assert float(np.abs(loaded - mixed).mean()) < 0.01
    assert abs(_siim_dice(loaded, masks) - _siim_dice(mixed, masks)) <= 0.02


def test_auto_precision_is_resolved_and_recorded(cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(cache), epochs=1, steps_per_epoch=1, **FAST)
    assert config.precision == "auto"
    result = train.train_model(config, tmp_path)
    saved = runs.load_run_config(result.run_dir)
    expected, reason = precisions.choose_precision("auto", on_gpu=False)
    assert (saved["precision"], saved["precision_reason"]) == (expected, reason)
    assert saved["precision_reason"].startswith("auto: ")
    resumed_config = settings.config_from_run(saved)
    assert resumed_config.precision == expected  # a resumed run keeps what was chosen
