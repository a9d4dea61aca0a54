"""ImageNet weights for the encoders: where Keras caches them, downloading them only when
asked, and loading an encoder's layers from an ``.h5`` file."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError, shorten_reason
from pneumo_cli.engine.tf import import_sm, import_tf

# Layer names segmentation_models gives the U-Net decoder; every other layer is the encoder.
_DECODER_PREFIXES = ("decoder_stage", "center_block", "final_conv", "sigmoid", "pneumo_")


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
        reason = shorten_reason(" ".join(str(exc).split()).rsplit(" -- ", 1)[-1])
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
