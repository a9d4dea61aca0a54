"""The DICOM side of `pneumo serve`: a Storage SCP and Verification SCP built on pynetdicom.

It accepts associations only from the calling AE titles in ``--allow`` and only when called by
its own AE title; everyone else is rejected at association ("calling AE title not recognised").
It offers Verification (C-ECHO) and storage of CR, DX (for presentation and for processing) and
Secondary Capture images, in the uncompressed transfer syntaxes and every compressed one this
installation can decode; any other SOP class (a structured report, a CT) gets no presentation
context, so it cannot be sent at all. Each C-STORE goes to :class:`~pneumo_cli.serve.intake.Intake`.

pynetdicom holds a data set in memory until it is complete. An instance over ``--max-size`` is
answered with status A700 once received; one that grows past twice that size is cut off by
aborting its association, so a sender cannot fill the memory. A sender that disconnects or
aborts mid-transfer leaves nothing: the intake only sees complete requests.

pynetdicom's own logging is silenced except errors, which reach the node's log as one line
(pynetdicom logs no data set contents at that level).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from typing import Any

from pneumo_cli.serve.intake import Intake, Log
from pneumo_cli.serve.settings import ServeError, ServeSettings

# Storage SOP classes of chest X-rays: CR, DX for presentation, DX for processing, and
# Secondary Capture (how the SIIM and many digitised films are stored).
IMAGE_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.7",
)
VERIFICATION_CLASS = "1.2.840.10008.1.1"
_P_DATA_TF = 0x04  # PDU type of a P-DATA-TF (the PDUs that carry data sets)
_MAX_PDU_BYTES = 262144  # what senders may put in one PDU; larger means fewer reads per image


def image_transfer_syntaxes() -> list[str]:
    """Uncompressed transfer syntaxes, then every compressed one pydicom can decode here."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    syntaxes = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
    syntaxes += [uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian]
    for syntax in (
        uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
        uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
        uid.RLELossless,
    ):  # fmt: skip
        with contextlib.suppress(Exception):
            if get_decoder(syntax).is_available:
                syntaxes.append(syntax)
    return [str(syntax) for syntax in syntaxes]


class Node:
    """The listening DICOM node. :meth:`start` binds the port; :meth:`stop` closes it.

    ``last_activity`` (``time.monotonic()``) is updated whenever data arrives or a connection
    closes, for `--exit-when-idle`.
    """

    def __init__(self, settings: ServeSettings, intake: Intake, log: Log) -> None:
        self.settings = settings
        self.intake = intake
        self.log = log
        self.last_activity = time.monotonic()
        self._ae: Any = None
        self._server: Any = None
        self._received: dict[int, int] = {}  # id(association) -> bytes of the message so far
        self._lock = threading.Lock()
        self._log_handler: logging.Handler | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when ``settings.port`` is 0)."""
        return int(self._server.server_address[1])

    def open_associations(self) -> int:
        return len(self._ae.active_associations) if self._ae is not None else 0

    def start(self) -> None:
        """Bind ``settings.host:settings.port`` and serve in background threads.

        Raises:
            ServeError: the port is in use, may not be used, or the address is not local.
        """
        from pynetdicom import AE, _config, evt

        _config.LOG_HANDLER_LEVEL = "none"  # the standard handlers log at debug level only
        self._forward_pynetdicom_errors()
        ae = AE(ae_title=self.settings.aet)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.settings.allow)
        ae.maximum_pdu_size = _MAX_PDU_BYTES
        ae.add_supported_context(VERIFICATION_CLASS)
        syntaxes = image_transfer_syntaxes()
        for sop_class in IMAGE_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_DIMSE_RECV, self._on_message),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        address = (self.settings.host, self.settings.port)
        try:
            self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            self._restore_logging()
            raise ServeError(_bind_error(exc, *address)) from None
        self._ae = ae

    def stop(self) -> None:
        """Stop listening and abort open associations (their unacknowledged requests are the
        senders' to repeat; acknowledged ones are on disk)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            for association in list(self._ae.active_associations):
                with contextlib.suppress(Exception):
                    association.abort()
            self._ae = None
        self._restore_logging()

    # --- event handlers (called in pynetdicom's threads) ----------------------------------

    def _on_store(self, event: Any) -> int:
        request = event.request
        data = request.DataSet
        size = data.getbuffer().nbytes if data is not None else 0
        calling = _printable(event.assoc.requestor.ae_title)
        uid = str(request.AffectedSOPInstanceUID or "")
        return self.intake.store(uid, size, event.encoded_dataset, calling)

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title or "").strip()
        if calling not in self.settings.allow:
            reason = "calling AE title not in --allow"
        else:
            reason = "called AE title is not this node's, or too many associations"
        self.log(
            "association-rejected",
            calling_aet=_printable(calling),
            address=str(requestor.address),
            reason=reason,
        )

    def _on_data(self, event: Any) -> None:
        self.last_activity = time.monotonic()
        data = event.data
        if not data or data[0] != _P_DATA_TF:
            return
        key = id(event.assoc)
        with self._lock:
            total = self._received.get(key, 0) + len(data)
            self._received[key] = total
        if total > 2 * self.settings.max_size_bytes + _MAX_PDU_BYTES:
            self.log(
                "association-aborted",
                calling_aet=_printable(event.assoc.requestor.ae_title),
                reason=f"a request passed twice --max-size ({total} bytes received)",
            )
            with self._lock:
                self._received[key] = 0
            event.assoc.abort()

    def _on_message(self, event: Any) -> None:
        with self._lock:
            self._received.pop(id(event.assoc), None)

    def _on_close(self, event: Any) -> None:
        self.last_activity = time.monotonic()
        with self._lock:
            self._received.pop(id(event.assoc), None)

    # --- pynetdicom's logging ---------------------------------------------------------------

    def _forward_pynetdicom_errors(self) -> None:
        logger = logging.getLogger("pynetdicom")
        handler = _ForwardErrors(self.log)
        logger.addHandler(handler)
        logger.propagate = False  # not to the root logger (absl/TensorFlow print from there)
        self._log_handler = handler

    def _restore_logging(self) -> None:
        if self._log_handler is not None:
            logger = logging.getLogger("pynetdicom")
            logger.removeHandler(self._log_handler)
            logger.propagate = True
            self._log_handler = None


# pynetdicom's errors when the sender's association fails; the sender logs those itself
# (``send-failed``), once per attempt.
_SENDER_ERRORS = (
    "Association request failed",
    "TCP Initialisation Error",
    "Association Rejected",
    "Result: ",
    "Reason: ",
)


class _ForwardErrors(logging.Handler):
    """pynetdicom's error records as one ``dicom-error`` log line each (first line only)."""

    def __init__(self, log: Log) -> None:
        super().__init__(level=logging.ERROR)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            first = record.getMessage().strip().splitlines()
            if first and not first[0].startswith(_SENDER_ERRORS):
                self._log("dicom-error", message=_printable(first[0], 200))


def _printable(text: Any, limit: int = 16) -> str:
    """``text`` as at most ``limit`` printable ASCII characters (AE titles come from peers)."""
    shown = str(text or "").strip().encode("unicode_escape").decode("ascii")
    return shown[:limit]


def _bind_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another DICOM node, or a second pneumo serve?); "
            "stop that program or choose another --port"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"port {port} may not be used by this user (ports below 1024 need root); use 11112"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
