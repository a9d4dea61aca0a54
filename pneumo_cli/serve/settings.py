"""Settings of `pneumo serve`, checked once: AE titles, the destination, sizes and retry times."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_cli.core.errors import ConfigError, PneumoError

DEFAULT_AET = "PNEUMO"
DEFAULT_PORT = 11112
DEFAULT_MAX_SIZE = 128 * 1024 * 1024  # bytes: a 16-bit 4k x 4k DX is 32 MiB uncompressed
DEFAULT_BATCH_SIZE = 8
DEFAULT_RETRY_MAX_S = 60.0
_AE_MAX_CHARS = 16  # DICOM AE: 16 characters, no backslash or control characters


class ServeError(PneumoError):
    """The DICOM node cannot start or go on (port in use, inbox in use, unsent results)."""


def check_ae_title(title: str, what: str = "AE title") -> str:
    """Return ``title`` if it is a valid DICOM AE title (1-16 printable ASCII characters, not
    all spaces, no backslash), else raise ConfigError naming ``what``."""
    if not title.strip():
        raise ConfigError(f"{what} is empty; give 1 to {_AE_MAX_CHARS} characters")
    if len(title) > _AE_MAX_CHARS:
        raise ConfigError(f"{what} '{title}' is longer than {_AE_MAX_CHARS} characters")
    if "\\" in title or not all(32 <= ord(char) < 127 for char in title):
        shown = title.encode("unicode_escape").decode("ascii")
        raise ConfigError(
            f"{what} '{shown}' may hold only printable ASCII characters, without backslash"
        )
    return title


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM Storage SCP (a PACS, a router) at ``host:port`` as ``aet``."""

    host: str
    port: int
    aet: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.aet}"


_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


def parse_destination(text: str) -> Destination:
    """``HOST:PORT:AET`` (an IPv6 host in brackets, ``[::1]:104:PACS``) as a :class:`Destination`.

    Raises:
        ConfigError: not three parts, a port outside 1-65535, a bad host or AE title.
    """
    host, sep1, rest = text.rpartition(":")
    host, sep2, port = host.rpartition(":")
    aet = rest
    if not (sep1 and sep2 and host):
        raise ConfigError(f"--send-to '{text}': expected HOST:PORT:AET, e.g. 10.0.0.5:104:PACS")
    if not _HOST.match(host):
        raise ConfigError(f"--send-to '{text}': '{host}' is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--send-to '{text}': port '{port}' is not a number in 1-65535")
    check_ae_title(aet, f"--send-to '{text}': AE title")
    return Destination(host.strip("[]"), int(port), aet)


@dataclass(frozen=True)
class ServeSettings:
    """Everything `pneumo serve` needs, checked.

    Attributes:
        inbox: the node's folder (see :mod:`pneumo_cli.serve`); nothing is written elsewhere.
        destination: where SEGs are sent.
        allow: calling AE titles that may send images; every other is refused.
        aet, host, port: this node's AE title and listening address (port 0: any free port).
        max_size_bytes: larger instances get a failure status (A700).
        batch_size: at most this many waiting images go through the network at once.
        retry_initial_s, retry_max_s: a failed send is retried after ``retry_initial_s``,
            doubling per failure up to ``retry_max_s``; it is never given up.
        exit_when_idle_s: stop once nothing has arrived, waits or is being sent for this
            long (None: serve until stopped).
        gate_overrides: gate values replacing the run's (None values are ignored).
    """

    inbox: Path
    destination: Destination
    allow: tuple[str, ...]
    aet: str = DEFAULT_AET
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_size_bytes: int = DEFAULT_MAX_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    retry_initial_s: float = 1.0
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    exit_when_idle_s: float | None = None
    gate_overrides: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inbox", Path(os.fspath(self.inbox)))
        check_ae_title(self.aet, "--aet")
        if not self.allow:
            raise ConfigError("give at least one --allow AET: the AE titles that may send images")
        for title in self.allow:
            check_ae_title(title, "--allow")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: choose a port in 1-65535")
        if self.max_size_bytes < 1 or self.batch_size < 1:
            raise ConfigError("--max-size and --batch-size must be positive")
        for name in ("retry_initial_s", "retry_max_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value}")
        if self.exit_when_idle_s is not None and not self.exit_when_idle_s >= 0:
            raise ConfigError("--exit-when-idle must be a number of seconds >= 0")

    def retry_delay_s(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt in a row (>= 1)."""
        return min(self.retry_max_s, self.retry_initial_s * 2.0 ** min(failures - 1, 30))
