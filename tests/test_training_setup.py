"""training/setup.py: what `pneumo train` checks before it creates a run folder or starts
TensorFlow (these tests must pass under --no-tf: every refusal comes first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from tests.cachefactory import Sample, synthetic_cache, synthetic_sample, write_cache

runner = CliRunner()


def _train(cache: Path, runs: Path):
    return runner.invoke(app, [
        "train", "--cache", str(cache), "--runs-dir", str(runs), "--encoder", "resnet18",
        "--encoder-weights", "none", "--epochs", "1", "--batch-size", "2", "-q",
    ])  # fmt: skip


def test_a_damaged_cache_is_refused_before_a_run_folder_exists(tmp_path: Path) -> None:
    cache = synthetic_cache(tmp_path / "cache", image_size=64)
    (cache / "images" / "val001.png").unlink()  # the manifest still names it
    runs = tmp_path / "runs"
    result = _train(cache, runs)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: cache file {cache.absolute() / 'images' / 'val001.png'} is missing; "
        "recreate the cache"
    ]
    assert not runs.exists() or list(runs.iterdir()) == []
    # A PNG of another size (a cache made at another --image-size, or overwritten) as well.
    (cache / "images" / "val001.png").write_bytes((cache / "images" / "val000.png").read_bytes())
    big = synthetic_sample(np.random.default_rng(1), 96, False)[0]
    import cv2

    cv2.imwrite(str(cache / "masks" / "train003.png"), big)
    result = _train(cache, runs)
    assert result.exit_code == 1
    assert "train003.png: not a 64x64 PNG; the cache is damaged" in result.stderr
    assert not runs.exists() or list(runs.iterdir()) == []


def test_an_unlabelled_cache_says_how_to_add_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [
        Sample(f"x{i}", synthetic_sample(rng, 32, False)[0], None, split)
        for i, split in enumerate(["train", "train", "val"])
    ]
    cache = write_cache(tmp_path / "cache", samples, 32)
    result = _train(cache, tmp_path / "runs")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "has no labelled images (every image is cached without a mask)" in lines[0]
    assert "--rle train-rle.csv or --masks MASK_DIR" in lines[0]
    assert "validation fraction" not in lines[0]
    assert not (tmp_path / "runs").exists()
