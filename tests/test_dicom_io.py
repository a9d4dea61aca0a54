"""DICOM/PNG/JPEG reading: real SIIM files and synthetic DICOMs written with write_dicom."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pneumo_cli.core.errors import DicomError, InputError
from pneumo_cli.core.files import write_png
from pneumo_cli.core.patient_key import PatientKeySecret
from pneumo_cli.io.dicom_pixels import JPEG_BASELINE
from pneumo_cli.io.dicom_read import _parse_age, read_header, read_xray
from pneumo_cli.io.dicom_write import write_dicom
from pneumo_cli.io.xrays import collect_xray_files, image_id_of, is_xray_file

UID_6904 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
UID_301 = "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319"
SECRET = PatientKeySecret(Path("test.secret"), b"0123456789abcdef" * 2)


def _ramp(height: int = 64, width: int = 80) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return ((rows * 3 + cols * 2) % 256).astype(np.uint8)


def test_real_training_dicom_image_and_meta(real_train_dicoms: dict[str, Path]) -> None:
    xray = read_xray(real_train_dicoms[UID_301], patient_secret=SECRET)
    assert xray.image_id == UID_301
    assert xray.image.shape == (1024, 1024) and xray.image.dtype == np.uint8
    assert (int(xray.image.min()), int(xray.image.max())) == (0, 255)
    assert xray.meta == {
        "pixel_spacing_mm": 0.143,
        "view_position": "PA",
        "sex": "F",
        "age": 50,
        "photometric": "MONOCHROME2",
        "bits_stored": 8,
        "rows": 1024,
        "cols": 1024,
        "patient_key": SECRET.patient_key("97d32841-8836-4630-873c-be0b4d2e5478"),
    }


def test_meta_never_holds_the_patient_id(real_train_dicoms: dict[str, Path]) -> None:
    path = real_train_dicoms[UID_301]
    patient_id = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
    meta = read_xray(path, patient_secret=SECRET).meta
    assert patient_id not in repr(meta)
    assert len(meta["patient_key"]) == 16 and int(meta["patient_key"], 16) >= 0


def test_monochrome1_copy_is_the_exact_inverse(real_train_dicoms: dict[str, Path], siim: Path):
    original = read_xray(real_train_dicoms[UID_6904])
    inverted = read_xray(siim / "dicom-odd" / "monochrome1_same_uid_as_6904.dcm")
    assert inverted.meta["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(inverted.image, 255 - original.image)


def test_stage2_headers_read_without_warnings_or_patient_key(siim: Path) -> None:
    files = sorted((siim / "dicom-odd").glob("stage2_ID_*.dcm"))
    assert len(files) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xrays = [read_xray(path, patient_secret=SECRET) for path in files]
        headers = [read_header(path) for path in files]
    assert [x.meta["patient_key"] for x in xrays] == [""] * 5
    assert [h.instance_uid for h in headers] == [f.stem.removeprefix("stage2_") for f in files]
    assert xrays[0].image_id == "stage2_ID_0011fe81e"
    assert xrays[0].meta["view_position"] == "PA" and xrays[0].meta["age"] == 64


def test_jpeg_round_trip_is_siim_shaped(tmp_path: Path) -> None:
    pixels = _ramp()
    path = tmp_path / "a.dcm"
    write_dicom(
        path,
        pixels,
        patient_id="P-7",
        sop_uid="1.2.3.4",
        extra={"PatientSex": "F", "PatientAge": "050Y", "PixelSpacing": [0.14, 0.14]},
    )
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
    assert ds.SOPInstanceUID == "1.2.3.4" and ds.BitsStored == 8
    xray = read_xray(path, patient_secret=SECRET)
    assert xray.image_id == "a"
    assert np.abs(xray.image.astype(int) - pixels).max() <= 8  # lossy JPEG, quality 95
    assert xray.meta["age"] == 50 and xray.meta["pixel_spacing_mm"] == 0.14
    assert xray.meta["patient_key"] == SECRET.patient_key("P-7")
    assert read_xray(path).meta["patient_key"] == ""  # no secret, no key


def test_16_bit_with_rescale_and_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1024, 1524], [2024, 3000, 4095]], dtype=np.uint16)
    path = tmp_path / "ct_like.dcm"
    extra = {
        "BitsStored": 12,
        "HighBit": 11,
        "RescaleSlope": 1,
        "RescaleIntercept": -1024,
        "WindowCenter": 500,
        "WindowWidth": 1001,
    }
    write_dicom(path, stored, jpeg=False, extra=extra)
    image = read_xray(path).image
    # v = stored - 1024; ((v - 499.5) / 1000 + 0.5) * 255, clipped: v=500 -> 127.63 -> 128.
    expected = [[0, 0, 128], [255, 255, 255]]
    np.testing.assert_array_equal(image, np.array(expected, dtype=np.uint8))


def test_16_bit_without_window_uses_full_range_and_monochrome1_inverts(tmp_path: Path) -> None:
    stored = np.array([[100, 200], [310, 500]], dtype=np.uint16)
    path = tmp_path / "m1.dcm"
    write_dicom(
        path,
        stored,
        jpeg=False,
        photometric="MONOCHROME1",
        extra={"RescaleSlope": 2, "RescaleIntercept": 10},
    )
    # (v - 210) / 800 * 255 on values 210, 410, 630, 1010 (0, 63.75, 133.9, 255), inverted.
    expected = 255 - np.array([[0, 64], [134, 255]])
    np.testing.assert_array_equal(read_xray(path).image, expected.astype(np.uint8))


def test_rgb_is_converted_to_grey(tmp_path: Path) -> None:
    grey = _ramp()
    path = tmp_path / "rgb.dcm"
    write_dicom(path, np.stack([grey] * 3, axis=-1), jpeg=False, photometric="RGB")
    np.testing.assert_array_equal(read_xray(path).image, grey)


def test_multi_frame_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    write_dicom(path, np.stack([_ramp()] * 3), jpeg=False)
    with pytest.raises(DicomError, match=r"cine\.dcm: multi-frame DICOM \(3 frames\)"):
        read_xray(path)


@pytest.mark.parametrize("jpeg", [True, False])
def test_truncated_file_is_refused(tmp_path: Path, jpeg: bool) -> None:
    whole = tmp_path / "whole.dcm"
    write_dicom(whole, _ramp(256, 256), jpeg=jpeg)
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(DicomError, match=r"cut\.dcm: "):
        read_xray(cut)


def test_real_dicoms_decode_like_pylibjpeg(real_train_dicoms: dict[str, Path]) -> None:
    # read_xray decodes JPEG Baseline with libjpeg-turbo; the JPEG standard lets two baseline
    # decoders differ by one grey level, and that is all the difference there may be.
    for path in real_train_dicoms.values():
        ds = pydicom.dcmread(path)
        reference = ds.pixel_array.astype(np.int16)  # pydicom's pylibjpeg plugin
        ours = read_xray(path).image.astype(np.int16)
        assert ours.shape == reference.shape
        assert int(np.abs(ours - reference).max()) <= 1
        assert np.count_nonzero(ours != reference) < 0.05 * ours.size


def _with_pixel_stream(source: Path, target: Path, change: object) -> None:
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(source)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([change(frame)])
    ds.save_as(target)


def test_jpeg_stream_cut_inside_an_intact_dicom_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole.dcm"
    write_dicom(whole, _ramp(256, 256))
    cut = tmp_path / "cut_stream.dcm"
    _with_pixel_stream(whole, cut, lambda frame: frame[: len(frame) // 2])
    with pytest.raises(DicomError, match=r"cut_stream\.dcm: JPEG pixel data is truncated"):
        read_xray(cut)
    assert read_xray(whole).image.shape == (256, 256)


def test_jpeg_size_that_contradicts_the_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.dcm"
    write_dicom(path, _ramp(64, 80))
    ds = pydicom.dcmread(path)
    ds.Rows = 100
    ds.save_as(path)
    with pytest.raises(DicomError, match=r"liar\.dcm: JPEG pixel data has shape \(64, 80\)"):
        read_xray(path)


def test_non_dicom_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not a dicom file at all")
    with pytest.raises(DicomError, match=r"junk\.dcm: not a DICOM file"):
        read_xray(path)
    with pytest.raises(InputError, match="no such file"):
        read_xray(tmp_path / "missing.dcm")


def test_png_and_extensionless_dicom(tmp_path: Path) -> None:
    pixels = _ramp()
    write_png(tmp_path / "x1.png", pixels)
    xray = read_xray(tmp_path / "x1.png")
    np.testing.assert_array_equal(xray.image, pixels)
    assert xray.image_id == "x1" and xray.meta["patient_key"] == ""
    bare = tmp_path / "1.2.840.99.5"
    write_dicom(bare, pixels, jpeg=False)
    assert is_xray_file(bare) and image_id_of(bare) == "1.2.840.99.5"
    np.testing.assert_array_equal(read_xray(bare).image, pixels)
    (tmp_path / "notes.txt").write_text("hello")
    assert not is_xray_file(tmp_path / "notes.txt")
    assert read_header(tmp_path / "x1.png").rows == 64


@pytest.mark.parametrize(
    ("text", "years"), [("050Y", 50), ("50", 50), ("018M", 1), ("", None), ("abcY", None)]
)
def test_age_strings(text: str, years: int | None) -> None:
    assert _parse_age(text) == years


def test_collect_xray_files_walks_folders_and_keeps_given_files(tmp_path: Path) -> None:
    (tmp_path / "in" / "deep").mkdir(parents=True)
    write_png(tmp_path / "in" / "deep" / "b.png", _ramp())
    write_png(tmp_path / "in" / "a.png", _ramp())
    (tmp_path / "in" / "notes.txt").write_text("x")
    write_png(tmp_path / "single.png", _ramp())
    found = collect_xray_files([tmp_path / "in", tmp_path / "single.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "in/a.png", "in/deep/b.png", "single.png",
    ]  # fmt: skip
    with pytest.raises(InputError, match="nothing.dcm: no such file or folder"):
        collect_xray_files([tmp_path / "nothing.dcm"])


# --- pixel padding and VOI LUT functions (DICOM PS3.3 C.7.5.1.1.2, C.11.2.1.2-3) ---------------


def test_padding_is_background_and_excluded_from_the_value_range(tmp_path: Path) -> None:
    # MONOCHROME1 16-bit, no window: the range is that of the image pixels, 1000..4000 (padding
    # 0 left out): 1000, 2000, 3000, 4000 -> 0, 85, 170, 255, inverted to 255, 170, 85, 0.
    # Padding is background, 0 after the inversion (it used to come out white, 255).
    stored = np.array([[0, 0, 1000, 2000], [0, 0, 3000, 4000]], dtype=np.uint16)
    path = tmp_path / "padded.dcm"
    write_dicom(path, stored, jpeg=False, photometric="MONOCHROME1",
                extra={"BitsStored": 12, "HighBit": 11, "PixelPaddingValue": 0})  # fmt: skip
    expected = [[0, 0, 255, 170], [0, 0, 85, 0]]
    np.testing.assert_array_equal(read_xray(path).image, np.array(expected, np.uint8))


def test_padding_range_limit_with_a_window_and_signed_pixels(tmp_path: Path) -> None:
    # Padding is every stored value from PixelPaddingValue to PixelPaddingRangeLimit (0..50).
    # Window 2048/4096: y = ((x - 2047.5) / 4095 + 0.5) * 255 on 51, 1000, 2000, 3000, 4095
    # -> 3, 62, 125, 187, 255, inverted by MONOCHROME1 -> 252, 193, 130, 68, 0.
    stored = np.array([[0, 30, 50, 51], [1000, 2000, 3000, 4095]], dtype=np.uint16)
    path = tmp_path / "range.dcm"
    extra = {"BitsStored": 12, "HighBit": 11, "PixelPaddingValue": 0,
             "PixelPaddingRangeLimit": 50, "WindowCenter": 2048, "WindowWidth": 4096}  # fmt: skip
    write_dicom(path, stored, jpeg=False, photometric="MONOCHROME1", extra=extra)
    expected = [[0, 0, 0, 252], [193, 130, 68, 0]]
    np.testing.assert_array_equal(read_xray(path).image, np.array(expected, np.uint8))
    # Signed pixels (PixelRepresentation 1): the padding value is negative; MONOCHROME2, full
    # range of the image pixels -1000..1000 -> 0, 128 (127.5 rounds to even), 255.
    signed = np.array([[-2000, -1000, 0, 1000]], dtype=np.int16)
    write_dicom(path, signed, jpeg=False, extra={"PixelPaddingValue": -2000})
    np.testing.assert_array_equal(read_xray(path).image, np.array([[0, 0, 128, 255]], np.uint8))


def test_a_padded_band_is_cropped_like_a_black_border(tmp_path: Path) -> None:
    from pneumo_cli.core.config import PreprocessConfig
    from pneumo_cli.data.imaging import prepare_image

    rng = np.random.default_rng(5)
    stored = rng.integers(500, 4000, size=(200, 200)).astype(np.uint16)
    stored[:, :30] = 0  # the detector's padded band, MONOCHROME1: it would show white
    path = tmp_path / "band.dcm"
    write_dicom(path, stored, jpeg=False, photometric="MONOCHROME1",
                extra={"BitsStored": 12, "HighBit": 11, "PixelPaddingValue": 0})  # fmt: skip
    image = read_xray(path).image
    assert (image[:, :30] == 0).all() and image[:, 30:].min() >= 0
    assert prepare_image(image, PreprocessConfig(image_size=64)).crop == (0, 200, 30, 200)


def test_voi_lut_function_sigmoid(tmp_path: Path) -> None:
    # PS3.3 C.11.2.1.3.1: y = 255 / (1 + exp(-4 (x - c) / w)), c = 2048, w = 1000:
    # x = 1048, 1798, 2048, 2298, 3048 -> 4.59, 68.58, 127.5, 186.42, 250.41 -> rounded.
    stored = np.array([[1048, 1798, 2048, 2298, 3048]], dtype=np.uint16)
    path = tmp_path / "sigmoid.dcm"
    extra = {"BitsStored": 12, "HighBit": 11, "WindowCenter": 2048, "WindowWidth": 1000,
             "VOILUTFunction": "SIGMOID"}  # fmt: skip
    write_dicom(path, stored, jpeg=False, extra=extra)
    expected = [[5, 69, 128, 186, 250]]  # the linear window gives 191 where sigmoid gives 186
    np.testing.assert_array_equal(read_xray(path).image, np.array(expected, np.uint8))


def test_voi_lut_function_linear_exact(tmp_path: Path) -> None:
    # PS3.3 C.11.2.1.3.2: x <= c - w/2 -> 0; x > c + w/2 -> 255; else ((x - c) / w + 0.5) * 255.
    # c = 100, w = 2: 98, 99 -> 0; 100 -> 127.5 -> 128; 101 -> 255; 102 -> 255. (LINEAR would
    # give 255 at 100: its ramp runs from 99 to 100.)
    stored = np.array([[98, 99, 100, 101, 102]], dtype=np.uint16)
    path = tmp_path / "exact.dcm"
    extra = {"BitsStored": 12, "HighBit": 11, "WindowCenter": 100, "WindowWidth": 2,
             "VOILUTFunction": "LINEAR_EXACT"}  # fmt: skip
    write_dicom(path, stored, jpeg=False, extra=extra)
    expected = [[0, 0, 128, 255, 255]]
    np.testing.assert_array_equal(read_xray(path).image, np.array(expected, np.uint8))


@pytest.mark.parametrize(
    ("function", "width", "message"),
    [
        ("CUBIC", 1000, "VOI LUT Function 'CUBIC' is not one DICOM defines"),
        ("SIGMOID", 0, "WindowWidth 0.0 is not positive, as VOI LUT Function SIGMOID needs"),
    ],
)
def test_an_unknown_voi_lut_function_is_refused_with_the_reason(
    tmp_path: Path, function: str, width: int, message: str
) -> None:
    path = tmp_path / "odd.dcm"
    extra = {"BitsStored": 12, "HighBit": 11, "WindowCenter": 100, "WindowWidth": width,
             "VOILUTFunction": function}  # fmt: skip
    write_dicom(path, np.array([[1, 2], [3, 4]], dtype=np.uint16), jpeg=False, extra=extra)
    with pytest.raises(DicomError, match=message) as caught:
        read_xray(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_a_long_header_error_is_cut_at_a_word_and_keeps_its_parentheses(tmp_path: Path) -> None:
    path = tmp_path / "rows.dcm"
    write_dicom(path, np.zeros((8, 8), np.uint8), jpeg=False, extra={"PixelSpacing": [0.1, 0.1]})
    data = path.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00"  # (0028,0010) Rows, US, 2 bytes
    path.write_bytes(data.replace(rows, b"\x28\x00\x10\x00US\x31\x00", 1))  # 49 bytes: odd
    with pytest.raises(DicomError) as caught:
        read_header(path)
    message = str(caught.value)
    prefix = f"{path}: not a readable DICOM file ("
    assert message.startswith(prefix) and message.endswith("…)"), message
    reason = message[len(prefix) : -1]
    assert len(reason) <= 160 and reason.startswith("Expected total bytes to be an even multiple")
    assert reason.count("(") == reason.count(")")  # it used to end "...(\x00)"


def test_shorten_reason() -> None:
    from pneumo_cli.core.errors import shorten_reason

    assert shorten_reason("short  text\n here") == "short text here"
    words = shorten_reason("word " * 50, limit=30)
    assert words == "word word word word word word…"
    bracket = shorten_reason("value (" + "x " * 40 + ") tail", limit=30)
    assert bracket == "value…"


def test_a_header_announcing_a_gigantic_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.dcm"
    write_dicom(path, np.zeros((8, 8), np.uint8), jpeg=False, extra={"Rows": 65535,
                "Columns": 65535})  # fmt: skip
    for read in (read_header, read_xray):
        with pytest.raises(InputError) as caught:
            read(path)
        assert str(caught.value) == (
            f"{path}: the header announces a 65535x65535 image (4295 megapixels); pneumo "
            "decodes images up to 40 megapixels"
        )
