"""Sending results: every SEG in ``INBOX/outbox/`` is C-STOREd to ``--send-to`` (a pynetdicom SCU
association), and moved to ``INBOX/sent/`` once the destination accepted it.

A destination that is down, rejects the association or refuses a SEG: the SEG stays in the
outbox and is tried again after ``retry_initial_s``, doubling per failure up to ``retry_max_s``;
it is never dropped. Whenever an association succeeds, every SEG waiting is sent on it, so a
destination coming back gets the backlog at once. SEGs left in the outbox by an earlier run are
sent first.

Each SEG sent makes the one ``done`` log line of its source (UIDs, result, area, timings); a
failed attempt makes one ``send-failed`` line for all the SEGs it concerned.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_cli.serve.inbox import Inbox
from pneumo_cli.serve.intake import Log
from pneumo_cli.serve.settings import ServeSettings

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
# Status codes that mean "stored": success and the Storage warnings (coercion, elements
# discarded, data set does not match SOP class), PS3.4 B.2.3.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class Outgoing:
    """A SEG waiting in the outbox.

    Attributes:
        seg: its file in ``INBOX/outbox/``.
        uid: the SOP Instance UID of its source.
        fields: what the source's log line says (result, area, timings so far).
        acked_at: ``time.monotonic()`` when the source was acknowledged (None: an earlier run).
        failures: failed attempts in a row; next_try: ``time.monotonic()`` of the next one.
    """

    seg: Path
    uid: str
    fields: dict[str, Any] = field(default_factory=dict)
    acked_at: float | None = None
    failures: int = 0
    next_try: float = 0.0


class _SendFailed(Exception):
    """The association could not be made; the reason is a short line."""


class Sender:
    """Sends what :meth:`submit` hands it, from :meth:`run`'s thread."""

    def __init__(self, settings: ServeSettings, inbox: Inbox, log: Log) -> None:
        self.settings = settings
        self.inbox = inbox
        self.log = log
        self._pending: dict[Path, Outgoing] = {}
        self._cond = threading.Condition()
        self._finishing = False
        self._ae: Any = None

    def submit(self, outgoing: Outgoing) -> None:
        with self._cond:
            self._pending[outgoing.seg] = outgoing
            self._cond.notify()

    def unsent(self) -> int:
        with self._cond:
            return len(self._pending)

    def idle(self) -> bool:
        """Nothing to send, or only SEGs whose last attempt failed (waiting to retry)."""
        with self._cond:
            return all(job.failures > 0 for job in self._pending.values())

    def finish(self) -> None:
        """Make :meth:`run` try once more what is due (unless it is backing off), then return."""
        with self._cond:
            self._finishing = True
            self._cond.notify()

    def run(self) -> None:
        """Send until :meth:`finish`."""
        while True:
            with self._cond:
                jobs = self._wait_for_work()
                finishing = self._finishing
            if jobs:
                self._send(jobs)
            if finishing:
                return

    def _wait_for_work(self) -> list[Outgoing]:
        """(Holding the lock.) Every pending SEG once one is due; [] when finishing."""
        while True:
            now = time.monotonic()
            due = [job for job in self._pending.values() if job.next_try <= now]
            if due:
                return list(self._pending.values())  # the destination is tried: send all
            if self._finishing:
                return []
            wake = min((job.next_try for job in self._pending.values()), default=now + 1.0)
            self._cond.wait(timeout=max(0.01, wake - now))

    def _send(self, jobs: list[Outgoing]) -> None:
        try:
            association = self._associate()
        except _SendFailed as exc:
            self._failed(jobs, str(exc))
            return
        try:
            for index, job in enumerate(jobs):
                if not association.is_established:
                    self._failed(jobs[index:], "the destination closed the association")
                    return
                self._send_one(association, job)
        finally:
            if association.is_established:
                association.release()

    def _send_one(self, association: Any, job: Outgoing) -> None:
        started = time.perf_counter()
        try:
            status = association.send_c_store(job.seg)
        except FileNotFoundError:
            with self._cond:
                self._pending.pop(job.seg, None)
            self.log("failed", sop_instance_uid=job.uid, reason="its SEG left the outbox unsent")
            return
        except (OSError, ValueError, RuntimeError) as exc:
            # An unreadable SEG file (a disk error), no context for it, a dropped association.
            self._failed([job], f"cannot send {job.seg.name}: {type(exc).__name__}")
            return
        code = int(status.Status) if "Status" in status else None
        if code not in _STORED:
            shown = "no response" if code is None else f"status 0x{code:04X}"
            self._failed([job], f"the destination refused the SEG ({shown})")
            return
        send_ms = (time.perf_counter() - started) * 1000.0
        self.inbox.move(job.seg, self.inbox.sent)
        with self._cond:
            self._pending.pop(job.seg, None)
        fields = {**job.fields, "send_ms": round(send_ms, 1), "attempts": job.failures + 1}
        if job.acked_at is not None:
            fields["total_ms"] = round((time.monotonic() - job.acked_at) * 1000.0, 1)
        self.log("done", sop_instance_uid=job.uid, **fields)

    def _associate(self) -> Any:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        if self._ae is None:
            ae = AE(ae_title=self.settings.aet)
            ae.add_requested_context(
                SEG_SOP_CLASS_UID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
            ae.connection_timeout = 5
            ae.acse_timeout = 10
            ae.dimse_timeout = 60
            ae.network_timeout = 60
            self._ae = ae
        target = self.settings.destination
        association = self._ae.associate(target.host, target.port, ae_title=target.aet)
        if association.is_established:
            if not association.accepted_contexts:
                association.release()
                raise _SendFailed("the destination does not accept DICOM Segmentation Storage")
            return association
        if association.is_rejected:
            raise _SendFailed(
                f"the destination rejected the association (does it know AE title "
                f"{self.settings.aet}?)"
            )
        raise _SendFailed("cannot connect (destination down, wrong host or port?)")

    def _failed(self, jobs: list[Outgoing], reason: str) -> None:
        now = time.monotonic()
        with self._cond:
            for job in jobs:
                job.failures += 1
                job.next_try = now + self.settings.retry_delay_s(job.failures)
            delay = min(job.next_try for job in jobs) - now
        self.log(
            "send-failed",
            destination=str(self.settings.destination),
            segs=len(jobs),
            reason=reason,
            retry_in_s=round(delay, 1),
        )
