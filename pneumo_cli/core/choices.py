"""The closed sets of values that settings take, defined once.

Each is a :class:`~enum.StrEnum`: the command layer gives it to Typer (so a wrong value is a
usage error, exit 2, before anything heavy is imported, and ``--help`` lists the choices), and
the library checks stored settings against the same set with :func:`check_choice`.
"""

from __future__ import annotations

from enum import StrEnum

from pneumo_cli.core.errors import ConfigError


class Precision(StrEnum):
    """Numeric precision of a network's compute: ``auto`` resolves to one of the others."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"  # mixed bfloat16: variables float32, compute bfloat16
    fp16 = "fp16"  # mixed float16 with loss scaling; NVIDIA GPUs only


class Loss(StrEnum):
    """Training loss."""

    bce = "bce"
    bce_dice = "bce-dice"
    focal_dice = "focal-dice"


class Split(StrEnum):
    """The cache's hold-out splits."""

    train = "train"
    val = "val"
    test = "test"


class Tta(StrEnum):
    """Test-time augmentation: ``hflip`` averages a prediction with that of the mirror image."""

    none = "none"
    hflip = "hflip"


class TopUse(StrEnum):
    """What inference makes of a run's top checkpoints (``train --keep-top``)."""

    average = "average"  # one model: the weights averaged, BatchNorm statistics recomputed
    ensemble = "ensemble"  # the checkpoints' maps averaged
    best = "best"  # best.keras alone (the others kept for a later choice)


class InputNorm(StrEnum):
    """The ResNet encoders' input BatchNormalization during training."""

    frozen = "frozen"
    trainable = "trainable"


class Engine(StrEnum):
    """Inference engine of a run's network: ``auto`` picks the fastest that matches float32."""

    auto = "auto"
    keras = "keras"
    openvino = "openvino"


class ExportFormat(StrEnum):
    """Deployable model formats of ``pneumo export``."""

    savedmodel = "savedmodel"
    tflite = "tflite"
    onnx = "onnx"


class Quantization(StrEnum):
    """Weight quantisation of an export (TFLite only)."""

    float16 = "float16"
    int8 = "int8"


class Resolution(StrEnum):
    """Where ``evaluate`` scores masks: at the X-ray's own size or the network's."""

    original = "original"
    model = "model"


class PictureFormat(StrEnum):
    """Overlay picture file format."""

    png = "png"
    jpg = "jpg"


class Encoder(StrEnum):
    """Encoder backbones pneumo trains: segmentation_models 1.0.1's, minus :data:`CODE_ENCODERS`.

    tests/test_model.py checks this list against segmentation_models' own, so it needs no
    TensorFlow to check a name.
    """

    resnet18 = "resnet18"
    resnet34 = "resnet34"
    resnet50 = "resnet50"
    resnet101 = "resnet101"
    resnet152 = "resnet152"
    vgg16 = "vgg16"
    vgg19 = "vgg19"
    densenet121 = "densenet121"
    densenet169 = "densenet169"
    densenet201 = "densenet201"
    inceptionv3 = "inceptionv3"
    mobilenet = "mobilenet"
    mobilenetv2 = "mobilenetv2"
    efficientnetb0 = "efficientnetb0"
    efficientnetb1 = "efficientnetb1"
    efficientnetb2 = "efficientnetb2"
    efficientnetb3 = "efficientnetb3"
    efficientnetb4 = "efficientnetb4"
    efficientnetb5 = "efficientnetb5"
    efficientnetb6 = "efficientnetb6"
    efficientnetb7 = "efficientnetb7"


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


def values(choice: type[StrEnum]) -> tuple[str, ...]:
    """The values of ``choice`` in their declared order."""
    return tuple(member.value for member in choice)


def check_choice(choice: type[StrEnum], value: object, what: str) -> str:
    """``value`` as a plain string if it is one of ``choice``'s values.

    Raises:
        ConfigError: naming ``what`` (for example ``--loss``) and the valid values.
    """
    allowed = values(choice)
    if value not in allowed:
        raise ConfigError(f"{what} '{value}': choose one of: {', '.join(allowed)}")
    return str(value)


def check_encoder(encoder: str, code_encoders: tuple[str, ...] = CODE_ENCODERS) -> str:
    """Return ``encoder`` if pneumo can train it, else raise ConfigError listing those it can.

    Raises:
        ConfigError: the encoder is unknown, or is one of ``code_encoders`` (the message says
            why: its models hold code, which pneumo never loads).
    """
    names = values(Encoder)
    if encoder in code_encoders:
        raise ConfigError(
            f"encoder '{encoder}' cannot be used: its U-Net contains Lambda layers (Python "
            "code), and pneumo refuses to load model files holding code, so its runs could "
            f"never be used by predict, evaluate or export; choose one of: {', '.join(names)}"
        )
    if encoder not in names:
        raise ConfigError(f"unknown encoder '{encoder}'; choose one of: {', '.join(names)}")
    return encoder
