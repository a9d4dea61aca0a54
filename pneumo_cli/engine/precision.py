"""Numeric precision: the Keras mixed-precision policy (set only here), the CPU's bfloat16
instructions, and how ``--precision auto`` resolves for the devices at hand."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pneumo_cli.core.choices import Precision, check_choice, values
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.engine.tf import import_tf

PRECISIONS = tuple(name for name in values(Precision) if name != Precision.auto)
# Keras mixed-precision policy per precision: variables stay float32, compute in the named type.
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


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


_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(cpuinfo: str | os.PathLike[str]) -> tuple[str, set[str]]:
    """The first CPU's model name ('' when unknown) and every flag the kernel lists."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    return model, flags


def cpu_bf16_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> list[str]:
    """The bfloat16 instruction-set flags this CPU reports (empty when none or unknown)."""
    flags = _cpuinfo(cpuinfo)[1]
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


def cpu_model(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's model name as the kernel reports it, else the platform's machine name."""
    import platform

    return _cpuinfo(cpuinfo)[0] or platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The names of the GPUs TensorFlow can use here (empty on a CPU-only machine)."""
    tf = import_tf()
    names = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        names.append(str(details.get("device_name", device.name)))
    return names


def choose_precision(
    requested: str,
    on_gpu: bool,
    gpu_names: list[str] | None = None,
    cpu_flags: list[str] | None = None,
    purpose: str = "train",
) -> tuple[str, str]:
    """Resolve ``--precision`` for the devices a run trains (or predicts) on: (precision, reason).

    ``auto`` is fp16 on NVIDIA GPUs (tensor cores; loss scaling in training), bf16 on a CPU
    that reports bfloat16 instructions (avx512_bf16 or amx_bf16: oneDNN then runs bf16
    convolutions natively), else fp32. Inference checks the choice against float32 before
    using it (:mod:`pneumo_cli.inference.precision_parity`); ``benchmarks/bench_precision.py``
    and ``benchmarks/bench_predict.py`` measure what it gains on the machine at hand.

    Raises:
        UsageError: unknown precision; fp16 without a GPU.
    """
    from pneumo_cli.core.errors import UsageError

    try:
        check_choice(Precision, requested, "--precision")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    device = ", ".join(gpu_names or []) or "GPU"
    if requested == "fp16" and not on_gpu:
        raise UsageError(
            f"--precision fp16 needs an NVIDIA GPU to {purpose} on and this machine has none "
            "(float16 has no fast CPU kernels); use --precision bf16 or fp32"
        )
    if requested != "auto":
        return requested, "asked for with --precision"
    if on_gpu:
        return "fp16", f"auto: mixed float16 on {device}"
    flags = cpu_flags if cpu_flags is not None else cpu_bf16_flags()
    if not flags:
        return "fp32", "auto: this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16)"
    return "bf16", f"auto: the CPU has {'/'.join(flags)} (native bfloat16 arithmetic)"
