"""The node's folder (``--inbox``): where every received instance and every result waits, so that
nothing acknowledged is lost when the process dies.

Layout (all on one file system, so a move is one atomic rename)::

    INBOX/incoming/<SOPInstanceUID>.dcm   received and acknowledged, not yet predicted
    INBOX/outbox/<SOPInstanceUID>.dcm     the SEG of that source, not yet accepted by --send-to
    INBOX/done/<SOPInstanceUID>.dcm       sources whose SEG is in the outbox (or sent)
    INBOX/sent/<SOPInstanceUID>.dcm       SEGs the destination accepted
    INBOX/failed/<SOPInstanceUID>.dcm     sources that could not make a SEG after all (rare)
    INBOX/series.json                     the node's SEG series, kept across restarts

A received instance is written to a temporary file in ``incoming/``, flushed to disk, checked
(it must decode into a single-frame X-ray), and only then renamed to its final name; the C-STORE
response says success after that. File names come from the SOP Instance UID only when it is a
valid DICOM UID (digits and single dots, at most 64 characters), so no name can leave its folder.
``done/`` and ``sent/`` grow: delete old files there as the site's retention rules say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pneumo_cli.core.errors import InputError, OutputError
from pneumo_cli.core.files import (
    TEMP_PREFIX,
    atomic_write_json,
    check_image_id,
    describe_os_error,
    remove_stale_temporaries,
)

INCOMING, OUTBOX, DONE, SENT, FAILED = "incoming", "outbox", "done", "sent", "failed"
SERIES_FILE = "series.json"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_MAX_CHARS = 64
T = TypeVar("T")


def instance_file_name(uid: str) -> str:
    """``<uid>.dcm`` for a valid DICOM UID.

    Raises:
        InputError: ``uid`` is not a valid UID (so it cannot name a file here).
    """
    if not isinstance(uid, str) or len(uid) > _UID_MAX_CHARS or not _UID.match(uid):
        raise InputError("SOP Instance UID is not a valid DICOM UID (digits and dots, <= 64)")
    return f"{check_image_id(uid)}.dcm"


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (a received instance must survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Inbox:
    """The folders of one node; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING
        self.outbox = self.root / OUTBOX
        self.done = self.root / DONE
        self.sent = self.root / SENT
        self.failed = self.root / FAILED
        self._numbers = itertools.count(1)

    def create_root(self) -> None:
        """Create the inbox folder itself (before it is locked; nothing is cleaned).

        Raises:
            OutputError: it cannot be created, or is a file.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.root}: {describe_os_error(exc)}") from None

    def prepare(self) -> None:
        """Create the folders and delete temporaries a killed node left (never complete files).

        Raises:
            OutputError: a folder cannot be created.
        """
        for folder in (self.root, self.incoming, self.outbox, self.done, self.sent, self.failed):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create {folder}: {describe_os_error(exc)}") from None
            remove_stale_temporaries(folder)

    def receive(self, data: bytes, name: str, check: Callable[[Path], T]) -> tuple[Path, T, bool]:
        """Store a received instance as ``incoming/<name>`` if ``check(path)`` accepts it.

        The bytes go to a temporary file (flushed to disk), ``check`` reads that file (it
        raises to refuse it), then the file is renamed into place and the folder flushed.
        Returns the final path, what ``check`` returned, and whether an instance of that name
        was already waiting there (a sender repeating it: it replaced the waiting copy).

        Raises:
            OutputError: the inbox cannot be written (disk full, read-only); nothing is left.
            Whatever ``check`` raises; nothing is left either.
        """
        target = self.incoming / name
        tmp = self.incoming / f"{TEMP_PREFIX}{os.getpid()}-{next(self._numbers)}.dcm"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            checked = check(tmp)
            waiting = target.exists()
            os.replace(tmp, target)
            _fsync_path(self.incoming)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None
            raise
        return target, checked, waiting

    def waiting(self) -> list[Path]:
        """Received instances not yet predicted, oldest first."""
        return _complete_files(self.incoming)

    def unsent(self) -> list[Path]:
        """SEGs in the outbox, oldest first."""
        return _complete_files(self.outbox)

    def seg_path(self, source: Path) -> Path:
        """Where the SEG of the source ``incoming/<name>`` is written."""
        return self.outbox / source.name

    def flush_seg(self, seg: Path) -> None:
        """Flush a SEG just written to the outbox to disk, before its source leaves incoming."""
        try:
            _fsync_path(seg)
            _fsync_path(self.outbox)
        except OSError as exc:
            raise OutputError(f"cannot write {seg}: {describe_os_error(exc)}") from None

    def move(self, path: Path, folder: Path) -> Path:
        """Move ``path`` into ``folder`` (``self.done``, ``self.sent`` or ``self.failed``); a
        file already moved (by the processing of a repeated instance) is left as it is."""
        target = folder / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot move {path} to {folder}: {describe_os_error(exc)}") from None
        return target

    def seg_series(self, source: str, version: str) -> Any:
        """The node's SEG series: the one in ``series.json`` if it was made by the same model
        (``source``, see ``dicom_outputs.algorithm_source``) and pneumo version, else a new
        one (saved). A new model starts a new series, so its results are told apart.

        Raises:
            InputError: ``series.json`` is damaged (the message says to delete it).
        """
        from pneumo_cli.io.dicom_seg import SegSeries, new_seg_series

        path = self.root / SERIES_FILE
        if path.is_file():
            try:
                series = SegSeries(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                raise InputError(
                    f"{path} is damaged ({exc}); delete it (new SEGs then start a new series)"
                ) from None
            if (series.algorithm_source, series.algorithm_version) == (source, version):
                return series
        series = new_seg_series(source, version)
        atomic_write_json(path, dataclasses.asdict(series))
        return series


def _complete_files(folder: Path) -> list[Path]:
    """``*.dcm`` files of ``folder`` (no temporaries), by modification time, then name."""
    found = []
    for path in folder.glob("*.dcm"):
        if path.name.startswith(TEMP_PREFIX):
            continue
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime_ns, path.name, path))
    return [path for _, _, path in sorted(found)]
