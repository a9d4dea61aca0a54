"""The guards tests/conftest.py puts around every test: no network, a private KERAS_HOME."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import NetworkBlockedError

TEST_NET = ("203.0.113.1", 80)  # TEST-NET-3 (RFC 5737): documentation only, never routed


def test_a_connection_to_the_internet_is_refused_before_any_packet() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Closed first: a real connect could then only fail with EBADF, so the guard's own error
    # proves it refused before calling the real one (no SYN was ever sent).
    sock.close()
    with pytest.raises(NetworkBlockedError, match=r"203\.0\.113\.1.*only loopback"):
        sock.connect(TEST_NET)
    with pytest.raises(NetworkBlockedError):
        sock.connect_ex(TEST_NET)
    with socket.socket(socket.AF_INET6) as sock6, pytest.raises(NetworkBlockedError):
        sock6.connect(("2001:db8::1", 80, 0, 0))  # the IPv6 documentation prefix


def test_a_host_name_is_refused_before_it_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[tuple] = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: lookups.append(args) or [])
    with pytest.raises(NetworkBlockedError, match="example.com"):
        socket.create_connection(("example.com", 443), timeout=1)
    with pytest.raises(NetworkBlockedError):  # what downloads (keras get_file, pip) go through
        urllib.request.urlopen("http://example.com/weights.h5", timeout=1)
    assert lookups == []  # no DNS query either


def test_loopback_and_unix_sockets_still_connect(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with socket.create_connection(("localhost", port), timeout=5):
            pass
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))


def test_keras_home_is_a_fresh_temporary_folder_that_subprocesses_inherit(
    private_keras_home: Path,
) -> None:
    home = Path(os.environ["KERAS_HOME"])
    assert home == private_keras_home and home.is_dir() and not any(home.iterdir())
    assert home != Path("~/.keras").expanduser()
    code = "import os; print(os.environ['KERAS_HOME'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(home)
