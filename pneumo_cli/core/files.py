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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError, OutputError

TEMP_PREFIX = ".pneumo-tmp-"
_MAX_NAME_BYTES = 200  # leaves room for an extension under the usual 255-byte file-name limit
# Control characters (Cc), line and paragraph separators (Zl, Zp) and lone surrogates (Cs: bytes
# of a file name that are not UTF-8) would break a file name, a CSV row or a one-line message.
_UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp", "Cs")
IMAGE_ID_RULE = (
    "any characters but '/', '\\', control characters and line breaks; not '.' or '..'; "
    f"no leading '.'; no leading or trailing space; at most {_MAX_NAME_BYTES} bytes in UTF-8"
)


def check_image_id(image_id: str, source: str = "") -> str:
    """Return ``image_id`` if it is safe to use as a file stem, else raise.

    An ImageId becomes ``<ImageId>.png`` inside an output folder, so every name a file system
    holds is accepted (spaces, non-ASCII letters, a leading '-', commas) except: empty; a path
    separator ('/', '\\'); control characters, line breaks or bytes that are not UTF-8; ``.``
    or ``..``; a leading dot (hidden files are skipped by folder walks, and ``.pneumo-tmp-`` is
    the temporary-file prefix); a leading or trailing space (CSV values are read stripped, so
    such a label could never be matched); more than 200 bytes (room for a suffix under the
    usual 255-byte limit). CSVs quote what needs quoting (a comma, a quote).

    Raises:
        InputError: naming ``source`` (e.g. "train-rle.csv line 7"), the offending id, what is
            wrong with it and the whole rule.
    """
    where = f"{source}: " if source else ""
    if not image_id:
        raise InputError(f"{where}empty ImageId; every row needs an image identifier")
    problem = _image_id_problem(image_id)
    if problem:
        shown = "".join(f"\\u{ord(c):04x}" if _is_unsafe_char(c) else c for c in image_id)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise InputError(
            f"{where}ImageId '{shown}' cannot be a file name: {problem} (the rule: {IMAGE_ID_RULE})"
        )
    return image_id


def _is_unsafe_char(char: str) -> bool:
    import unicodedata

    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def _image_id_problem(image_id: str) -> str:
    """What makes ``image_id`` unusable as a file stem, or "" when it is fine."""
    if image_id in (".", ".."):
        return f"it is '{image_id}'"
    for char in image_id:
        if char in "/\\":
            return f"it contains '{char}'"
        if "\ud800" <= char <= "\udfff":
            return "it holds bytes that are not UTF-8"
        if _is_unsafe_char(char):
            return f"it contains U+{ord(char):04X}, a control character or line break"
    if image_id.startswith("."):
        return "it starts with '.'"
    if image_id != image_id.strip():
        return "it starts or ends with white space"
    if len(image_id.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"it is longer than {_MAX_NAME_BYTES} bytes"
    return ""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; renamed over ``target`` when the block
    ends, removed when it fails (an OSError becomes an OutputError naming ``target``)."""
    tmp = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:  # also a signal's exception: never leave the temporary
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {target}: {describe_os_error(exc)}") from None
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    ``fsync=True`` also flushes the file to disk before the rename (for manifests and configs,
    whose loss after a power cut would cost more than the flush).

    Raises:
        OutputError: the folder is missing, read-only or full; nothing is left behind.
    """
    target = Path(path)
    with _replacing(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    if fsync:
        _fsync_dir(target.parent)


def atomic_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copy the file ``source`` to ``path`` atomically, like :func:`atomic_write_bytes`.

    Raises:
        OutputError: ``path`` cannot be written; nothing is left behind.
    """
    import shutil

    with _replacing(Path(path)) as tmp:
        shutil.copyfile(source, tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> None:
    """Write UTF-8 ``text`` atomically; see :func:`atomic_write_bytes`.

    A file name that is not UTF-8 reaches Python as lone surrogates; they are written as
    backslash escapes (``caf\\udce9.dcm``) instead of failing the whole file.
    """
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"), fsync=fsync)


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


def decode_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a PNG/JPEG/BMP/TIFF as a grey (H, W) array of its stored values: uint8, or uint16
    for a 16-bit file. Colour is converted to grey. The size in the header is checked against
    :data:`pneumo_cli.core.image_files.MAX_IMAGE_PIXELS` before anything is decoded.

    Raises:
        InputError: the file is missing, not a readable image, too large, or of another pixel
            type.
    """
    import cv2

    from pneumo_cli.core.image_files import check_image_pixels, raster_size

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = raster_size(path)
    if size is not None:
        check_image_pixels(path, *size)
    raw = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise InputError(f"{path}: not a readable image (PNG, JPEG, BMP or TIFF expected)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: unsupported pixel type {image.dtype}; save it as 8-bit")
    return image


def image_file_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(rows, cols) of a PNG/JPEG/BMP from its header, of any other raster by decoding it.

    Raises:
        InputError: as :func:`decode_image_file`.
    """
    from pneumo_cli.core.image_files import check_image_pixels, raster_size

    size = raster_size(path)
    if size is None:
        image = decode_image_file(path)
        return int(image.shape[0]), int(image.shape[1])
    check_image_pixels(path, *size)
    return size


def read_grey_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF as a uint8 (H, W) grey array (see :func:`decode_image_file`).

    Colour images are converted to grey; 16-bit images are scaled to 8 bits.

    Raises:
        InputError: the file is missing, not a readable image, or too large.
    """
    image = decode_image_file(path)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
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


# Text inputs (RLE CSVs, predictions.csv) are read whole, so their size is capped: the real
# train-rle.csv of SIIM stage 2 is 5.8 MB; a "small" gzip file can inflate to gigabytes.
MAX_TEXT_BYTES = 256 * 2**20
_GZIP_MAGIC = b"\x1f\x8b"


def read_text_input(path: str | os.PathLike[str], limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a text input, gunzipped when it starts with the gzip magic (whatever its
    name), in bounded memory: more than ``limit`` bytes (after decompression) are refused as
    soon as that is known. A plain file's size is known at once. A gzip file whose trailer
    announces more than ``limit`` is inflated once without keeping anything, so a bomb costs
    time, not memory; otherwise it is inflated into memory and refused past ``limit``.

    Raises:
        InputError: missing, a folder, unreadable, corrupt gzip data, or too large (the message
            names the limit).
    """
    path = Path(path)
    with _input_errors(path), open(path, "rb") as handle:
        packed = handle.read(2) == _GZIP_MAGIC
        size = os.fstat(handle.fileno()).st_size
        if not packed:
            if size > limit:
                raise InputError(_too_large(path, limit, packed))
            handle.seek(0)
            return handle.read()
        handle.seek(-4, os.SEEK_END)  # ISIZE: the uncompressed size mod 2**32
        if size < 20 or int.from_bytes(handle.read(4), "little") > limit:
            handle.seek(0)
            _inflate(path, handle, limit, keep=False)  # refuses a bomb, or corrupt data
        handle.seek(0)
        return _inflate(path, handle, limit, keep=True)


def _inflate(path: Path, handle: Any, limit: int, keep: bool) -> bytes:
    """Inflate gzip ``handle`` in 1 MiB pieces (one read of a large size from a GzipFile holds
    several copies at once), refusing more than ``limit`` bytes; ``keep=False`` only counts."""
    import gzip
    import zlib

    data, total = bytearray(), 0
    try:
        with gzip.GzipFile(fileobj=handle) as inflated:
            while piece := inflated.read(2**20):
                total += len(piece)
                if total > limit:
                    raise InputError(_too_large(path, limit, packed=True))
                if keep:
                    data += piece
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt gzip data ({exc})") from None
    return bytes(data)


def _too_large(path: Path, limit: int, packed: bool) -> str:
    what = "inflates to more than" if packed else "is larger than"
    bomb = " (a gzip bomb?)" if packed else ""
    return (
        f"{path}: {what} {limit / 2**20:g} MiB of text, the most pneumo reads from one "
        f"CSV{bomb}; split the file"
    )


def read_input_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole input file, turning OS errors into one-line :class:`InputError`."""
    with _input_errors(path):
        return Path(path).read_bytes()


@contextlib.contextmanager
def _input_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """OS errors while reading the input ``path`` as one-line :class:`InputError`."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, a file was expected") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {describe_os_error(exc)}") from None
