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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError, OutputError

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
