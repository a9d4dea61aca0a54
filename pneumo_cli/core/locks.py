"""Folder locks: one writer per cache or output folder, with stale locks of dead processes
taken over safely."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import OutputError
from pneumo_cli.core.files import TEMP_PREFIX, describe_os_error

LOCK_NAME = ".pneumo-lock"


def _process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), else None.

    Stored in the lock so that a new process that happens to reuse a dead writer's PID (common
    in containers, where PIDs restart at 1) is not mistaken for the writer.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its closing ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running on this machine.

    Only a definite "no such process" (or a number no process can have) counts as dead: a
    process of another user, or one the system will not tell us about, is taken as alive, so
    nobody deletes the lock or the files of a process that is still working.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # PermissionError: exists, owned by another user; others: cannot judge
    return True


def _lock_is_stale(owner: dict[str, Any]) -> bool:
    """Whether the process recorded in a lock is certainly gone (same host only)."""
    if owner.get("host") != socket.gethostname():
        return False  # cannot check a process on another machine
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return True
    recorded = owner.get("start_ticks")
    return recorded is not None and _process_start_ticks(pid) not in (None, recorded)


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The owner recorded in a lock file; None when it vanished; {} when unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], purpose: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (which must exist) while the block runs.

    The lock is a file ``folder/.pneumo-lock`` holding the owner's PID, host, process start time
    and ``purpose``; it is created complete in one step (written to a temporary file, then
    hard-linked into place, which fails if a lock exists) and removed when the block ends, even
    on an error. A lock left by a killed process (same host, PID dead or reused) is stale: it is
    replaced. Yields the lock file's path.

    Raises:
        OutputError: another live process holds the lock (naming it, and the file to delete if
            it is certainly gone), or the lock cannot be written.
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_ticks": _process_start_ticks(os.getpid()),
        "purpose": purpose,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-lock"
    try:
        tmp.write_text(json.dumps(me), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot lock {folder}: {describe_os_error(exc)}") from None
    try:
        for _ in range(5):
            if _try_to_take(folder, lock, tmp, me):
                break
        else:
            raise OutputError(
                f"cannot lock {folder}: {lock} is unreadable or keeps changing; delete it if no "
                "pneumo command is running"
            )
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        yield lock
    finally:
        owner = _read_lock(lock)
        if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            with contextlib.suppress(OSError):
                lock.unlink()


def _try_to_take(folder: Path, lock: Path, tmp: Path, me: dict[str, Any]) -> bool:
    """One attempt to create ``lock`` from the complete ``tmp``; False means "try again" (the
    lock was released, stale and removed, or is being written).

    Raises:
        OutputError: a live process holds the lock, or the lock cannot be written.
    """
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        owner = _read_lock(lock)
        if owner is None:
            return False  # released between our attempt and the read
        if not owner and time.time() - _mtime(lock) < 10:
            time.sleep(0.2)  # being written by a writer without hard links; re-read
            return False
        if not owner or _lock_is_stale(owner):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return False
        raise OutputError(
            f"{folder} is in use by `pneumo {owner.get('purpose', '?')}` (PID "
            f"{owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}); "
            f"wait for it to finish, or delete {lock} if that process is gone"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise OutputError(f"cannot lock {folder}: {describe_os_error(exc)}") from None
    # No hard links on this file system: exclusive create, then write.
    try:
        with open(lock, "x", encoding="utf-8") as handle:
            handle.write(json.dumps(me))
        return True
    except FileExistsError:
        return False
    except OSError as inner:
        raise OutputError(f"cannot lock {folder}: {describe_os_error(inner)}") from None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
