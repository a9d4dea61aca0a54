"""`pneumo train --cv`: one run per cross-validation fold, in one folder that is an ensemble.

The sweep folder (``runs/cv`` by default) holds ``ensemble.json`` (what the sweep is: its folds,
its members, the cache and the settings) and one ordinary run per fold, ``fold0`` ...
``fold{N-1}``, each trained by :func:`~pneumo_cli.training.train.train_model` with ``--fold K``.
``ensemble.json`` is written before the first fold starts, so a sweep killed at any point is
continued by the same command (or ``--resume`` on the folder): finished folds are kept, an
unfinished fold is resumed from its last epoch (or started again if it had none), and the
sweep goes on with the next fold. Every later command that takes a run reads the folder as the
ensemble of its folds (:mod:`pneumo_cli.inference.ensemble`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo_cli import __version__
from pneumo_cli.core.config import TrainConfig, to_dict
from pneumo_cli.core.errors import ConfigError, OutputError
from pneumo_cli.core.files import atomic_write_json
from pneumo_cli.data import cache as data_cache
from pneumo_cli.training import runs
from pneumo_cli.training.checkpoints import needs_finishing
from pneumo_cli.training.settings import SilentReporter, TrainReporter, TrainResult
from pneumo_cli.training.state import FINISHED, STATE_FILE, read_state

ENSEMBLE_FILE = runs.ENSEMBLE_FILE
CV_KIND = "cross-validation"
DEFAULT_CV_NAME = "cv"
# Settings that may differ when a sweep is continued: where it trains, not what.
_DEVICE_SETTINGS = ("gpus",)


@dataclass(frozen=True)
class CrossValidationResult:
    """What ``train --cv`` reports: the sweep folder and each fold's result, in fold order."""

    run_dir: str
    folds: list[TrainResult]
    kept: list[int]  # folds finished before this call, left as they were


def fold_name(fold: int) -> str:
    return f"fold{fold}"


def _sweep_settings(config: TrainConfig) -> dict[str, Any]:
    values = to_dict(dataclasses.replace(config, fold=None))
    return {k: v for k, v in values.items() if k not in _DEVICE_SETTINGS}


def train_cross_validation(
    config: TrainConfig,
    runs_dir: str | Path = runs.DEFAULT_RUNS_DIR,
    name: str | None = None,
    reporter: TrainReporter | None = None,
    cpu_replicas: int = 1,
) -> CrossValidationResult:
    """Train one run per fold of ``config.cache`` into ``runs_dir/name`` (default ``cv``), or
    continue that sweep if it exists with the same settings.

    Raises:
        InputError: the cache has no folds (or what training raises for a fold).
        ConfigError: the folder holds a sweep with other settings or on another cache.
        OutputError: the folder exists and is not a sweep, or cannot be written.
        KeyboardInterrupt: from the fold being trained (its state is saved; run the same
            command again to continue).
    """
    reporter = reporter or SilentReporter()
    if config.fold is not None:
        raise ConfigError("--fold and --cv exclude each other: --cv trains every fold")
    cache = data_cache.read_cache(config.cache)
    folds = data_cache.cache_folds(cache)
    if folds < 2:
        data_cache.select_fold(cache, 0)  # raises the one-line "no folds" error
    config = dataclasses.replace(config, cache=str(cache.folder))
    sweep = runs.check_run_name(runs_dir, name or DEFAULT_CV_NAME, exist_ok=True)
    wanted = {
        "kind": CV_KIND,
        "folds": folds,
        "members": [fold_name(k) for k in range(folds)],
        "cache": str(cache.folder),
        "cache_manifest_sha256": cache.manifest_sha256,
        "settings": _sweep_settings(config),
    }
    recorded = read_sweep(sweep) if sweep.exists() else None
    if recorded is not None:
        _check_same_sweep(sweep, recorded, wanted)
    elif sweep.exists() and any(sweep.iterdir()):
        raise OutputError(
            f"{sweep} exists and is not a cross-validation sweep (no {ENSEMBLE_FILE}); "
            "choose another --name"
        )
    else:
        runs.create_run_dir(runs_dir, sweep.name, exist_ok=True)
        atomic_write_json(sweep / ENSEMBLE_FILE, wanted | {"pneumo_version": __version__})
    return _run_folds(sweep, config, folds, reporter, cpu_replicas)


def resume_cross_validation(
    sweep: str | Path,
    reporter: TrainReporter | None = None,
    gpus: int | None = None,
    cpu_replicas: int = 1,
) -> CrossValidationResult:
    """Continue the sweep in ``sweep`` with its recorded settings (``train --resume runs/cv``).

    Raises:
        ConfigError: not a sweep, a finished sweep, or its cache changed.
    """
    from pneumo_cli.core.config import from_dict

    reporter = reporter or SilentReporter()
    sweep = Path(sweep)
    recorded = read_sweep(sweep)
    states = [_fold_status(sweep / member) for member in recorded["members"]]
    if all(status in FINISHED for status in states):
        raise ConfigError(
            f"{sweep} has finished already (all {len(states)} folds trained); start a new "
            "sweep with another --name instead of --resume"
        )
    config = from_dict(TrainConfig, recorded["settings"], str(sweep / ENSEMBLE_FILE))
    config = dataclasses.replace(config, gpus=gpus)
    cache = data_cache.read_cache(config.cache)
    if cache.manifest_sha256 != recorded["cache_manifest_sha256"]:
        raise ConfigError(
            f"{cache.folder / 'manifest.csv'} changed since {sweep} started; continuing would "
            "train its folds on other data: start a new sweep"
        )
    return _run_folds(sweep, config, int(recorded["folds"]), reporter, cpu_replicas)


def _run_folds(
    sweep: Path, config: TrainConfig, folds: int, reporter: TrainReporter, cpu_replicas: int
) -> CrossValidationResult:
    from pneumo_cli.training.fit import result_from_summary
    from pneumo_cli.training.resume import resume_training
    from pneumo_cli.training.train import train_model

    results: list[TrainResult] = []
    kept: list[int] = []
    for fold in range(folds):
        folder = sweep / fold_name(fold)
        status = _fold_status(folder)
        if status in FINISHED and not needs_finishing(folder, config):
            reporter.note(f"fold {fold} of {folds}: {folder} finished already ({status})")
            results.append(result_from_summary(folder))
            kept.append(fold)
            continue
        reporter.note(f"fold {fold} of {folds}: training {folder}")
        if (folder / runs.CONFIG_FILE).is_file():
            result = resume_training(
                folder, sweep, reporter, gpus=config.gpus, cpu_replicas=cpu_replicas,
                mark_as_latest=False,
            )  # fmt: skip
        else:
            fold_config = dataclasses.replace(config, fold=fold)
            result = train_model(
                fold_config, sweep, fold_name(fold), exist_ok=True, reporter=reporter,
                cpu_replicas=cpu_replicas, mark_as_latest=False,
            )  # fmt: skip
        results.append(result)
    runs.mark_latest(sweep)
    return CrossValidationResult(str(sweep), results, kept)


def _fold_status(folder: Path) -> str | None:
    """The fold run's status, or None when it has not written its state yet."""
    if not (folder / STATE_FILE).is_file():
        return None
    return str(read_state(folder)["status"])


def _check_same_sweep(sweep: Path, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to continue a sweep with other settings, folds or cache than it started with."""
    hint = "run the same command as before, or choose another --name for a new sweep"
    if recorded["cache_manifest_sha256"] != wanted["cache_manifest_sha256"]:
        raise ConfigError(
            f"{sweep} was started on {recorded['cache']} with another manifest; {hint}"
        )
    if recorded["folds"] != wanted["folds"]:
        raise ConfigError(
            f"{sweep} has {recorded['folds']} folds and the cache {wanted['folds']}; {hint}"
        )
    then, now = recorded["settings"], wanted["settings"]
    differing = [f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now))
                 if then.get(k) != now.get(k)]  # fmt: skip
    if differing:
        shown = "; ".join(differing)
        raise ConfigError(f"{sweep} was started with other settings ({shown}); {hint}")


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def read_sweep(sweep: str | Path) -> dict[str, Any]:
    """A sweep's ``ensemble.json``, checked.

    Raises:
        ConfigError: missing, unreadable or not written by ``train --cv``.
    """
    path = Path(sweep) / ENSEMBLE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{Path(sweep)} is not a cross-validation sweep (no {ENSEMBLE_FILE}); was it "
            "written by `pneumo train --cv`?"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable ({exc}); restore it or train the sweep again"
        ) from None
    kinds = {"kind": str, "folds": int, "members": list, "cache": str,
             "cache_manifest_sha256": str, "settings": dict}  # fmt: skip
    if not isinstance(data, dict):
        data = {}
    bad = [k for k, kind in kinds.items() if not isinstance(data.get(k), kind)]
    if bad or data["kind"] != CV_KIND or len(data["members"]) != data["folds"]:
        raise ConfigError(
            f"{path}: not a sweep file written by `pneumo train --cv` "
            f"({'bad ' + ', '.join(bad) if bad else 'inconsistent folds and members'}); "
            "restore it or train the sweep again"
        )
    for member in data["members"]:
        if not isinstance(member, str) or "/" in member or member.startswith("."):
            raise ConfigError(f"{path}: member {member!r} is not a folder name of the sweep")
    return data
