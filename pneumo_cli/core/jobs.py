"""What made an output folder, so that re-running a command resumes only the same job.

Every command that resumes (``predict``, ``rle-decode``, ``overlay``) records its job, the
settings and input identities that decide its outputs, in a JSON file in its output folder. A
re-run with the same job skips what is finished; a re-run with another job is refused with one
line naming the differences, because finished files of the old job would otherwise be mixed with
new ones under a summary that describes the new job. ``--overwrite`` replaces the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.core.files import atomic_write_json


def claim_job(
    out: Path,
    job: dict[str, Any],
    overwrite: bool,
    *,
    command: str,
    file_name: str,
    earlier_outputs: bool = False,
) -> None:
    """Record ``job`` in ``out/file_name``, or check that the outputs there are of the same job.

    ``earlier_outputs`` says that ``out`` already holds outputs of this command; without a job
    file they were made by an older pneumo and cannot be resumed safely.

    Raises:
        ConfigError: ``out`` holds outputs of another job (naming the first differences), or
            outputs without a job file, and ``overwrite`` is False; or the job file is unreadable.
    """
    path = out / file_name
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); use --overwrite") from None
        differences = _differences(before, json.loads(json.dumps(job)))
        if differences:
            raise ConfigError(
                f"{out} holds the outputs of another {command} job "
                f"({'; '.join(differences[:3])}); use --overwrite to replace them, or another "
                "output folder"
            )
        return
    if earlier_outputs and not overwrite:
        raise ConfigError(
            f"{out} holds {command} outputs without a {file_name} (an older pneumo wrote them), "
            "so they cannot be resumed safely; use --overwrite to replace them, or another "
            "output folder"
        )
    atomic_write_json(path, job)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_state(folder: str | os.PathLike[str], suffixes: tuple[str, ...]) -> str:
    """A digest of the files with ``suffixes`` in ``folder`` (names, sizes, modification
    times): it changes when a file is added, removed or rewritten."""
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(suffixes):
            info = entry.stat()
            digest.update(f"{entry.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(before) | set(now)):
            found += _differences(before.get(key), now.get(key), f"{prefix}{key} ")
        return found
    return [] if before == now else [f"{prefix.strip()} {before!r} -> {now!r}"]
