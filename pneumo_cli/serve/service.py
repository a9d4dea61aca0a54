"""`pneumo serve` as one function: the inbox, the DICOM node, the worker and the sender, started
in that order and stopped in the reverse one.

Start-up: the run (or export) is checked without loading the model, the inbox is locked (one
node per inbox) and cleaned of temporaries, instances and SEGs a killed node left are queued
first, then the port is bound, so a port in use fails at once. Instances that arrive while the
model loads are stored and acknowledged; the worker predicts them as soon as it is ready.

Stopping (``stop`` set, e.g. by SIGTERM, or ``exit_when_idle_s`` reached): the node stops
listening, the worker finishes the batch in hand, the sender tries once more what is due;
whatever is left waits in the inbox and outbox for the next start.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pneumo_cli.serve.inbox import Inbox
from pneumo_cli.serve.intake import Arrival, Intake, Log
from pneumo_cli.serve.node import Node
from pneumo_cli.serve.outbox import Outgoing, Sender
from pneumo_cli.serve.settings import ServeError, ServeSettings


@dataclass
class ServeSummary:
    """What a node did between its start and its stop."""

    received: int = 0  # instances acknowledged
    refused: int = 0  # instances given a failure status
    done: int = 0  # SEGs the destination accepted
    failed: int = 0  # acknowledged instances that could not make a SEG (in INBOX/failed)
    rejected_associations: int = 0
    waiting: int = 0  # still in INBOX/incoming at the stop
    unsent: int = 0  # still in INBOX/outbox at the stop
    port: int = 0
    stopped_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(
        cls, counts: collections.Counter[str], inbox: Inbox, port: int, stopped_by: str
    ) -> ServeSummary:
        """The summary from the node's counted log events and what its inbox holds."""
        return cls(
            received=counts["received"],
            refused=counts["refused"],
            done=counts["done"],
            failed=counts["failed"],
            rejected_associations=counts["association-rejected"],
            waiting=len(inbox.waiting()),
            unsent=len(inbox.unsent()),
            port=port,
            stopped_by=stopped_by,
        )


def model_settings(
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    model: str | os.PathLike[str] | None,
    tta: str,
) -> Any:
    """The preprocessing settings of a run or export, read without loading its model.

    Raises:
        PneumoError: as ``open_predictor`` would for the same arguments.
    """
    from pneumo_cli.core.choices import Tta, check_choice
    from pneumo_cli.core.errors import ConfigError

    check_choice(Tta, tta, "--tta")
    if model is not None:
        if run:
            raise ConfigError("give --run or --model, not both")
        from pneumo_cli.inference.exported import read_export

        return read_export(model).settings
    from pneumo_cli.inference.ensemble import resolve_members
    from pneumo_cli.inference.predictor import open_run_for_inference

    opened = [open_run_for_inference(member) for member in resolve_members(run).runs]
    return max(opened, key=lambda o: o.image_size).settings


def serve(
    settings: ServeSettings,
    *,
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    model: str | os.PathLike[str] | None = None,
    tta: str = "none",
    precision: str = "auto",
    engine: str = "auto",
    log: Log,
    stop: threading.Event,
) -> ServeSummary:
    """Run the DICOM node until ``stop`` is set (or it has been idle ``exit_when_idle_s``).

    ``precision`` is resolved as `pneumo predict` resolves it; its check against float32 uses
    the run's validation images or the result `predict` cached for this run and machine kind
    (with neither, ``auto`` stays fp32 and says so in the ``ready`` line).

    ``log(event, **fields)`` receives one call per line to log (thread-safe calls, from
    several threads; never patient data). Events: ``listening``, ``ready``, ``done``,
    ``refused``, ``failed``, ``send-failed``, ``association-rejected``,
    ``association-aborted``, ``dicom-error``, ``stopped``.

    Raises:
        PneumoError: a bad run or export, the inbox in use or not writable, the port in use;
            with ``exit_when_idle_s``, SEGs that could not be sent (they stay in the outbox).
    """
    from pneumo_cli.core.locks import folder_lock
    from pneumo_cli.inference.loading import open_predictor
    from pneumo_cli.inference.sources import file_loader

    load = file_loader(model_settings(run, model, tta))
    counts: collections.Counter[str] = collections.Counter()
    counted = _counting(log, counts)
    inbox = Inbox(settings.inbox)
    inbox.create_root()
    with folder_lock(inbox.root, "serve"):
        inbox.prepare()
        arrivals: queue.Queue[Arrival] = queue.Queue()
        for path in inbox.waiting():
            arrivals.put(Arrival(path, path.stem))

        def submit(arrival: Arrival) -> None:
            counted("received")
            arrivals.put(arrival)

        intake = Intake(inbox, load, submit, counted, settings.max_size_bytes)
        node = Node(settings, intake, counted)
        node.start()
        port = node.port
        counted("listening", aet=settings.aet, host=settings.host, port=port,
                allow=list(settings.allow), send_to=str(settings.destination),
                inbox=str(inbox.root), waiting=arrivals.qsize(),
                unsent=len(inbox.unsent()))  # fmt: skip
        try:
            started = time.perf_counter()
            predictor = open_predictor(run, model, tta, precision, None, engine)  # slow
            load_s = round(time.perf_counter() - started, 2)
            stopped_by = _run_node(settings, predictor, load_s, node, inbox, arrivals, load,
                                   counted, stop)  # fmt: skip
        finally:
            node.stop()
        summary = ServeSummary.of(counts, inbox, port, stopped_by)
    log("stopped", **summary.to_dict())
    if summary.stopped_by == "idle" and summary.unsent:
        raise ServeError(
            f"{summary.unsent} SEG(s) could not be sent to {settings.destination}; they stay "
            f"in {inbox.outbox} and are sent when the node starts again"
        )
    return summary


def _run_node(
    settings: ServeSettings,
    predictor: Any,
    load_s: float,
    node: Node,
    inbox: Inbox,
    arrivals: queue.Queue,
    load: Any,
    log: Log,
    stop: threading.Event,
) -> str:
    """Run the worker and the sender until a stop; returns why it stopped."""
    from pneumo_cli import __version__
    from pneumo_cli.inference.dicom_outputs import algorithm_source
    from pneumo_cli.serve.worker import Worker

    overrides = {k: v for k, v in settings.gate_overrides.items() if v is not None}
    gate = dataclasses.replace(predictor.gate, **overrides)
    series = inbox.seg_series(algorithm_source(predictor), __version__)
    sender = Sender(settings, inbox, log)
    for seg in inbox.unsent():
        sender.submit(Outgoing(seg, seg.stem))
    worker = Worker(predictor, gate, load, inbox, series, sender.submit, log, arrivals,
                    settings.batch_size)  # fmt: skip
    worker.warm_up()
    worker_stop = threading.Event()
    threads = [_Thread(worker.run, worker_stop), _Thread(sender.run)]
    for thread in threads:
        thread.start()
    log("ready", model=str(predictor.source), tta=predictor.tta, gate=dataclasses.asdict(gate),
        precision=predictor.precision, engine=predictor.engine,
        precision_reason=predictor.precision_reason,
        notes=[text for _, text in predictor.notes], load_s=load_s)  # fmt: skip
    try:
        return _wait_for_stop(settings, node, arrivals, sender, threads, stop)
    finally:
        node.stop()  # no new instances while the worker finishes the batch in hand
        worker_stop.set()
        threads[0].join()
        sender.finish()
        threads[1].join()
        for thread in threads:
            if thread.error is not None:
                raise thread.error


def _wait_for_stop(
    settings: ServeSettings,
    node: Node,
    arrivals: queue.Queue,
    sender: Sender,
    threads: list[_Thread],
    stop: threading.Event,
) -> str:
    idle_since: float | None = None
    while not stop.wait(0.05):
        if any(thread.error is not None for thread in threads):
            return "error"
        if settings.exit_when_idle_s is None:
            continue
        now = time.monotonic()
        idle = node.open_associations() == 0 and arrivals.unfinished_tasks == 0 and sender.idle()
        if not idle:
            idle_since = None
            continue
        idle_since = idle_since or now
        if now - max(idle_since, node.last_activity) >= settings.exit_when_idle_s:
            return "idle"
    return "stop"


class _Thread(threading.Thread):
    """A daemon thread that keeps the exception that ended it (in ``error``)."""

    def __init__(self, target: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self._call = (target, args)
        self.error: BaseException | None = None

    def run(self) -> None:
        target, args = self._call
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised there
            self.error = exc


def _counting(log: Log, counts: collections.Counter[str]) -> Log:
    """``log`` that also counts events; ``received`` is counted only (no line of its own)."""
    lock = threading.Lock()

    def counted(event: str, **fields: Any) -> None:
        with lock:
            counts[event] += 1
        if event != "received":
            log(event, **fields)

    return counted
