"""`train --keep-top N`: the kept epochs, weight averaging with recomputed BatchNorm statistics,
and what inference uses of them (64 px, resnet18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pneumo_cli.training import checkpoints


def test_the_n_best_epochs_are_kept_and_the_rest_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pneumo_cli.model import saving

    monkeypatch.setattr(saving, "save_model", lambda net, path: Path(path).write_text(str(net)))
    state: dict[str, Any] = {}
    dice = [0.1, 0.5, 0.3, float("nan"), 0.6, 0.2, 0.5]
    for epoch, value in enumerate(dice, start=1):
        checkpoints.update_top(tmp_path, state, f"net{epoch}", epoch, value, keep=3)
    # Best first; the tie at 0.5 goes to the earlier epoch; NaN is never kept.
    assert state["top"] == [[5, 0.6], [2, 0.5], [7, 0.5]]
    kept = sorted(p.name for p in (tmp_path / "top").iterdir())
    assert kept == ["epoch-0002.keras", "epoch-0005.keras", "epoch-0007.keras"]
    assert (tmp_path / "top" / "epoch-0007.keras").read_text() == "net7"
    # A file the state does not name (a kill between the write and the state) goes.
    (tmp_path / "top" / "epoch-0009.keras").write_text("orphan")
    checkpoints.prune_top(tmp_path, state["top"])
    assert len(list((tmp_path / "top").iterdir())) == 3

    quiet: dict[str, Any] = {}
    checkpoints.update_top(tmp_path / "none", quiet, "net", 1, 0.9, keep=1)
    assert quiet == {} and not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pneumo_cli.core.config import TrainConfig
    from pneumo_cli.training import train
    from tests.cachefactory import synthetic_cache

    root = tmp_path_factory.mktemp("kept")
    cache = synthetic_cache(root / "cache", n_train=8, n_val=4)
    config = TrainConfig(
        cache=str(cache), encoder="resnet18", encoder_weights="none", batch_size=4, lr=1e-3,
        augment=False, precision="fp32", epochs=5, steps_per_epoch=3, patience=0, gpus=0,
        keep_top=3, input_norm="trainable",
    )  # fmt: skip
    return Path(train.train_model(config, root / "runs").run_dir)


@pytest.mark.slow
def test_keep_top_writes_the_best_epochs_an_averaged_model_and_their_scores(
    kept_run: Path,
) -> None:
    from pneumo_cli.model import saving
    from pneumo_cli.training import runs

    history = runs.read_history(kept_run)
    ranked = sorted(history, key=lambda r: (-r["val_dice"], r["epoch"]))[:3]
    recorded = json.loads((kept_run / "checkpoints.json").read_text())
    assert [e["epoch"] for e in recorded["top"]] == [r["epoch"] for r in ranked]
    assert recorded["use"] == "average" and recorded["keep_top"] == 3
    assert recorded["bn_images"] == 8
    assert set(recorded["val_dice"]) == {"best", "averaged", "top_ensemble"}
    summary = json.loads((kept_run / "summary.json").read_text())
    assert recorded["val_dice"]["best"] == pytest.approx(summary["best_val_dice"], abs=1e-4)
    assert sorted(p.name for p in (kept_run / "top").iterdir()) == sorted(
        f"epoch-{r['epoch']:04d}.keras" for r in ranked
    )

    # Every weight but the BatchNorm statistics is the mean of the three epochs' weights.
    tops = [saving.load_model(kept_run / e["file"]) for e in recorded["top"]]
    averaged = saving.load_model(kept_run / "averaged.keras")
    statistics = {id(v) for layer in checkpoints._batch_norms(averaged)
                  for v in (layer.moving_mean, layer.moving_variance)}  # fmt: skip
    compared = 0
    for index, variable in enumerate(averaged.weights):
        mean = np.mean([m.weights[index].numpy() for m in tops], axis=0)
        if id(variable) in statistics:
            continue
        np.testing.assert_allclose(variable.numpy(), mean, rtol=1e-5, atol=1e-6)
        compared += 1
    assert compared > 50 and len(statistics) > 20


@pytest.mark.slow
def test_batch_norm_statistics_are_the_mean_over_the_training_batches(kept_run: Path) -> None:
    from pneumo_cli.data import cache as data_cache
    from pneumo_cli.data.pipeline import make_eval_dataset
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model import saving

    tf = import_tf()
    model = saving.load_model(kept_run / "averaged.keras")
    records = data_cache.select_split(data_cache.read_cache(kept_run.parent.parent / "cache"),
                                      "train")  # fmt: skip
    layers = checkpoints._batch_norms(model)[:4] + checkpoints._batch_norms(model)[-2:]
    probe = tf.keras.Model(model.inputs, [layer.input for layer in layers])
    checkpoints.recompute_batch_norm(model, records, "raw-0-255", 3, 64)  # batches 3, 3, 2
    means = []
    for x, _ in make_eval_dataset(records, 64, "raw-0-255", 3).dataset:
        outputs = probe(x, training=True)
        means.append([tf.reduce_mean(o, axis=(0, 1, 2)).numpy() for o in outputs])
    for index, layer in enumerate(layers):
        expected = np.mean([batch[index] for batch in means], axis=0)
        np.testing.assert_allclose(layer.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inference_uses_the_averaged_model_or_the_ensemble_of_the_checkpoints(
    kept_run: Path, tmp_path: Path
) -> None:
    from pneumo_cli.inference.ensemble import EnsemblePredictor
    from pneumo_cli.inference.loading import open_predictor
    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import cache_sources

    sources, load = cache_sources(kept_run.parent.parent / "cache", "val")
    images = np.stack([load(row).image for _, row in sources])
    averaged = open_predictor(kept_run, precision="fp32", engine="keras")
    assert averaged.model_path == kept_run / "averaged.keras"

    as_ensemble = tmp_path / "run"
    shutil.copytree(kept_run, as_ensemble)
    recorded = json.loads((as_ensemble / "checkpoints.json").read_text())
    (as_ensemble / "checkpoints.json").write_text(json.dumps({**recorded, "use": "ensemble"}))
    three = open_predictor(as_ensemble, precision="fp32", engine="keras")
    assert isinstance(three, EnsemblePredictor)
    files = [as_ensemble / e["file"] for e in recorded["top"]]
    assert three.member_models == files
    by_hand = np.mean([load_predictor(as_ensemble, precision="fp32", engine="keras",
                                      model_file=f).probabilities(images) for f in files],
                      axis=0)  # fmt: skip
    np.testing.assert_allclose(three.probabilities(images), by_hand, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_run_killed_while_averaging_is_finished_by_resume(kept_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pneumo_cli.cli.main import app
    from pneumo_cli.training import runs
    from pneumo_cli.training.resume import resume_training

    run = tmp_path / "run"
    shutil.copytree(kept_run, run)
    (run / "checkpoints.json").unlink()
    (run / "averaged.keras").unlink()
    result = CliRunner().invoke(app, ["predict", "--cache", str(kept_run.parent.parent / "cache"),
                                      "--split", "val", "--run", str(run), "--out",
                                      str(tmp_path / "p")])  # fmt: skip
    assert result.exit_code == 1
    assert f"finish it with `pneumo train --resume {run}`" in result.stderr
    epochs = len(runs.read_history(run))
    done = resume_training(run, tmp_path)
    assert done.status in ("completed", "early_stopped")
    assert len(runs.read_history(run)) == epochs  # nothing trained again
    assert (run / "averaged.keras").is_file() and (run / "checkpoints.json").is_file()
