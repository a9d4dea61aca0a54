"""Concurrency: one writer per cache. `files.folder_lock` and its use by `pneumo preprocess`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pneumo_cli.core.errors import OutputError
from pneumo_cli.core.locks import LOCK_NAME, folder_lock
from pneumo_cli.io.dicom_write import write_dicom
from tests.robustness.conftest import cli_env, fake_xray, pneumo_command, tree_bytes


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(folder: Path, **fields: object) -> Path:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": "preprocess"}
    owner.update(fields)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps(owner))
    return lock


def test_lock_records_its_owner_and_is_removed_after_the_block(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "preprocess") as lock:
        assert lock == tmp_path / LOCK_NAME
        owner = json.loads(lock.read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        assert owner["purpose"] == "preprocess"
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no temporary left
    assert not lock.exists()


def test_lock_is_removed_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), folder_lock(tmp_path, "train"):
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_a_held_lock_refuses_a_second_writer_with_one_line(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "preprocess"):
        with pytest.raises(OutputError) as caught, folder_lock(tmp_path, "preprocess"):
            pass
        message = str(caught.value)
        assert "\n" not in message
        assert f"is in use by `pneumo preprocess` (PID {os.getpid()} on" in message
        assert str(tmp_path / LOCK_NAME) in message  # names the file to delete
        assert (tmp_path / LOCK_NAME).exists()  # the refused writer did not take it away
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "owner",
    [
        {"pid": "dead"},  # a killed run's lock (PID filled in below)
        {"start_ticks": -5},  # our PID, but a different process started with it: PID reused
        {"pid": None},  # no usable PID recorded
    ],
)
def test_a_stale_lock_is_replaced(tmp_path: Path, owner: dict) -> None:
    if owner.get("pid") == "dead":
        owner = {"pid": _dead_pid()}
    if owner.get("start_ticks") is not None and not Path("/proc/self/stat").exists():
        pytest.skip("no /proc: process start times are not available on this system")
    _write_lock(tmp_path, **owner)
    with folder_lock(tmp_path, "preprocess") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_old_lock_is_stale_but_a_fresh_one_is_waited_for(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_text("{not json")
    old = time.time() - 60
    os.utime(lock, (old, old))
    with folder_lock(tmp_path, "preprocess"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text("")  # fresh: a writer may be between creating and filling it
    started = time.monotonic()
    refused = pytest.raises(OutputError, match="is unreadable or keeps changing; delete it")
    with refused, folder_lock(tmp_path, "preprocess"):
        pass
    assert 0.5 < time.monotonic() - started < 10
    assert lock.read_text() == ""


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, host="some-other-machine", pid=1)
    refused = pytest.raises(OutputError, match="in use by .* on some-other-machine")
    with refused, folder_lock(tmp_path, "preprocess"):
        pass
    assert (tmp_path / LOCK_NAME).exists()


def test_lock_in_a_missing_folder_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot lock"), folder_lock(tmp_path / "nope", "x"):
        pass


def test_two_preprocess_runs_into_one_cache(tmp_path: Path) -> None:
    """The second run refuses with one line while the first works; the first finishes cleanly
    and its cache equals that of a run that had the cache to itself."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(3)
    # Enough work (about 2 s for one worker) that the first run is still busy when the second,
    # a fresh process, reaches the lock.
    for i in range(200):
        write_dicom(raw / f"c{i:03d}.dcm", fake_xray(rng, 1024, border=8), patient_id=f"P{i}")
    args = ["preprocess", raw, "CACHE", "--workers", "1", "--quiet", "--image-size", "64"]
    cache = tmp_path / "cache"
    first = subprocess.Popen(
        pneumo_command(*[cache if a == "CACHE" else a for a in args]),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (cache / "records").is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (cache / LOCK_NAME).exists(), "the first run holds no lock while it writes"
    second = subprocess.run(
        pneumo_command(*[cache if a == "CACHE" else a for a in args]),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.poll() is None, "the first run ended before the second started; use more images"
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"error: {cache} is in use by `pneumo preprocess` (PID {first.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert not (cache / LOCK_NAME).exists()
    alone = tmp_path / "alone"
    subprocess.run(
        pneumo_command(*[alone if a == "CACHE" else a for a in args]), env=cli_env(), check=True
    )
    assert tree_bytes(cache) == tree_bytes(alone)
