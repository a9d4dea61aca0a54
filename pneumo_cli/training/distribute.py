"""Where training runs: the distribution strategy, this process's role, and the precision.

Everything device-related is decided here:

- :func:`make_strategy` places a run on one machine: the CPU, or MirroredStrategy over GPUs;
- :func:`make_multi_worker_strategy` joins the cluster described by ``TF_CONFIG`` with
  MultiWorkerMirroredStrategy (one process per machine, each with its own GPUs or CPU);
- :func:`choose_precision` resolves ``--precision auto`` for the devices in use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pneumo_cli.core.errors import ConfigError, shorten_reason
from pneumo_cli.engine import tf as tf_engine

# A lost worker is noticed by TensorFlow's coordination service, whose heartbeat declares a
# task dead after HEARTBEAT_TIMEOUT_S without news; the others then fail their collectives.
# COLLECTIVE_TIMEOUT_S is the backstop for a collective that hangs for any other reason; it must
# exceed the slowest legitimate wait (a worker building the model or saving while the others
# wait at the next all-reduce).
HEARTBEAT_TIMEOUT_S = 10
REGISTER_TIMEOUT_S = 600  # how long the workers wait for each other to start
COLLECTIVE_TIMEOUT_S = 600


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker cluster (from ``TF_CONFIG``)."""

    task_type: str  # "chief" or "worker"
    task_index: int
    workers: int  # processes that train (chief + workers)
    worker_id: int  # 0 .. workers - 1; the chief is 0
    is_chief: bool


@dataclass(frozen=True)
class Placement:
    """A strategy and what it means for the run: who writes, how many replicas in total."""

    strategy: Any
    description: str
    role: WorkerRole | None = None  # None: a single-machine run

    @property
    def is_chief(self) -> bool:
        return self.role is None or self.role.is_chief

    @property
    def workers(self) -> int:
        return 1 if self.role is None else self.role.workers

    @property
    def replicas(self) -> int:
        """Replicas in sync over the whole cluster (the global batch is per-replica x this)."""
        return int(self.strategy.num_replicas_in_sync)

    @property
    def gpus(self) -> bool:
        return bool(self.strategy.extended.worker_devices) and all(
            "GPU" in device.upper() for device in self.strategy.extended.worker_devices
        )


def make_strategy(gpus: int | None, cpu_replicas: int = 1) -> tuple[Any, str]:
    """The strategy of a single-machine run. Returns (strategy, description).

    Args:
        gpus: 0 = CPU; N >= 1 = MirroredStrategy over the first N GPUs; None = the first GPU
            when one is visible, else the CPU.
        cpu_replicas: with ``gpus=0``, mirror over this many logical CPU devices (for tests of
            the multi-replica path; needs TensorFlow not yet initialised, or the devices made).

    Raises:
        ConfigError: more GPUs asked for than are visible (lists them); logical CPU devices
            cannot be made any more.
    """
    tf = tf_engine.import_tf()
    gpus = _check_gpus(gpus, tf.config.list_physical_devices("GPU"))
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


def _check_gpus(gpus: int | None, visible: list[Any]) -> int:
    if gpus is None:
        return 1 if visible else 0
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus} must be 0 (CPU) or a positive number of GPUs")
    if gpus > len(visible):
        names = ", ".join(d.name for d in visible) or "none"
        raise ConfigError(
            f"--gpus {gpus} asks for more GPUs than are visible ({len(visible)}: {names}); "
            "use --gpus 0 for the CPU"
        )
    return gpus


def parse_tf_config(text: str | None) -> WorkerRole:
    """Check ``TF_CONFIG`` (the JSON TensorFlow reads) and return this process's role.

    The cluster may hold one ``chief`` and any number of ``worker`` tasks, each a list of
    ``host:port`` strings; ``task`` names this process (``{"type": "worker", "index": 1}``).
    The chief is the ``chief`` task, or worker 0 when there is none (as in TensorFlow).

    Raises:
        ConfigError: unset, not JSON, or not a cluster this process is part of (one line).
    """
    hint = (
        'set it like {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    if text is None or not text.strip():
        raise ConfigError(f"--multi-worker needs the TF_CONFIG environment variable; {hint}")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc}); {hint}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ConfigError(f"TF_CONFIG has no 'cluster' object; {hint}")
    cluster, task = config["cluster"], config.get("task")
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise ConfigError(
            f"TF_CONFIG cluster has job(s) {', '.join(unknown)}; pneumo trains with 'chief' "
            "and 'worker' tasks only"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and _is_host_port(a) for a in addresses)
        ):
            raise ConfigError(
                f"TF_CONFIG cluster '{job}' must be a non-empty list of 'host:port' strings, "
                f"got {json.dumps(addresses)}"
            )
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError("TF_CONFIG cluster has more than one chief; use one")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ConfigError(
            f"TF_CONFIG task {json.dumps(task)} must name a job of the cluster "
            f"({', '.join(sorted(cluster))}) in 'type'"
        )
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"TF_CONFIG task index {json.dumps(index)} must be an integer")
    if not 0 <= index < len(cluster[task["type"]]):
        raise ConfigError(
            f"TF_CONFIG task index {index} is outside the {len(cluster[task['type']])} "
            f"'{task['type']}' address(es) of the cluster"
        )
    has_chief = "chief" in cluster
    if task["type"] == "chief":
        worker_id, is_chief = 0, True
    else:
        worker_id, is_chief = index + int(has_chief), index == 0 and not has_chief
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return WorkerRole(task["type"], index, workers, worker_id, is_chief)


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def make_multi_worker_strategy(
    gpus: int | None,
    environ: Mapping[str, str] | None = None,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
) -> Placement:
    """Join the ``TF_CONFIG`` cluster with MultiWorkerMirroredStrategy.

    Must run before TensorFlow executes anything in this process (TensorFlow configures its
    collective runtime at start-up). Blocks until every worker of the cluster has started.

    Args:
        gpus: GPUs of THIS machine to use (None = all visible; 0 = CPU only).
        environ: where ``TF_CONFIG`` is read (default ``os.environ``).
        collective_timeout_s: a collective that waits longer fails (backstop; see module).

    Raises:
        ConfigError: ``TF_CONFIG`` unset or malformed; more GPUs asked for than this machine
            has; TensorFlow already started in this process.
    """
    role = parse_tf_config((os.environ if environ is None else environ).get("TF_CONFIG"))
    tf = tf_engine.import_tf()
    visible = tf.config.list_physical_devices("GPU")
    count = len(visible) if gpus is None else _check_gpus(gpus, visible)
    try:
        if count < len(visible):
            tf.config.set_visible_devices(visible[:count], "GPU")
        _configure_heartbeat(tf)
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_s
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as exc:
        raise ConfigError(
            f"cannot join the TF_CONFIG cluster: TensorFlow started before the multi-worker "
            f"strategy was created ({shorten_reason(str(exc))})"
        ) from None
    where = "GPU" if count else "CPU"
    description = (
        f"MultiWorkerMirroredStrategy, {role.task_type} {role.task_index} of {role.workers} "
        f"worker(s), {max(count, 1)} {where} replica(s) here"
    )
    return Placement(strategy, description, role)


def _configure_heartbeat(tf: Any) -> None:
    """Start TensorFlow's coordination service with pneumo's timeouts (as the strategy would,
    with its defaults, when it is not configured yet)."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    if ctx.coordination_service is not None:
        return
    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    jobs = [job for job in ("chief", "worker") if job in spec.jobs]
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{jobs[0]}/replica:0/task:0",
        cluster_register_timeout_in_ms=REGISTER_TIMEOUT_S * 1000,
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in jobs
        ],
    )
