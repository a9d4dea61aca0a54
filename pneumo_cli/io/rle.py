"""SIIM-ACR relative run-length encoding (numpy only).

The SIIM ``EncodedPixels`` string is a list of integers alternating *start* and *length*. The first
start is a 0-based offset into the flattened image; every later start counts from the end of the
previous run (it is *relative*). Pixels are numbered **column-major**: flat index ``f`` is column
``f // H``, row ``f % H``. ``-1`` means an empty mask. An image may have several rows in the CSV;
its mask is the union of all of them.

Masks here are uint8 {0, 1} arrays of shape (H, W) in image orientation.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_cli.core.errors import RleError
from pneumo_cli.core.files import read_text_input

EMPTY = "-1"
ID_COLUMNS = ("imageid", "image_id", "fname", "id", "image")
RLE_COLUMNS = ("encodedpixels", "encoded_pixels", "mask", "rle")


@dataclass(frozen=True)
class RleRow:
    """One row of an RLE CSV: 1-based ``line`` in the file, the ``image_id`` and the string."""

    line: int
    image_id: str
    encoded: str


def parse_runs(encoded: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse an RLE string into absolute column-major ``(starts, ends)`` int64 arrays.

    ``-1`` (or an empty string) gives two empty arrays. Runs are half-open ``[start, end)``.

    Raises:
        RleError: odd token count, a token that is not an integer, a negative start, a length
            below 1, or a run past ``height * width``. The message does not name the file; the
            CSV readers add it.
    """
    text = encoded.strip()
    if text in ("", EMPTY):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    parts = text.split()
    try:
        tokens = np.array(parts, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((p for p in parts if not _is_int(p)), None)
        if bad is None:
            bad = next(p for p in parts if abs(int(p)) >= 2**63)
            raise RleError(f"token '{bad[:40]}' is too large for a pixel offset") from None
        raise RleError(f"token '{bad[:40]}' is not an integer") from None
    if tokens.size % 2:
        raise RleError(f"odd number of tokens ({tokens.size}); tokens must be start/length pairs")
    rel_starts, lengths = tokens[0::2], tokens[1::2]
    if (rel_starts < 0).any():
        i = int(np.argmax(rel_starts < 0))
        raise RleError(f"run {i + 1} has a negative start ({rel_starts[i]})")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise RleError(f"run {i + 1} has length {lengths[i]}; lengths must be at least 1")
    # start_i = sum(rel_starts[:i+1]) + sum(lengths[:i])
    ends = np.cumsum(rel_starts + lengths)
    starts = ends - lengths
    total = height * width
    if ends[-1] > total:
        i = int(np.argmax(ends > total))
        raise RleError(
            f"run {i + 1} ends at pixel {ends[i]}, past the {width}x{height} image "
            f"({total} pixels); check --width/--height"
        )
    return starts, ends


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def paint_runs(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    """Set the column-major runs ``[starts, ends)`` to 1 in the (H, W) uint8 ``mask``, in place."""
    if starts.size == 0:
        return
    height, width = mask.shape
    lengths = ends - starts
    # Flat column-major index of every covered pixel, built without a Python loop.
    offsets = np.arange(int(lengths.sum()), dtype=np.int64)
    offsets -= np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(starts, lengths) + offsets
    rows, cols = flat % height, flat // height
    mask.reshape(-1)[rows * width + cols] = 1


def decode_rle(encoded: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """Decode one SIIM RLE string into a uint8 {0,1} mask of shape (height, width).

    Raises:
        RleError: see :func:`parse_runs`.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    paint_runs(mask, *parse_runs(encoded, height, width))
    return mask


def decode_union(encoded_strings: list[str], height: int = 1024, width: int = 1024) -> np.ndarray:
    """Decode several RLE strings of one image into the union of their masks."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for encoded in encoded_strings:
        paint_runs(mask, *parse_runs(encoded, height, width))
    return mask


def encode_rle(mask: np.ndarray) -> str:
    """Encode an (H, W) mask (any non-zero pixel is foreground) as a SIIM relative RLE string.

    Returns ``"-1"`` for an empty mask. A run that reaches the very last pixel is kept.
    """
    if mask.ndim != 2:
        raise RleError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    import cv2

    binary = (np.asarray(mask) != 0).view(np.uint8)
    if binary.size == 0:
        return EMPTY
    # Only the columns from the first to the last holding foreground are scanned (a lesion
    # covers a few of an X-ray's 1024), in column-major order: OpenCV transposes a byte mask
    # faster than numpy (benchmarks/bench_rle.py).
    occupied = np.flatnonzero(binary.max(axis=0))
    if occupied.size == 0:
        return EMPTY
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    flat = cv2.transpose(binary[:, first:last]).reshape(-1).view(bool)
    padded = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + first * binary.shape[0]
    starts, ends = edges[0::2], edges[1::2]
    rel_starts = starts - np.concatenate(([0], ends[:-1]))
    tokens = np.empty(starts.size * 2, dtype=np.int64)
    tokens[0::2], tokens[1::2] = rel_starts, ends - starts
    return " ".join(map(str, tokens.tolist()))


def read_rle_csv(path: str | Path) -> list[RleRow]:
    """Read a SIIM RLE CSV in any of its real-world variants.

    Accepted: header ``ImageId,EncodedPixels`` (with or without a space after the comma),
    ``fname,mask``, wider files with those two columns among others (e.g. a pneumo
    ``predictions.csv``), or no header at all (two columns); UTF-8 with or without BOM; LF or CRLF;
    values with leading spaces; no final newline; gzip-compressed content (detected by its magic
    bytes, whatever the file name). Blank lines are ignored. Values are returned stripped. At
    most :data:`pneumo_cli.core.files.MAX_TEXT_BYTES` (256 MiB) of text, after decompression.

    Raises:
        RleError: the file is empty, not text, or has no recognisable ImageId/RLE columns; a
            row has too few fields.
        InputError: missing or unreadable, corrupt gzip data, or more text than the limit.
    """
    path = Path(path)
    data = read_text_input(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RleError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8"
        ) from None
    if "\x00" in text:
        raise RleError(f"{path}: contains NUL bytes; is it really a CSV file?")
    # A fragmented 1024 x 1024 mask encodes to megabytes; lift the csv module's 128 KiB limit.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    try:
        records = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise RleError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not records:
        raise RleError(f"{path}: the CSV is empty; expected rows of ImageId,EncodedPixels")
    first_line, header = records[0]
    names = [cell.strip().lower() for cell in header]
    id_col = next((names.index(n) for n in ID_COLUMNS if n in names), None)
    rle_col = next((names.index(n) for n in RLE_COLUMNS if n in names), None)
    if id_col is not None and rle_col is not None:
        body = records[1:]
    elif len(header) == 2 and _looks_like_rle(header[1]):
        id_col, rle_col, body = 0, 1, records
    else:
        raise RleError(
            f"{path} line {first_line}: no recognisable columns; expected a header "
            "'ImageId,EncodedPixels' (or 'fname,mask') or two columns ImageId,RLE"
        )
    rows = []
    width = max(id_col, rle_col) + 1
    for line, row in body:
        if len(row) < width:
            image_id = row[id_col].strip() if len(row) > id_col else ""
            raise RleError(
                f"{path} line {line} (ImageId '{image_id}'): {len(row)} field(s), "
                f"expected at least {width}"
            )
        rows.append(RleRow(line, row[id_col].strip(), row[rle_col].strip()))
    return rows


def _looks_like_rle(value: str) -> bool:
    tokens = value.split()
    return bool(tokens) and all(_is_int(t) for t in tokens)


def row_context(path: str | Path, row: RleRow) -> str:
    """``"<path> line <n> (ImageId '<id>')"``, the prefix of every row error."""
    return f"{path} line {row.line} (ImageId '{row.image_id}')"
