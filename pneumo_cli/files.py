"""Safe file writing and file names built from data.

Every artifact pneumo writes goes through :func:`atomic_write_bytes`: the bytes land in a hidden
temporary file in the destination folder, are flushed to disk, then renamed over the target. A
killed process therefore leaves either the old file, the complete new file, or a stray temporary
file that :func:`remove_stale_temporaries` cleans up - never a truncated artifact.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.errors import InputError, OutputError

TEMP_PREFIX = ".pneumo-tmp-"
_MAX_NAME_BYTES = 200  # leaves room for an extension under the usual 255-byte file-name limit
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_image_id(image_id: str, source: str = "") -> str:
    """Return ``image_id`` if it is safe to use as a file stem, else raise.

    An ImageId becomes ``<ImageId>.png`` inside an output folder, so it must not be empty, contain
    a path separator, NUL or other control characters, be ``.``/``..``, start with a dot or dash,
    or be longer than 200 bytes.

    Raises:
        InputError: naming ``source`` (e.g. "train-rle.csv line 7") and the offending id.
    """
    where = f"{source}: " if source else ""
    if not image_id:
        raise InputError(f"{where}empty ImageId; every row needs an image identifier")
    if len(image_id.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        raise InputError(
            f"{where}ImageId is longer than {_MAX_NAME_BYTES} bytes and cannot be a file name"
        )
    if not _SAFE_ID.match(image_id) or ".." in image_id:
        shown = image_id.encode("unicode_escape").decode("ascii")
        raise InputError(
            f"{where}ImageId '{shown}' is not a safe file name "
            "(allowed: letters, digits, '.', '_', '+', '-'; no '/', '\\', '..' or leading dot)"
        )
    return image_id


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    ``fsync=True`` also flushes the file to disk before the rename (for manifests and configs,
    whose loss after a power cut would cost more than the flush).

    Raises:
        OutputError: the folder is missing, read-only or full; nothing is left behind.
    """
    target = Path(path)
    tmp = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:  # also a signal's exception: never leave the temporary
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None
        raise
    if fsync:
        _fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    """Write UTF-8 ``text`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (always fsynced)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", fsync=True)


def encode_png(image: np.ndarray, source: str = "image", *, unfiltered: bool = False) -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) BGR array as PNG bytes.

    ``unfiltered`` skips PNG's per-row prediction filters: for two-level masks the filters gain
    nothing and cost a quarter of the encoding time.
    """
    import cv2

    params = [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE] if unfiltered else []
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image), params)
    if not ok:
        raise OutputError(f"OpenCV could not encode {source} as PNG")
    return buffer.tobytes()


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8 (H, W) grey or (H, W, 3) BGR image as a PNG, atomically."""
    atomic_write_bytes(path, encode_png(image, str(path)))


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a {0,1} (H, W) mask as a 0/255 single-channel PNG, atomically."""
    if not mask.any():  # most X-rays: the same bytes for every empty mask of this size
        atomic_write_bytes(path, _empty_mask_png(mask.shape))
        return
    binary = np.multiply(mask > 0, 255, dtype=np.uint8)
    atomic_write_bytes(path, encode_png(binary, str(path), unfiltered=True))


@functools.lru_cache(maxsize=8)
def _empty_mask_png(shape: tuple[int, ...]) -> bytes:
    return encode_png(np.zeros(shape, dtype=np.uint8), "an empty mask", unfiltered=True)


def read_grey_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF as a uint8 (H, W) grey array.

    Colour images are converted to grey; 16-bit images are scaled to 8 bits.

    Raises:
        InputError: the file is missing or not a readable image.
    """
    import cv2

    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if raw is None:
        raise InputError(f"{path}: no such file")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise InputError(f"{path}: not a readable image (PNG, JPEG, BMP or TIFF expected)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{path}: unsupported pixel type {image.dtype}; save it as 8-bit")
    return image


def read_mask_png(path: str | os.PathLike[str], threshold: int = 0) -> np.ndarray:
    """Read a mask image as a uint8 {0,1} (H, W) array: pixels above ``threshold`` are 1."""
    return (read_grey_png(path) > threshold).astype(np.uint8)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files left in ``folder`` by a killed run; return how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for stray in folder.glob(f"{TEMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            stray.unlink()
            removed += 1
    return removed


def ensure_output_dir(folder: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and parents) and return it, refusing folders inside an input folder.

    Raises:
        OutputError: ``folder`` is inside one of ``inputs`` (pneumo never writes into its
            inputs), is a file, or cannot be created.
    """
    folder = Path(folder)
    resolved = folder.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source.is_dir() and (resolved == source or source in resolved.parents):
            raise OutputError(
                f"output folder {folder} is inside input folder {given}; "
                "choose an output folder outside the inputs"
            )
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {describe_os_error(exc)}") from None
    return folder


def iter_files(
    root: str | os.PathLike[str], suffixes: tuple[str, ...] | None = None
) -> Iterator[Path]:
    """Yield regular files under ``root`` recursively in sorted order, following no symlinked
    folders (so symlink loops cannot make the walk endless). ``suffixes`` filters by lower-case
    extension ('' matches files without one)."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if suffixes is not None and path.suffix.lower() not in suffixes:
                continue
            if path.is_file():
                yield path


def describe_os_error(exc: OSError) -> str:
    """A short, user-facing reason for an OS error (disk full, read-only, missing)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device; free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?); choose a writable output folder"
    if exc.errno == errno.ENOENT:
        return "the folder does not exist"
    return exc.strerror or str(exc)


def read_input_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole input file, turning OS errors into one-line :class:`InputError`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, a file was expected") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {describe_os_error(exc)}") from None


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def _lock_is_stale(owner: dict[str, Any]) -> bool:
    """Whether the process recorded in a lock is certainly gone (same host only)."""
    if owner.get("host") != socket.gethostname():
        return False  # cannot check a process on another machine
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _pid_alive(pid):
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
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                owner = _read_lock(lock)
                if owner is None:
                    continue  # released between our attempt and the read; try again
                if not owner and time.time() - _mtime(lock) < 10:
                    time.sleep(0.2)  # being written by a writer without hard links; re-read
                    continue
                if not owner or _lock_is_stale(owner):
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                    continue
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
                    break
                except FileExistsError:
                    continue
                except OSError as inner:
                    raise OutputError(f"cannot lock {folder}: {describe_os_error(inner)}") from None
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
