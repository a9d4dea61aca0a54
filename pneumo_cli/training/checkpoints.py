"""`train --keep-top N`: the N best epochs' models, and what a run makes of them.

While a run trains, ``RUN/top/epoch-NNNN.keras`` holds the model of each of the N epochs with
the best validation Dice so far (``state.json`` lists them as ``top``: a file is written before
the state that names it, and files the state does not name are removed). When the run
finishes, :func:`finish_top` writes

- ``averaged.keras``: the N models' weights averaged, then every trainable BatchNormalization's
  statistics recomputed on training images (the averaged weights see other activations than
  any one epoch's statistics were made for), and
- ``checkpoints.json``: the N epochs, and the validation Dice (SIIM per image, threshold 0.5) of
  the best epoch, the averaged model and the mean of the N models' maps, measured on the run's
  own validation images, and ``use``: what inference uses (``--top-use``).

``use`` ``average`` makes ``averaged.keras`` the run's model; ``ensemble`` makes the run an
ensemble of its N checkpoints (:mod:`pneumo_cli.inference.ensemble`); ``best`` keeps
``best.keras``. A run without ``--keep-top`` (N = 1) uses ``best.keras``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.files import atomic_write_json

TOP_DIR = "top"
AVERAGED_MODEL_FILE = "averaged.keras"
CHECKPOINTS_FILE = "checkpoints.json"
# Training images whose batches recompute the averaged model's BatchNorm statistics (all of
# them when fewer): enough for stable means at any batch size, bounded in time on a CPU.
BN_IMAGES = 1024


def top_file(epoch: int) -> str:
    return f"{TOP_DIR}/epoch-{epoch:04d}.keras"


def update_top(
    run_dir: Path, state: dict[str, Any], net: Any, epoch: int, val_dice: float, keep: int
) -> None:
    """Keep ``net`` among the ``keep`` best epochs (``state["top"]``, best first; ties to the
    earlier epoch) and delete the file of the epoch it pushes out. Call before the state is
    saved."""
    from pneumo_cli.model import saving

    if keep < 2 or math.isnan(val_dice):
        return
    before = [list(entry) for entry in state.get("top", [])]
    ranked = sorted([*before, [epoch, val_dice]], key=lambda e: (-e[1], e[0]))[:keep]
    if [epoch, val_dice] in ranked:
        (run_dir / TOP_DIR).mkdir(exist_ok=True)
        saving.save_model(net, run_dir / top_file(epoch))
    state["top"] = ranked
    prune_top(run_dir, ranked)


def prune_top(run_dir: Path, top: list[list[Any]]) -> None:
    """Remove the checkpoint files of ``top/`` that ``top`` does not name (what a killed run
    left between writing a file and the state)."""
    folder = run_dir / TOP_DIR
    if not folder.is_dir():
        return
    named = {Path(top_file(int(epoch))).name for epoch, _ in top}
    for path in folder.glob("epoch-*.keras"):
        if path.name not in named:
            with contextlib.suppress(OSError):
                path.unlink()


def top_epochs(state: dict[str, Any], run_dir: Path) -> list[int]:
    """The kept epochs, best first.

    Raises:
        ConfigError: ``top`` in state.json is not a list of [epoch, val_dice] pairs.
    """
    top = state.get("top", [])
    ok = isinstance(top, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) for e in top
    )
    if not ok:
        raise ConfigError(f"{run_dir / 'state.json'}: 'top' is not a list of [epoch, dice]")
    return [int(epoch) for epoch, _ in top]


def needs_finishing(run_dir: Path, config: Any) -> bool:
    """Whether a finished run with ``--keep-top`` has not yet written its checkpoints.json."""
    return config.keep_top >= 2 and not (run_dir / CHECKPOINTS_FILE).is_file()


def finish_top(run_dir: Path, config: Any, scaling: str, state: dict[str, Any], note: Any) -> dict:
    """Write ``averaged.keras`` and ``checkpoints.json`` for a finished run (module docstring).

    Returns:
        The contents of ``checkpoints.json``.
    """
    from pneumo_cli.model import saving
    from pneumo_cli.training.setup import load_training_data

    epochs = top_epochs(state, run_dir)
    _, train_records, val_records = load_training_data(config)
    models = [saving.load_model(run_dir / top_file(epoch)) for epoch in epochs]
    note(f"averaging the weights of epochs {', '.join(map(str, epochs))} of {run_dir}")
    averaged = average_weights(models)
    bn_images = recompute_batch_norm(
        averaged, train_records[:BN_IMAGES], scaling, config.batch_size, config.image_size
    )
    saving.save_model(averaged, run_dir / AVERAGED_MODEL_FILE)
    scores = _val_dice(models, averaged, val_records, scaling, config)
    result = {
        "keep_top": config.keep_top,
        "top": [{"epoch": e, "val_dice": d, "file": top_file(e)} for e, d in state["top"]],
        "use": config.top_use,
        "val_dice": scores,
        "bn_images": bn_images,
    }
    atomic_write_json(run_dir / CHECKPOINTS_FILE, result)
    note(
        f"validation Dice: best epoch {scores['best']:.4f}, averaged {scores['averaged']:.4f}, "
        f"mean of the {len(models)} models {scores['top_ensemble']:.4f}; inference uses "
        f"{config.top_use}"
    )
    return result


def average_weights(models: list[Any]) -> Any:
    """A copy of ``models[0]`` whose every weight is the mean over ``models`` (same
    architecture)."""
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    twin = tf.keras.models.clone_model(models[0])
    stacks = zip(*(model.get_weights() for model in models), strict=True)
    twin.set_weights([np.mean(np.stack(s).astype(np.float64), axis=0).astype(s[0].dtype)
                      for s in stacks])  # fmt: skip
    return twin


def _batch_norms(model: Any) -> list[Any]:
    from pneumo_cli.engine.tf import import_tf

    kind = import_tf().keras.layers.BatchNormalization
    return [layer for layer in model.submodules if isinstance(layer, kind) and layer.trainable]


def recompute_batch_norm(
    model: Any, records: list[Any], scaling: str, batch_size: int, image_size: int | None
) -> int:
    """Replace the moving mean and variance of every trainable BatchNormalization by their mean
    over the batches of ``records`` (not augmented), the other weights unchanged. Frozen ones
    (the fixed input normalisation) are left as they are. Returns the images used.

    The running average is exact: at batch ``t`` (from 0) the layer's momentum is t/(t+1), so
    after T batches each statistic is the plain mean of the T batch statistics.
    """
    from pneumo_cli.data.pipeline import make_eval_dataset

    layers = _batch_norms(model)
    if not layers or not records:
        return 0
    size = image_size or int(model.input_shape[1])
    dataset = make_eval_dataset(records, size, scaling, batch_size).dataset
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    try:
        for t, (x, _) in enumerate(dataset):
            for layer in layers:
                layer.momentum = t / (t + 1)
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    return len(records)


def _val_dice(
    models: list[Any], averaged: Any, records: list[Any], scaling: str, config: Any
) -> dict[str, float]:
    """Mean per-image SIIM Dice at threshold 0.5 on ``records``: of the best epoch
    (``models[0]``), the averaged model, and the mean of the models' maps."""
    from pneumo_cli.core.metrics import dice_from_counts
    from pneumo_cli.data.pipeline import make_eval_dataset

    dataset = make_eval_dataset(records, config.image_size, scaling, config.batch_size).dataset
    sums = {"best": [], "averaged": [], "top_ensemble": []}
    for x, y in dataset:
        truth = y.numpy()[..., 0] > 0.5
        maps = [np.asarray(model(x, training=False), np.float32)[..., 0] for model in models]
        outputs = {
            "best": maps[0],
            "averaged": np.asarray(averaged(x, training=False), np.float32)[..., 0],
            "top_ensemble": np.mean(maps, axis=0),
        }
        for name, probs in outputs.items():
            pred = probs > 0.5
            inter = (pred & truth).sum(axis=(1, 2))
            dice = dice_from_counts(inter, truth.sum(axis=(1, 2)), pred.sum(axis=(1, 2)))
            sums[name].extend(float(d) for d in dice)
    return {name: float(np.mean(values)) for name, values in sums.items()}


def read_checkpoints(run_dir: Path) -> dict[str, Any]:
    """A finished ``--keep-top`` run's ``checkpoints.json``, checked.

    Raises:
        InputError: missing (the run has not finished, or was killed while finishing).
        ConfigError: unreadable or not pneumo's.
    """
    path = run_dir / CHECKPOINTS_FILE
    if not path.is_file():
        raise InputError(
            f"{run_dir} keeps its top checkpoints but has no {CHECKPOINTS_FILE} yet: finish it "
            f"with `pneumo train --resume {run_dir}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = [str(entry["file"]) for entry in data["top"]]
        use = str(data["use"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); finish the run again or retrain") from None
    unsafe = [f for f in files if not f.startswith(f"{TOP_DIR}/") or ".." in f]
    if use not in ("average", "ensemble", "best") or unsafe:
        raise ConfigError(f"{path}: not written by `pneumo train --keep-top`")
    return data


def inference_models(run_dir: Path, config: dict[str, Any]) -> list[Path]:
    """The model files inference runs for a run: ``best.keras``; with ``--keep-top``,
    ``averaged.keras`` or the top checkpoints, as the run's ``use`` says.

    Raises:
        InputError: a file the run should have is missing.
    """
    from pneumo_cli.training.runs import BEST_MODEL_FILE

    keep = config.get("keep_top", 1)
    if not isinstance(keep, int) or keep < 2:
        return [run_dir / BEST_MODEL_FILE]
    data = read_checkpoints(run_dir)
    files = {"average": [AVERAGED_MODEL_FILE], "best": [BEST_MODEL_FILE]}.get(
        data["use"], [e["file"] for e in data["top"]]
    )
    paths = [run_dir / name for name in files]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path} is missing; train the run again")
    return paths
