"""Fuzzing the parsers that read untrusted files: SIIM RLE strings and CSVs, and DICOMs.

For every input the only exception allowed out is a :class:`PneumoError` whose message names the
file (so the CLI prints one useful line); every input finishes within a time limit; and a failed
decode leaves no partial output behind.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pneumo_cli.core.errors import PneumoError, RleError
from pneumo_cli.io import rle
from pneumo_cli.io.dicom_read import read_header, read_xray
from pneumo_cli.io.rle_files import decode_csv
from tests.robustness.conftest import time_limit

PER_INPUT_SECONDS = 10.0
FUZZ = settings(
    deadline=None,  # bounded by time_limit instead: CI boxes are too noisy for 200 ms deadlines
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- RLE strings ------------------------------------------------------------------------------

token = st.one_of(
    st.integers(-5, 70).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["-1", "0", "1e3", "0x10", "+4", "٣", "1_000", "nan", "", " ", "\t", "\x00"]),
    st.text(max_size=4),
)
rle_like = st.lists(token, max_size=12).map(" ".join)


@FUZZ
@given(
    text=st.one_of(st.text(max_size=60), rle_like),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
)
def test_parse_runs_accepts_valid_runs_or_raises_rle_error(
    text: str, height: int, width: int
) -> None:
    with time_limit(PER_INPUT_SECONDS):
        try:
            starts, ends = rle.parse_runs(text, height, width)
        except RleError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    # Accepted runs are in bounds, non-empty, sorted and never overlapping.
    assert starts.dtype == ends.dtype == np.int64
    assert ((starts >= 0) & (ends > starts) & (ends <= height * width)).all()
    assert (starts[1:] >= ends[:-1]).all()
    mask = rle.decode_rle(text, height, width)
    assert int(mask.sum()) == int((ends - starts).sum())


# --- RLE CSV files ----------------------------------------------------------------------------

header = st.sampled_from(
    [
        "ImageId,EncodedPixels",
        "ImageId, EncodedPixels",
        "fname,mask",
        "\ufeffImageId,EncodedPixels",
        "",
    ]
)
csv_row = st.tuples(
    st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True), st.text(max_size=8)),
    rle_like,
).map(lambda pair: f"{pair[0]},{pair[1]}")
csv_text = st.builds(
    lambda head, rows, newline: newline.join(([head] if head else []) + rows),
    header,
    st.lists(csv_row, max_size=6),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
csv_bytes = st.one_of(
    st.binary(max_size=300),
    csv_text.map(lambda text: text.encode("utf-8", "surrogatepass")),
    csv_text.map(lambda text: b"\x1f\x8b" + text.encode("utf-8", "surrogatepass")),  # fake gzip
)


@FUZZ
@given(data=csv_bytes)
def test_read_rle_csv_on_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        path.write_bytes(data)
        with time_limit(PER_INPUT_SECONDS):
            try:
                rows = rle.read_rle_csv(path)
            except PneumoError as exc:
                assert str(path) in str(exc), str(exc)
                return
    for row in rows:
        assert isinstance(row, rle.RleRow) and row.line >= 1
        assert row.image_id == row.image_id.strip() and row.encoded == row.encoded.strip()


@FUZZ
@given(data=csv_bytes, size=st.integers(1, 8))
def test_decode_csv_writes_everything_or_nothing(data: bytes, size: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path, out = Path(folder) / "labels.csv", Path(folder) / "out"
        path.write_bytes(data)
        with time_limit(PER_INPUT_SECONDS):
            try:
                summary = decode_csv(path, out, height=size, width=size, workers=1)
            except PneumoError as exc:
                assert str(path) in str(exc), str(exc)
                assert not out.exists() or not any(out.iterdir()), "partial output after an error"
                return
        written = sorted(p.name for p in out.iterdir() if p.name != ".pneumo-job.json")
        assert len(written) == summary.written == summary.images
        assert all(name.endswith(".png") and not name.startswith(".") for name in written)


# --- DICOM files ------------------------------------------------------------------------------


@functools.cache
def _real_dicom_bytes(siim: Path) -> tuple[bytes, ...]:
    """The bytes of the 3 training DICOMs and one broken-header stage-2 file (read once)."""
    files = sorted((siim / "dicom-images-train").rglob("*.dcm"))
    files.append(siim / "dicom-odd" / "stage2_ID_0011fe81e.dcm")
    return tuple(path.read_bytes() for path in files)


def _check_read(data: bytes, suffix: str = ".dcm") -> None:
    """Read ``data`` as a file: either a valid XRay or a PneumoError naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        with time_limit(PER_INPUT_SECONDS):
            for reader in (read_header, read_xray):
                try:
                    result = reader(path)
                except PneumoError as exc:
                    message = str(exc)
                    assert str(path) in message and "\n" not in message, message
                    continue
                if reader is read_xray:
                    assert result.image.dtype == np.uint8 and result.image.ndim == 2
                    assert min(result.image.shape) >= 1
                else:
                    assert result.rows >= 1 and result.cols >= 1


@FUZZ
@given(data=st.binary(max_size=2000), preamble=st.booleans(), suffix=st.sampled_from([".dcm", ""]))
def test_read_xray_on_random_bytes(data: bytes, preamble: bool, suffix: str) -> None:
    if preamble:
        data = b"\x00" * 128 + b"DICM" + data
    _check_read(data, suffix)


@settings(FUZZ, max_examples=60)
@given(which=st.integers(0, 3), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_read_xray_on_truncated_real_files(siim: Path, which: int, fraction: float) -> None:
    data = _real_dicom_bytes(siim)[which]
    _check_read(data[: int(len(data) * fraction)])


@settings(FUZZ, max_examples=120)
@given(
    which=st.integers(0, 3),
    flips=st.lists(
        st.tuples(st.one_of(st.integers(0, 1500), st.integers(0, 10**6)), st.integers(0, 7)),
        min_size=1,
        max_size=12,
    ),
)
def test_read_xray_on_bit_flipped_real_files(siim: Path, which: int, flips) -> None:
    data = bytearray(_real_dicom_bytes(siim)[which])
    # Most flips land in the header (first 1.5 KB), where they change what the reader believes.
    positions = [(offset % len(data), bit) for offset, bit in flips]
    assume(positions)
    for offset, bit in positions:
        data[offset] ^= 1 << bit
    _check_read(bytes(data))


def test_preprocess_writes_nothing_for_corrupt_copies(siim: Path, tmp_path: Path) -> None:
    """Seeded truncated and bit-flipped copies of a real DICOM through `run_preprocess`: each is
    cached or rejected, and a rejected one leaves no image, mask or record behind."""
    from pneumo_cli.core.config import PreprocessConfig
    from pneumo_cli.data.preprocess import run_preprocess

    original = _real_dicom_bytes(siim)[0]  # ...301...280319
    rng = np.random.default_rng(2024)
    raw = tmp_path / "raw"
    raw.mkdir()
    uid = b"1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"
    for i in range(12):
        # A UID of the same length per copy, so that no copy is rejected as a duplicate.
        data = bytearray(original.replace(uid, uid[:-2] + f"{i:02d}".encode()))
        if i % 2:
            data = data[: int(rng.integers(100, len(data)))]
        else:
            region = (0, 1500) if i % 4 else (1500, len(data))  # header or pixel data
            for offset in rng.integers(*region, size=int(rng.integers(1, 6))):
                data[int(offset)] ^= 1 << int(rng.integers(0, 8))
        (raw / f"copy{i:02d}.dcm").write_bytes(bytes(data))
    rle_csv = tmp_path / "labels.csv"
    rle_csv.write_text("ImageId,EncodedPixels\n" + "".join(f"copy{i:02d},5 3\n" for i in range(12)))
    cache = tmp_path / "cache"
    try:
        summary = run_preprocess(raw, cache, PreprocessConfig(image_size=32), rle_csv=rle_csv,
                                 workers=1)  # fmt: skip
    except PneumoError as exc:  # e.g. every copy unusable
        assert "no usable image" in str(exc) or str(raw) in str(exc), str(exc)
        summary = None
    rejected = (cache / "rejected.csv").read_text().splitlines()[1:]
    names = [line.split(",")[0].removesuffix(".dcm") for line in rejected]
    assert summary is None or summary.images + len(names) == 12
    for image_id in names:
        for folder, suffix in (("images", ".png"), ("masks", ".png"), ("records", ".json")):
            assert not (cache / folder / f"{image_id}{suffix}").exists(), image_id
