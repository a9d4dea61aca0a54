"""TensorFlow and segmentation_models, imported lazily and once, with the environment they
need (tf-keras, the framework choice) and their start-up noise kept off stderr."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from pneumo_cli.core.errors import ConfigError


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
