"""OpenVINO, the CPU inference engine behind ``--engine openvino``: imported only here, with its
usage telemetry switched off, and a network compiled from the run's TensorFlow function.

OpenVINO's Python package sends usage events to an analytics service when its conversion API is
imported, unless the user opted out in a file in their home folder. pneumo runs beside patient
data on hospital networks and never reports anything anywhere: the telemetry module is made
unimportable in this process before OpenVINO is imported, so OpenVINO uses its built-in no-op
stand-in. Nothing is written to the user's home folder.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np

from pneumo_cli.core.errors import UsageError

_TELEMETRY_MODULE = "openvino_telemetry"
# pneumo's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values.
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    """The ``openvino`` module, with telemetry off.

    Raises:
        UsageError: OpenVINO is not installed.
    """
    if "openvino" not in sys.modules:
        sys.modules[_TELEMETRY_MODULE] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import openvino
    except ImportError:
        raise UsageError(
            "--engine openvino needs the openvino package: pip install openvino"
        ) from None
    return openvino


def openvino_available() -> bool:
    """Whether OpenVINO can be imported here (without importing it yet)."""
    from importlib.util import find_spec

    return "openvino" in sys.modules or find_spec("openvino") is not None


def openvino_precisions() -> list[str]:
    """The precisions (pneumo's names) OpenVINO's CPU plugin computes natively on this CPU:
    fp32 always, bf16 where it reports the BF16 capability (AVX512-BF16 or AMX)."""
    capabilities = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32"] + (["bf16"] if "BF16" in capabilities else [])


def openvino_version() -> str:
    return str(import_openvino().get_version())


class OpenVinoNetwork:
    """A TensorFlow function ``uint8 (B, S, S) -> float32 (B, S, S)`` compiled by OpenVINO for
    the CPU in ``precision`` (``fp32`` or ``bf16``); callable like it, from any thread.

    OpenVINO plans a static shape best, so the network is compiled once per batch size met
    (predict meets two: its batch size and the last, smaller batch; serve meets a few).
    """

    def __init__(self, function: Any, precision: str, threads: int | None = None) -> None:
        if precision not in _HINTS:
            raise UsageError(f"--engine openvino runs fp32 or bf16, not {precision}")
        ov = import_openvino()
        self.precision = precision
        self._core = ov.Core()
        self._model = ov.convert_model(function)
        self._config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one request over all cores: how pneumo calls it
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _for_batch(self, batch: int) -> Any:
        if batch not in self._compiled:
            model = self._model.clone()
            partial = self._model.inputs[0].get_partial_shape()  # (?, S, S)
            model.reshape([batch, *(dim.get_length() for dim in list(partial)[1:])])
            self._compiled[batch] = self._core.compile_model(model, "CPU", self._config)
        return self._compiled[batch]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        with self._lock:
            compiled = self._for_batch(len(images))
            outputs = compiled(images)
        return np.asarray(outputs[0], dtype=np.float32)
