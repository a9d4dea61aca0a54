"""Kill -9 anywhere: `rle-decode` and `preprocess` killed at seeded points, then run again with
the same arguments, end with exactly the files of an uninterrupted run and no temporaries.

Every file that exists right after the kill must already be final (byte-equal to the clean run's
file), which is what atomic writes promise: a killed run never leaves a half-written artifact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pneumo_cli.core.locks import LOCK_NAME
from pneumo_cli.io.dicom_write import write_dicom
from pneumo_cli.io.rle import encode_rle
from tests.robustness.conftest import (
    TEMP_PREFIX,
    cli_env,
    fake_xray,
    pneumo_command,
    run_pneumo,
    temporaries,
    tree_bytes,
)

SEEDS = (0, 1, 2)


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _kill_when(
    args: list, files: Path, pattern: str, count: int, pause_s: float
) -> tuple[list[int], int]:
    """Start ``pneumo ARGS``, wait until ``count`` files match ``files/pattern`` (plus
    ``pause_s``), then SIGKILL the main process only. Returns (its worker PIDs, files seen)."""
    process = subprocess.Popen(
        pneumo_command(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if files.is_dir() and len(list(files.glob(pattern))) >= count:
            break
        time.sleep(0.002)
    time.sleep(pause_s)
    workers = _children_of(process.pid)
    seen = len(list(files.glob(pattern))) if files.is_dir() else 0
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return workers, seen


def _assert_final_files_only(after_kill: dict[str, bytes], clean: dict[str, bytes], kinds) -> None:
    for name, data in after_kill.items():
        if TEMP_PREFIX in name or name.endswith(LOCK_NAME) or not name.startswith(kinds):
            continue
        assert data == clean[name], f"{name} was left half-written or different by the kill"


# --- rle-decode -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rle_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, dict[str, bytes]]:
    """A CSV of 240 images (2 rows each, one invalid row) and the clean run's output."""
    root = tmp_path_factory.mktemp("rle_kill")
    rng = np.random.default_rng(11)
    lines = ["ImageId,EncodedPixels"]
    for i in range(240):
        for _ in range(2):
            mask = np.zeros((512, 512), np.uint8)
            top, left = rng.integers(0, 400, size=2)
            mask[top : top + rng.integers(5, 100), left : left + rng.integers(5, 100)] = 1
            lines.append(f"img{i:03d},{encode_rle(mask) if i % 4 else '-1'}")
    lines.append("bad,1 2 3")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    args = ["rle-decode", root / "labels.csv", "OUT", "--width", "512", "--height", "512"]
    args += ["--skip-invalid", "--workers", "2", "--quiet"]
    clean = root / "clean"
    done = run_pneumo(*[clean if a == "OUT" else a for a in args])
    assert done.returncode == 0, done.stderr
    return root, args, tree_bytes(clean)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_rle_decode_resumes_to_a_clean_result(rle_job, seed: int) -> None:
    root, args, clean = rle_job
    rng = np.random.default_rng(seed)
    out = root / f"killed{seed}"
    command = [out if a == "OUT" else a for a in args]
    count = int(rng.integers(0, 200)) if seed else 0  # seed 0: during start-up
    _, seen = _kill_when(command, out, "*.png", count, float(rng.uniform(0, 0.02)))
    assert seen < 240
    _assert_final_files_only(tree_bytes(out) if out.is_dir() else {}, clean, ("img",))
    done = run_pneumo(*command)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(out) == clean
    assert temporaries(out) == []


# --- preprocess -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocess_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, dict]:
    """36 DICOMs with RLE labels and the clean run's cache (2 worker processes, 3 folds)."""
    root = tmp_path_factory.mktemp("pre_kill")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(5)
    rows = ["ImageId,EncodedPixels"]
    # 80 full-size X-rays: a kill after up to 34 records leaves at least 46 images (~0.1 s of
    # work for 2 workers) still to do, so the run cannot finish in the meantime.
    for i in range(80):
        write_dicom(raw / f"k{i:02d}.dcm", fake_xray(rng, 1024, border=24), patient_id=f"P{i % 25}")
        mask = np.zeros((1024, 1024), np.uint8)
        if i % 3 == 0:
            mask[120 + 2 * i : 400 + 2 * i, 300:420] = 1
        rows.append(f"k{i:02d},{encode_rle(mask)}")
    (root / "rle.csv").write_text("\n".join(rows) + "\n")
    args = ["preprocess", raw, "CACHE", "--rle", root / "rle.csv", "--workers", "2"]
    args += ["--folds", "3", "--image-size", "128", "--quiet"]
    clean = root / "clean"
    done = run_pneumo(*[clean if a == "CACHE" else a for a in args])
    assert done.returncode == 0, done.stderr
    return root, args, tree_bytes(clean)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_preprocess_resumes_to_a_clean_cache(preprocess_job, seed: int) -> None:
    root, args, clean = preprocess_job
    rng = np.random.default_rng(100 + seed)
    cache = root / f"killed{seed}"
    command = [cache if a == "CACHE" else a for a in args]
    count = int(rng.integers(0, 34)) if seed else 0  # seed 0: during start-up and scanning
    workers, _ = _kill_when(command, cache / "records", "*.json", count, rng.uniform(0, 0.03))
    assert not (cache / "manifest.csv").exists(), "the run finished before it could be killed"
    # The worker processes die with the main process: no orphan keeps writing into the cache.
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in workers if _running(pid)], "orphaned workers still running"
    after_kill = tree_bytes(cache) if cache.is_dir() else {}
    _assert_final_files_only(after_kill, clean, ("images/", "masks/", "records/"))
    done = run_pneumo(*command)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(cache) == clean  # the stale lock was recovered and removed
    assert temporaries(cache) == []
