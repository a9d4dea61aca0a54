"""What happens to one C-STORE request: checked, stored in the inbox, handed to the worker, and
the status the sender gets back.

A request is acknowledged (status 0x0000) only once its instance is complete on disk in
``INBOX/incoming/`` and is known to decode into one 2-D X-ray; otherwise it gets a failure status
from the Storage Service Class (DICOM PS3.4 B.2.3) and nothing stays in the inbox:

====== ================================================================================
0xA700 Refused, out of resources: over ``--max-size``, or the inbox cannot be written
0xA900 Error, data set does not match SOP class: no pixel data, no Rows/Columns, several
       frames
0xC000 Error, cannot understand: not a readable data set, undecodable pixels (a broken
       JPEG), or a SOP Instance UID that is not a valid UID
====== ================================================================================
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import InputError, OutputError
from pneumo_cli.inference.sources import Item
from pneumo_cli.serve.inbox import Inbox, instance_file_name

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

Log = Callable[..., None]  # log(event, **fields): one line per call, never patient data


@dataclass(frozen=True)
class Arrival:
    """An acknowledged instance waiting for the worker.

    Attributes:
        path: its file in ``INBOX/incoming/``.
        uid: its SOP Instance UID (valid, safe as a file stem).
        item: the prepared image (uint8 (S, S)), or None for an instance left by an earlier
            run (the worker then reads the file).
        acked_at: ``time.monotonic()`` when it was acknowledged (None for a leftover).
        receive_ms: time spent checking and storing it before the acknowledgement.
    """

    path: Path
    uid: str
    item: Item | None = None
    acked_at: float | None = None
    receive_ms: float = 0.0


class Refusal(Exception):
    """A request that gets a failure status: ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Intake:
    """Checks and stores C-STORE requests (thread-safe: each association runs in its thread).

    ``load(path) -> Item`` prepares an X-ray as the run's training did
    (:func:`~pneumo_cli.inference.sources.file_loader`); ``submit(arrival)`` hands an
    acknowledged instance to the worker.
    """

    def __init__(
        self,
        inbox: Inbox,
        load: Callable[[Path], Item],
        submit: Callable[[Arrival], None],
        log: Log,
        max_size_bytes: int,
    ) -> None:
        self.inbox = inbox
        self.load = load
        self.submit = submit
        self.log = log
        self.max_size_bytes = max_size_bytes

    def store(self, uid: str, size: int, encoded: Callable[[], bytes], calling_aet: str) -> int:
        """Handle one request for SOP instance ``uid`` of ``size`` bytes; ``encoded()`` gives
        the instance as DICOM file bytes. Returns the status to send back."""
        started = time.perf_counter()
        try:
            name = _file_name(uid)
            if size > self.max_size_bytes:
                raise Refusal(
                    OUT_OF_RESOURCES,
                    f"instance has {size} bytes, over --max-size {self.max_size_bytes}",
                )
            data = encoded()
            _check_header(data)
            path, item, repeated = self.inbox.receive(data, name, self._prepare)
        except Refusal as refusal:
            shown = uid if _is_safe(uid) else "(invalid UID)"
            self.log(
                "refused",
                sop_instance_uid=shown,
                calling_aet=calling_aet,
                status=f"0x{refusal.status:04X}",
                reason=refusal.reason,
            )
            return refusal.status
        except OutputError as exc:
            self.log("refused", sop_instance_uid=uid, calling_aet=calling_aet,
                     status=f"0x{OUT_OF_RESOURCES:04X}", reason=str(exc))  # fmt: skip
            return OUT_OF_RESOURCES
        if not repeated:  # a repeated instance replaced its waiting copy: predicted once
            item = dataclasses.replace(item, image_id=uid, source=path)
            receive_ms = (time.perf_counter() - started) * 1000.0
            self.submit(Arrival(path, uid, item, time.monotonic(), receive_ms))
        return SUCCESS

    def _prepare(self, path: Path) -> Item:
        """Decode and prepare the stored temporary file; a failure refuses the instance."""
        try:
            return self.load(path)
        except InputError as exc:
            reason = " ".join(str(exc).split()).removeprefix(f"{path}: ")
            raise Refusal(CANNOT_UNDERSTAND, reason) from None


def _is_safe(uid: str) -> bool:
    try:
        instance_file_name(uid)
    except InputError:
        return False
    return True


def _file_name(uid: str) -> str:
    try:
        return instance_file_name(uid)
    except InputError as exc:
        raise Refusal(CANNOT_UNDERSTAND, str(exc)) from None


def _check_header(data: bytes) -> None:
    """Refuse data sets that are not one 2-D image before their pixels are decoded."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            frames = _positive_int(ds.get("NumberOfFrames", 1))
            rows, cols = _positive_int(ds.get("Rows")), _positive_int(ds.get("Columns"))
            has_pixels = "PixelData" in ds
        except Exception as exc:  # noqa: BLE001 - untrusted bytes make pydicom raise many types
            # The type only: a parser's message may quote header values (names included).
            reason = f"not a readable data set ({type(exc).__name__})"
            raise Refusal(CANNOT_UNDERSTAND, reason) from None
    if not has_pixels:
        raise Refusal(DOES_NOT_MATCH_SOP_CLASS, "no pixel data (not an image)")
    if not rows or not cols:
        raise Refusal(DOES_NOT_MATCH_SOP_CLASS, "no image size (Rows/Columns)")
    if frames is None:
        raise Refusal(DOES_NOT_MATCH_SOP_CLASS, "NumberOfFrames is not a positive number")
    if frames > 1:
        raise Refusal(
            DOES_NOT_MATCH_SOP_CLASS, f"multi-frame instance ({frames} frames); one X-ray expected"
        )


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
