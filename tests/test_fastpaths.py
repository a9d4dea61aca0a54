"""The training fast paths compute what the plain Keras code computes, and save the same way.

Small models with random starts; each fast path is compared against the code it replaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build, encoders, fastpaths, saving

pytestmark = pytest.mark.slow


def _small_net(tf, seed: int = 0):  # type: ignore[no-untyped-def]
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((8, 8, 2))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = tf.keras.layers.UpSampling2D(2)(x)
    return tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1)(x))


def _train(net, optimizer, steps: int, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    tf = tf_engine.import_tf()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(4, 8, 8, 2)), tf.float32)
    y = tf.constant(rng.normal(size=(4, 16, 16, 1)), tf.float32)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(net(x) - y))
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))


def test_fused_adam_updates_like_keras_adam() -> None:
    tf = tf_engine.import_tf()
    plain, fused = _small_net(tf), _small_net(tf)
    _train(plain, tf.keras.optimizers.Adam(1e-2), steps=6)
    _train(fused, fastpaths.FusedAdam(1e-2), steps=6)
    start = _small_net(tf)
    for a, b, c in zip(plain.get_weights(), fused.get_weights(), start.get_weights(), strict=True):
        assert not np.allclose(a, c)  # the weights did move
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_fused_adam_resumes_a_keras_adam_checkpoint(tmp_path: Path) -> None:
    tf = tf_engine.import_tf()
    net = _small_net(tf)
    optimizer = tf.keras.optimizers.Adam(1e-2)
    _train(net, optimizer, steps=3)
    prefix = tf.train.Checkpoint(model=net, optimizer=optimizer).write(str(tmp_path / "ckpt"))
    _train(net, optimizer, steps=3, seed=2)  # the reference continuation

    resumed = _small_net(tf, seed=5)
    fused = fastpaths.FusedAdam(1e-2)
    fused.build(resumed.trainable_variables)
    restored = tf.train.Checkpoint(model=resumed, optimizer=fused).read(prefix)
    restored.assert_existing_objects_matched()
    assert int(fused.iterations) == 3
    _train(resumed, fused, steps=3, seed=2)
    for a, b in zip(net.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_upsampling_keeps_its_output_and_gets_the_plain_gradient() -> None:
    tf = tf_engine.import_tf()
    plain, fast = _small_net(tf), _small_net(tf)
    assert fastpaths.fast_upsampling_gradients(fast) == 1
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 8, 8, 2)), tf.float32)
    weight = tf.constant(np.random.default_rng(1).normal(size=(3, 16, 16, 1)), tf.float32)
    results = []
    for net in (plain, fast):
        with tf.GradientTape() as tape:
            out = net(x)
            loss = tf.reduce_sum(out * weight)
        results.append((out.numpy(), [g.numpy() for g in tape.gradient(loss, net.weights)]))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert np.abs(results[0][1][0]).max() > 0


def test_unet_upsampling_is_changed_but_saved_as_plain_keras(tmp_path: Path) -> None:
    tf = tf_engine.import_tf()
    net = build.build_model("resnet18", 64, encoder_weights=None)
    upsampling = [layer for layer in net.layers if type(layer).__name__ == "UpSampling2D"]
    assert len(upsampling) == 5
    assert all("call" in vars(layer) for layer in upsampling)  # the instances' own call
    saving.save_model(net, tmp_path / "m.keras")
    loaded = saving.load_model(tmp_path / "m.keras")
    loaded_up = [layer for layer in loaded.layers if type(layer).__name__ == "UpSampling2D"]
    assert len(loaded_up) == 5 and not any("call" in vars(layer) for layer in loaded_up)
    x = encoders.scale_input(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1)), "raw-0-255")
    assert loaded.get_layer(build.INPUT_NORM_LAYER).fused is False  # frozen: as in training
    np.testing.assert_array_equal(loaded(x).numpy(), net(x).numpy())
    assert tf.keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_unfused_frozen_input_norm_computes_the_fused_result(precision: str) -> None:
    tf = tf_engine.import_tf()
    net = build.build_model("resnet18", 64, encoder_weights=None, precision=precision)
    layer = net.get_layer(build.INPUT_NORM_LAYER)
    assert layer.fused is False and layer.trainable is False
    rng = np.random.default_rng(0)
    layer.moving_mean.assign(rng.uniform(50, 150, 3).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(500, 5000, 3).astype(np.float32))
    for weight in (layer.gamma, layer.beta):  # segmentation_models' bn_data has no gamma
        if weight is not None:
            weight.assign(rng.uniform(0.5, 2, 3).astype(np.float32))
    x = encoders.scale_input(rng.integers(0, 256, (2, 64, 64, 1)), "raw-0-255")
    unfused = layer(tf.cast(x, layer.compute_dtype), training=False)
    layer.fused = True
    fused = layer(tf.cast(x, layer.compute_dtype), training=False)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(
        tf.cast(unfused, tf.float32).numpy(),
        tf.cast(fused, tf.float32).numpy(),
        rtol=tolerance,
        atol=tolerance,
    )
    trainable = build.build_model("resnet18", 64, encoder_weights=None, input_norm="trainable")
    assert trainable.get_layer(build.INPUT_NORM_LAYER).fused is True


def test_folded_zero_padding_gives_the_plain_outputs_and_gradients(tmp_path: Path) -> None:
    tf = tf_engine.import_tf()
    tf.keras.utils.set_random_seed(0)
    fast = build.build_model("resnet18", 64, encoder_weights=None)  # folds its padding
    plain = tf.keras.models.clone_model(fast)  # fresh plain layers, same configuration
    plain.set_weights(fast.get_weights())
    plain.get_layer(build.INPUT_NORM_LAYER).fused = False  # as in fast: compare padding only
    assert fastpaths.fold_zero_padding(tf.keras.models.clone_model(fast)) == 13
    # resnet18: 16 padded 3x3 convolutions, 3 of them strided (kept); the 7x7 conv0 and the
    # max pool are strided too.
    folded = [layer for layer in fast.layers if "call" in vars(layer)]
    assert sum(type(layer).__name__ == "ZeroPadding2D" for layer in folded) == 13
    assert sum(type(layer).__name__ == "Conv2D" for layer in folded) == 13
    rng = np.random.default_rng(0)
    x = encoders.scale_input(rng.integers(0, 256, (2, 64, 64, 1)), "raw-0-255")
    weight = tf.constant(rng.normal(size=(2, 64, 64, 1)), tf.float32)
    results = []
    for net in (plain, fast):
        with tf.GradientTape() as tape:
            out = net(x, training=True)
            loss = tf.reduce_sum(out * weight)
        grads = tape.gradient(loss, net.trainable_variables)
        results.append((out.numpy(), [g.numpy() for g in grads]))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    saving.save_model(fast, tmp_path / "m.keras")
    loaded = saving.load_model(tmp_path / "m.keras")
    assert not any("call" in vars(layer) for layer in loaded.layers)
    assert [type(layer).__name__ for layer in loaded.layers] == [
        type(layer).__name__ for layer in fast.layers
    ]
