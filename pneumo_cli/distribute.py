"""Where training runs: the one function that picks the TensorFlow distribution strategy.

Everything device-related is decided in :func:`make_strategy`, so multi-worker training and
other placements can be added here without touching the training loop.
"""

from __future__ import annotations

from typing import Any

from pneumo_cli import model
from pneumo_cli.errors import ConfigError


def make_strategy(gpus: int | None, cpu_replicas: int = 1) -> tuple[Any, str]:
    """The one place that decides where training runs. Returns (strategy, description).

    Args:
        gpus: 0 = CPU; N >= 1 = MirroredStrategy over the first N GPUs; None = the first GPU
            when one is visible, else the CPU.
        cpu_replicas: with ``gpus=0``, mirror over this many logical CPU devices (for tests of
            the multi-replica path; needs TensorFlow not yet initialised, or the devices made).

    Raises:
        ConfigError: more GPUs asked for than are visible (lists them); logical CPU devices
            cannot be made any more.
    """
    tf = model.import_tf()
    visible = tf.config.list_physical_devices("GPU")
    if gpus is None:
        gpus = 1 if visible else 0
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus} must be 0 (CPU) or a positive number of GPUs")
    if gpus > len(visible):
        names = ", ".join(d.name for d in visible) or "none"
        raise ConfigError(
            f"--gpus {gpus} asks for more GPUs than are visible ({len(visible)}: {names}); "
            "use --gpus 0 for the CPU"
        )
    if gpus >= 1:
        devices = [f"/gpu:{i}" for i in range(gpus)]
        return tf.distribute.MirroredStrategy(devices), f"MirroredStrategy over {gpus} GPU(s)"
    if cpu_replicas > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:  # listing logical devices would start the runtime, so configure first
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
            )
        except RuntimeError:
            if len(tf.config.list_logical_devices("CPU")) < cpu_replicas:
                raise ConfigError(
                    f"cannot split the CPU into {cpu_replicas} devices after TensorFlow started"
                ) from None
        devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
        return tf.distribute.MirroredStrategy(devices), f"MirroredStrategy over {cpu_replicas} CPUs"
    return tf.distribute.OneDeviceStrategy("/cpu:0"), "CPU"
