"""The segmentation_models U-Net and the one place that chooses the Keras engine.

pneumo runs on TensorFlow with the tf-keras engine (``TF_USE_LEGACY_KERAS=1``) and
segmentation_models in its ``tf.keras`` mode (``SM_FRAMEWORK=tf.keras``). Both variables must be
set before TensorFlow is first imported, so every module gets TensorFlow from :func:`import_tf`
and segmentation_models from :func:`import_sm`; nothing else sets them.

Images enter the network as float32 (B, H, W, 3): the grey uint8 X-ray repeated on the three
channels, then scaled the way the encoder's ImageNet weights expect (:func:`scale_input`). The
scaling's name is stored in every run so that prediction scales exactly as training did.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.errors import ConfigError, InputError

DEFAULT_ENCODER = "resnet34"
PRECISIONS = ("fp32", "bf16", "fp16")
# Keras mixed-precision policy per precision: variables stay float32, compute in the named type.
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

# How grey pixel values v in [0, 255] become network inputs, per encoder family. The names are
# stored in runs; the maths must match segmentation_models' get_preprocessing(encoder), which
# tests/test_model.py checks for every encoder.
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
SCALINGS = ("raw-0-255", "imagenet-mean-std", "caffe-mean", "symmetric-1")
INPUT_NORMS = ("frozen", "trainable")
INPUT_NORM_LAYER = "bn_data"  # the input BatchNormalization of segmentation_models' ResNets

# Layer names segmentation_models gives the U-Net decoder; every other layer is the encoder.
_DECODER_PREFIXES = ("decoder_stage", "center_block", "final_conv", "sigmoid", "pneumo_")


def import_tf() -> Any:
    """Import TensorFlow with the tf-keras engine and return the ``tensorflow`` module.

    Sets ``TF_USE_LEGACY_KERAS=1`` and ``SM_FRAMEWORK=tf.keras`` unless TensorFlow is already
    imported (then they can no longer take effect and are left alone).

    Raises:
        ConfigError: ``tf.keras`` is not the tf-keras engine (TensorFlow was imported elsewhere
            before pneumo could select it, or the ``tf-keras`` package is missing).
    """
    if "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        os.environ["SM_FRAMEWORK"] = "tf.keras"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        with _native_start_up_noise_filtered():
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # the CUDA probe logs here, not at import
    import tensorflow as tf

    engine = tf.keras.Model.__module__  # forces the lazy tf.keras to resolve
    if not engine.startswith("tf_keras"):
        raise ConfigError(
            f"tf.keras is '{engine}', not the tf-keras engine pneumo needs: install tf-keras "
            "matching TensorFlow and make sure TensorFlow is not imported before pneumo "
            "(or export TF_USE_LEGACY_KERAS=1)"
        )
    return tf


# TensorFlow's C++ start-up lines that say nothing to a pneumo user (glog format), e.g.
# "I0000 00:00:... port.cc:153] oneDNN custom operations are on" or, on machines without a GPU,
# "E0000 ... cuda_platform.cc:52] failed call to cuInit". TF_CPP_MIN_LOG_LEVEL does not hide them.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} [\d:. ]+\d+ \S+\] "
    r"|[WE]\d{4} [\d:. ]+\d+ \S+\] .*(cuInit|CUDA|cuda|TensorRT|Unable to register))"
)


@contextlib.contextmanager
def _native_start_up_noise_filtered() -> Iterator[None]:
    """Capture file descriptor 2 while TensorFlow starts, then pass on every line that is not
    known start-up noise, so warnings and errors still reach the user."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if line.strip() and not _NATIVE_NOISE.match(line):
                    print(line, file=sys.stderr)


# What segmentation_models prints on import; dropped so that an error is one line on stderr.
_SM_BANNER = re.compile(r"Segmentation Models: using `[\w.]+` framework\.")


def import_sm() -> Any:
    """Import segmentation_models in ``tf.keras`` mode; anything it prints other than its
    start-up banner goes to stderr (stdout carries ``--json``)."""
    import_tf()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import segmentation_models as sm
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip() and not _SM_BANNER.fullmatch(line.strip()):
                print(line, file=sys.stderr)
    if sm.framework() != "tf.keras":
        raise ConfigError(
            f"segmentation_models runs on '{sm.framework()}', not tf.keras; it was imported "
            "before pneumo could select the framework (export SM_FRAMEWORK=tf.keras)"
        )
    return sm


def keras_engine() -> str:
    """The Keras engine in use, e.g. ``"tf-keras 2.21.0"``."""
    import_tf()
    import tf_keras

    return f"tf-keras {tf_keras.__version__}"


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a trained model computes."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in (
        "tensorflow",
        "tf-keras",
        "segmentation-models",
        "numpy",
        "opencv-python-headless",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


# Backbones whose segmentation_models U-Net contains Lambda layers (Python code): the
# grouped convolutions of ResNeXt/SENet slice channels in a Lambda, the squeeze-excitation
# blocks of SE-ResNet(X)/SENet expand dimensions in one, and Inception-ResNet-v2 scales its
# residuals in one (found by building every backbone at 64 px). load_model never runs code
# from a model file, so a run of theirs could never be loaded again: training refuses them up
# front, and build_model also checks every network it builds.
CODE_ENCODERS = (
    "seresnet18", "seresnet34", "seresnet50", "seresnet101", "seresnet152", "seresnext50",
    "seresnext101", "senet154", "resnext50", "resnext101", "inceptionresnetv2",
)  # fmt: skip


def available_encoders() -> list[str]:
    """Encoder (backbone) names pneumo can train: those segmentation_models can build, minus
    :data:`CODE_ENCODERS`, whose models could never be loaded again."""
    return [name for name in _known_encoders() if name not in CODE_ENCODERS]


def _known_encoders() -> list[str]:
    return list(import_sm().get_available_backbone_names())


def check_encoder(encoder: str) -> str:
    """Return ``encoder`` if pneumo can train it, else raise ConfigError listing those it can.

    Raises:
        ConfigError: the encoder is unknown, or is one of :data:`CODE_ENCODERS` (the message
            says why: its models hold code, which pneumo never loads).
    """
    names = available_encoders()
    if encoder in CODE_ENCODERS:
        raise ConfigError(
            f"encoder '{encoder}' cannot be used: its U-Net contains Lambda layers (Python "
            "code), and pneumo refuses to load model files holding code, so its runs could "
            f"never be used by predict, evaluate or export; choose one of: {', '.join(names)}"
        )
    if encoder not in names:
        raise ConfigError(f"unknown encoder '{encoder}'; choose one of: {', '.join(names)}")
    return encoder


def input_scaling_for(encoder: str) -> str:
    """Name of the input scaling segmentation_models' ``get_preprocessing(encoder)`` applies.

    Found by running that function on a probe of grey values and matching the result against
    :data:`SCALINGS`, so a future change in segmentation_models cannot silently diverge.

    Raises:
        ConfigError: the encoder is unknown or its preprocessing matches none of the scalings.
    """
    sm = import_sm()
    if encoder not in _known_encoders():  # any backbone: scaling is not about training
        check_encoder(encoder)
    probe = np.repeat(np.array([0.0, 17.0, 128.0, 255.0]).reshape(1, 2, 2, 1), 3, axis=3)
    expected = np.asarray(sm.get_preprocessing(encoder)(probe.copy()), dtype=np.float64)
    for name in SCALINGS:
        if np.allclose(_scale_numpy(probe, name), expected, atol=1e-4):
            return name
    raise ConfigError(f"encoder '{encoder}' uses an input scaling pneumo does not know")


def _scale_numpy(batch: np.ndarray, scaling: str) -> np.ndarray:
    if scaling == "raw-0-255":
        return batch
    if scaling == "imagenet-mean-std":
        return (batch / 255.0 - np.array(_IMAGENET_MEAN_RGB)) / np.array(_IMAGENET_STD_RGB)
    if scaling == "caffe-mean":
        return batch - np.array(_CAFFE_MEAN_BGR)
    if scaling == "symmetric-1":
        return batch / 127.5 - 1.0
    raise ConfigError(f"unknown input scaling '{scaling}'; known: {', '.join(SCALINGS)}")


def scale_input(batch: Any, scaling: str) -> Any:
    """Turn grey pixels into network input, as a TensorFlow op.

    Args:
        batch: grey pixel values in [0, 255], any numeric dtype, shaped (..., H, W) or
            (..., H, W, 1): an (H, W) image, an (H, W, 1) image or a (B, H, W, 1) batch. A
            trailing axis of size 1 is taken as the channel axis.
        scaling: one of :data:`SCALINGS` (as recorded in the run's config.json).

    Returns:
        float32 tensor ending in a channel axis of 3 (the grey value on every channel), scaled.

    Raises:
        ConfigError: unknown scaling name.
    """
    tf = import_tf()
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown input scaling '{scaling}'; known: {', '.join(SCALINGS)}")
    x = tf.cast(batch, tf.float32)
    if x.shape[-1] != 1:
        x = x[..., tf.newaxis]
    x = tf.repeat(x, 3, axis=-1)
    if scaling == "imagenet-mean-std":
        mean = tf.constant(_IMAGENET_MEAN_RGB, tf.float32)
        std = tf.constant(_IMAGENET_STD_RGB, tf.float32)
        return (x / 255.0 - mean) / std
    if scaling == "caffe-mean":
        return x - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
    if scaling == "symmetric-1":
        return x / 127.5 - 1.0
    return x


@dataclass(frozen=True)
class ImagenetWeights:
    """Where segmentation_models looks for an encoder's ImageNet weights."""

    encoder: str
    file_name: str
    url: str
    md5: str
    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / self.file_name


def keras_cache_folder() -> Path:
    """Folder the Keras file cache keeps model weights in (as ``keras.utils.get_file`` does)."""
    base = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    if base.exists() and not os.access(base, os.W_OK):
        base = Path("/tmp/.keras")  # keras.utils.get_file's own fallback
    return base / "models"


def imagenet_weights(encoder: str) -> ImagenetWeights:
    """The ImageNet weights file segmentation_models uses for ``encoder``'s encoder.

    Raises:
        ConfigError: there are no ImageNet weights for this encoder.
    """
    import_sm()
    from classification_models.weights import WEIGHTS_COLLECTION

    for entry in WEIGHTS_COLLECTION:
        if (
            entry["model"] == encoder
            and entry["dataset"] == "imagenet"
            and not entry["include_top"]
        ):
            return ImagenetWeights(
                encoder, entry["name"], entry["url"], entry["md5"], keras_cache_folder()
            )
    raise ConfigError(
        f"pneumo knows no ImageNet weights file for encoder '{encoder}'; "
        "use --encoder-weights none or --encoder-weights PATH"
    )


def fetch_imagenet_weights(encoder: str, notify: Callable[[str], None] | None = None) -> Path:
    """Path of ``encoder``'s ImageNet weights in the Keras cache, downloading them if absent.

    ``notify`` is told what is downloaded from where, before the download starts.

    Raises:
        ConfigError: one line naming the file, its md5, the folder to put it in, and the
            ``none``/PATH alternatives, when the file is absent and cannot be downloaded.
    """
    tf = import_tf()
    weights = imagenet_weights(encoder)
    if weights.path.is_file():
        digest = _md5_of(weights.path)
        if digest != weights.md5:
            raise ConfigError(
                f"{weights.path} is damaged (md5 {digest}, expected {weights.md5}): delete it "
                f"and run again to download it, or place a good copy from {weights.url} there"
            )
        return weights.path
    with contextlib.suppress(OSError):
        weights.folder.mkdir(parents=True, exist_ok=True)
    if notify is not None:
        notify(f"downloading {weights.file_name} from {weights.url} into {weights.folder}")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            fetched = tf.keras.utils.get_file(
                weights.file_name,
                weights.url,
                cache_subdir="models",
                md5_hash=weights.md5,
                cache_dir=str(weights.folder.parent),
            )
    except Exception as exc:  # get_file raises bare Exception for network errors
        # get_file's message ends with the network error after " -- "; keep that part.
        reason = " ".join(str(exc).split()).rsplit(" -- ", 1)[-1][:160]
        raise ConfigError(
            f"ImageNet weights for {encoder} are not in the Keras cache and could not be "
            f"downloaded ({reason}): place {weights.file_name} (md5 {weights.md5}) from "
            f"{weights.url} in {weights.folder}, or train with --encoder-weights none "
            "(random start) or --encoder-weights PATH (an .h5 file of the encoder)"
        ) from None
    return Path(fetched)


def _md5_of(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoder_layers(model: Any) -> list[Any]:
    """The U-Net's encoder layers that hold weights (everything that is not the decoder)."""
    return [
        layer
        for layer in model.layers
        if layer.weights and not layer.name.startswith(_DECODER_PREFIXES)
    ]


def _h5_weight_groups(path: Path) -> dict[str, list[np.ndarray]]:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 (.h5) weights file") from None
    with handle:
        root = handle.get("model_weights", handle)
        if "layer_names" not in root.attrs:
            raise InputError(f"{path}: HDF5 file without Keras layer weights (no 'layer_names')")
        groups: dict[str, list[np.ndarray]] = {}
        for raw_name in root.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            group = root[name]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            if names:
                groups[name] = [np.asarray(group[n]) for n in names]
        return groups


def load_encoder_weights(model: Any, encoder: str, path: str | os.PathLike[str]) -> int:
    """Load an ``.h5`` file with the encoder's layer layout into the U-Net's encoder.

    The file may hold the bare encoder (as segmentation_models' ImageNet files do) or a whole
    U-Net; decoder layers in it are ignored. Every encoder layer must receive weights of the
    right shapes, and the file must not hold encoder layers this encoder lacks.

    Returns:
        The number of encoder layers loaded.

    Raises:
        InputError: the file is missing or not a Keras HDF5 weights file.
        ConfigError: the file does not fit the encoder (names the first mismatching layer).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"encoder weights file {path} does not exist")
    groups = _h5_weight_groups(path)
    layers = encoder_layers(model)
    ours = {layer.name for layer in layers}
    extra = sorted(n for n in groups if n not in ours and not n.startswith(_DECODER_PREFIXES))
    if extra:
        raise ConfigError(
            f"{path} does not fit encoder {encoder}: it has {len(extra)} layer(s) the encoder "
            f"lacks (e.g. '{extra[0]}'); was it written for another encoder?"
        )
    for layer in layers:
        arrays = groups.get(layer.name)
        expected = [tuple(w.shape) for w in layer.weights]
        if arrays is None:
            raise ConfigError(
                f"{path} does not fit encoder {encoder}: no weights for layer '{layer.name}'"
            )
        found = [tuple(a.shape) for a in arrays]
        if found != expected:
            raise ConfigError(
                f"{path} does not fit encoder {encoder}: layer '{layer.name}' needs shapes "
                f"{expected}, the file has {found}"
            )
    for layer in layers:
        layer.set_weights(groups[layer.name])
    return len(layers)


def _set_precision(precision: str) -> None:
    """Make ``precision``'s Keras policy the global one; idempotent, the only place that sets it.

    Raises:
        ConfigError: unknown precision.
    """
    tf = import_tf()
    if precision not in _POLICIES:
        raise ConfigError(
            f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}"
        )
    if tf.keras.mixed_precision.global_policy().name != _POLICIES[precision]:
        tf.keras.mixed_precision.set_global_policy(_POLICIES[precision])


def current_precision() -> str:
    """The precision whose policy is global now (``"fp32"`` for any policy pneumo did not set)."""
    name = import_tf().keras.mixed_precision.global_policy().name
    return next((key for key, policy in _POLICIES.items() if policy == name), "fp32")


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Layers created inside get ``precision``'s policy; the previous policy returns afterwards.

    The policy is applied on entry every time, so nothing that reset the global policy before
    (``clear_session`` in Keras 3, another model's build) can leak into the layers built here.
    """
    before = current_precision()
    _set_precision(precision)
    try:
        yield
    finally:
        _set_precision(before)


def clear_session() -> None:
    """``tf.keras.backend.clear_session()`` that keeps the global precision policy.

    Keras 3 resets the policy to float32 on ``clear_session``; tf-keras 2.21 keeps it. Either
    way the policy in force before the call is re-applied after it.
    """
    before = current_precision()
    import_tf().keras.backend.clear_session()
    _set_precision(before)


def build_model(
    encoder: str = DEFAULT_ENCODER,
    image_size: int = 256,
    encoder_weights: str | os.PathLike[str] | None = "imagenet",
    precision: str = "fp32",
    notify: Callable[[str], None] | None = None,
    input_norm: str = "frozen",
) -> Any:
    """Build the U-Net: ``encoder`` backbone, one sigmoid output channel.

    Args:
        encoder: a segmentation_models backbone name (see :func:`available_encoders`).
        image_size: input height and width in pixels; a multiple of 32.
        encoder_weights: ``"imagenet"`` (Keras cache, downloaded if absent), ``None``/``"none"``
            (random start) or the path of an ``.h5`` file with the encoder's layer layout.
        precision: ``"fp32"``, ``"bf16"`` (mixed bfloat16) or ``"fp16"`` (mixed float16):
            the compute type of the layers; variables, the sigmoid output and hence the loss
            stay float32. Resolve ``"auto"`` first (:func:`pneumo_cli.distribute.choose_precision`).
        notify: told before ImageNet weights are downloaded.
        input_norm: ``"frozen"`` or ``"trainable"``: see :func:`set_input_norm`.

    Returns:
        A tf-keras Model mapping float32 (B, image_size, image_size, 3) scaled input
        (:func:`scale_input`) to float32 (B, image_size, image_size, 1) probabilities.

    Raises:
        ConfigError: unknown encoder or one whose U-Net holds code (:data:`CODE_ENCODERS`),
            bad size, weights that do not fit or cannot be obtained.
    """
    sm = import_sm()
    tf = import_tf()
    check_encoder(encoder)
    if image_size < 32 or image_size % 32:
        raise ConfigError(f"image size {image_size} px must be a positive multiple of 32")
    weights_path: Path | None = None
    if encoder_weights == "imagenet":
        weights_path = fetch_imagenet_weights(encoder, notify)
    elif encoder_weights not in (None, "none"):
        weights_path = Path(encoder_weights)
    with precision_policy(precision):
        try:
            unet = sm.Unet(
                encoder,
                input_shape=(image_size, image_size, 3),
                classes=1,
                activation="sigmoid",
                encoder_weights=None,
            )
        except ValueError as exc:  # e.g. inceptionv3: "Input size must be at least 75x75"
            reason = " ".join(str(exc).split())[:160]
            raise ConfigError(
                f"encoder '{encoder}' cannot be built at {image_size} px ({reason}); "
                "preprocess at a larger --image-size or choose another encoder"
            ) from None
        code = [layer.name for layer in unet.layers if type(layer).__name__ in _CODE_LAYERS]
        if code:
            raise ConfigError(
                f"encoder '{encoder}' cannot be used: its U-Net contains Lambda layers "
                f"('{code[0]}'), and pneumo refuses to load model files holding code; choose "
                f"one of: {', '.join(available_encoders())}"
            )
        if precision != "fp32":
            # Under a mixed policy segmentation_models' sigmoid outputs bfloat16/float16;
            # recompute it in float32 from the last convolution so the loss sees float32.
            logits = unet.get_layer("final_conv").output
            probabilities = tf.keras.layers.Activation(
                "sigmoid", dtype="float32", name="pneumo_sigmoid_float32"
            )(logits)
            unet = tf.keras.Model(unet.input, probabilities, name=unet.name)
    if weights_path is not None:
        load_encoder_weights(unet, encoder, weights_path)
    set_input_norm(unet, input_norm, random_start=weights_path is None)
    from pneumo_cli import fastpaths

    fastpaths.fast_upsampling_gradients(unet)
    fastpaths.fold_zero_padding(unet)
    return unet


def check_input_norm(mode: str) -> None:
    """Raise ConfigError unless ``mode`` is one of :data:`INPUT_NORMS`."""
    if mode not in INPUT_NORMS:
        raise ConfigError(f"--input-norm {mode}: choose one of {', '.join(INPUT_NORMS)}")


def set_input_norm(net: Any, mode: str, random_start: bool) -> bool:
    """Freeze (``mode="frozen"``) or keep trainable the encoder's input normalisation layer.

    The ResNet/ResNeXt/SE-ResNet encoders start with a BatchNormalization of the raw 0-255 input
    (``bn_data``, a per-channel shift and scale). Trained, it costs 11% of a training step here
    (batch statistics and gradients over a 3-channel full-size image, and the gradient of the
    first convolution with respect to its input, needed only for it). Frozen it is a fixed
    affine map: ImageNet's learned statistics with pretrained weights; with a random start, the
    mean and variance of bytes spread evenly over 0-255 (127.5 and 255^2 / 12), which centres
    and scales the input. The first convolution feeds a batch normalisation, which absorbs
    any fixed scale, so the network can learn the same functions either way.

    Returns:
        True when the model has such a layer (encoders without one are left as they are).

    Raises:
        ConfigError: an unknown ``mode``.
    """
    check_input_norm(mode)
    try:
        layer = net.get_layer(INPUT_NORM_LAYER)
    except ValueError:
        return False
    if mode == "frozen":
        if random_start:
            channels = layer.moving_mean.shape[-1]
            layer.moving_mean.assign(np.full(channels, 127.5, np.float32))
            layer.moving_variance.assign(np.full(channels, 255.0**2 / 12.0, np.float32))
        layer.trainable = False
        from pneumo_cli import fastpaths

        fastpaths.unfuse_frozen_norm(layer)
    return True


def float32_copy(model: Any) -> Any:
    """``model`` itself if every layer computes in float32, else a float32 twin of it.

    The twin has the same layers, names and weights with every layer's dtype set to float32,
    so a model trained in bf16/fp16 is saved, loaded and run in float32 (its weights are
    float32 variables already; only the compute type changes).
    """
    tf = import_tf()
    if all(_layer_dtype_name(layer) == "float32" for layer in model.layers):
        return model
    from pneumo_cli import losses

    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float32"
    with precision_policy("fp32"):
        twin = tf.keras.Model.from_config(config, custom_objects=losses.custom_objects())
    twin.set_weights(model.get_weights())
    return twin


def _layer_dtype_name(layer: Any) -> str:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "name", None) or str(layer.dtype)


def weights_sha256(model: Any) -> str:
    """SHA-256 of every weight of ``model`` as float32 bytes, in layer order.

    Equal digests mean bit-identical networks (used to check that all workers of a
    multi-worker run end with the same model).
    """
    import hashlib

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_model(model: Any, path: str | os.PathLike[str]) -> None:
    """Save ``model`` (without optimizer) to a ``.keras`` file atomically, in float32.

    A model trained in mixed precision is saved as its :func:`float32_copy`, so every later
    command loads and predicts in float32 whatever the training precision.

    Raises:
        OutputError: the folder cannot be written.
    """
    from pneumo_cli.errors import OutputError
    from pneumo_cli.files import TEMP_PREFIX

    tf = import_tf()
    target = Path(path)
    tmp = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}")
    # A fresh, uncompiled Model over the same layers: the .keras file then holds the network
    # only (the optimizer state of a run is checkpointed separately, for --resume).
    bare = float32_copy(tf.keras.Model(model.inputs, model.outputs, name=model.name))
    try:
        bare.save(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        from pneumo_cli.files import describe_os_error

        raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None


# A .keras file is a zip archive; these are the members pneumo's own models have.
_KERAS_CONFIG = "config.json"
_KERAS_WEIGHTS = "model.weights.h5"
_KERAS_MEMBERS = {_KERAS_CONFIG, "metadata.json", _KERAS_WEIGHTS}
_MAX_CONFIG_BYTES = 64 << 20
# Keras imports the module a layer's config names. pneumo's U-Nets only use layers from these
# packages; any other module (os, subprocess, a planted file...) is refused before import.
_TRUSTED_MODULES = ("keras", "tf_keras", "segmentation_models", "classification_models",
                    "efficientnet")  # fmt: skip
# Layers that hold Python code (bytecode or a Python callable) or call arbitrary TF ops.
_CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__")


def _code_in_model_config(node: Any, layer: str = "model") -> str | None:
    """Why the parsed ``config.json`` of a .keras file could run code when loaded, or None."""
    if isinstance(node, list):
        return next(filter(None, (_code_in_model_config(item, layer) for item in node)), None)
    if not isinstance(node, dict):
        return None
    inner = node.get("config")
    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
        layer = inner["name"]
    class_name, module = node.get("class_name"), node.get("module")
    if class_name in _CODE_LAYERS or "function_type" in node:
        return f"its layer '{layer}' is a {str(class_name).strip('_')} layer, which holds code"
    if module is not None and (
        not isinstance(module, str) or module.split(".")[0] not in _TRUSTED_MODULES
    ):
        return f"its layer '{layer}' names the Python module '{module}'"
    return next(filter(None, (_code_in_model_config(v, layer) for v in node.values())), None)


def load_model(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` model written by pneumo, for inference (not compiled).

    The file is untrusted input: nothing in it is ever run as Python code. Only the ``.keras``
    zip format is accepted (Keras would load HDF5 files and SavedModel folders without safe
    mode). Its ``config.json`` is parsed as JSON and refused if a layer holds code (``Lambda``)
    or names a module outside Keras and segmentation_models' encoders; the model is then built
    from it in Keras safe mode and its weights are read from ``model.weights.h5``.

    Raises:
        InputError: one line naming the file: missing, not a .keras archive, refused because it
            could run code, or unreadable.
    """
    import json
    import tempfile
    import zipfile

    tf = import_tf()
    import_sm()  # registers the custom objects of segmentation_models' encoders
    from pneumo_cli import losses

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file; was it written by `pneumo train`?")
    refused = f"{path}: refused to load this model file"
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"{path}: not a readable Keras model (not a .keras zip archive, the only format "
            "pneumo loads: Keras would run code stored in HDF5 or SavedModel files)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            unexpected = sorted(members - _KERAS_MEMBERS)
            if unexpected or _KERAS_CONFIG not in members or _KERAS_WEIGHTS not in members:
                detail = f"unexpected {unexpected[0]!r}" if unexpected else "missing members"
                raise InputError(f"{path}: not a model written by pneumo ({detail} in archive)")
            if archive.getinfo(_KERAS_CONFIG).file_size > _MAX_CONFIG_BYTES:
                raise InputError(f"{path}: not a model written by pneumo (huge {_KERAS_CONFIG})")
            config = json.loads(archive.read(_KERAS_CONFIG))
            weights = archive.read(_KERAS_WEIGHTS)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:  # ValueError: bad JSON or UTF-8
        reason = " ".join(str(exc).split())[:160]
        raise InputError(f"{path}: not a readable Keras model ({reason})") from None
    why = _code_in_model_config(config)
    if why:
        raise InputError(f"{refused}: {why}; pneumo never runs code from model files")
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a readable Keras model (config.json is not an object)")
    config["compile_config"] = None
    try:
        model = tf.keras.saving.deserialize_keras_object(
            config, custom_objects=losses.custom_objects(), safe_mode=True
        )
        # Keras reads the weights through seeks in the zip member, which costs seconds for a
        # large U-Net; a plain file in a temporary folder reads in a fraction of that.
        with tempfile.TemporaryDirectory(prefix="pneumo-model-") as folder:
            weights_path = Path(folder) / _KERAS_WEIGHTS
            weights_path.write_bytes(weights)
            model.load_weights(weights_path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        if "safe_mode" in reason:  # a form of code the scan above does not know
            raise InputError(f"{refused}: Keras safe mode found code in it") from None
        raise InputError(f"{path}: not a readable Keras model ({reason})") from None
    if not isinstance(model, tf.keras.Model):
        raise InputError(f"{path}: not a Keras model (it holds a {type(model).__name__})")
    norm = next((layer for layer in model.layers if layer.name == INPUT_NORM_LAYER), None)
    if norm is not None and not norm.trainable:  # computed as in training (set_input_norm)
        from pneumo_cli import fastpaths

        fastpaths.unfuse_frozen_norm(norm)
    return model
