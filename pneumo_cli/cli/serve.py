"""`pneumo serve`: a DICOM node that segments every chest X-ray sent to it and sends the SEG on."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from pneumo_cli.cli.options import InferenceEngine, InferencePrecision, checked_by
from pneumo_cli.cli.predict import (
    BottomThreshold,
    MinArea,
    MinComponentArea,
    ModelOption,
    RunOption,
    TopThreshold,
    TtaOption,
)
from pneumo_cli.cli.render import print_summary
from pneumo_cli.core.choices import Engine, Precision, Tta
from pneumo_cli.core.errors import ConfigError
from pneumo_cli.serve.settings import (
    DEFAULT_AET,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_SIZE,
    DEFAULT_PORT,
    DEFAULT_RETRY_MAX_S,
    check_ae_title,
    parse_destination,
)


def _check_titles(titles: list[str]) -> None:
    for title in titles:
        check_ae_title(title, "--allow")


def serve_command(
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="AET",
            help="Calling AE title that may send images (repeat for several, e.g. the PACS "
            "and a router); associations from any other are rejected. Required.",
            callback=checked_by(_check_titles),
            show_default=False,
        ),
    ] = None,
    send_to: Annotated[
        str | None,
        typer.Option(
            "--send-to",
            metavar="HOST:PORT:AET",
            help="Where every SEG is C-STOREd (the PACS); retried with backoff while it is "
            "down. Required.",
            callback=checked_by(parse_destination),
            show_default=False,
        ),
    ] = None,
    inbox: Annotated[
        Path | None,
        typer.Option(
            "--inbox",
            help="The node's folder: incoming/, outbox/, done/, sent/, failed/. Nothing is "
            "written elsewhere. Required.",
            show_default=False,
        ),
    ] = None,
    run: RunOption = None,
    model: ModelOption = None,
    tta: TtaOption = Tta.none,
    precision: InferencePrecision = Precision.auto,
    engine: InferenceEngine = Engine.auto,
    top_threshold: TopThreshold = None,
    min_area: MinArea = None,
    bottom_threshold: BottomThreshold = None,
    min_component_area: MinComponentArea = None,
    aet: Annotated[
        str,
        typer.Option("--aet", help="This node's AE title.", callback=checked_by(check_ae_title)),
    ] = DEFAULT_AET,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")
    ] = "0.0.0.0",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="DICOM port (0: any free port).")
    ] = DEFAULT_PORT,
    max_size: Annotated[
        int,
        typer.Option(
            "--max-size",
            metavar="BYTES",
            min=1,
            help="Larger instances get failure status A700.",
        ),
    ] = DEFAULT_MAX_SIZE,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="At most this many waiting images at once.")
    ] = DEFAULT_BATCH_SIZE,
    retry_max: Annotated[
        float,
        typer.Option(
            "--retry-max-seconds",
            min=0.1,
            help="Longest wait between two attempts to send a SEG (waits double from 1 s).",
        ),
    ] = DEFAULT_RETRY_MAX_S,
    exit_when_idle: Annotated[
        float | None,
        typer.Option(
            "--exit-when-idle",
            metavar="SECONDS",
            min=0.0,
            help="Exit once nothing has arrived, waited or been sent for SECONDS (batch jobs, "
            "tests); exit 1 if SEGs could not be sent. Default: serve until SIGTERM/Ctrl-C.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Log JSON lines on stderr, and print the final summary as JSON."
        ),
    ] = False,
) -> None:
    """Run a DICOM node next to a PACS: every chest X-ray C-STOREd to it is segmented and its
    DICOM SEG C-STOREd to --send-to.

    A Storage SCP (CR, DX, Secondary Capture) and Verification SCP for the calling AE titles in
    --allow. Each instance is written to INBOX/incoming/ before its C-STORE is acknowledged;
    the model, loaded once, predicts what is waiting, writes the SEG (as `pneumo predict
    --dicom-seg` does) into INBOX/outbox/ and sends it, retrying while the destination is down.
    After a crash or kill, the next start finishes what the inbox and outbox hold. SIGTERM or
    Ctrl-C: finish the image in hand, exit 0. One log line per instance on stderr (UIDs,
    result, area, timings; never patient names or IDs), JSON lines with --json; a summary on
    stdout at the end. Bad instances get a DICOM failure status: A700 over --max-size, A900
    without pixels or with several frames, C000 undecodable.
    """
    from pneumo_cli.serve.service import serve
    from pneumo_cli.serve.settings import ServeSettings

    missing = [name for name, value in (("--allow", allow), ("--send-to", send_to),
               ("--inbox", inbox)) if not value]  # fmt: skip
    if missing:
        raise typer.BadParameter(f"{', '.join(missing)} required (see pneumo serve --help)")
    try:
        settings = ServeSettings(
            inbox=inbox,
            destination=parse_destination(send_to),
            allow=tuple(allow),
            aet=aet,
            host=host,
            port=port,
            max_size_bytes=max_size,
            batch_size=batch_size,
            retry_max_s=retry_max,
            exit_when_idle_s=exit_when_idle,
            gate_overrides={
                "top_threshold": top_threshold,
                "min_area_px": min_area,
                "bottom_threshold": bottom_threshold,
                "min_component_area_px": min_component_area,
            },
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    _silence_library_warnings()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        summary = serve(
            settings, run=run, model=model, tta=tta.value, precision=precision.value,
            engine=engine.value, log=LogLines(as_json), stop=stop,
        )  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_summary("pneumo serve", summary.to_dict(), as_json)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _silence_library_warnings() -> None:
    """pydicom and highdicom warn and log about odd header values by quoting them (patient
    names too), from every association's thread; the node's stderr is its log, which never
    holds patient data, so their warnings and log records are dropped for this process."""
    warnings.simplefilter("ignore")
    for name in ("pydicom", "highdicom"):
        logging.getLogger(name).propagate = False  # their own NullHandler stays


class LogLines:
    """The node's log on stderr: ``TIME EVENT key=value ...`` lines, or JSON lines.

    Called from several threads; each call writes one whole line.
    """

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
        if self.as_json:
            line = json.dumps({"time": stamp, "event": event, **fields}, default=str)
        else:
            parts = [f"{key}={_text(value)}" for key, value in fields.items() if value is not None]
            line = " ".join([stamp, event, *parts])
        with self._lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    text = " ".join(str(value).split())
    return f'"{text}"' if " " in text else text
