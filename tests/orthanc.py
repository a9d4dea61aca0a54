"""A real PACS for the tests: Orthanc (Debian package ``orthanc``) started on 127.0.0.1 with its
own configuration, temporary storage and free ports, and stopped by PID.

Without the ``Orthanc`` binary the tests that need it skip with that reason; under ``CI=true``
they fail (``.ci/run`` installs it). The Debian package's own service is never used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def orthanc_binary() -> str:
    """The Orthanc executable; skips the test (fails under CI=true) when it is not installed."""
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = (
            "Orthanc is not installed (Debian package `orthanc`: apt-get install -y orthanc); "
            "the PACS tests need it"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    return found


class Orthanc:
    """One Orthanc process: its DICOM port, REST API and the instances it stores."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]], lua: str = "") -> None:
        self.folder = folder
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = ORTHANC_AET
        self.modalities = modalities
        self.lua = lua
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, binary: str, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers."""
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumo-tests",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {
                name: {"AET": aet, "Host": "127.0.0.1", "Port": port}
                for name, (aet, port) in self.modalities.items()
            },
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
            "SaveJobs": False,
            "HttpDescribeErrors": True,
        }
        if self.lua:
            script = self.folder / "route.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            [binary, str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get_json("/system")
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc's REST API did not answer in {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate the process by its PID (kill it if it does not exit in 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "orthanc.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- REST API -------------------------------------------------------------------------

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def get_json(self, path: str) -> object:
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        return list(self.get_json("/instances"))

    def datasets(self, seen: dict[str, object]) -> dict[str, object]:
        """Every stored instance as a pydicom dataset (``seen`` caches the ones already read)."""
        import pydicom

        for instance in self.instances():
            if instance not in seen:
                seen[instance] = pydicom.dcmread(
                    io.BytesIO(self.get(f"/instances/{instance}/file"))
                )
        return seen


@contextlib.contextmanager
def running_orthanc(
    folder: Path, modalities: dict[str, tuple[str, int]], lua: str = ""
) -> Iterator[Orthanc]:
    """An Orthanc started in ``folder`` for the block, stopped by PID afterwards."""
    binary = orthanc_binary()
    pacs = Orthanc(folder, modalities, lua)
    pacs.start(binary)
    try:
        yield pacs
    finally:
        pacs.stop()


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001
    """Poll ``condition()`` until it returns something truthy (returned) or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)
