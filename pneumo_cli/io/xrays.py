"""Finding X-ray files: which files are X-rays (DICOM by extension or preamble, PNG, JPEG),
and each one's ImageId."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pneumo_cli.core.errors import InputError

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
_PREAMBLE_OFFSET = 128


def image_id_of(path: str | os.PathLike[str]) -> str:
    """The ImageId of a file: its name without the last extension (``a/b/1.2.3.dcm`` -> ``1.2.3``).

    Only the known image suffixes are dropped, because SOPInstanceUIDs contain dots: an
    extension-less DICOM named ``1.2.840.5`` keeps its whole name.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES:
        return path.stem
    return path.name


def has_dicom_preamble(path: str | os.PathLike[str]) -> bool:
    """True when the file carries the ``DICM`` magic at byte 128 (the DICOM Part 10 preamble)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_PREAMBLE_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DICOM file: a .dcm/.dicom suffix or the Part 10 preamble."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path)


def is_xray_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like an input X-ray: a DICOM/PNG/JPEG suffix, or no suffix and a
    DICOM preamble. Used to pick files from a folder walk."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES + RASTER_SUFFIXES:
        return True
    if suffix and not _looks_like_uid_suffix(suffix):
        return False
    return has_dicom_preamble(path)


def collect_xray_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The X-ray files named by ``inputs``, sorted and without duplicates: files as given (so an
    unreadable one is reported rather than silently ignored), folders searched recursively
    (hidden entries skipped, symlinked folders not followed, see :func:`is_xray_file`).

    Raises:
        InputError: an input does not exist, or no X-ray file is found at all.
    """
    from pneumo_cli.core.files import iter_files

    found: dict[Path, Path] = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for item in iter_files(path):
                if is_xray_file(item):
                    found.setdefault(item.resolve(), item)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not found:
        shown = ", ".join(str(p) for p in inputs) or "(no inputs)"
        raise InputError(f"no DICOM, PNG or JPEG files in {shown}")
    return sorted(found.values())


def _looks_like_uid_suffix(suffix: str) -> bool:
    # Extension-less Kaggle files named by UID have a "suffix" such as ".850819".
    return suffix[1:].isdigit()
