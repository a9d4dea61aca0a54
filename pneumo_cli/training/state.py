"""A run's training state (``state.json`` and ``state/epoch-NNNN`` checkpoints) and the
cleanup of what a killed run left behind."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.core.files import TEMP_PREFIX, remove_stale_temporaries
from pneumo_cli.core.locks import pid_alive
from pneumo_cli.training import runs

STATE_FILE = "state.json"
STATE_DIR = "state"
FINISHED = ("completed", "early_stopped")


def first_state() -> dict[str, Any]:
    """The training state of a run before its first epoch."""
    return {
        "epoch": 0,
        "best_epoch": None,
        "best_val_dice": None,
        "since_best": 0,
        "plateau_wait": 0,
        "seconds": 0.0,
    }


def remove_stale_results(run_dir: Path) -> None:
    """Delete what an earlier start of the run wrote that a fresh start must not inherit."""
    for stale in (STATE_FILE, runs.HISTORY_FILE, "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / stale).unlink()


# What a checkpoint write leaves in state/: PREFIX.index, PREFIX.data-00000-of-00001, and,
# while TensorFlow writes, a PREFIX_temp/ folder that a kill leaves behind.
_CHECKPOINT_ENTRY = re.compile(r"^epoch-\d{4}[._]")
_LATEST_TEMPORARY = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-{runs.LATEST}$")


def remove_leftovers(run_dir: Path, keep: str | None) -> None:
    """Delete what a killed run left: pneumo's temporary files in the run folder, the
    ``latest`` pointer temporaries of dead processes in the runs folder, and every checkpoint
    file or folder under ``state/`` other than those of the checkpoint ``keep`` (a prefix such
    as ``state/epoch-0002``; None keeps none). Only pneumo's and TensorFlow's own name
    patterns are touched."""
    remove_stale_temporaries(run_dir)
    for pointer in run_dir.parent.glob(f"{TEMP_PREFIX}*-{runs.LATEST}"):
        found = _LATEST_TEMPORARY.match(pointer.name)
        if found and not pid_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                pointer.unlink()
    remove_old_checkpoints(run_dir, keep)


def remove_old_checkpoints(run_dir: Path, keep: str | None) -> None:
    kept = Path(keep).name + "." if keep else None
    folder = run_dir / STATE_DIR
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not _CHECKPOINT_ENTRY.match(entry.name) or (kept and entry.name.startswith(kept)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


_CHECKPOINT = re.compile(rf"^{STATE_DIR}/epoch-\d{{4}}$")
_STATUSES = ("running", "interrupted", *FINISHED)


def read_state(run_dir: Path) -> dict[str, Any]:
    """The training state saved after the last finished epoch (``state.json``), checked.

    Raises:
        ConfigError: one line naming the file when it is unreadable, or a value has the wrong
            type or range (the checkpoint must be ``state/epoch-NNNN`` inside the run).
    """
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{run_dir} has no {STATE_FILE}: it stopped before saving any state; start a new run"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable training state ({exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: unreadable training state (not a JSON object)")
    problem = _state_problem(state)
    if problem:
        raise ConfigError(
            f"{path}: unreadable training state ({problem}); was it edited? restore it, or "
            "start a new run"
        )
    return state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a parsed state.json, or None."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    checks = {
        "epoch": (count, "an integer >= 0"),
        "checkpoint": (
            lambda v: isinstance(v, str) and bool(_CHECKPOINT.match(v)),
            f"'{STATE_DIR}/epoch-NNNN'",
        ),
        "status": (lambda v: v in _STATUSES, f"one of {', '.join(_STATUSES)}"),
        "best_epoch": (lambda v: v is None or count(v), "an integer or null"),
        "best_val_dice": (lambda v: v is None or number(v), "a number or null"),
        "since_best": (count, "an integer >= 0"),
        "plateau_wait": (count, "an integer >= 0"),
        "seconds": (lambda v: number(v) and v >= 0, "a number >= 0"),
    }
    for key, (ok, described) in checks.items():
        if key not in state:
            return f"no '{key}'"
        if not ok(state[key]):
            shown = " ".join(json.dumps(state[key]).split())[:60]
            return f"'{key}' must be {described}, got {shown}"
    return None
