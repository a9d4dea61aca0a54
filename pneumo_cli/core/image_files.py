"""How large an image pneumo agrees to decode, and reading a raster's size from its header.

A small file can announce a gigantic image: a 50 KB PNG of a 100,000 x 100,000 black square, a
DICOM header with 65,535 x 65,535 pixels. Decoding either would take gigabytes before anything
could object, so the size in the header is checked first against :data:`MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import os
import struct

from pneumo_cli.core.errors import InputError

# 40 megapixels: far above any radiograph detector (a 43 x 43 cm plate at 0.1 mm is 18.5 Mpx),
# and small enough that converting one image to floating point stays well under a gigabyte.
MAX_IMAGE_PIXELS = 40_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (SOF0-SOF15 except DHT C4, JPG C8 and DAC CC) carry the size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_image_pixels(path: str | os.PathLike[str], rows: int, cols: int) -> None:
    """Refuse an image whose header announces more than :data:`MAX_IMAGE_PIXELS` pixels.

    Raises:
        InputError: naming the file, its size and the limit.
    """
    if rows * cols > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{path}: the header announces a {cols}x{rows} image ({rows * cols / 1e6:.0f} "
            f"megapixels); pneumo decodes images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
        )


def reduction_for(shape: tuple[int, int], min_side: int | None) -> int:
    """The largest of 8, 4 and 2 that shrinks an image of ``shape`` (H, W) to a shorter side of
    at least ``min_side`` (sides rounded up, as a JPEG decoder scales them); 1 when none does or
    ``min_side`` is None."""
    if min_side is None:
        return 1
    for factor in (8, 4, 2):
        if -(-min(shape) // factor) >= min_side:
            return factor
    return 1


def reduced_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """(H, W) divided by ``factor``, rounded up."""
    return -(-shape[0] // factor), -(-shape[1] // factor)


def raster_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(rows, cols) of a PNG, JPEG or BMP read from its header alone; None for another format
    or a header that cannot be parsed (the decoder then has the last word)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
            if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return height, width
            if head[:2] == b"BM" and len(head) >= 26:
                width, height = struct.unpack("<ii", head[18:26])
                return abs(height), abs(width)  # a negative height means top-down rows
            if head[:2] == b"\xff\xd8":
                handle.seek(2)
                return _jpeg_size(handle)
    except (OSError, struct.error):
        return None
    return None


def _jpeg_size(handle: object) -> tuple[int, int] | None:
    """Walk the JPEG segments up to the first start-of-frame marker."""
    read = handle.read  # type: ignore[attr-defined]
    while True:
        byte = read(1)
        while byte and byte != b"\xff":  # skip to the next marker
            byte = read(1)
        while byte == b"\xff":  # fill bytes
            byte = read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            continue  # markers without a segment
        length_bytes = read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if marker in _JPEG_SOF:
            frame = read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return height, width
        handle.seek(length - 2, os.SEEK_CUR)  # type: ignore[attr-defined]
