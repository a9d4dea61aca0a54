"""Finding X-ray files: which files are X-rays (DICOM by extension or preamble, PNG, JPEG),
and each one's ImageId.

How ImageIds are formed (one rule for ``preprocess``, ``predict`` and ``overlay``):

- An X-ray's ImageId is its file name without a known image suffix: in the Kaggle archive the
  name *is* the SOPInstanceUID (``1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm``).
- A DICOM named like a member of a DICOM File-set (PS3.10 File ID: 1-8 characters of ``A-Z``,
  ``0-9`` and ``_``, no extension, e.g. ``PT000000/ST000000/SE000000/IM000000`` on every DICOM
  CD and most PACS exports) says nothing about its image by its name: its ImageId is its
  SOPInstanceUID (or, when that is not a valid UID, the MediaStorageSOPInstanceUID of its file
  meta).
- When another file already holds that ImageId, a DICOM takes its SOPInstanceUID instead (see
  :class:`ImageIdRegistry`); a file whose SOPInstanceUID was seen before is a duplicate.

UIDs hold only digits and dots, so an ImageId taken from a header is always a safe file name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pneumo_cli.core.errors import InputError

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOMDIR_NAME = "DICOMDIR"
_PREAMBLE_OFFSET = 128
_FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")  # DICOM PS3.10 section 8.2 File ID component
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")  # DICOM PS3.5 section 9.1 (at most 64 characters)


def image_id_of(path: str | os.PathLike[str]) -> str:
    """The name part of an ImageId: the file name without the last extension
    (``a/b/1.2.3.dcm`` -> ``1.2.3``).

    Only the known image suffixes are dropped, because SOPInstanceUIDs contain dots: an
    extension-less DICOM named ``1.2.840.5`` keeps its whole name. For DICOMs use
    :func:`image_id_for`, which also reads the header's UIDs.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES + RASTER_SUFFIXES:
        return path.stem
    return path.name


def is_valid_uid(text: str) -> bool:
    """Whether ``text`` is a DICOM UID: digits in dot-separated components, at most 64 long."""
    return 0 < len(text) <= 64 and _UID.match(text) is not None


def is_file_set_name(path: str | os.PathLike[str]) -> bool:
    """Whether a file is named like a DICOM File-set member (``IM000000``): 1-8 characters of
    A-Z, 0-9 and _, no extension. Such names number files; they do not identify images."""
    return _FILE_ID.match(Path(path).name) is not None


def image_id_for(path: str | os.PathLike[str], uids: Sequence[str] = ()) -> str:
    """The ImageId of an X-ray file given its header's UIDs (SOPInstanceUID first, then the
    MediaStorageSOPInstanceUID; none for PNG/JPEG): the file name without its image suffix,
    except for a DICOM File-set member name (:func:`is_file_set_name`), whose ImageId is the
    first valid UID. Kaggle-layout files keep their names (which are their UIDs)."""
    if is_file_set_name(path):
        uid = first_valid_uid(uids)
        if uid:
            return uid
    return image_id_of(path)


def first_valid_uid(uids: Sequence[str]) -> str:
    """The first of ``uids`` that :func:`is_valid_uid` accepts, or ""."""
    return next((uid for uid in uids if is_valid_uid(uid)), "")


class ImageIdRegistry:
    """Gives X-ray files their ImageIds in the order they are offered, refusing duplicates.

    ImageIds and header UIDs share one namespace, as in the Kaggle layout where they are equal:

    - a file with a UID (SOPInstanceUID or MediaStorageSOPInstanceUID) that an earlier file has
      as its ImageId or UID is a duplicate of that file (the same image, e.g. another export);
    - a file whose ImageId is taken already (``IM000000.dcm`` in two series, ``1.dcm`` in two
      folders) gets its first valid UID as ImageId instead; without one it is a duplicate.
    """

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def claim(self, source: str, image_id: str, uids: Sequence[str] = ()) -> str:
        """Register ``source`` and return its ImageId.

        Raises:
            InputError: ``source`` duplicates an earlier file (the message names it).
        """
        for key in uids:
            if key in self._owner:
                raise InputError(self._duplicate(key))
        chosen = image_id
        if chosen in self._owner:
            chosen = first_valid_uid(uids)
            if not chosen:
                raise InputError(self._duplicate(image_id))
        for key in (chosen, *uids):
            self._owner[key] = source
        return chosen

    def _duplicate(self, key: str) -> str:
        return f"duplicate: ImageId/SOPInstanceUID '{key}' is already {self._owner[key]}"


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
    DICOM preamble; never a ``DICOMDIR``. Used to pick files from a folder walk."""
    if Path(path).name.upper() == DICOMDIR_NAME:
        return False  # a File-set's directory: it lists the images, it holds none
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
