"""Ensembles: several runs, or a cross-validation sweep, predicting as one model.

Each member runs its own network (in the precision and engine chosen for it, with its own TTA)
and the members' probability maps are averaged before the one gate. Members must share the
preprocessing that shapes their input (:data:`SHARED_SETTINGS`: the border crop and CLAHE); they
may differ in encoder, input scaling and image size. The image is prepared once at the largest
member's size; a smaller member gets it area-resized to its own size, and its map is resized
back bilinearly before the average, so the average is taken on one grid that is then restored
to the original pixels like any single run's map (restoring is linear, so averaging before or
after it gives the same map up to rounding). An ensemble of one run is that run's own
:class:`~pneumo_cli.inference.predictor.Predictor`.

The gate: a sweep's own ``postprocess.json`` (written by ``evaluate --tune`` on its
out-of-fold maps), else the default; for runs given one by one, their gate when they all have
the same, else the default (with a note).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.inference.postprocess import POSTPROCESS_FILE, Gate, load_gate

# Preprocessing settings that must be equal across members: they decide what the image shows
# and how its contrast is set. The image size may differ (see the module docstring).
SHARED_SETTINGS = ("crop_border", "crop_threshold", "crop_min_keep", "clahe", "clahe_clip",
                   "clahe_grid", "downscale_first")  # fmt: skip


@dataclass(frozen=True)
class Members:
    """The run folders an ensemble is made of, resolved and checked to exist.

    ``source`` is the sweep folder for a sweep, else the first run; ``sweep`` is True for a
    cross-validation sweep (the folder holds the ensemble's gate).
    """

    source: Path
    runs: tuple[Path, ...]
    sweep: bool

    @property
    def gate_path(self) -> Path | None:
        return self.source / POSTPROCESS_FILE if self.sweep else None


def sweep_members(sweep: Path) -> list[Path]:
    """The fold runs of a sweep, each finished.

    Raises:
        ConfigError: a bad ``ensemble.json``.
        InputError: a fold not trained yet or stopped before it finished.
    """
    from pneumo_cli.training.cv import read_sweep
    from pneumo_cli.training.state import FINISHED, STATE_FILE, read_state

    recorded = read_sweep(sweep)
    members = []
    for fold, name in enumerate(recorded["members"]):
        run = sweep / name
        status = read_state(run)["status"] if (run / STATE_FILE).is_file() else "not trained"
        if status not in FINISHED:
            raise InputError(
                f"fold {fold} of {sweep} is {str(status).replace('_', ' ')}, not finished; "
                f"finish the sweep with `pneumo train --resume {sweep}`"
            )
        members.append(run)
    return members


def resolve_members(
    given: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    runs_dir: str | os.PathLike[str] | None = None,
) -> Members:
    """The runs ``--run`` names (None or empty: the latest run or sweep); a sweep among them
    stands for its folds.

    Raises:
        ConfigError: a folder that is neither a run nor a sweep, or a run given twice.
        InputError: an unfinished fold of a sweep.
    """
    from pneumo_cli.training.cv import is_sweep
    from pneumo_cli.training.runs import DEFAULT_RUNS_DIR, resolve_run

    if given is None or isinstance(given, (str, os.PathLike)):
        given = [] if given is None else [given]
    folders = [resolve_run(run, runs_dir or DEFAULT_RUNS_DIR) for run in given] or [
        resolve_run(None, runs_dir or DEFAULT_RUNS_DIR)
    ]
    members: list[Path] = []
    for folder in folders:
        members.extend(sweep_members(folder) if is_sweep(folder) else [folder])
    seen: dict[Path, Path] = {}
    for run in members:
        key = run.resolve()
        if key in seen:
            raise ConfigError(f"{run} is in the ensemble twice; give each run once")
        seen[key] = run
    single_sweep = len(folders) == 1 and is_sweep(folders[0])
    return Members(folders[0], tuple(members), single_sweep)


def check_members_agree(opened: Sequence[Any]) -> None:
    """Refuse members preprocessed differently (:data:`SHARED_SETTINGS`).

    ``opened`` are :class:`~pneumo_cli.inference.predictor.RunForInference` (or anything with
    ``run_dir`` and ``settings``).

    Raises:
        ConfigError: naming the member, the setting and both values.
    """
    first = opened[0]
    for member in opened[1:]:
        for name in SHARED_SETTINGS:
            mine, theirs = getattr(member.settings, name), getattr(first.settings, name)
            if mine != theirs:
                raise ConfigError(
                    f"ensemble member {member.run_dir} was preprocessed with {name} {mine}, "
                    f"{first.run_dir} with {name} {theirs}: members must share the crop and CLAHE "
                    "settings; leave one of them out"
                )
        if first.settings.downscale_first and member.image_size != first.image_size:
            # CLAHE runs at the image size there: a shrunk larger image is not what it trained on.
            raise ConfigError(
                f"ensemble members {member.run_dir} ({member.image_size} px) and "
                f"{first.run_dir} ({first.image_size} px) were preprocessed with "
                "--downscale-first, which applies CLAHE at the image size: such members must "
                "share one image size; leave one of them out"
            )


def ensemble_gate(members: Members, gates: Sequence[Gate]) -> tuple[Gate, str, list[str]]:
    """The gate an ensemble applies, where it comes from, and notes for stderr."""
    path = members.gate_path
    if path is not None:
        if path.is_file():
            return load_gate(path), str(path.absolute()), []
        return Gate(), "default", []
    if all(gate == gates[0] for gate in gates):
        return gates[0], "members' own", []
    note = (
        "the ensemble's members have different post-processing gates; using the default gate "
        "(tune one for the ensemble with a cross-validation sweep's `evaluate --tune`, or pass "
        "--top-threshold and friends)"
    )
    return Gate(), "default", [note]


@dataclass
class EnsemblePredictor:
    """Several runs predicting as one: the average of their probability maps.

    Offers what :class:`~pneumo_cli.inference.predictor.Predictor` offers (``settings``,
    ``gate``, ``tta``, ``image_size``, ``source``, ``precision``, ``engine``, ``notes``,
    ``probabilities``) and ``members``. ``settings`` are the largest member's.
    """

    source: Path
    members: list[Any]
    gate: Gate
    gate_source: str
    sweep: bool
    notes: list[tuple[str, str]] = field(default_factory=list)
    _resizers: list[Callable[[np.ndarray], np.ndarray] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        size = self.image_size
        self._resizers = [None if m.image_size == size else _shrinker(m.image_size)
                          for m in self.members]  # fmt: skip

    @property
    def run_dir(self) -> Path:
        return self.source

    @property
    def settings(self) -> PreprocessConfig:
        return max(self.members, key=lambda m: m.image_size).settings

    @property
    def image_size(self) -> int:
        return max(m.image_size for m in self.members)

    @property
    def tta(self) -> str:
        return str(self.members[0].tta)

    @property
    def precision(self) -> str:
        return _joined(m.precision for m in self.members)

    @property
    def engine(self) -> str:
        return _joined(m.engine for m in self.members)

    @property
    def precision_reason(self) -> str:
        return _joined((m.precision_reason for m in self.members), "; ")

    @property
    def precision_check(self) -> dict[str, Any] | None:
        checks = {str(getattr(m, "model_path", None) or m.run_dir): m.precision_check
                  for m in self.members if m.precision_check}  # fmt: skip
        return {"members": checks} if checks else None

    @property
    def config(self) -> dict[str, Any]:
        """The run's config.json for one run's checkpoints; for several runs what callers read
        of it: the training cache (the first member's)."""
        if len({str(m.run_dir) for m in self.members}) == 1:
            return dict(self.members[0].config)
        return {"cache": self.members[0].config.get("cache", "cache")}

    @property
    def member_dirs(self) -> list[Path]:
        return [Path(m.run_dir) for m in self.members]

    @property
    def member_models(self) -> list[Path]:
        """Every model file the ensemble runs, in order (nested ensembles flattened)."""
        found: list[Path] = []
        for member in self.members:
            nested = getattr(member, "member_models", None)
            found.extend(nested if nested is not None else [Path(member.model_path)])
        return found

    def member_probabilities(self, images: np.ndarray) -> list[np.ndarray]:
        """Each member's float32 (B, S, S) maps of uint8 (B, S, S) images prepared at
        :attr:`image_size`, on that grid."""
        size = images.shape[-1]
        maps = []
        for member, shrink in zip(self.members, self._resizers, strict=True):
            probs = np.asarray(member.probabilities(images if shrink is None else shrink(images)))
            maps.append(probs if probs.shape[-1] == size else _enlarge(probs, size))
        return maps

    @staticmethod
    def mean_of(maps: list[np.ndarray]) -> np.ndarray:
        """The members' mean map, summed in member order in float32."""
        total = maps[0].astype(np.float32)
        for probs in maps[1:]:
            total = total + probs
        return total / np.float32(len(maps))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S) prepared at :attr:`image_size` -> float32 (B, S, S), the members'
        mean."""
        return self.mean_of(self.member_probabilities(images))


def member_label(member: Any) -> str:
    """How a member is named in reports: its run folder, or for one of a run's top checkpoints
    (any model file but best.keras) that file."""
    path = getattr(member, "model_path", None)
    if path is None or Path(path).name == "best.keras":
        return str(member.run_dir)
    return str(path)


def _joined(values: Any, separator: str = "+") -> str:
    unique: list[str] = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return separator.join(unique)


def _shrinker(size: int) -> Callable[[np.ndarray], np.ndarray]:
    from pneumo_cli.data.imaging import resize_image

    return lambda images: np.stack([resize_image(image, size) for image in images])


def _enlarge(probs: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR) for p in probs])


def load_ensemble(
    members: Members,
    tta: str = "none",
    precision: str = "auto",
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None = None,
    engine: str = "auto",
) -> EnsemblePredictor:
    """Open every member, check they agree (:func:`check_members_agree`), then load each one's
    network (:func:`~pneumo_cli.inference.predictor.load_predictor`, each with its own
    precision check).

    Raises:
        ConfigError: members preprocessed differently, or what loading one run raises.
        InputError, UsageError: as :func:`~pneumo_cli.inference.predictor.load_predictor`.
    """
    from pneumo_cli.core.choices import Tta, check_choice
    from pneumo_cli.inference.predictor import open_run_for_inference

    check_choice(Tta, tta, "--tta")
    opened = [open_run_for_inference(run) for run in members.runs]
    check_members_agree(opened)
    gate, gate_source, gate_notes = ensemble_gate(members, [o.gate for o in opened])
    loaded = [load_run(run, tta, precision, parity_inputs, engine, o) for run, o in
              zip(members.runs, opened, strict=True)]  # fmt: skip
    notes = [("note", note) for note in gate_notes]
    for member in loaded:
        notes.extend((level, f"{member.run_dir.name}: {text}") for level, text in member.notes)
    return EnsemblePredictor(members.source, loaded, gate, gate_source, members.sweep, notes)


def load_run(
    run: Path,
    tta: str = "none",
    precision: str = "auto",
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None = None,
    engine: str = "auto",
    opened: Any = None,
) -> Any:
    """One run ready for inference: its :class:`~pneumo_cli.inference.predictor.Predictor`,
    or for a run that keeps its top checkpoints as an ensemble (``train --keep-top N --top-use
    ensemble``) the :class:`EnsemblePredictor` of those checkpoints, under the run's gate."""
    from pneumo_cli.inference.predictor import load_predictor, open_run_for_inference

    opened = opened or open_run_for_inference(run)
    if len(opened.model_paths) <= 1:
        return load_predictor(run, tta, precision, parity_inputs, engine)
    loaded = [load_predictor(run, tta, precision, parity_inputs, engine, model_file=path)
              for path in opened.model_paths]  # fmt: skip
    notes = []
    for member, path in zip(loaded, opened.model_paths, strict=True):
        notes.extend((level, f"{path.name}: {text}") for level, text in member.notes)
    return EnsemblePredictor(run, loaded, opened.gate, "the run's", False, notes)
