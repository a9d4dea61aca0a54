"""Which predict job made an output folder (``OUT/job.json``), so that a re-run resumes only the
same job: the same model, gate, TTA, precision, preprocessing and pneumo version."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pneumo_cli.core.jobs import claim_job
from pneumo_cli.inference.postprocess import Gate

JOB_FILE = "job.json"


def job_identity(
    predictor: Any, gate: Gate, shard: tuple[int, int] | None = None, save_probs: bool = False
) -> dict[str, Any]:
    """What decides a predict job's outputs: the model (its folder and a hash of its model
    file), the gate, TTA, precision, engine, preprocessing, pneumo's version, whether
    probability maps are saved (recorded only when they are) and, for a part of a sharded job,
    the part (``"K/N"``). A re-run into the same folder resumes only the same job."""
    from pneumo_cli import __version__
    from pneumo_cli.core.config import to_dict
    from pneumo_cli.inference.dicom_outputs import model_file_sha256

    return (
        {
            "model": str(Path(predictor.source).resolve()),
            "model_sha256": model_file_sha256(predictor),
            "gate": asdict(gate),
            "tta": predictor.tta,
            "precision": predictor.precision,
            "engine": predictor.engine,
            "preprocess": to_dict(predictor.settings),
            "pneumo_version": __version__,
        }
        | ({"save_probs": True} if save_probs else {})
        | ({"shard": f"{shard[0]}/{shard[1]}"} if shard else {})
        | _members(predictor)
    )


def _members(predictor: Any) -> dict[str, Any]:
    members = getattr(predictor, "member_models", None)
    return {"members": [str(model.resolve()) for model in members]} if members else {}


def claim_predict_job(out: Path, job: dict[str, Any], overwrite: bool) -> None:
    """:func:`~pneumo_cli.core.jobs.claim_job` for a predict output folder (``job.json``)."""
    records = out / "records"
    earlier = records.is_dir() and any(records.iterdir())
    claim_job(out, job, overwrite, command="predict", file_name=JOB_FILE, earlier_outputs=earlier)
