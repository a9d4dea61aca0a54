"""Exit codes of every finished command with typical bad arguments: 0 success, 1 bad input or
data (one line on stderr), 2 usage error (Click's usage hint plus one 'Error:' line). Never a
traceback."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.files import write_mask_png
from pneumo_cli.engine.tf import import_tf
from pneumo_cli.io.dicom_write import write_dicom
from tests.robustness.conftest import copy_run, error_lines, fake_xray, run_pneumo

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("codes")
    (root / "good.csv").write_text("ImageId,EncodedPixels\na,1 2\nb,-1\n")
    (root / "bad_row.csv").write_text("ImageId,EncodedPixels\na,1 2 3\n")
    (root / "other.csv").write_text("ImageId,EncodedPixels\nz,-1\n")
    (root / "empty.csv").write_text("")
    (root / "binary.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    (root / "broken.csv.gz").write_bytes(gzip.compress(b"ImageId,EncodedPixels\na,1 1\n")[:-12])
    (root / "a_file").write_text("not a folder")
    for name in ("masks", "mixed", "empty_dir", "raw", "raw_empty"):
        (root / name).mkdir()
    write_mask_png(root / "masks" / "a.png", np.eye(4, dtype=np.uint8))
    write_mask_png(root / "mixed" / "a.png", np.eye(4, dtype=np.uint8))
    write_mask_png(root / "mixed" / "b.png", np.eye(5, dtype=np.uint8))
    write_dicom(root / "raw" / "a.dcm", fake_xray(np.random.default_rng(0), 160))
    (root / "raw_empty" / "notes.txt").write_text("no images here")
    (root / "exists.csv").write_text("keep me")
    return root


def F(name: str) -> str:  # noqa: N802 - reads like a placeholder in the table below
    return "{" + name + "}"


CASES = [
    # rle-decode
    ("rle-decode", [F("good.csv"), F("out"), "--width", "2", "--height", "2"], 0),
    ("rle-decode", [F("missing.csv"), F("out")], 1),
    ("rle-decode", [F("masks"), F("out")], 1),  # a folder, not a CSV
    ("rle-decode", [F("bad_row.csv"), F("out")], 1),
    ("rle-decode", [F("empty.csv"), F("out")], 1),
    ("rle-decode", [F("binary.csv"), F("out")], 1),
    ("rle-decode", [F("broken.csv.gz"), F("out")], 1),
    ("rle-decode", [F("good.csv"), F("a_file")], 1),  # output is a file
    ("rle-decode", [F("good.csv"), F("out"), "--width", "1", "--height", "1"], 1),  # too small
    ("rle-decode", [F("good.csv"), F("out"), "--width", "0"], 2),
    ("rle-decode", [F("good.csv"), F("out"), "--workers", "0"], 2),
    ("rle-decode", [F("good.csv")], 2),
    ("rle-decode", [F("good.csv"), F("out"), "--bogus"], 2),
    # rle-encode
    ("rle-encode", [F("masks"), F("out.csv")], 0),
    ("rle-encode", [F("missing"), F("out.csv")], 1),
    ("rle-encode", [F("empty_dir"), F("out.csv")], 1),
    ("rle-encode", [F("mixed"), F("out.csv")], 1),  # masks of two sizes
    ("rle-encode", [F("masks"), F("exists.csv")], 1),  # exists, no --overwrite
    ("rle-encode", [F("masks"), F("out.csv"), "--threshold", "300"], 2),
    ("rle-encode", [F("masks")], 2),
    # preprocess
    ("preprocess", [F("raw"), F("cache"), "-j", "1", "--image-size", "32", "--min-size", "64"], 0),
    ("preprocess", [F("missing"), F("cache")], 1),
    ("preprocess", [F("a_file"), F("cache")], 1),
    ("preprocess", [F("raw_empty"), F("cache")], 1),
    ("preprocess", [F("raw"), F("raw") + "/cache"], 1),  # cache inside raw
    ("preprocess", [F("raw"), F("cache"), "--rle", F("missing.csv")], 1),
    ("preprocess", [F("raw"), F("cache"), "--rle", F("bad_row.csv"), "--min-size", "64"], 1),
    ("preprocess", [F("raw"), F("cache"), "--masks", F("missing")], 1),
    ("preprocess", [F("raw"), F("cache"), "--strict", "--min-size", "4000"], 1),
    ("preprocess", [F("raw"), F("cache"), "--rle", F("good.csv"), "--masks", F("masks")], 2),
    ("preprocess", [F("raw"), F("cache"), "--image-size", "8"], 2),
    ("preprocess", [F("raw"), F("cache"), "--val-fraction", "0.6", "--test-fraction", "0.6"], 2),
    ("preprocess", [F("raw"), F("cache"), "--folds", "1"], 2),
    ("preprocess", [F("raw")], 2),
    # overlay
    ("overlay", [F("raw"), "--masks", F("masks"), "--out", F("ov")], 0),
    ("overlay", [F("raw"), "--masks", F("missing"), "--out", F("ov")], 1),
    ("overlay", [F("missing"), "--masks", F("masks"), "--out", F("ov")], 1),
    ("overlay", [F("raw_empty"), "--masks", F("masks"), "--out", F("ov")], 1),
    ("overlay", [F("raw"), "--masks", F("masks"), "--out", F("raw") + "/ov"], 1),
    ("overlay", [F("raw"), "--masks", F("masks"), "--truth", F("missing")], 1),
    ("overlay", [F("raw"), "--masks", F("masks"), "--rle", F("empty.csv"), "--out", F("ov")], 1),
    ("overlay", [F("raw"), "--masks", F("masks"), "--format", "gif"], 2),
    ("overlay", [F("raw"), "--masks", F("masks"), "--max-size", "8"], 2),
    ("overlay", [F("raw"), "--masks", F("masks"), "--truth", F("masks"), "--rle", F("good.csv")],
     2),
    ("overlay", [F("raw")], 2),
    ("overlay", ["--masks", F("masks")], 2),
    # evaluate, offline
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("good.csv"), "--height", "2",
                  "--width", "2", "--out", F("ev")], 0),
    ("evaluate", ["--predictions", F("missing.csv"), "--truth", F("good.csv")], 1),
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("bad_row.csv")], 1),
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("other.csv")], 1),  # no common id
    ("evaluate", ["--predictions", F("binary.csv"), "--truth", F("good.csv")], 1),
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("good.csv"), "--out", F("a_file")],
     1),
    ("evaluate", ["--predictions", F("good.csv")], 2),
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("good.csv"), "--run", "runs/x"], 2),
    ("evaluate", ["--predictions", F("good.csv"), "--truth", F("good.csv"), "--height", "0"], 2),
    # the app itself
    ("pneumo", ["nonsense"], 2),
    ("pneumo", ["--version"], 0),
]  # fmt: skip


def _fill(arg: str, root: Path, tmp: Path) -> str:
    if not arg.startswith("{"):
        return arg
    name, _, rest = arg[1:].partition("}")
    base = root if (root / name).exists() or name.startswith("missing") else tmp
    return str(base / name) + rest


@pytest.mark.parametrize(
    ("command", "args", "code"), CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)]
)
def test_exit_code_and_message(command, args, code, files: Path, tmp_path: Path) -> None:
    argv = ([] if command == "pneumo" else [command]) + [_fill(a, files, tmp_path) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert len(lines[0]) < 600
    elif code == 2:
        errors = [line for line in lines if line.startswith("Error: ")]
        assert len(errors) == 1, result.stderr
        assert lines[0].startswith("Usage: ")


def test_exit_codes_in_a_real_process(files: Path, tmp_path: Path) -> None:
    """The same boundary in a real process (no CliRunner): stderr carries exactly one line."""
    done = run_pneumo("rle-decode", files / "bad_row.csv", tmp_path / "out")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "line 2 (ImageId 'a'): odd number of tokens (3)" in done.stderr
    usage = run_pneumo("overlay", files / "raw", "--masks", files / "masks", "--format", "gif")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


# --- the TensorFlow commands: train, predict, evaluate (model mode), demo-data -----------------

TF_CASES = [
    # train
    # (a successful train is in test_privacy.py and test_kill_tf.py)
    ("train", ["--cache", F("missing")], 1),
    ("train", ["--cache", F("a_file")], 1),
    ("train", ["--cache", F("small_cache"), "--encoder", "resnet1000"], 2),  # closed sets and
    ("train", ["--cache", F("small_cache"), "--loss", "mse"], 2),  # value rules: usage errors
    ("train", ["--cache", F("small_cache"), "--pos-fraction", "2"], 2),
    ("train", ["--cache", F("small_cache"), "--gpus", "64"], 1),
    ("train", ["--cache", F("small_cache"), "--image-size", "128"], 1),  # not the cache's
    ("train", ["--cache", F("small_cache"), "--encoder-weights", F("missing.h5")], 1),
    ("train", ["--cache", F("small_cache"), "--name", "../escape"], 1),
    ("train", ["--cache", F("small_cache"), "--name", "latest"], 1),
    ("train", ["--cache", F("small_cache"), "--runs-dir", F("runs_with_a"), "--name", "a"], 1),
    ("train", ["--resume", F("missing")], 1),
    ("train", ["--resume", F("finished_run")], 1),
    ("train", ["--epochs", "many"], 2),
    ("train", ["--bogus"], 2),
    ("train", ["--cache", F("small_cache"), "--epochs", "0"], 2),
    ("train", ["--cache", F("small_cache"), "--lr", "-1"], 2),
    ("train", ["--resume", F("finished_run"), "--epochs", "3"], 2),
    # predict
    ("predict", [F("dicom"), "--run", F("run"), "--out", F("p")], 0),
    ("predict", [F("dicom"), "--run", F("missing")], 1),
    ("predict", [F("dicom"), "--run", F("run_without_model")], 1),
    ("predict", [F("dicom"), "--run", F("lambda_run")], 1),
    ("predict", [F("missing.dcm"), "--run", F("run")], 1),
    ("predict", [F("no_images"), "--run", F("run"), "--out", F("p")], 1),
    ("predict", [F("raw"), "--run", F("run"), "--out", F("raw") + "/p"], 1),  # inside input
    ("predict", [F("dicom"), "--run", F("run"), "--out", F("a_file")], 1),
    ("predict", ["--run", F("run"), "--cache", F("cache"), "--split", "holdout"], 2),
    ("predict", ["--run", F("run"), "--cache", F("other_size_cache")], 1),
    ("predict", [F("dicom"), "--run", F("run"), "--top-threshold", "2"], 2),
    ("predict", [F("dicom"), "--run", F("run"), "--batch-size", "0"], 2),
    ("predict", [F("dicom"), "--run", F("run"), "--bogus"], 2),
    ("predict", [F("dicom"), "--run", F("run"), "--tta", "vflip"], 2),
    ("predict", [F("dicom"), "--run", F("run"), "--cache", F("cache")], 2),
    # evaluate, model mode
    ("evaluate", ["--run", F("run"), "--out", F("ev"), "-q"], 0),
    ("evaluate", ["--run", F("missing")], 1),
    ("evaluate", ["--run", F("run"), "--split", "test", "--tune"], 1),
    ("evaluate", ["--run", F("run"), "--cache", F("missing")], 1),
    ("evaluate", ["--run", F("run"), "--cache", F("other_size_cache")], 1),
    ("evaluate", ["--run", F("run"), "--out", F("a_file")], 1),
    ("evaluate", ["--run", F("run"), "--split", "holdout"], 2),
    ("evaluate", ["--run", F("run"), "--at", "half"], 2),
    ("evaluate", ["--run", F("run"), "--tta", "vflip"], 2),
    # demo-data
    ("demo-data", [F("demo"), "--n", "2", "--size", "128", "-q"], 0),
    ("demo-data", [F("no_images")], 1),  # not empty
    ("demo-data", [F("a_file")], 1),
    ("demo-data", [F("demo"), "--n", "0"], 2),
    ("demo-data", [F("demo"), "--size", "64"], 2),
    ("demo-data", [], 2),
]  # fmt: skip


@pytest.fixture(scope="module")
def tf_files(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.cachefactory import synthetic_cache

    root = tmp_path_factory.mktemp("tf_codes")
    (root / "a_file").write_text("not a folder")
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("no X-rays here")
    run = copy_run(tiny_run["run"], root / "run")
    without_model = root / "run_without_model"
    without_model.mkdir()
    (without_model / "config.json").write_bytes((run / "config.json").read_bytes())
    lambda_run = copy_run(tiny_run["run"], root / "lambda_run")
    (lambda_run / "best.keras").unlink()
    tf = import_tf()
    inputs = tf.keras.Input((64, 64, 3))
    outputs = tf.keras.layers.Lambda(lambda x: x[..., :1])(inputs)
    tf.keras.Model(inputs, outputs).save(lambda_run / "best.keras")
    (root / "runs_with_a" / "a").mkdir(parents=True)
    shutil.copytree(tiny_run["cache"], root / "other_size_cache")
    settings = json.loads((root / "other_size_cache" / "preprocess.json").read_text())
    settings["settings"]["image_size"] = 32
    (root / "other_size_cache" / "preprocess.json").write_text(json.dumps(settings))
    return {
        "root": root,
        "run": run,
        "finished_run": tiny_run["run"],
        "raw": tiny_run["raw"],
        "cache": tiny_run["cache"],
        "dicom": next((tiny_run["raw"] / "dicom-images-train").rglob("*.dcm")),
        "small_cache": synthetic_cache(root / "small_cache", 64, n_train=2, n_val=1),
    }


def _fill_tf(arg: str, files: dict[str, Path], tmp: Path) -> str:
    if not arg.startswith("{"):
        return arg
    name, _, rest = arg[1:].partition("}")
    if name in files:
        return str(files[name]) + rest
    base = files["root"] if (files["root"] / name).exists() else tmp
    return str(base / name) + rest


@pytest.mark.parametrize(
    ("command", "args", "code"),
    TF_CASES,
    ids=[f"{getattr(c, 'values', c)[0]}-{i}" for i, c in enumerate(TF_CASES)],
)
def test_tf_command_exit_code_and_message(command, args, code, tf_files, tmp_path: Path) -> None:
    argv = [command] + [_fill_tf(a, tf_files, tmp_path) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stderr + result.stdout
    lines = error_lines(result.stderr)
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert 'File "' not in lines[0] and len(lines[0]) < 600
    elif code == 2:
        assert len([line for line in lines if line.startswith("Error: ")]) == 1, result.stderr
        assert lines[0].startswith("Usage: ")


def test_train_error_in_a_real_process_is_the_only_stderr_line(tmp_path: Path) -> None:
    """segmentation_models prints a banner when imported (before pneumo checks the cache); pneumo
    drops it, so a script reading stderr gets exactly the error."""
    done = run_pneumo("train", "--cache", tmp_path / "missing", "--runs-dir", tmp_path / "runs")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: cache folder {tmp_path / 'missing'} does not exist; create it with "
        "`pneumo preprocess RAW_DIR CACHE_DIR`"
    ]
    assert not (tmp_path / "runs").exists()


def test_tf_command_error_is_the_last_stderr_line_of_a_real_process(tf_files) -> None:
    """In a real process TensorFlow's native start-up log (I0000..., cuInit) may precede it, but
    pneumo's message is the one `error:` line and the last line, with no traceback."""
    done = run_pneumo("predict", tf_files["dicom"], "--run", tf_files["root"] / "lambda_run")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert "Lambda layer" in lines[-1]


def test_a_lost_cluster_peer_ends_the_process_at_once_with_its_message(tmp_path: Path) -> None:
    """ClusterLostError skips interpreter teardown (where TensorFlow can wait for the dead
    peer): exit 1, the message on stderr, and no atexit handler run."""
    import subprocess
    import sys

    script = tmp_path / "lost.py"
    script.write_text(
        "import atexit, sys\n"
        "from pneumo_cli.cli.main import error_boundary\n"
        "from pneumo_cli.core.errors import ClusterLostError\n"
        "atexit.register(lambda: sys.stderr.write('teardown ran\\n'))\n"
        "@error_boundary\n"
        "def command():\n"
        "    raise ClusterLostError('lost contact with another worker during epoch 2')\n"
        "command()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 1
    assert "error: lost contact with another worker during epoch 2" in done.stderr
    assert "teardown ran" not in done.stderr
