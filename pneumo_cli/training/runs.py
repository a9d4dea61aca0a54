"""Run folders: where `pneumo train` writes, and how later commands find a run.

Runs live under a runs folder (``./runs`` by default) as ``train``, ``train2``, ``train3``... or
a chosen ``--name``. ``runs/latest`` points at the newest run (a relative symlink, or a one-line
text file naming the run where symlinks are not allowed), so ``pneumo predict`` and friends can
default to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError, OutputError
from pneumo_cli.core.files import TEMP_PREFIX, atomic_write_text, describe_os_error

DEFAULT_RUNS_DIR = Path("runs")
LATEST = "latest"
CONFIG_FILE = "config.json"
# The checkpoint with the best validation Dice (what every later command uses) and the last one.
BEST_MODEL_FILE = "best.keras"
LAST_MODEL_FILE = "last.keras"
# Every labelled cache image and its split when the run started: `evaluate` refuses to score,
# as held out, an image the run trained on.
SPLITS_FILE = "splits.csv"
# What makes a folder a cross-validation sweep (`pneumo train --cv`): an ensemble of its folds.
ENSEMBLE_FILE = "ensemble.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _next_free_name(runs_dir: Path, stem: str = "train") -> str:
    if not (runs_dir / stem).exists():
        return stem
    number = 2
    while (runs_dir / f"{stem}{number}").exists():
        number += 1
    return f"{stem}{number}"


def create_run_dir(
    runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR,
    name: str | None = None,
    exist_ok: bool = False,
) -> Path:
    """Create and return a new run folder under ``runs_dir``.

    Without ``name`` the folder is the first free of ``train``, ``train2``, ``train3``...

    Raises:
        OutputError: ``name`` is unsafe or ``latest``, or the run exists and ``exist_ok`` is
            false, or the folder cannot be created.
    """
    runs_dir = Path(runs_dir)
    run_dir = check_run_name(runs_dir, name, exist_ok)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=exist_ok)
    except OSError as exc:
        raise OutputError(f"cannot create {run_dir}: {describe_os_error(exc)}") from None
    return run_dir


def check_run_name(
    runs_dir: str | os.PathLike[str], name: str | None = None, exist_ok: bool = False
) -> Path:
    """The run folder :func:`create_run_dir` would create, without creating it.

    Raises:
        OutputError: ``name`` is unsafe or ``latest``, or the run exists and ``exist_ok`` is
            false.
    """
    runs_dir = Path(runs_dir)
    if name is not None and (not _NAME.match(name) or ".." in name or name == LATEST):
        raise OutputError(
            f"run name '{name}' is not allowed: use letters, digits, '.', '_' or '-' "
            "(and not 'latest')"
        )
    run_dir = runs_dir / (name or _next_free_name(runs_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir} exists and is not a folder")
    if run_dir.exists() and not exist_ok:
        # --resume continues any run with a config.json, even one stopped before its first
        # epoch ended; a folder without one holds nothing to resume.
        choices = "choose another --name or add --exist-ok to write into it"
        if (run_dir / CONFIG_FILE).is_file():
            choices = "choose another --name, add --exist-ok to write into it, or --resume it"
        raise OutputError(f"run {run_dir} exists already; {choices}")
    return run_dir


def mark_latest(run_dir: str | os.PathLike[str]) -> None:
    """Point ``<runs folder>/latest`` at ``run_dir`` (atomically replaced)."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f"{TEMP_PREFIX}{os.getpid()}-{LATEST}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            raise OutputError(f"{link} is a folder, not pneumo's pointer; rename it")
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        atomic_write_text(link, run_dir.name + "\n")


def _follow_latest(link: Path) -> Path | None:
    if link.is_symlink():
        return link.parent / os.readlink(link)
    if link.is_file():
        name = link.read_text(encoding="utf-8").strip()
        return link.parent / name if name else None
    return None


def resolve_run(
    run: str | os.PathLike[str] | None, runs_dir: str | os.PathLike[str] = DEFAULT_RUNS_DIR
) -> Path:
    """The run folder ``run`` names, or the latest run under ``runs_dir`` when ``run`` is None.

    A cross-validation sweep (a folder with ``ensemble.json``) is accepted too: callers that
    need one run check for it.

    Raises:
        ConfigError: no latest run, or the folder is neither a run (no config.json) nor a sweep.
    """
    if run is None:
        target = _follow_latest(Path(runs_dir) / LATEST)
        if target is None:
            raise ConfigError(
                f"no run given and {Path(runs_dir) / LATEST} does not exist; "
                "train one with `pneumo train` or name a run folder"
            )
    else:
        target = Path(run)
        if target.name == LATEST and (target.is_symlink() or target.is_file()):
            target = _follow_latest(target) or target
    if not (target / CONFIG_FILE).is_file() and not (target / ENSEMBLE_FILE).is_file():
        raise ConfigError(
            f"{target} is not a pneumo run (no {CONFIG_FILE}); was it written by `pneumo train`?"
        )
    return target


def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a run was trained with (its ``config.json``).

    The keys later commands read directly (``preprocess``, ``cache``, ``encoder``,
    ``input_scaling``, ``image_size``, ``cache_manifest_sha256``) are type-checked when present.

    Raises:
        ConfigError: missing or unreadable config.json, not an object, or one of those keys
            with the wrong JSON type.
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{Path(run_dir)} is not a pneumo run (no {CONFIG_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key, (kind, described) in _RUN_CONFIG_TYPES.items():
        value = data.get(key)
        if key in data and not (isinstance(value, kind) and not isinstance(value, bool)):
            shown = " ".join(json.dumps(value).split())
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConfigError(
                f"{path}: '{key}' must be {described}, got {shown}; was the file edited? "
                "restore it or train the run again"
            )
    return data


# The types of the config.json keys that later commands read directly (the settings that go
# through config.from_dict are checked there, key by key).
_RUN_CONFIG_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "preprocess": (dict, "a JSON object"),
    "cache": (str, "a string"),
    "encoder": (str, "a string"),
    "input_scaling": (str, "a string"),
    "image_size": (int, "an integer"),
    "cache_manifest_sha256": (str, "a string"),
}


HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = (
    "epoch", "loss", "dice", "pos_dice", "val_loss", "val_dice", "val_pos_dice", "lr",
    "seconds", "images_per_s",
)  # fmt: skip


def write_history(run_dir: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write ``history.csv`` (one row per finished epoch, :data:`HISTORY_COLUMNS`) atomically."""
    lines = [",".join(HISTORY_COLUMNS)]
    for row in rows:
        lines.append(",".join(_format_cell(row.get(column)) for column in HISTORY_COLUMNS))
    atomic_write_text(Path(run_dir) / HISTORY_FILE, "\n".join(lines) + "\n")


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a run's ``history.csv`` (numbers as int/float; empty or NaN cells as NaN).

    Raises:
        ConfigError: the file is unreadable or has other columns.
    """
    import csv

    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != HISTORY_COLUMNS:
                raise ConfigError(f"{path}: unexpected columns {reader.fieldnames}")
            rows = []
            for record in reader:
                row: dict[str, Any] = {}
                for key, text in record.items():
                    row[key] = int(text) if key == "epoch" else float(text or "nan")
                rows.append(row)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    return rows


def plot_curves(run_dir: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write ``curves.png``: loss and Dice per epoch, train and validation."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pneumo_cli.core.files import atomic_write_bytes

    epochs = [row["epoch"] for row in rows]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, dice_axes = figure.subplots(1, 2)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        loss_axes.plot(epochs, [row[key] for row in rows], marker="o", label=label)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="loss")
    for key, label in (
        ("dice", "train"),
        ("val_dice", "validation"),
        ("val_pos_dice", "validation, positives only"),
    ):
        dice_axes.plot(epochs, [row[key] for row in rows], marker="o", label=label)
    dice_axes.set(title="Per-image Dice (threshold 0.5)", xlabel="epoch", ylim=(0, 1))
    for axes in (loss_axes, dice_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(run_dir) / "curves.png", buffer.getvalue())


def write_splits(run_dir: str | os.PathLike[str], assignment: list[tuple[str, str]]) -> None:
    """Write ``RUN/splits.csv`` (ImageId, split) of the cache the run trains on."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "split"])
    writer.writerows(sorted(assignment))
    atomic_write_text(Path(run_dir) / SPLITS_FILE, buffer.getvalue())


def read_splits(run_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """ImageId -> split of the run's training cache, or None for a run made before pneumo
    recorded it.

    Raises:
        ConfigError: the file exists but is not pneumo's (names it).
    """
    import csv

    path = Path(run_dir) / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(
            f"{path}: unreadable ({exc}); was it written by `pneumo train`?"
        ) from None
    if not rows or rows[0] != ["ImageId", "split"] or any(len(row) != 2 for row in rows[1:]):
        raise ConfigError(f"{path}: not a splits file written by `pneumo train`")
    return dict(rows[1:])
