"""Disk full and read-only output: exit 1 with one line, earlier complete outputs intact, and a
re-run after freeing space finishes the job.

Root ignores file modes, so read-only and full folders are real small tmpfs mounts (skipped with
a reason where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import OutputError
from pneumo_cli.core.files import TEMP_PREFIX
from pneumo_cli.data import inputs as data_inputs
from pneumo_cli.data.preprocess import run_preprocess
from tests.robustness.conftest import (
    Mounts,
    folder_size_kb,
    run_pneumo,
    temporaries,
    tree_bytes,
    write_raw_dicoms,
    write_rle_csv,
)


def _one_error_line(stderr: str, *expected: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    assert any(text in lines[0] for text in expected), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disk_inputs")
    ids = write_raw_dicoms(root / "raw", 6, 256, seed=1)
    write_rle_csv(root / "labels.csv", ids, 256, seed=2)
    write_rle_csv(root / "noisy.csv", [f"n{i:03d}" for i in range(90)], 256, seed=3, noisy=True)
    done = run_pneumo("rle-decode", root / "labels.csv", root / "masks", "--width", "256",
                      "--height", "256", "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {"root": root, "raw": root / "raw", "labels": root / "labels.csv",
            "noisy": root / "noisy.csv", "masks": root / "masks"}  # fmt: skip


def test_rle_decode_on_a_full_disk_then_resumed(inputs, mounts: Mounts, tmp_path: Path) -> None:
    args = ["rle-decode", inputs["noisy"], "OUT", "--width", "256", "--height", "256", "-q"]
    clean = tmp_path / "clean"
    assert run_pneumo(*[clean if a == "OUT" else a for a in args]).returncode == 0
    expected = tree_bytes(clean)
    out = mounts.tmpfs(tmp_path / "small", folder_size_kb(clean) // 2)
    command = [out if a == "OUT" else a for a in args]

    full = run_pneumo(*command)
    assert full.returncode == 1
    _one_error_line(full.stderr, "no space left on device")
    written = tree_bytes(out)
    assert 0 < len(written) < len(expected)
    assert all(expected[name] == data for name, data in written.items())  # all complete
    assert temporaries(out) == []

    mounts.resize(out, folder_size_kb(clean) * 2)
    resumed = run_pneumo(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(out) == expected


def test_preprocess_on_a_full_disk_keeps_the_finished_cache(mounts: Mounts, tmp_path: Path) -> None:
    """Only CACHE/images fills up (its own small file system), so a run that wrongly counted a
    failed write as a bad image could still write rejected.csv and a manifest with exit 0."""
    raw = tmp_path / "raw"
    write_raw_dicoms(raw, 4, 384, seed=4, prefix="a")
    cache = tmp_path / "cache"
    args = ["preprocess", raw, cache, "--workers", "2", "-q", "--image-size", "128"]
    assert run_pneumo(*args).returncode == 0
    manifest = (cache / "manifest.csv").read_bytes()
    (cache / "images").rename(tmp_path / "first_images")
    images = mounts.tmpfs(cache / "images", folder_size_kb(tmp_path / "first_images") + 32)
    for path in (tmp_path / "first_images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    write_raw_dicoms(raw, 30, 384, seed=5, prefix="b")  # more than CACHE/images can hold

    full = run_pneumo(*args)
    assert full.returncode == 1
    _one_error_line(full.stderr, "no space left on device")
    assert (cache / "manifest.csv").read_bytes() == manifest  # the finished manifest survives
    assert temporaries(cache) == []
    assert not (cache / "rejected.csv").read_text().count("\n") > 1  # no image blamed

    mounts.resize(images, 4096)
    done = run_pneumo(*args, "--json")
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["images"], json.loads(done.stdout)["rejected"]) == (34, 0)
    assert not (cache / ".pneumo-lock").exists()


def _fail_while_the_other_worker_writes(task: tuple) -> tuple[str, object]:
    """Stands in for preprocess' per-image task in the pool's worker processes: image a00 fails
    like a full disk as soon as the other worker is in the middle of writing a record (its
    temporary file exists, and it pauses there until the pool stops it)."""
    item, _, cache = task[:3]
    records = cache / "records"
    if item.image_id == "a00":
        deadline = time.monotonic() + 60
        while not list(records.glob(f"{TEMP_PREFIX}*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise OutputError(f"cannot write {records / 'a00.json'}: no space left on device")
    (records / f"{TEMP_PREFIX}{os.getpid()}-{item.image_id}.json").write_text("{")
    time.sleep(120)
    return "done", {}


def test_a_write_error_in_one_worker_leaves_no_temporary_of_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The failure CI once caught by chance: the pool is stopped while a second worker is between
    opening and renaming a record's temporary file. Made certain here, not left to timing."""
    write_raw_dicoms(tmp_path / "raw", 4, 128, seed=6, prefix="a")
    cache = tmp_path / "cache"
    monkeypatch.setattr(data_inputs, "_process_task", _fail_while_the_other_worker_writes)
    with pytest.raises(OutputError, match="no space left on device"):
        run_preprocess(tmp_path / "raw", cache, PreprocessConfig(image_size=64), workers=2)
    assert (cache / "records").is_dir()
    assert temporaries(cache) == []
    assert not (cache / ".pneumo-lock").exists()


def _command(name: str, inputs: dict[str, Path], out: Path) -> list:
    return {
        "rle-decode": ["rle-decode", inputs["labels"], out, "--width", "256", "--height", "256"],
        "rle-encode": ["rle-encode", inputs["masks"], out / "labels.csv"],
        "preprocess": ["preprocess", inputs["raw"], out, "--workers", "1", "--image-size", "64"],
        "overlay": ["overlay", inputs["raw"], "--masks", inputs["masks"], "--out", out],
        "evaluate": ["evaluate", "--predictions", inputs["labels"], "--truth", inputs["labels"],
                     "--out", out, "--height", "256", "--width", "256"],
    }[name]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "again"),
    [
        ("rle-decode", ["--overwrite"]),
        ("rle-encode", ["--overwrite"]),
        ("preprocess", ["--overwrite"]),
        ("overlay", ["--overwrite"]),
        ("evaluate", []),
    ],
)
def test_read_only_output_folder(
    name: str, again: list[str], inputs, mounts: Mounts, tmp_path: Path
) -> None:
    out = mounts.tmpfs(tmp_path / "out", 4096)
    first = run_pneumo(*_command(name, inputs, out), "-q")
    assert first.returncode == 0, first.stderr
    before = tree_bytes(out)
    assert before
    mounts.read_only(out)
    refused = run_pneumo(*_command(name, inputs, out), *again, "-q")
    assert refused.returncode == 1, refused.stderr
    _one_error_line(refused.stderr, "read-only", "permission denied")
    assert tree_bytes(out) == before
