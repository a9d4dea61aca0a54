"""Paths: names taken from CSVs, file names and DICOM headers never write outside the output
folder; symlink loops in inputs end; output folders inside input folders are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.files import write_mask_png
from pneumo_cli.io.dicom_write import write_dicom
from tests.robustness.conftest import fake_xray, time_limit

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
UNSAFE_IDS = [
    "../escape",
    "../../escape2",
    "/tmp/absolute-escape",
    "sub/dir",
    "back\\slash",
    "..",
    ".hidden",
    "a" * 201,
    "tab\there",
    "new\u2028line",
]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_rle_decode_never_writes_outside_its_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    rows = ["ImageId,EncodedPixels", "good,1 2", "b" * 200 + ",3 1"]
    rows += [f'"{image_id}",1 1' for image_id in UNSAFE_IDS]
    (work / "labels.csv").write_text("\n".join(rows) + "\n")
    out = work / "out"

    refused = invoke("rle-decode", work / "labels.csv", out, "--width", 4, "--height", 4)
    assert refused.exit_code == 1
    assert "cannot be a file name" in one_line(refused) and "9 more bad rows" in refused.stderr
    assert not out.exists()

    kept = invoke("rle-decode", work / "labels.csv", out, "--width", 4, "--height", 4,
                  "--skip-invalid")  # fmt: skip
    assert kept.exit_code == 0, kept.output
    assert all_files(tmp_path) == {
        "work/labels.csv", "work/out/good.png", f"work/out/{'b' * 200}.png",
        "work/out/rejected.csv", "work/out/.pneumo-job.json",
    }  # fmt: skip
    assert (out / "rejected.csv").read_text().count("\n") == 1 + len(UNSAFE_IDS)


def test_nul_in_a_csv_is_refused_whole(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_bytes(b"ImageId,EncodedPixels\nok,1 1\nx\x00/../y,1 1\n")
    result = invoke("rle-decode", tmp_path / "labels.csv", tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 1
    assert "contains NUL bytes" in one_line(result)
    assert not (tmp_path / "out").exists()


def test_atomic_replace_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(victim)
    (tmp_path / "labels.csv").write_text("ImageId,EncodedPixels\na,1 1\n")
    result = invoke("rle-decode", tmp_path / "labels.csv", out, "--width", 2, "--height", 2,
                    "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert not (out / "a.png").is_symlink() and (out / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["../up.png", "line\nbreak.png", "x" * 240 + ".png"])
def test_rle_encode_refuses_unsafe_mask_names(tmp_path: Path, name: str) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    write_mask_png(masks / "fine.png", np.eye(4, dtype=np.uint8))
    target = masks / name if "/" not in name else masks / "sub" / "up.png"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes((masks / "fine.png").read_bytes())
    if "/" in name:  # '../up.png' cannot be a file name; a sub-folder is simply not read
        result = invoke("rle-encode", masks, tmp_path / "out.csv")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "out.csv").read_text() == "ImageId,EncodedPixels\nfine,0 1 4 1 4 1 4 1\n"
        return
    result = invoke("rle-encode", masks, tmp_path / "out.csv")
    assert result.exit_code == 1
    assert "ImageId" in one_line(result)
    assert not (tmp_path / "out.csv").exists()


def _raw_with_odd_names(raw: Path) -> None:
    rng = np.random.default_rng(0)
    raw.mkdir()
    write_dicom(raw / "ok.dcm", fake_xray(rng, 160), sop_uid="1.2.3.4")
    # The header's UID tries to climb out; pneumo names files after the file, never the header.
    write_dicom(raw / "uid.dcm", fake_xray(rng, 160), sop_uid="../../../escaped")
    write_dicom(raw / ("n" * 230 + ".dcm"), fake_xray(rng, 160))
    write_dicom(raw / "...dcm", fake_xray(rng, 160))  # hidden: never read
    write_dicom(raw / "sp ace.dcm", fake_xray(rng, 160))  # a fine name: cached
    write_dicom(raw / "tab\there.dcm", fake_xray(rng, 160))  # a control character: refused
    (raw / "loop").symlink_to(raw, target_is_directory=True)  # raw/loop/loop/loop/...
    (raw / "sub").mkdir()
    (raw / "sub" / "back").symlink_to(raw, target_is_directory=True)


def test_preprocess_with_odd_names_and_symlink_loops(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _raw_with_odd_names(raw)
    cache = tmp_path / "cache"
    with time_limit(60):
        result = invoke(
            "preprocess", raw, cache, "-j", 1, "-q", "--image-size", 32, "--min-size", 64
        )
    assert result.exit_code == 0, result.output
    outside = all_files(tmp_path) - {
        p for p in all_files(tmp_path) if p.startswith(("raw/", "cache/"))
    }
    assert outside == set()
    images = sorted(p.name for p in (cache / "images").iterdir())
    assert images == ["ok.png", "sp ace.png", "uid.png"]
    rejected = (cache / "rejected.csv").read_text()
    assert "longer than 200 bytes" in rejected and "contains U+0009" in rejected
    assert rejected.count("\n") == 3  # header, the long name and 'tab\there.dcm'


def test_overlay_with_odd_names_and_symlink_loops(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _raw_with_odd_names(raw)
    masks = tmp_path / "masks"
    masks.mkdir()
    for image_id in ("ok", "uid"):
        write_mask_png(masks / f"{image_id}.png", np.zeros((160, 160), np.uint8))
    out = tmp_path / "out"
    with time_limit(60):
        result = invoke("overlay", raw, "--masks", masks, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".pneumo-job.json", "ok.png", "rejected.csv", "uid.png",
    ]  # fmt: skip


def test_rle_encode_with_a_symlink_loop(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    write_mask_png(masks / "m.png", np.ones((2, 2), np.uint8))
    (masks / "loop").symlink_to(masks, target_is_directory=True)
    with time_limit(30):
        result = invoke("rle-encode", masks, tmp_path / "out.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.csv").read_text() == "ImageId,EncodedPixels\nm,0 4\n"


@pytest.mark.parametrize("where", ["inside", "same", "symlink", "masks"])
def test_preprocess_refuses_a_cache_inside_its_inputs(tmp_path: Path, where: str) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_dicom(raw / "a.dcm", fake_xray(np.random.default_rng(1), 160))
    masks = tmp_path / "masks"
    masks.mkdir()
    extra: list[object] = []
    cache = {"inside": raw / "cache", "same": raw, "symlink": tmp_path / "link" / "c",
             "masks": masks / "cache"}[where]  # fmt: skip
    if where == "symlink":
        (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    if where == "masks":
        extra = ["--masks", masks]
    before = all_files(tmp_path)
    result = invoke("preprocess", raw, cache, "-j", 1, *extra)
    assert result.exit_code == 1
    assert "is inside input folder" in one_line(result)
    assert all_files(tmp_path) == before
    assert not (raw / "cache").exists() and not (masks / "cache").exists()


@pytest.mark.parametrize("where", ["images", "masks", "truth"])
def test_overlay_refuses_an_output_inside_an_input(tmp_path: Path, where: str) -> None:
    folders = {name: tmp_path / name for name in ("images", "masks", "truth")}
    for folder in folders.values():
        folder.mkdir()
    write_dicom(folders["images"] / "a.dcm", fake_xray(np.random.default_rng(2), 160))
    out = folders[where] / "out"
    result = invoke("overlay", folders["images"], "--masks", folders["masks"],
                    "--truth", folders["truth"], "--out", out)  # fmt: skip
    assert result.exit_code == 1
    assert "is inside input folder" in one_line(result)
    assert not out.exists()


def test_long_names_fit_with_their_temporary_prefix(tmp_path: Path) -> None:
    """A 200-byte ImageId (the longest accepted) still fits its temporary name and records."""
    raw = tmp_path / "raw"
    raw.mkdir()
    name = "L" * 200
    write_dicom(raw / f"{name}.dcm", fake_xray(np.random.default_rng(3), 160))
    result = invoke("preprocess", raw, tmp_path / "cache", "-j", 1, "-q", "--min-size", 64)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "images" / f"{name}.png").is_file()
    assert (tmp_path / "cache" / "records" / f"{name}.json").is_file()
    assert os.pathconf(tmp_path, "PC_NAME_MAX") >= len(f".pneumo-tmp-{2**22}-{name}.json")
