"""The U-Net factory, input scaling, encoder weights files and model save/load."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build, encoders, saving, weights

tf = tf_engine.import_tf()
sm = tf_engine.import_sm()


def build_encoder(name: str) -> object:
    """A bare segmentation_models encoder (the layout of its ImageNet weights files)."""
    keras = tf.keras
    return sm.Backbones.get_backbone(
        name, input_shape=(64, 64, 3), weights=None, include_top=False,
        backend=keras.backend, layers=keras.layers, models=keras.models, utils=keras.utils,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resnet18_backbone_h5(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An .h5 of a resnet18 encoder with random weights, written like the ImageNet files."""
    tf.keras.utils.set_random_seed(7)
    backbone = build_encoder("resnet18")
    path = tmp_path_factory.mktemp("weights") / "resnet18_encoder.h5"
    backbone.save_weights(path)
    return str(path)


@pytest.fixture(scope="module")
def resnet18_unet() -> object:
    tf.keras.utils.set_random_seed(1)
    return build.build_model("resnet18", 64, encoder_weights=None)


def test_import_tf_selects_the_tf_keras_engine() -> None:
    import tf_keras

    assert os.environ["TF_USE_LEGACY_KERAS"] == "1"
    assert os.environ["SM_FRAMEWORK"] == "tf.keras"
    assert tf.keras.Model is tf_keras.Model
    assert sm.framework() == "tf.keras"
    assert tf_engine.keras_engine() == f"tf-keras {tf_keras.__version__}"


@pytest.mark.parametrize(
    ("encoder", "scaling"),
    [
        ("resnet18", "raw-0-255"),  # classification_models' ResNets normalise inside (bn_data)
        ("resnet34", "raw-0-255"),
        ("seresnext50", "imagenet-mean-std"),
        ("densenet121", "imagenet-mean-std"),
        ("efficientnetb0", "imagenet-mean-std"),
        ("vgg16", "caffe-mean"),
        ("mobilenetv2", "symmetric-1"),
    ],
)
def test_input_scaling_matches_segmentation_models_preprocessing(
    encoder: str, scaling: str
) -> None:
    assert encoders.input_scaling_for(encoder) == scaling
    grey = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
    expected = sm.get_preprocessing(encoder)(np.repeat(grey, 3, axis=3).astype(np.float64))
    ours = encoders.scale_input(grey, scaling).numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_scale_input_hand_computed_values_and_shapes() -> None:
    image = np.array([[0, 255]], dtype=np.uint8)  # (H, W) = (1, 2)
    out = encoders.scale_input(image, "imagenet-mean-std").numpy()
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(
        out[0, 1], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6
    )
    np.testing.assert_allclose(
        out[0, 0], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6
    )
    np.testing.assert_array_equal(
        encoders.scale_input(image, "raw-0-255").numpy()[0, 1], [255, 255, 255]
    )
    np.testing.assert_allclose(
        encoders.scale_input(image, "symmetric-1").numpy()[0], [[-1] * 3, [1] * 3]
    )
    np.testing.assert_allclose(
        encoders.scale_input(image, "caffe-mean").numpy()[0, 0],
        [-103.939, -116.779, -123.68],
        rtol=1e-6,
    )
    assert encoders.scale_input(np.zeros((4, 32, 32, 1)), "raw-0-255").shape == (4, 32, 32, 3)
    with pytest.raises(ConfigError, match="unknown input scaling 'zscore'"):
        encoders.scale_input(image, "zscore")


def test_build_model_shapes_and_one_float32_sigmoid_channel(resnet18_unet: object) -> None:
    net = resnet18_unet
    assert net.input_shape == (None, 64, 64, 3)
    assert net.output_shape == (None, 64, 64, 1)
    out = net(np.zeros((1, 64, 64, 3), np.float32)).numpy()
    assert out.dtype == np.float32 and ((out > 0) & (out < 1)).all()
    assert net.layers[-1].get_config()["activation"] == "sigmoid"


def test_bf16_model_keeps_a_float32_output() -> None:
    net = build.build_model("resnet18", 64, encoder_weights=None, precision="bf16")
    assert net.get_layer("final_conv").compute_dtype == "bfloat16"
    assert net.output.dtype == tf.float32
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # not left behind


def test_unknown_encoder_lists_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown encoder 'resnet35'; choose one of: resnet18, resnet34"
    ):
        build.build_model("resnet35", 64, encoder_weights=None)


def test_image_size_must_be_a_multiple_of_32() -> None:
    with pytest.raises(
        ConfigError, match="image size 100 px must be a multiple of 32 from 32 to 4096"
    ):
        build.build_model("resnet18", 100, encoder_weights=None)


def test_encoder_weights_file_loads_into_every_encoder_layer(resnet18_backbone_h5: str) -> None:
    import h5py

    net = build.build_model("resnet18", 64, encoder_weights=resnet18_backbone_h5)
    layers = weights.encoder_layers(net)
    # bn_data, conv0, bn0, 8 blocks x (2 bn + 2 conv), 4 shortcut convs, bn1
    assert len(layers) == 40 and layers[0].name == "bn_data"
    assert [layer.name for layer in layers][-1] == "bn1"
    with h5py.File(resnet18_backbone_h5, "r") as handle:
        kernel = np.asarray(handle["conv0"]["conv0"]["kernel:0"])
        gamma = np.asarray(handle["stage4_unit2_bn2"]["stage4_unit2_bn2"]["gamma:0"])
    np.testing.assert_array_equal(net.get_layer("conv0").get_weights()[0], kernel)
    np.testing.assert_array_equal(net.get_layer("stage4_unit2_bn2").get_weights()[0], gamma)
    # The frozen input normalisation keeps the file's statistics (ImageNet's, for real weights).
    with h5py.File(resnet18_backbone_h5, "r") as handle:
        moving_mean = np.asarray(handle["bn_data"]["bn_data"]["moving_mean:0"])
    bn_data = net.get_layer("bn_data")
    assert not bn_data.trainable
    np.testing.assert_array_equal(bn_data.moving_mean.numpy(), moving_mean)


def test_encoder_weights_of_another_encoder_are_refused(
    resnet18_backbone_h5: str, tmp_path: pytest.TempPathFactory
) -> None:
    # resnet18's weights lack resnet34's extra units.
    with pytest.raises(
        ConfigError, match="does not fit encoder resnet34: no weights for layer 'stage1_unit3"
    ):
        build.build_model("resnet34", 64, encoder_weights=resnet18_backbone_h5)
    # A resnet34 file has all of resnet18's layers plus 8 blocks x 4 more.
    backbone34 = build_encoder("resnet34")
    path34 = tmp_path / "resnet34.h5"
    backbone34.save_weights(path34)
    with pytest.raises(
        ConfigError, match=r"does not fit encoder resnet18: it has 32 layer\(s\) the encoder lacks"
    ):
        build.build_model("resnet18", 64, encoder_weights=path34)
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(InputError, match="not an HDF5"):
        build.build_model("resnet18", 64, encoder_weights=not_h5)
    with pytest.raises(InputError, match="does not exist"):
        build.build_model("resnet18", 64, encoder_weights=tmp_path / "missing.h5")


def test_imagenet_weights_absent_and_offline_gives_one_actionable_line(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    calls = []

    def offline(*args: object, **kwargs: object) -> str:
        calls.append(args)
        raise Exception(  # what keras.utils.get_file raises when offline
            "URL fetch failure on https://x/y.h5: None -- "
            "[Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(tf.keras.utils, "get_file", offline)
    notes: list[str] = []
    with pytest.raises(ConfigError) as caught:
        build.build_model("resnet34", 64, encoder_weights="imagenet", notify=notes.append)
    message = str(caught.value)
    folder = tmp_path / "keras" / "models"
    assert "\n" not in message
    assert "resnet34_imagenet_1000_no_top.h5" in message
    assert "8caaa0ad39d927cb8ba5385bf945d582" in message  # its md5 in classification_models
    assert f"in {folder}," in message
    assert "--encoder-weights none" in message and "--encoder-weights PATH" in message
    assert "Temporary failure in name resolution" in message
    assert len(calls) == 1 and notes and str(folder) in notes[0]


def test_imagenet_weights_from_the_cache_are_checked_and_loaded(
    resnet18_backbone_h5: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(resnet18_backbone_h5, "rb") as handle:
        data = handle.read()
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "fake_resnet18.h5").write_bytes(data)
    fake = weights.ImagenetWeights(
        "resnet18", "fake_resnet18.h5", "https://invalid/", hashlib.md5(data).hexdigest(), folder
    )
    monkeypatch.setattr(weights, "imagenet_weights", lambda encoder: fake)
    monkeypatch.setattr(
        tf.keras.utils, "get_file", lambda *a, **k: pytest.fail("must not download")
    )
    net = build.build_model("resnet18", 64, encoder_weights="imagenet")
    assert net.get_layer("conv0").get_weights()[0].std() > 0
    (folder / "fake_resnet18.h5").write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(
        ConfigError, match=r"fake_resnet18.h5 is damaged \(md5 [0-9a-f]{32}, expected"
    ):
        build.build_model("resnet18", 64, encoder_weights="imagenet")


def test_save_then_load_gives_identical_predictions(
    resnet18_unet: object, tmp_path: pytest.TempPathFactory
) -> None:
    net = resnet18_unet
    path = tmp_path / "model.keras"
    saving.save_model(net, path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pneumo-tmp")]
    loaded = saving.load_model(path)
    x = encoders.scale_input(np.random.default_rng(3).integers(0, 256, (2, 64, 64, 1)), "raw-0-255")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), net.predict(x, verbose=0))


def test_load_model_errors(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(InputError, match="no such model file"):
        saving.load_model(tmp_path / "best.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK not really a zip")
    with pytest.raises(InputError, match="not a readable Keras model"):
        saving.load_model(broken)


def test_input_norm_frozen_by_default_centres_raw_bytes(resnet18_unet: object) -> None:
    bn_data = resnet18_unet.get_layer(build.INPUT_NORM_LAYER)
    assert not bn_data.trainable
    np.testing.assert_allclose(bn_data.moving_mean.numpy(), [127.5] * 3)
    np.testing.assert_allclose(bn_data.moving_variance.numpy(), [255.0**2 / 12] * 3)
    assert bn_data.beta.numpy().tolist() == [0.0] * 3
    # As a fixed affine map, the layer turns 0 and 255 into about -1.73 and +1.73.
    probe = tf.keras.Model(resnet18_unet.input, bn_data.output)
    ends = np.zeros((2, 64, 64, 3), np.float32)
    ends[1] = 255.0
    out = probe(ends, training=True).numpy()
    np.testing.assert_allclose(out[:, 0, 0, 0], [-(3**0.5), 3**0.5], rtol=1e-3)


def test_trainable_input_norm_learns_and_frozen_does_not() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 64, 64, 3)).astype(np.float32)
    y = (rng.random((4, 64, 64, 1)) > 0.8).astype(np.float32)
    for mode in build.INPUT_NORMS:
        net = build.build_model("resnet18", 64, encoder_weights=None, input_norm=mode)
        net.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        before = [w.numpy().copy() for w in net.get_layer("bn_data").weights]
        net.fit(x, y, epochs=1, batch_size=4, verbose=0)
        after = [w.numpy() for w in net.get_layer("bn_data").weights]
        changed = any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
        assert changed == (mode == "trainable"), mode


def test_input_norm_mode_is_checked_and_encoders_without_one_are_left_alone() -> None:
    with pytest.raises(
        ConfigError, match="--input-norm 'learned': choose one of: frozen, trainable"
    ):
        build.build_model("resnet18", 64, encoder_weights=None, input_norm="learned")
    plain = tf.keras.Sequential([tf.keras.Input((8, 8, 3)), tf.keras.layers.Conv2D(1, 1)])
    assert build.set_input_norm(plain, "frozen", random_start=True) is False
    assert all(layer.trainable for layer in plain.layers)
