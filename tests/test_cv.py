"""Cross-validation training: `train --fold K`, `train --cv` sweeps and continuing a killed one
(64 px, resnet18, no augmentation, CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import TrainConfig
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.model import saving
from pneumo_cli.training import cv, runs, train
from tests.cachefactory import synthetic_cache

pytestmark = pytest.mark.slow

FAST = dict(
    encoder="resnet18", encoder_weights="none", batch_size=4, lr=1e-3, augment=False,
    precision="fp32", epochs=2, steps_per_epoch=2, patience=0, gpus=0,
)  # fmt: skip


class Interrupter:
    """A reporter that raises KeyboardInterrupt (Ctrl-C) at the end of the ``at``-th epoch it
    sees, counting over the whole sweep."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.epochs = 0
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step_done(self, step: int, logs: dict[str, float]) -> None:
        pass

    def epoch_done(self, row: dict[str, Any], epochs: int) -> None:
        self.epochs += 1
        if self.epochs == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 labelled train/val images in 3 folds, one labelled test image, one unlabelled."""
    return synthetic_cache(tmp_path_factory.mktemp("folded"), n_train=8, n_val=4, folds=3)


def _manifest_folds(cache: Path) -> dict[str, tuple[str, int]]:
    with open(cache / "manifest.csv", newline="") as handle:
        return {row["ImageId"]: (row["split"], int(row["fold"])) for row in csv.DictReader(handle)}


def test_fold_k_images_are_in_no_training_batch(
    folded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every image of every training batch of fold 1's run is matched, pixel for pixel, to a
    cache image: none is in fold 1 or the test split; validation is fold 1 exactly."""
    from pneumo_cli.data import pipeline
    from pneumo_cli.training import fit

    seen: dict[str, list] = {"train": [], "val": []}
    make_train, make_eval = pipeline.make_train_dataset, pipeline.make_eval_dataset

    def spy_train(records: Any, *args: Any, **kwargs: Any) -> Any:
        made = make_train(records, *args, **kwargs)
        seen["train"].extend(x.numpy() for x, _ in made.dataset)
        return made

    def spy_eval(records: Any, *args: Any, **kwargs: Any) -> Any:
        seen["val"].extend(r.image_id for r in records)
        return make_eval(records, *args, **kwargs)

    monkeypatch.setattr(fit.data_pipeline, "make_train_dataset", spy_train)
    monkeypatch.setattr(fit.data_pipeline, "make_eval_dataset", spy_eval)
    config = TrainConfig(cache=str(folded), fold=1, **{**FAST, "steps_per_epoch": 6})
    result = train.train_model(config, tmp_path, name="fold1")

    where = _manifest_folds(folded)
    pixels = {
        cv2.imread(str(folded / "images" / f"{image_id}.png"), 0).tobytes(): image_id
        for image_id in where
    }
    trained = [
        pixels[image[..., 0].astype(np.uint8).tobytes()]
        for batch in seen["train"]
        for image in batch
    ]
    assert len(trained) == 2 * 6 * 4  # every sample of both epochs was matched to its image
    assert {where[i][1] for i in trained} == {0, 2}  # the other folds, both of them
    assert sorted(seen["val"]) == sorted(i for i, (_, fold) in where.items() if fold == 1)

    saved = runs.load_run_config(result.run_dir)
    assert saved["fold"] == 1 and saved["folds"] == 3
    assert saved["train_images"] == 8 and saved["val_images"] == 4
    # splits.csv records how the run used each image, so evaluate cannot score a training
    # image of this run as held out (some of fold 0's images are in the cache's val split).
    roles = runs.read_splits(result.run_dir)
    assert {roles[i] for i, (_, fold) in where.items() if fold == 1} == {"val"}
    assert {roles[i] for i, (_, fold) in where.items() if fold in (0, 2)} == {"train"}
    assert roles["test000"] == "test"


@pytest.mark.parametrize(
    ("fold", "cache_folds", "message"),
    [
        (0, 0, r"has no cross-validation folds; preprocess it again with --folds N"),
        (3, 3, r"--fold 3 is not a fold of cache .*: its folds are 0\.\.2"),
    ],
)
def test_fold_without_folds_or_out_of_range_is_refused(
    tmp_path: Path, fold: int, cache_folds: int, message: str
) -> None:
    cache = synthetic_cache(tmp_path / "cache", n_train=6, n_val=3, folds=cache_folds)
    config = TrainConfig(cache=str(cache), fold=fold, **FAST)
    with pytest.raises(InputError, match=message):
        train.train_model(config, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # refused before any folder was made

    result = CliRunner().invoke(
        app, ["train", "--cache", str(cache), "--fold", str(fold), "--runs-dir",
              str(tmp_path / "runs"), "--encoder", "resnet18", "--encoder-weights", "none"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert str(cache) in result.stderr and "folds" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cv_usage_errors_exit_2(folded: Path, tmp_path: Path) -> None:
    for extra, word in ((["--fold", "1"], "--fold"), (["--exist-ok"], "--exist-ok")):
        result = CliRunner().invoke(
            app, ["train", "--cv", "--cache", str(folded), "--runs-dir", str(tmp_path), *extra]
        )
        assert result.exit_code == 2, result.output
        assert word in result.stderr
    assert not any(tmp_path.iterdir())


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _weights(path: Path) -> list[np.ndarray]:
    return saving.load_model(path).get_weights()


def test_killed_sweep_continues_at_the_unfinished_fold_and_ends_like_an_uninterrupted_one(
    folded: Path, tmp_path: Path
) -> None:
    config = TrainConfig(cache=str(folded), **FAST)
    straight = cv.train_cross_validation(config, tmp_path / "a", "cv")
    assert [Path(r.run_dir).name for r in straight.folds] == ["fold0", "fold1", "fold2"]
    assert runs.resolve_run(None, tmp_path / "a") == tmp_path / "a" / "cv"

    # Ctrl-C at the end of the first epoch of fold 1 (the sweep's third epoch).
    with pytest.raises(KeyboardInterrupt):
        cv.train_cross_validation(config, tmp_path / "b", "cv", reporter=Interrupter(at=3))
    sweep = tmp_path / "b" / "cv"
    assert json.loads((sweep / "fold1" / "state.json").read_text())["status"] == "interrupted"
    assert not (sweep / "fold2").exists()

    reporter = Interrupter()
    again = cv.train_cross_validation(config, tmp_path / "b", "cv", reporter=reporter)
    assert again.kept == [0]  # fold 0 was finished: kept, not trained again
    assert reporter.epochs == 1 + 2  # fold 1's second epoch, then fold 2
    assert any("resuming" in note and "fold1" in note for note in reporter.notes)

    first = tmp_path / "a" / "cv"
    assert _tree(sweep) == _tree(first)
    ours, theirs = (
        json.loads((sweep / "ensemble.json").read_text()),
        json.loads((first / "ensemble.json").read_text()),
    )
    assert ours["members"] == theirs["members"] == ["fold0", "fold1", "fold2"]
    assert ours["settings"] == theirs["settings"]
    for member in ours["members"]:
        history, reference = runs.read_history(sweep / member), runs.read_history(first / member)
        assert [r["epoch"] for r in history] == [r["epoch"] for r in reference] == [1, 2]
        np.testing.assert_allclose(
            [r["val_loss"] for r in history], [r["val_loss"] for r in reference], rtol=1e-4
        )
        for mine, other in zip(
            _weights(sweep / member / "best.keras"),
            _weights(first / member / "best.keras"),
            strict=True,
        ):
            np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)

    # A finished sweep: the same command keeps every fold; --resume says it is finished.
    done = cv.train_cross_validation(config, tmp_path / "b", "cv")
    assert done.kept == [0, 1, 2]
    with pytest.raises(ConfigError, match="has finished already .all 3 folds"):
        cv.resume_cross_validation(sweep)


def test_sweep_refuses_other_settings_and_resumes_through_the_cli(
    folded: Path, tmp_path: Path
) -> None:
    config = TrainConfig(cache=str(folded), **FAST)
    with pytest.raises(KeyboardInterrupt):
        cv.train_cross_validation(config, tmp_path, "cv", reporter=Interrupter(at=1))
    with pytest.raises(ConfigError, match=r"started with other settings \(lr 0\.001 -> 0\.01\)"):
        cv.train_cross_validation(TrainConfig(cache=str(folded), **{**FAST, "lr": 1e-2}),
                                  tmp_path, "cv")  # fmt: skip

    result = CliRunner().invoke(
        app, ["train", "--resume", str(tmp_path / "cv"), "--gpus", "0", "--json", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["run_dir"] == str(tmp_path / "cv") and report["kept"] == []
    assert [r["status"] for r in report["folds"]] == ["completed"] * 3
    assert [r["epochs_done"] for r in report["folds"]] == [2, 2, 2]


def test_a_damaged_sweep_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "ensemble.json").write_text('{"kind": "cross-validation"}')
    with pytest.raises(ConfigError, match=r"ensemble.json: not a sweep file .*bad folds"):
        cv.read_sweep(tmp_path / "cv")
