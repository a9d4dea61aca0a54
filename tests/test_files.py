"""core/files.py: the ImageId rule, and bounded reading of (possibly gzipped) text inputs."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import InputError
from pneumo_cli.core.files import check_image_id, read_grey_png, read_text_input
from pneumo_cli.core.image_files import raster_size
from pneumo_cli.io import rle

ACCEPTED = [
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819",
    "chest one",  # a space
    "-starts-with-dash",
    "Müller_ß_日本",  # non-ASCII letters
    "a,b;c'd\"e",  # CSVs quote these
    "a..b",  # '..' inside a name climbs nowhere
    "x" * 200,
    "é" * 100,  # 200 bytes in UTF-8
    "trailing.",
]
REFUSED = [
    ("", "empty ImageId"),
    (".", "it is '.'"),
    ("..", "it is '..'"),
    ("../up", "it contains '/'"),
    ("sub/dir", "it contains '/'"),
    ("back\\slash", "it contains '\\'"),
    (".hidden", "it starts with '.'"),
    (" lead", "starts or ends with white space"),
    ("trail ", "starts or ends with white space"),
    ("tab\there", "U+0009, a control character"),
    ("nul\x00", "U+0000"),
    ("new\u2028line", "U+2028"),
    ("del\x7f", "U+007F"),
    ("caf\udce9", "bytes that are not UTF-8"),  # how Python spells a non-UTF-8 file name
    ("x" * 201, "longer than 200 bytes"),
    ("é" * 101, "longer than 200 bytes"),
]


@pytest.mark.parametrize("image_id", ACCEPTED)
def test_every_name_a_file_system_holds_is_accepted(image_id: str) -> None:
    assert check_image_id(image_id, "x.csv line 2") == image_id


@pytest.mark.parametrize(("image_id", "problem"), REFUSED)
def test_unsafe_output_names_are_refused_with_the_rule(image_id: str, problem: str) -> None:
    with pytest.raises(InputError) as caught:
        check_image_id(image_id, "x.csv line 2")
    message = str(caught.value)
    assert message.startswith("x.csv line 2: ") and problem in message
    assert len(message.splitlines()) == 1 and "\x00" not in message
    if image_id:
        # The message states the real rule, and nothing it allows is listed as forbidden.
        assert message.endswith(
            "(the rule: any characters but '/', '\\', control characters and line breaks; not "
            "'.' or '..'; no leading '.'; no leading or trailing space; at most 200 bytes in "
            "UTF-8)"
        )


# --- bounded reading of text inputs (gzip bombs) and of image headers -----------------------------

BOMB_MB = 300


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV header then 300 MB of zero bytes, gzipped to ~300 KB, written in 1 MB chunks so
    the test itself never holds it."""
    path = tmp_path_factory.mktemp("bomb") / "labels.csv.gz"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(b"ImageId,EncodedPixels\n")
        chunk = bytes(2**20)
        for _ in range(BOMB_MB):
            handle.write(chunk)
    assert path.stat().st_size < 2**20
    return path


def _peak_bytes(function, *args) -> tuple[BaseException | None, int]:
    """What ``function(*args)`` raised, and the peak of memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        function(*args)
        raised = None
    except Exception as exc:  # noqa: BLE001 - the caller checks what it was
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def test_a_gzip_bomb_is_refused_with_the_limit_in_bounded_memory(gzip_bomb: Path) -> None:
    raised, peak = _peak_bytes(rle.read_rle_csv, gzip_bomb)
    assert isinstance(raised, InputError)
    assert str(raised) == (
        f"{gzip_bomb}: inflates to more than 256 MiB of text, the most pneumo reads from one CSV "
        "(a gzip bomb?); split the file"
    )
    assert peak < 16 * 2**20  # inflated once without keeping anything, then refused


def test_every_command_that_reads_a_csv_refuses_the_bomb(gzip_bomb: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    good = tmp_path / "good.csv"
    good.write_text("ImageId,EncodedPixels\na,-1\n")
    commands = [
        ["rle-decode", gzip_bomb, tmp_path / "out"],
        ["preprocess", raw, tmp_path / "cache", "--rle", gzip_bomb],
        ["evaluate", "--predictions", gzip_bomb, "--truth", good, "--out", tmp_path / "ev"],
        ["evaluate", "--predictions", good, "--truth", gzip_bomb, "--out", tmp_path / "ev"],
    ]
    for command in commands:
        result = CliRunner().invoke(app, [str(part) for part in command])
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.strip().splitlines() == [
            f"error: {gzip_bomb}: inflates to more than 256 MiB of text, the most pneumo reads "
            "from one CSV (a gzip bomb?); split the file"
        ], command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "raw"]


def test_a_forged_gzip_trailer_still_stops_at_the_limit(gzip_bomb: Path, tmp_path: Path) -> None:
    forged = tmp_path / "forged.csv.gz"
    data = gzip_bomb.read_bytes()
    forged.write_bytes(data[:-4] + struct.pack("<I", 22))  # the trailer claims 22 bytes
    limit = 8 * 2**20
    raised, peak = _peak_bytes(read_text_input, forged, limit)
    assert isinstance(raised, InputError) and "inflates to more than 8 MiB" in str(raised)
    assert peak < 2.5 * limit  # inflated up to the limit, then refused


def test_plain_and_small_inputs(tmp_path: Path) -> None:
    plain = tmp_path / "big.csv"
    plain.write_bytes(b"ImageId,EncodedPixels\n" + b"a,-1\n" * 120_000)
    with pytest.raises(InputError, match=r"big.csv: is larger than 0.5 MiB of text, the most pn"):
        read_text_input(plain, limit=2**19)
    assert read_text_input(plain) == plain.read_bytes()
    packed = tmp_path / "small.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_text_input(packed) == plain.read_bytes()
    packed.write_bytes(gzip.compress(plain.read_bytes())[:-12])
    with pytest.raises(InputError, match="small.gz: corrupt gzip data"):
        read_text_input(packed)


def test_image_headers_give_the_size_without_decoding(tmp_path: Path) -> None:
    import cv2

    image = np.zeros((37, 53), np.uint8)
    for suffix in (".png", ".jpg", ".bmp"):
        path = tmp_path / f"x{suffix}"
        cv2.imwrite(str(path), image)
        assert raster_size(path) == (37, 53), suffix
    assert raster_size(tmp_path / "missing.png") is None
    # A 57-byte PNG announcing 100,000 x 100,000 pixels: refused before OpenCV decodes it.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 24)
    with pytest.raises(InputError) as caught:
        read_grey_png(huge)
    assert str(caught.value) == (
        f"{huge}: the header announces a 100000x100000 image (10000 megapixels); pneumo decodes "
        "images up to 40 megapixels"
    )
