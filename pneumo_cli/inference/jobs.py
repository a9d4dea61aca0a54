"""Which predict job made an output folder (``OUT/job.json``), so that a re-run resumes only the
same job: the same model, gate, TTA, precision, preprocessing and pneumo version."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.core.files import (
    atomic_write_json,
)
from pneumo_cli.inference.postprocess import Gate

JOB_FILE = "job.json"


def job_identity(predictor: Any, gate: Gate) -> dict[str, Any]:
    """What decides a predict job's outputs: the model (its folder and a hash of its model
    file), the gate, TTA, precision, preprocessing and pneumo's version. A re-run into the same
    folder resumes only the same job."""
    from pneumo_cli import __version__
    from pneumo_cli.core.config import to_dict
    from pneumo_cli.inference.dicom_outputs import model_file_sha256

    return {
        "model": str(Path(predictor.source).resolve()),
        "model_sha256": model_file_sha256(predictor),
        "gate": asdict(gate),
        "tta": predictor.tta,
        "precision": "fp32",
        "preprocess": to_dict(predictor.settings),
        "pneumo_version": __version__,
    }


def claim_job(out: Path, job: dict[str, Any], overwrite: bool) -> None:
    """Record ``job`` in ``out/job.json``, or check that the outputs there are of the same job.

    Raises:
        ConfigError: ``out`` holds outputs of another job (naming the first differences) and
            ``overwrite`` is False; or its job.json is unreadable.
    """
    path = out / JOB_FILE
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); use --overwrite") from None
        differences = _differences(before, json.loads(json.dumps(job)))
        if differences:
            raise ConfigError(
                f"{out} holds the outputs of another predict job ({'; '.join(differences[:3])}); "
                "use --overwrite to replace them, or another --out"
            )
        return
    if not overwrite and (out / "records").is_dir() and any((out / "records").iterdir()):
        raise ConfigError(
            f"{out} holds predictions without a {JOB_FILE} (an older pneumo wrote them), so "
            "they cannot be resumed safely; use --overwrite to replace them, or another --out"
        )
    atomic_write_json(path, job)


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(before) | set(now)):
            found += _differences(before.get(key), now.get(key), f"{prefix}{key} ")
        return found
    return [] if before == now else [f"{prefix.strip()} {before!r} -> {now!r}"]
