"""The node's worker: the model, loaded once, predicts the instances waiting in the inbox (in
batches of what is waiting), writes each one's DICOM SEG into the outbox and moves the source to
``done/``; the sender (:mod:`pneumo_cli.serve.outbox`) takes it from there.

Order on disk, so that a kill at any point loses nothing: the SEG is written atomically into
``outbox/`` and flushed, then the source leaves ``incoming/``. A node killed in between predicts
that source again at its next start and replaces the SEG with the same one (same series, same
SOP Instance UID).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError
from pneumo_cli.inference.outputs import output_row
from pneumo_cli.inference.postprocess import Gate
from pneumo_cli.inference.sources import Item
from pneumo_cli.serve.inbox import Inbox
from pneumo_cli.serve.intake import Arrival, Log
from pneumo_cli.serve.outbox import Outgoing


class Worker:
    """Predicts the arrivals the intake queues, in arrival order, from :meth:`run`'s thread.

    Args:
        predictor: from ``inference.loading.open_predictor`` (``probabilities``).
        gate: the post-processing gate (the run's, with the command's overrides).
        load: ``load(path) -> Item`` for instances left by an earlier run.
        inbox: the node's folders.
        series: the node's ``SegSeries``.
        send: hands a written SEG to the sender.
        arrivals: the queue the intake fills; ``unfinished_tasks`` counts what is not done.
    """

    def __init__(
        self,
        predictor: Any,
        gate: Gate,
        load: Callable[[Any], Item],
        inbox: Inbox,
        series: Any,
        send: Callable[[Outgoing], None],
        log: Log,
        arrivals: queue.Queue,
        batch_size: int,
    ) -> None:
        self.predictor = predictor
        self.gate = gate
        self.load = load
        self.inbox = inbox
        self.series = series
        self.send = send
        self.log = log
        self.arrivals = arrivals
        self.batch_size = batch_size
        # InstanceNumber of the SEGs: continues after the sources already done.
        self._numbers = itertools.count(len(list(inbox.done.glob("*.dcm"))) + 1)
        self._read_back: set[tuple] = set()  # header signatures highdicom has read back

    def run(self, stop: threading.Event) -> None:
        """Predict until ``stop`` is set; the batch in hand is always finished (its SEGs
        written). A second thread writes the SEGs of one batch while the next is predicted
        (at most one batch waits for it, so memory stays bounded)."""
        with ThreadPoolExecutor(1, thread_name_prefix="pneumo-seg") as writer:
            writing: Future | None = None
            while not stop.is_set():
                if writing is not None and writing.done():
                    writing.result()  # a failed write stops the worker
                batch = self._take()
                if not batch:
                    continue
                try:
                    predicted = self._predict(batch)
                except BaseException:
                    self._finished(batch)
                    raise
                if writing is not None:
                    writing.result()
                writing = writer.submit(self._write_batch, batch, predicted)
            if writing is not None:
                writing.result()

    def warm_up(self) -> None:
        """Compile the network and import the SEG writer before the first image arrives."""
        import highdicom  # noqa: F401 - its import is a large part of the first SEG's time

        size = self.predictor.image_size
        self.predictor.probabilities(np.zeros((1, size, size), np.uint8))

    def _take(self) -> list[Arrival]:
        """The next arrival (waiting up to 0.2 s) and whatever else is waiting, up to a batch."""
        try:
            batch = [self.arrivals.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < self.batch_size:
            try:
                batch.append(self.arrivals.get_nowait())
            except queue.Empty:
                break
        return batch

    def _predict(self, batch: list[Arrival]) -> list[tuple]:
        """``(arrival, item, probability map, the batch's network ms, its start)`` for every
        arrival that reads."""
        ready: list[tuple[Arrival, Item]] = []
        for arrival in batch:
            item = arrival.item if arrival.item is not None else self._reload(arrival)
            if item is not None:
                ready.append((arrival, item))
        if not ready:
            return []
        begun, started = time.monotonic(), time.perf_counter()
        probs = self.predictor.probabilities(np.stack([item.image for _, item in ready]))
        predict_ms = (time.perf_counter() - started) * 1000.0
        return [(arrival, item, prob, predict_ms, begun) for (arrival, item), prob in
                zip(ready, probs, strict=True)]  # fmt: skip

    def _write_batch(self, batch: list[Arrival], predicted: list[tuple]) -> None:
        try:
            for result in predicted:
                self._write(*result)
        finally:
            self._finished(batch)

    def _finished(self, batch: list[Arrival]) -> None:
        for _ in batch:
            self.arrivals.task_done()

    def _reload(self, arrival: Arrival) -> Item | None:
        """Read an instance an earlier run acknowledged; a file that no longer reads goes to
        ``failed/`` (it was checked when it arrived, so this is rare)."""
        try:
            return self.load(arrival.path)
        except InputError as exc:
            reason = " ".join(str(exc).split()).removeprefix(f"{arrival.path}: ")
            self.inbox.move(arrival.path, self.inbox.failed)
            self.log("failed", sop_instance_uid=arrival.uid, reason=reason)
            return None

    def _write(
        self, arrival: Arrival, item: Item, prob: np.ndarray, predict_ms: float, begun: float
    ) -> None:
        """Gate one map, write its SEG into the outbox, move the source to done/, send."""
        from pneumo_cli.io.dicom_seg import write_seg

        if not arrival.path.is_file():
            return  # a repeated instance, done already with its earlier copy
        started = time.perf_counter()
        record, mask, _ = output_row(arrival.uid, prob, item, self.gate, keep_probs=False)
        seg = self.inbox.seg_path(arrival.path)
        try:
            written = write_seg(
                arrival.path,
                mask,
                self.series,
                seg,
                instance_number=next(self._numbers),
                full_check=self._read_back,
            )
        except InputError as exc:
            reason = " ".join(str(exc).split()).removeprefix(f"{arrival.path}: ")
            self.inbox.move(arrival.path, self.inbox.failed)
            self.log("failed", sop_instance_uid=arrival.uid, reason=f"no SEG: {reason}")
            return
        self.inbox.flush_seg(seg)
        self.inbox.move(arrival.path, self.inbox.done)
        fields = {
            "result": "positive" if record["has_pneumothorax"] else "negative",
            "area_px": record["area_px"],
            "max_prob": record["max_prob"],
            "seg_sop_instance_uid": written.sop_instance_uid,
            "receive_ms": round(arrival.receive_ms, 1),
            "wait_ms": None if arrival.acked_at is None else _ms(begun - arrival.acked_at),
            "predict_ms": round(predict_ms, 1),
            "seg_ms": round((time.perf_counter() - started) * 1000.0, 1),
        }
        self.send(Outgoing(seg, arrival.uid, fields, arrival.acked_at))


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 1)
