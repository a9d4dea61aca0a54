"""Training end to end: overfitting, run folders, resume, bad input, replicas (64 px, resnet18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import TrainConfig
from pneumo_cli.core.errors import ConfigError, InputError, OutputError
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import build, encoders, saving
from pneumo_cli.training import resume, runs, settings, state, train
from tests.cachefactory import Sample, synthetic_cache, write_cache

pytestmark = pytest.mark.slow

# fp32 explicitly: `auto` depends on the CPU (bf16 where it has bfloat16 instructions).
FAST = dict(
    encoder="resnet18", encoder_weights="none", batch_size=4, lr=1e-3, augment=False,
    precision="fp32",
)  # fmt: skip


class Recorder:
    """A reporter that keeps what it is told; can interrupt after a given epoch."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.first_step_loss: float | None = None
        self.rows: list[dict[str, Any]] = []
        # Per epoch: [start, end of its last training step] (perf_counter s) and steps seen.
        self.train_spans: list[list[float]] = []
        self.steps_seen: list[int] = []
        self.notes: list[str] = []
        self.interrupt_after = interrupt_after
        self.snapshot_of: Path | None = None  # a model file to keep a copy of at each epoch end
        self.snapshots: list[bytes] | None = None

    def note(self, message: str) -> None:
        self.notes.append(message)

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        now = time.perf_counter()
        self.train_spans.append([now, now])
        self.steps_seen.append(0)

    def step_done(self, step: int, logs: dict[str, float]) -> None:
        self.train_spans[-1][1] = time.perf_counter()
        self.steps_seen[-1] += 1
        if self.first_step_loss is None:
            self.first_step_loss = logs["loss"]

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None:
        self.rows.append(row)
        if self.snapshots is not None:  # the epoch's last.keras, written before this call
            self.snapshots.append(self.snapshot_of.read_bytes())
        if row["epoch"] == self.interrupt_after:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache"), image_size=64, n_train=8, n_val=4)


def test_overfits_eight_synthetic_images_and_writes_the_run(cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(cache), epochs=4, steps_per_epoch=15, **FAST)
    reporter = Recorder()
    reporter.snapshot_of, reporter.snapshots = tmp_path / "runs" / "train" / "last.keras", []
    result = train.train_model(config, tmp_path / "runs", reporter=reporter)

    history = runs.read_history(result.run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert reporter.first_step_loss / history[-1]["loss"] >= 5.0  # 60 steps
    assert history[-1]["dice"] > 0.9  # per-image train Dice at 0.5
    run_dir = tmp_path / "runs" / "train"
    assert result.run_dir == str(run_dir) and result.status == "completed"
    for name in ("config.json", "best.keras", "last.keras", "history.csv", "curves.png",
                 "summary.json", "state.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert runs.resolve_run(None, tmp_path / "runs") == run_dir

    saved = runs.load_run_config(run_dir)
    assert saved["input_scaling"] == "raw-0-255"
    assert saved["keras_engine"] == tf_engine.keras_engine()
    assert saved["cache"] == str(cache.absolute()) and saved["image_size"] == 64
    assert saved["preprocess"]["image_size"] == 64 and saved["precision"] == "fp32"
    assert len(saved["cache_manifest_sha256"]) == 64
    assert saved["versions"]["tensorflow"].startswith("2.")
    resolved = TrainConfig(cache=str(cache.absolute()), image_size=64, epochs=4,
                                    steps_per_epoch=15, **FAST)  # fmt: skip
    assert settings.config_from_run(saved) == resolved  # config.json round-trips
    assert saved["input_norm"] == "frozen"
    made_before_the_option = {k: v for k, v in saved.items() if k != "input_norm"}
    assert settings.config_from_run(made_before_the_option).input_norm == "trainable"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 4 and summary["best_epoch"] == result.best_epoch
    best_row = history[result.best_epoch - 1]
    assert summary["best_val_dice"] == pytest.approx(best_row["val_dice"])
    assert best_row["val_dice"] == max(row["val_dice"] for row in history)
    # images_per_s: images trained / training seconds of the epoch (validation excluded), timed
    # here independently from the reporter's calls; the summary gives the mean over epochs.
    assert reporter.steps_seen == [15] * 4
    for row, (start, end) in zip(history, reporter.train_spans, strict=True):
        assert row["images_per_s"] == pytest.approx(15 * 4 / (end - start), rel=0.02)
        assert row["images_per_s"] >= 15 * 4 / row["seconds"]  # seconds include validation
    speeds = [row["images_per_s"] for row in history]
    assert summary["images_per_s"] == pytest.approx(sum(speeds) / 4, abs=1e-3)
    with open(run_dir / "curves.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    # best.keras is the network of the best epoch (copied from that epoch's last.keras), and no
    # other epoch's.
    epochs = []
    for epoch, data in enumerate(reporter.snapshots, start=1):
        (tmp_path / f"epoch{epoch}.keras").write_bytes(data)
        epochs.append(saving.weights_sha256(saving.load_model(tmp_path / f"epoch{epoch}.keras")))
    best = saving.weights_sha256(saving.load_model(run_dir / "best.keras"))
    assert len(set(epochs)) == 4 and best == epochs[result.best_epoch - 1]

    # last.keras is the final network: it predicts like a fresh load of itself and gives
    # masks, not constants.
    last = saving.load_model(run_dir / "last.keras")
    x = encoders.scale_input(cv2.imread(str(cache / "images/train000.png"), 0)[None, ..., None],
                          "raw-0-255")  # fmt: skip
    assert last.predict(x, verbose=0).shape == (1, 64, 64, 1)


def test_resume_continues_epochs_and_loss_curve(cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(cache), epochs=4, steps_per_epoch=2,
                                  **{**FAST, "augment": True})  # fmt: skip
    straight = train.train_model(config, tmp_path, name="straight")
    with pytest.raises(KeyboardInterrupt):
        train.train_model(config, tmp_path, name="broken", reporter=Recorder(interrupt_after=2))
    broken = tmp_path / "broken"
    assert json.loads((broken / "state.json").read_text())["status"] == "interrupted"
    assert json.loads((broken / "summary.json").read_text())["status"] == "interrupted"
    assert len(runs.read_history(broken)) == 2

    reporter = Recorder()
    resumed = resume.resume_training(broken, tmp_path, reporter=reporter)
    assert [row["epoch"] for row in reporter.rows] == [3, 4]  # did not restart at epoch 1
    assert resumed.epochs_done == 4 and resumed.status == "completed"
    ours, theirs = runs.read_history(broken), runs.read_history(straight.run_dir)
    assert [row["epoch"] for row in ours] == [1, 2, 3, 4]
    for column in ("loss", "dice"):
        np.testing.assert_allclose(
            [r[column] for r in ours], [r[column] for r in theirs], rtol=2e-3
        )
    assert runs.resolve_run(None, tmp_path) == broken  # resuming makes it the latest

    with pytest.raises(ConfigError, match="has finished already .completed after 4 epoch"):
        resume.resume_training(broken, tmp_path)
    with pytest.raises(ConfigError, match="is not a pneumo run"):
        resume.resume_training(cache, tmp_path)


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """What kill -9 leaves while saving: pneumo's temporary model file, TensorFlow's
    state/epoch-N_temp/ folder, older checkpoints, a `latest` pointer temporary of a dead
    process. Other files, the kept checkpoint and a live process's temporary stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    run = tmp_path / "runs" / "train"
    (run / "state" / "epoch-0003_temp").mkdir(parents=True)
    (run / "state" / "epoch-0003_temp" / "part-00000-of-00001.data-00000-of-00001").write_text("x")
    planted = {
        run / ".pneumo-tmp-4242-last.keras": False,
        run / "state" / "epoch-0001.index": False,
        run / "state" / "epoch-0002.index": True,
        run / "state" / "epoch-0002.data-00000-of-00001": True,
        run / "state" / "notes.txt": True,
        run / "last.keras": True,
        run.parent / f".pneumo-tmp-{os.getpid()}-latest": True,  # this process is alive
    }
    for path in planted:
        path.write_text("x")
    stale_pointer = run.parent / f".pneumo-tmp-{dead.stdout.strip()}-latest"
    stale_pointer.symlink_to("train", target_is_directory=True)
    state.remove_leftovers(run, "state/epoch-0002")
    assert {path: path.exists() for path in planted} == planted
    assert not (run / "state" / "epoch-0003_temp").exists()
    assert not stale_pointer.is_symlink() and run.is_dir()
    state.remove_leftovers(run, None)  # a fresh start keeps no checkpoint
    assert sorted(p.name for p in (run / "state").iterdir()) == ["notes.txt"]


def test_bad_input_is_refused_before_training(cache: Path, tmp_path: Path) -> None:
    config = TrainConfig(cache=str(cache), **FAST)
    with pytest.raises(ConfigError, match="holds 64 px images but --image-size is 128"):
        train.train_model(TrainConfig(cache=str(cache), image_size=128, **FAST), tmp_path)
    with pytest.raises(InputError, match="no labelled images in split 'holdout'"):
        train.train_model(TrainConfig(cache=str(cache), val_split="holdout", **FAST), tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="exists already; choose another --name"):
        train.train_model(config, tmp_path, name="taken")
    with pytest.raises(
        ConfigError, match="--loss 'dice': choose one of: bce, bce-dice, focal-dice"
    ):
        train.train_model(TrainConfig(cache=str(cache), loss="dice"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"--gpus 3 asks for more GPUs than are visible \(0: none\)"
    ):
        train.train_model(TrainConfig(cache=str(cache), gpus=3, **FAST), tmp_path)
    rng = np.random.default_rng(0)
    blank = np.zeros((64, 64), np.uint8)
    splits = ["val", "train", "train"]
    empty = [Sample(f"n{i}", rng.integers(0, 255, (64, 64), np.uint8), blank, splits[i])
             for i in range(3)]  # fmt: skip
    negatives = write_cache(tmp_path / "negatives", empty, 64)
    with pytest.raises(InputError, match="split 'train' has no image with a pneumothorax"):
        train.train_model(TrainConfig(cache=str(negatives), **FAST), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["negatives", "taken"]  # no run made


def test_cli_trains_with_json_output_and_reports_errors_in_one_line(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink(cache, tmp_path / "cache")  # the default ./cache
    runner = CliRunner()
    args = ["train", "--encoder", "resnet18", "--encoder-weights", "none", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "2", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run_dir"] == "runs/train" and payload["epochs_done"] == 1
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / "train").resolve()

    finished = runner.invoke(app, ["train", "--resume", "runs/train"])
    assert finished.exit_code == 1
    assert finished.stderr.strip().count("\n") == 0
    assert "has finished already" in finished.stderr
    mixed = runner.invoke(app, ["train", "--resume", "runs/train", "--lr", "0.1"])
    assert mixed.exit_code == 2 and "drop --lr" in mixed.stderr  # a usage error
    missing = runner.invoke(app, ["train", "--cache", "elsewhere"])
    assert missing.exit_code == 1 and "elsewhere does not exist" in missing.stderr
    norm = runner.invoke(app, ["train", "--input-norm", "learned", "--name", "other"])
    assert norm.exit_code == 2  # a usage error, before TensorFlow loads
    assert "'learned' is not one of 'frozen', 'trainable'" in norm.stderr
    assert not (tmp_path / "runs" / "other").exists()


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model import losses
    from pneumo_cli.model.build import build_model
    from pneumo_cli.model.encoders import scale_input
    from pneumo_cli.model.fastpaths import FusedAdam  # pneumo train's optimizer
    from pneumo_cli.training.distribute import make_strategy

    replicas = int(sys.argv[1])
    strategy, _ = make_strategy(0, cpu_replicas=replicas)
    tf = import_tf()
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        net = build_model("resnet18", 64, encoder_weights=None)
        net.compile(optimizer=FusedAdam(1e-3), loss=losses.bce_loss)
    net.load_weights(sys.argv[2])
    rng = np.random.default_rng(0)
    half_x = rng.integers(0, 256, (2, 64, 64, 1)).astype(np.float32)
    half_y = (rng.random((2, 64, 64, 1)) > 0.7).astype(np.float32)
    # The same two images on each replica, so per-replica batch statistics equal the global ones.
    x = scale_input(np.concatenate([half_x, half_x]), "raw-0-255")
    y = np.concatenate([half_y, half_y])
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat(2)
    history = net.fit(dataset, epochs=2, steps_per_epoch=1, verbose=0)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                      "losses": history.history["loss"]}))
    """
)


def test_mirrored_strategy_on_two_cpu_replicas_matches_one(tmp_path: Path) -> None:
    tf = tf_engine.import_tf()
    tf.keras.utils.set_random_seed(0)
    weights = tmp_path / "start.h5"
    build.build_model("resnet18", 64, encoder_weights=None).save_weights(weights)
    results = {}
    for replicas in (1, 2):  # logical CPU devices must exist before TF starts: a fresh process
        done = subprocess.run(
            [sys.executable, "-c", MIRRORED_SCRIPT, str(replicas), str(weights)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        results[replicas] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results[2]["replicas"] == 2
    first_1, first_2 = results[1]["losses"][0], results[2]["losses"][0]
    assert first_2 == pytest.approx(first_1, rel=1e-4)
    # The second step uses the gradients all-reduced over both replicas.
    assert results[2]["losses"][1] == pytest.approx(results[1]["losses"][1], rel=1e-3)


def _real_cache(siim: Path, folder: Path, size: int) -> Path:
    import pydicom

    from pneumo_cli.io.rle import decode_union, read_rle_csv
    from tests.conftest import REAL_TRAIN_AREAS

    rows = read_rle_csv(siim / "csv" / "train-rle.csv.gz")
    samples = []
    for path in sorted((siim / "dicom-images-train").rglob("*.dcm")):
        image_id = path.stem
        pixels = pydicom.dcmread(path).pixel_array.astype(np.uint8)
        full = decode_union([r.encoded for r in rows if r.image_id == image_id], 1024, 1024)
        assert int(full.sum()) == REAL_TRAIN_AREAS[image_id]
        image = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(full.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        split = "train" if full.any() else "val"
        samples.append(Sample(image_id, image, (mask >= 0.5).astype(np.uint8), split))
    return write_cache(folder, samples, size)


def test_overfits_the_real_positive_siim_images(siim: Path, tmp_path: Path) -> None:
    cache = _real_cache(siim, tmp_path / "cache", 128)
    config = TrainConfig(cache=str(cache), epochs=3, steps_per_epoch=20,
                                  **{**FAST, "batch_size": 2})  # fmt: skip
    reporter = Recorder()
    train.train_model(config, tmp_path / "runs", reporter=reporter)
    history = runs.read_history(tmp_path / "runs" / "train")
    assert reporter.first_step_loss / history[-1]["loss"] >= 5.0
    assert history[-1]["dice"] > 0.9


@pytest.mark.slow
def test_a_real_train_process_prints_no_tensorflow_dataset_noise(cache: Path, tmp_path) -> None:
    """The tf.data `dataset.cc` warning Keras' fit triggers is dropped from stderr (the epoch
    lines and real warnings stay)."""
    from tests.robustness.conftest import cli_env, pneumo_command

    done = subprocess.run(
        pneumo_command("train", "--cache", cache, "--runs-dir", tmp_path, "--encoder",
                       "resnet18", "--encoder-weights", "none", "--epochs", "1",
                       "--steps-per-epoch", "2", "--batch-size", "2", "--gpus", "0"),
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dataset.cc" not in done.stderr and "GeneratorDatasetOp" not in done.stderr
    assert "epoch 1/1" in done.stderr
