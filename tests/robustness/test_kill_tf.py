"""Kill -9 anywhere for the TensorFlow commands: `train`, `predict` and model-mode `evaluate`.

Each is killed at seeded points in a real process, then run again; the result must equal an
uninterrupted run: byte-identical masks, CSVs and evaluation files, and for a deterministic
training run (fixed --seed, --no-augment, CPU) exactly the same final weights.

How to recover a killed `train`:
- killed after its first epoch: `pneumo train --resume RUN` continues from the last saved epoch;
- killed before that, RUN holds only config.json: the same command refuses the taken name and
  points at --resume, which starts the run again from epoch 0 with its recorded settings (the
  same command with --exist-ok does that too). Either way the weights equal an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.model.saving import load_model
from tests.cachefactory import synthetic_cache
from tests.robustness.conftest import (
    TEMP_PREFIX,
    cli_env,
    copy_run,
    error_lines,
    pneumo_command,
    temporaries,
    tree_bytes,
)

runner = CliRunner()


def _invoke(args: list) -> None:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (result.output, result.exception)


def _kill_when(
    args: list, ready: Callable[[], bool], pause_s: float, timeout_s: float = 120
) -> None:
    """Run ``pneumo ARGS`` in a real process; SIGKILL it ``pause_s`` after ``ready()`` holds."""
    process = subprocess.Popen(
        pneumo_command(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(pause_s)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _files_left_final(folder: Path, clean: dict[str, bytes], kinds: tuple[str, ...]) -> None:
    for name, data in tree_bytes(folder).items():
        if TEMP_PREFIX not in name and name.startswith(kinds):
            assert data == clean[name], f"{name} was left half-written or different by the kill"


def _swap(args: list, **values: Path) -> list:
    return [values.get(a, a) if isinstance(a, str) else a for a in args]


# --- predict ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_job(tiny_run, tmp_path_factory: pytest.TempPathFactory):
    """Predict the 44 files of the tiny run's raw folder (4 corrupt) with probability maps."""
    root = tmp_path_factory.mktemp("predict_kill")
    run = copy_run(tiny_run["run"], root / "run")
    args = ["predict", tiny_run["raw"], "--run", run, "--out", "OUT", "--save-probs",
            "--batch-size", "2", "--workers", "2", "-q"]  # fmt: skip
    _invoke(_swap(args, OUT=root / "clean"))
    clean = tree_bytes(root / "clean")
    assert len([name for name in clean if name.startswith("masks/")]) == 40
    assert "rejected.csv" in clean
    return root, args, clean


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_predict_resumes_to_a_clean_result(predict_job, seed: int) -> None:
    root, args, clean = predict_job
    rng = np.random.default_rng(200 + seed)
    out = root / f"killed{seed}"
    command = _swap(args, OUT=out)
    if seed == 0:  # while TensorFlow starts and the model loads
        _kill_when(command, lambda: True, float(rng.uniform(0.5, 3.0)))
    else:  # while masks are being written
        count = int(rng.integers(1, 30))
        _kill_when(command, lambda: len(list(out.glob("records/*.json"))) >= count, 0.0)
        assert not (out / "predictions.csv").exists()
    if out.exists():
        _files_left_final(out, clean, ("masks/", "probs/", "records/"))
    _invoke(command)
    assert tree_bytes(out) == clean
    assert temporaries(out) == []


def _seg_content(folder: Path) -> dict[str, tuple]:
    """Per SEG: pixel data, referenced source image and study; the SEG's own UIDs differ from
    job to job (a new series each), so they are compared within a job only."""
    import pydicom

    content = {}
    for path in sorted(folder.glob("*.dcm")):
        seg = pydicom.dcmread(path)
        referenced = seg.ReferencedSeriesSequence[0]
        content[path.name] = (
            bytes(seg.PixelData),
            referenced.SeriesInstanceUID,
            referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID,
            seg.StudyInstanceUID,
        )
    return content


def test_killed_predict_with_dicom_seg_resumes_to_the_same_segs(predict_job) -> None:
    root, args, _ = predict_job
    command = [*args, "--dicom-seg"]
    _invoke(_swap(command, OUT=root / "seg-clean"))
    clean = _seg_content(root / "seg-clean" / "dicom-seg")
    assert len(clean) == 40
    out = root / "seg-killed"
    _kill_when(_swap(command, OUT=out), lambda: len(list(out.glob("dicom-seg/*.dcm"))) >= 12, 0.0)
    assert 12 <= len(list(out.glob("dicom-seg/*.dcm"))) < 40
    _invoke(_swap(command, OUT=out))
    assert _seg_content(out / "dicom-seg") == clean
    assert temporaries(out) == []
    import pydicom

    series = {pydicom.dcmread(p).SeriesInstanceUID for p in (out / "dicom-seg").glob("*.dcm")}
    studies = {value[3] for value in clean.values()}
    assert len(series) == len(studies)  # the resumed job kept its series: one per study
    masks = {k: v for k, v in tree_bytes(out).items() if k.startswith(("masks/", "probs/"))}
    clean_masks = tree_bytes(root / "seg-clean")
    assert masks == {k: v for k, v in clean_masks.items() if k.startswith(("masks/", "probs/"))}


# --- evaluate (model mode) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_job(tiny_run, tmp_path_factory: pytest.TempPathFactory):
    """`evaluate --tune` on the val split; the run and output paths are reused by every test
    because metrics.json records the run folder."""
    root = tmp_path_factory.mktemp("evaluate_kill")
    run = copy_run(tiny_run["run"], root / "run")
    out = root / "eval"
    args = ["evaluate", "--run", run, "--tune", "--out", out, "-q"]
    _invoke(args)
    clean = tree_bytes(out)
    gate = (run / "postprocess.json").read_bytes()
    assert {"metrics.json", "report.html", "predictions.csv"} <= set(clean)

    def reset() -> None:
        shutil.rmtree(out)
        (run / "postprocess.json").unlink()

    reset()
    return run, out, args, clean, gate, reset


def test_killed_evaluate_resumes_to_a_clean_result(evaluate_job) -> None:
    run, out, args, clean, gate, reset = evaluate_job
    rng = np.random.default_rng(300)
    _kill_when(args, lambda: True, float(rng.uniform(1.0, 4.0)))
    if out.exists():
        _files_left_final(out, clean, ("overlays/", "per_image", "roc", "pr", "dice"))
        assert not (out / "metrics.json").exists()  # a folder without it is not finished
    _invoke(args)
    assert (run / "postprocess.json").read_bytes() == gate
    assert {k: v for k, v in tree_bytes(out).items() if TEMP_PREFIX not in k} == clean
    reset()


def test_evaluate_removes_temporaries_a_killed_run_left(evaluate_job) -> None:
    """The files a kill during the writing leaves (planted here: such kills hit a window of
    milliseconds) are gone after the next run."""
    run, out, args, clean, gate, reset = evaluate_job
    (out / "overlays").mkdir(parents=True)
    for stray in (
        out / f"{TEMP_PREFIX}4242-metrics.json",
        out / "overlays" / f"{TEMP_PREFIX}4242-a.png",
    ):
        stray.write_bytes(b"half")
    try:
        _invoke(args)
        assert temporaries(out) == []
    finally:
        reset()


# --- train ------------------------------------------------------------------------------------

TRAIN_ARGS = ["train", "--cache", "CACHE", "--runs-dir", "RUNS", "--name", "NAME",
              "--encoder", "resnet18", "--encoder-weights", "none", "--epochs", "3",
              "--batch-size", "2", "--steps-per-epoch", "2", "--no-augment", "--seed", "1",
              "--gpus", "0", "--patience", "0", "-q"]  # fmt: skip
TIMING_COLUMNS = ("seconds", "images_per_s")


def _weights(path: Path) -> list[np.ndarray]:
    return load_model(path).get_weights()


def _history(run: Path) -> list[list[str]]:
    """history.csv without its timing columns."""
    lines = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    keep = [i for i, column in enumerate(lines[0]) if column not in TIMING_COLUMNS]
    return [[cells[i] for i in keep] for cells in lines]


def _assert_same_training(run: Path, clean: dict) -> None:
    for name in ("last.keras", "best.keras"):
        got = _weights(run / name)
        assert len(got) == len(clean[name])
        assert all(np.array_equal(a, b) for a, b in zip(got, clean[name], strict=True)), name
    assert _history(run) == clean["history"]


@pytest.fixture(scope="module")
def train_job(tmp_path_factory: pytest.TempPathFactory):
    """A tiny cache and the result of an uninterrupted 3-epoch run on it."""
    root = tmp_path_factory.mktemp("train_kill")
    cache = synthetic_cache(root / "cache", 64, n_train=6, n_val=2, seed=0)
    runs = root / "runs"

    def command(name: str) -> list:
        return _swap(TRAIN_ARGS, CACHE=cache, RUNS=runs, NAME=name)

    _invoke(command("clean"))
    clean_run = runs / "clean"
    clean = {name: _weights(clean_run / name) for name in ("last.keras", "best.keras")}
    clean["history"] = _history(clean_run)
    assert len(clean["history"]) == 4
    return runs, command, clean


@pytest.fixture(scope="module")
def killed_in_first_epoch(train_job) -> Path:
    """A run killed after it wrote config.json, before its first epoch ended."""
    runs, command, _ = train_job
    run = runs / "first"
    rng = np.random.default_rng(400)
    _kill_when(command("first"), lambda: (run / "config.json").is_file(), rng.uniform(0, 0.5))
    assert (run / "config.json").is_file() and not (run / "state.json").exists()
    return run


def test_train_killed_before_its_first_epoch_name_is_taken(train_job, killed_in_first_epoch):
    runs, command, _ = train_job
    again = runner.invoke(app, [str(arg) for arg in command("first")])
    assert again.exit_code == 1
    lines = error_lines(again.stderr)
    assert len(lines) == 1 and "exists already" in lines[0] and "--resume" in lines[0], lines


def test_train_killed_before_its_first_epoch_restarts_with_exist_ok(
    train_job, killed_in_first_epoch: Path
) -> None:
    runs, command, clean = train_job
    shutil.copytree(killed_in_first_epoch, runs / "first_exist_ok", symlinks=True)
    _invoke(command("first_exist_ok") + ["--exist-ok"])
    _assert_same_training(runs / "first_exist_ok", clean)


def test_train_killed_before_its_first_epoch_resumes(train_job, killed_in_first_epoch) -> None:
    runs, _, clean = train_job
    run = runs / "first_resume"
    shutil.copytree(killed_in_first_epoch, run, symlinks=True)
    result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    _assert_same_training(run, clean)


@pytest.fixture(scope="module")
def killed_while_saving(train_job) -> Path:
    """A run killed while it saved epoch 2 (a model file or the optimizer checkpoint being
    written), then resumed with `pneumo train --resume`."""
    runs, command, _ = train_job
    run = runs / "saving"
    rng = np.random.default_rng(500)
    pattern = [f"{TEMP_PREFIX}*", "state/*_temp"][int(rng.integers(0, 2))]

    def saving_epoch_2() -> bool:
        return (run / "state.json").is_file() and any(run.glob(pattern))

    _kill_when(command("saving"), saving_epoch_2, 0.0)
    assert b'"epoch": 1' in (run / "state.json").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    return run


def test_train_killed_while_saving_resumes_to_the_same_weights(train_job, killed_while_saving):
    _, _, clean = train_job
    _assert_same_training(killed_while_saving, clean)


def test_train_resume_leaves_no_temporaries(killed_while_saving: Path) -> None:
    left = temporaries(killed_while_saving) + sorted(killed_while_saving.glob("state/*_temp"))
    assert left == []
    assert temporaries(killed_while_saving.parent) == []
