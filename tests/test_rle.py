"""SIIM relative RLE: hand-computed cases, round-trip properties and the real label file."""

from __future__ import annotations

import gzip
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pneumo_cli.core.errors import RleError
from pneumo_cli.io import rle
from tests.conftest import REAL_TRAIN_AREAS


def test_decode_hand_computed_column_major_relative():
    # H=3, W=4. Column-major numbering: pixel f is (row f % 3, column f // 3).
    # "1 2 3 1": first run starts at 1 (rows 1-2 of column 0); it ends at 3, so the second run
    # starts at 3 + 3 = 6, i.e. (row 0, column 2).
    mask = rle.decode_rle("1 2 3 1", height=3, width=4)
    expected = np.array(
        [
            [0, 0, 1, 0],
            [1, 0, 0, 0],
            [1, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.uint8


def test_decode_first_and_last_pixel_non_square():
    mask = rle.decode_rle("0 1 4 1", height=2, width=3)  # pixels 0 and 5
    expected = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(mask, expected)
    assert rle.encode_rle(expected) == "0 1 4 1"


def test_run_reaching_the_last_pixel_is_encoded():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[:, -1] = 1  # the last column is the last 4 pixels in column-major order
    assert rle.encode_rle(mask) == "16 4"
    np.testing.assert_array_equal(rle.decode_rle("16 4", 4, 5), mask)


def test_whole_image_and_empty():
    assert rle.encode_rle(np.ones((2, 2), np.uint8)) == "0 4"
    assert rle.encode_rle(np.zeros((2, 2), np.uint8)) == "-1"
    assert not rle.decode_rle("-1", 2, 2).any()
    assert not rle.decode_rle(" -1", 2, 2).any()


def test_adjacent_runs_decode_and_are_merged_on_encode():
    # A relative start of 0 puts the second run right after the first.
    mask = rle.decode_rle("2 2 0 3", height=4, width=3)
    assert mask.T.reshape(-1).tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert rle.encode_rle(mask) == "2 5"


def test_encode_treats_any_nonzero_as_foreground():
    mask = np.array([[0, 255], [7, 0]], dtype=np.uint8)
    assert rle.encode_rle(mask) == "1 2"


def test_union_of_overlapping_rows():
    union = rle.decode_union(["0 3", "2 2"], height=3, width=2)
    assert union.T.reshape(-1).tolist() == [1, 1, 1, 1, 0, 0]
    assert union.max() == 1


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        ("1 2 3", "odd number of tokens"),
        ("1 x", "token 'x' is not an integer"),
        ("1 2.5", "token '2.5' is not an integer"),
        ("1 0", "length 0"),
        ("1 -2", "length -2"),
        ("-3 2", "negative start"),
        ("10 3", "past the 4x3 image"),
        ("99999999999999999999999 1", "too large"),
    ],
)
def test_parse_runs_rejects(encoded, message):
    with pytest.raises(RleError, match=message):
        rle.parse_runs(encoded, height=3, width=4)


masks = arrays(
    np.uint8,
    st.tuples(st.integers(1, 17), st.integers(1, 17)),
    elements=st.integers(0, 1),
)


@settings(max_examples=300, deadline=None)
@given(masks)
def test_decode_encode_round_trip(mask):
    encoded = rle.encode_rle(mask)
    np.testing.assert_array_equal(rle.decode_rle(encoded, *mask.shape), mask)


def _plain_encoding(mask: np.ndarray) -> str:
    """The SIIM encoding by its definition: every pixel in column-major order."""
    flat = np.concatenate(([0], (mask.T.reshape(-1) != 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    previous_ends = np.concatenate(([0], ends[:-1]))
    tokens = np.stack([starts - previous_ends, ends - starts], axis=1).reshape(-1)
    return " ".join(map(str, tokens.tolist())) or "-1"


@settings(max_examples=300, deadline=None)
@given(masks, st.integers(0, 16), st.integers(0, 16))
def test_encoding_scans_only_the_occupied_columns_and_equals_the_definition(mask, a, b):
    first, last = sorted((min(a, mask.shape[1]), min(b, mask.shape[1])))
    mask[:, :first] = 0  # foreground only in columns [first, last), possibly none
    mask[:, last:] = 0
    assert rle.encode_rle(mask) == _plain_encoding(mask)
    assert rle.encode_rle(mask.astype(bool)) == _plain_encoding(mask)


@st.composite
def valid_strings(draw):
    height, width = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    total = height * width
    tokens, position = [], 0
    first = True
    while position < total and draw(st.booleans()):
        start = draw(st.integers(0 if first else 1, max(0 if first else 1, total - position - 1)))
        if position + start >= total:
            break
        length = draw(st.integers(1, total - position - start))
        tokens += [start, length]
        position += start + length
        first = False
    return (" ".join(map(str, tokens)) or "-1"), height, width


@settings(max_examples=300, deadline=None)
@given(valid_strings())
def test_encode_decode_round_trip(case):
    encoded, height, width = case
    assert rle.encode_rle(rle.decode_rle(encoded, height, width)) == encoded


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "content",
    [
        b"ImageId,EncodedPixels\na,1 2\nb,-1\n",
        b"ImageId, EncodedPixels\na, 1 2\nb, -1",
        b"\xef\xbb\xbffname,mask\r\na, 1 2\r\nb,-1",
        b"\xef\xbb\xbfa,1 2\r\nb,-1\r\n",
        b"a,1 2\n\nb,-1\n",
        b"ImageId,has_pneumothorax,EncodedPixels\na,1,1 2\nb,0,-1\n",
    ],
)
def test_read_rle_csv_variants(tmp_path, content):
    rows = rle.read_rle_csv(_write(tmp_path, "x.csv", content))
    assert [(r.image_id, r.encoded) for r in rows] == [("a", "1 2"), ("b", "-1")]


def test_read_rle_csv_very_long_field(tmp_path):
    # Every other pixel of a 1024 x 1024 mask: ~1 M tokens, far above csv's default field limit.
    encoded = " ".join(["0 1"] + ["1 1"] * 524_287)
    rows = rle.read_rle_csv(
        _write(tmp_path, "x.csv", f"ImageId,EncodedPixels\na,{encoded}\n".encode())
    )
    assert rle.decode_rle(rows[0].encoded).sum() == 524_288


def test_read_rle_csv_gzip_and_line_numbers(tmp_path):
    path = _write(tmp_path, "x.csv.gz", gzip.compress(b"ImageId,EncodedPixels\na,1 2\n\nb,-1\n"))
    rows = rle.read_rle_csv(path)
    assert [(r.line, r.image_id) for r in rows] == [(2, "a"), (4, "b")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"foo,bar\n1,2\n", "no recognisable columns"),
        (b"just one column\n", "no recognisable columns"),
        (b"ImageId,EncodedPixels\na\n", "line 2 \\(ImageId 'a'\\): 1 field"),
        (b"\xff\xfe\x00a", "not UTF-8"),
        (b'ImageId,EncodedPixels\na,"1 2\n', "line 2: not valid CSV"),
    ],
)
def test_read_rle_csv_rejects(tmp_path, content, message):
    with pytest.raises(RleError, match=message):
        rle.read_rle_csv(_write(tmp_path, "bad.csv", content))


def test_real_variants_agree(siim):
    folder = siim / "csv"
    with_header = rle.read_rle_csv(folder / "train-rle-sample_bom_fname-mask-header.csv")
    no_header = rle.read_rle_csv(folder / "train-rle-sample_bom_noheader_crlf.csv")
    assert len(with_header) == 10
    assert [(r.image_id, r.encoded) for r in with_header] == [
        (r.image_id, r.encoded) for r in no_header
    ]
    stage1 = rle.read_rle_csv(folder / "train-rle_stage1_format_excerpt.csv")
    assert len(stage1) == 6
    assert all(not r.encoded.startswith(" ") for r in stage1)
    for row in with_header + stage1:
        rle.decode_rle(row.encoded)  # every real string decodes at 1024 x 1024


def test_full_real_file(real_rle_csv):
    rows = rle.read_rle_csv(real_rle_csv)
    assert len(rows) == 12954
    groups = defaultdict(list)
    for row in rows:
        groups[row.image_id].append(row.encoded)
    assert len(groups) == 12047
    positive = [i for i, g in groups.items() if any(e != "-1" for e in g)]
    assert len(positive) == 2669
    assert sum(1 for r in rows if r.encoded == "-1") == 9378
    # Every positive row decodes; single-row images re-encode to their exact string.
    for encoded_list in groups.values():
        for encoded in encoded_list:
            if encoded != "-1":
                rle.parse_runs(encoded, 1024, 1024)
        if len(encoded_list) == 1 and encoded_list[0] != "-1":
            mask = rle.decode_rle(encoded_list[0])
            assert rle.encode_rle(mask) == encoded_list[0]
    for image_id, area in REAL_TRAIN_AREAS.items():
        assert int(rle.decode_union(groups[image_id]).sum()) == area
