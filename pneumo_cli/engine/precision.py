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


# `auto` picks bf16 for training on a CPU with bfloat16 instructions because the full-size
# parity benchmark (benchmarks/bench_precision.py --parity; its numbers and CPU are in the
# README) found bf16 training as accurate as fp32 and faster on such CPUs.
BF16_FASTER_ON_CPU = True
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> list[str]:
    """The bfloat16 instruction-set flags this CPU reports (empty when none or unknown)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


def choose_precision(
    requested: str,
    on_gpu: bool,
    gpu_names: list[str] | None = None,
    cpu_flags: list[str] | None = None,
    bf16_faster_on_cpu: bool = BF16_FASTER_ON_CPU,
) -> tuple[str, str]:
    """Resolve ``--precision`` for the devices a run trains on. Returns (precision, reason).

    ``auto`` is fp16 (with loss scaling) on NVIDIA GPUs, where tensor cores make it the fast
    choice; on CPUs it is bf16 only when the CPU has bfloat16 instructions AND the benchmark
    showed bf16 faster there (``bf16_faster_on_cpu``), else fp32.

    Raises:
        ConfigError: unknown precision; fp16 without a GPU to train on.
    """
    check_choice(Precision, requested, "--precision")
    device = ", ".join(gpu_names or []) or "GPU"
    if requested == "fp16" and not on_gpu:
        raise ConfigError(
            "--precision fp16 needs an NVIDIA GPU to train on and this run uses the CPU; "
            "use --precision bf16 or fp32"
        )
    if requested != "auto":
        return requested, "asked for with --precision"
    if on_gpu:
        return "fp16", f"auto: mixed float16 with loss scaling on {device}"
    flags = cpu_flags if cpu_flags is not None else cpu_bf16_flags()
    if not flags:
        return "fp32", "auto: this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16)"
    if not bf16_faster_on_cpu:
        return "fp32", (
            f"auto: the CPU has {'/'.join(flags)}, but bf16 is not known to be as accurate and "
            "faster on it; use --precision bf16 to choose it"
        )
    return "bf16", (
        f"auto: the CPU has {'/'.join(flags)}; bf16 trains faster than fp32 there and as "
        "accurately (benchmarks/bench_precision.py)"
    )
