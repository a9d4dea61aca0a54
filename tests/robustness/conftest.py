"""Helpers shared by the robustness suite: running the real CLI, fake X-rays, time limits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TEMP_PREFIX = ".pneumo-tmp-"


def cli_env() -> dict[str, str]:
    """Environment for ``python -m pneumo_cli``: this checkout first, no colour codes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("FORCE_COLOR", None)
    return env


def pneumo_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "pneumo_cli", *map(str, args)]


def run_pneumo(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``pneumo ARGS`` in a subprocess, capturing text stdout/stderr."""
    return subprocess.run(
        pneumo_command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included), relative path -> content."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob(f"{TEMP_PREFIX}*"))


def fake_xray(rng: np.random.Generator, size: int = 256, border: int = 0) -> np.ndarray:
    """A smooth, non-constant uint8 (size, size) picture with an optional black border."""
    noise = rng.random((max(2, size // 8), max(2, size // 8))).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.clip(40 + image * 180, 0, 255).astype(np.uint8)
    if border:
        image[:border], image[:, :border] = 0, 0
    return image


class TimeLimitExceeded(Exception):
    """Raised inside the code under test when it runs past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`TimeLimitExceeded` after ``seconds`` (SIGALRM; main
    thread only). Used as a per-input bound in the fuzz tests: a hang fails the test instead of
    stalling CI."""

    def expire(signum: int, frame: object) -> None:
        raise TimeLimitExceeded(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- small file systems for disk-full and read-only tests ----------------------------------------


class Mounts:
    """Mounts small tmpfs file systems and unmounts them when the test ends."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, path: Path, size_kb: int) -> Path:
        """Mount an empty tmpfs of ``size_kb`` KiB at ``path`` (created); skip when the system
        does not allow it (not root, or a container without mount rights)."""
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(
                "disk-full/read-only tests need a small tmpfs and `mount` was refused "
                f"({done.stderr.strip() or 'not permitted'}); run them as root in a container "
                "with mount rights (CAP_SYS_ADMIN)"
            )
        self.points.append(path)
        return path

    def resize(self, path: Path, size_kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(path)], check=True)

    def read_only(self, path: Path) -> None:
        """Make the mounted ``path`` read-only for everyone, root included."""
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    def unmount_all(self) -> None:
        for path in reversed(self.points):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.points.clear()


def folder_size_kb(folder: Path) -> int:
    """Space the files under ``folder`` take on a tmpfs (whole 4 KiB pages), in KiB."""
    pages = sum(-(-path.stat().st_size // 4096) for path in folder.rglob("*") if path.is_file())
    return pages * 4


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    helper = Mounts()
    try:
        yield helper
    finally:
        helper.unmount_all()


# --- small input sets ------------------------------------------------------------------------


def write_raw_dicoms(raw: Path, count: int, size: int, seed: int, prefix: str = "x") -> list[str]:
    """``count`` JPEG DICOMs ``raw/<prefix>NN.dcm`` of fake X-rays; returns their ImageIds."""
    from pneumo_cli.io.dicom_write import write_dicom

    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i:02d}" for i in range(count)]
    for i, image_id in enumerate(ids):
        write_dicom(raw / f"{image_id}.dcm", fake_xray(rng, size, border=8), patient_id=f"P{i}")
    return ids


def write_rle_csv(path: Path, ids: list[str], size: int, seed: int, noisy: bool = False) -> None:
    """An ``ImageId,EncodedPixels`` CSV with a rectangle (``noisy``: speckled) on 2 of 3 ids."""
    from pneumo_cli.io.rle import encode_rle

    rng = np.random.default_rng(seed)
    lines = ["ImageId,EncodedPixels"]
    for i, image_id in enumerate(ids):
        mask = np.zeros((size, size), np.uint8)
        if i % 3:
            top, left = rng.integers(0, size // 2, size=2)
            mask[top : top + size // 3, left : left + size // 4] = 1
            if noisy:
                mask &= (rng.random((size, size)) < 0.6).astype(np.uint8)
        lines.append(f"{image_id},{encode_rle(mask)}")
    path.write_text("\n".join(lines) + "\n")


# --- TensorFlow commands ---------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """The non-blank lines of a command's stderr: nothing but pneumo's own (segmentation_models'
    start-up banner and TensorFlow's native start-up lines are dropped by pneumo)."""
    return [line for line in stderr.strip().splitlines() if line.strip()]


def copy_run(run: Path, dest: Path) -> Path:
    """A run folder at ``dest`` holding ``run``'s config.json and a link to its best.keras:
    tests may add postprocess.json or replace files without touching the shared run."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_bytes((run / "config.json").read_bytes())
    (dest / "best.keras").symlink_to((run / "best.keras").resolve())
    return dest
