"""One prediction split over many machines: ``predict --shard K/N`` and merging the parts.

Part K of N (K from 1) takes the inputs whose ImageId hashes to K - 1 modulo N (SHA-256 of the
ImageId), so every machine picks its part from the same listing without talking to the others,
whatever order its file system lists the folder in; an input rejected before it has an ImageId
(an unsafe name, a duplicate) goes by its path the same way. :func:`merge_parts` joins the N
output folders into one that equals, file for file and byte for byte, the output of one
``predict`` over all inputs: masks, probability maps and records are copied, the CSVs are
written from the records, and ``job.json`` is the job without its shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError, InputError, UsageError

# What predict writes per image: (folder, suffix after the ImageId).
_PER_IMAGE_FILES = (("masks", ".png"), ("probs", ".png"), ("records", ".json"))


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N.

    Raises:
        UsageError: not of that form, or out of range.
    """
    parts = str(text).split("/")
    try:
        part, count = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        part, count = 0, 0
    if count < 1 or not 1 <= part <= count:
        raise UsageError(
            f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 3/8 for the third of "
            "eight parts (Slurm: $SLURM_ARRAY_TASK_ID/N with --array=1-N; Kubernetes: "
            "$((JOB_COMPLETION_INDEX + 1))/N)"
        )
    return part, count


def shard_of(key: str, count: int) -> int:
    """The part (1..count) that ``key`` belongs to."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select_shard(
    sources: list[tuple[str, Any]], rejected: list[tuple[str, str]], shard: tuple[int, int]
) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """The sources (by ImageId) and listing rejections (by path) of part ``shard`` = (K, N)."""
    part, count = shard
    mine = [source for source in sources if shard_of(source[0], count) == part]
    refused = [entry for entry in rejected if shard_of(entry[0], count) == part]
    return mine, refused


@dataclass
class MergeSummary:
    """What :func:`merge_parts` wrote."""

    parts: int = 0
    images: int = 0
    positive: int = 0
    rejected: int = 0
    out_dir: str = ""
    predictions_csv: str = ""
    files: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _read_part(folder: Path) -> dict[str, Any]:
    """A finished part's job (with its shard) and its records."""
    from pneumo_cli.inference.jobs import JOB_FILE
    from pneumo_cli.inference.outputs import PREDICTIONS_FILE

    job_path = folder / JOB_FILE
    if not job_path.is_file():
        raise InputError(f"{folder} has no {JOB_FILE}: is it the output of `pneumo predict`?")
    try:
        job = json.loads(job_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{job_path} is unreadable ({exc}); predict that part again") from None
    if not isinstance(job, dict) or not job.get("shard"):
        raise InputError(f"{folder} was not predicted with --shard; nothing to merge")
    if not (folder / PREDICTIONS_FILE).is_file():
        raise InputError(
            f"{folder} is unfinished (no {PREDICTIONS_FILE}); run its `pneumo predict --shard "
            f"{job['shard']}` again to finish it, then merge"
        )
    return job


def _check_parts(folders: list[Path]) -> dict[str, Any]:
    """The common job of ``folders``, which must be parts 1..N of one job, each exactly once."""
    jobs = [_read_part(folder) for folder in folders]
    first = {k: v for k, v in jobs[0].items() if k != "shard"}
    for folder, job in zip(folders, jobs, strict=True):
        other = {k: v for k, v in job.items() if k != "shard"}
        differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differing:
            raise ConfigError(
                f"{folder} is a part of another job than {folders[0]} (they differ in "
                f"{', '.join(differing)}); merge only parts of one predict job"
            )
    shards = [parse_shard(job["shard"]) for job in jobs]
    count = shards[0][1]
    seen: dict[int, Path] = {}
    for folder, (part, total) in zip(folders, shards, strict=True):
        if total != count:
            raise ConfigError(f"{folder} is part {part}/{total}, {folders[0]} of {count} parts")
        if part in seen:
            raise ConfigError(f"{folder} and {seen[part]} are both part {part}/{count}")
        seen[part] = folder
    missing = sorted(set(range(1, count + 1)) - set(seen))
    if missing:
        raise InputError(
            f"part {missing[0]}/{count} is missing ({len(missing)} of {count} parts absent); "
            "give every part's output folder"
        )
    return first


def merge_parts(
    parts: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> MergeSummary:
    """Join the output folders of ``predict --shard 1/N .. N/N`` into ``out_dir``.

    Raises:
        InputError: a folder that is no finished part, a part missing.
        ConfigError: parts of different jobs, a part given twice.
        OutputError: ``out_dir`` exists and is not empty, or cannot be written.
    """
    from pneumo_cli.core.errors import OutputError
    from pneumo_cli.core.files import TEMP_PREFIX, ensure_output_dir
    from pneumo_cli.inference.outputs import PREDICTIONS_FILE

    folders = [Path(p) for p in parts]
    if not folders:
        raise UsageError("give the output folders of every part")
    job = _check_parts(folders)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} exists and is not an empty folder; merge into a new folder")
    ensure_output_dir(out, *folders)
    out.rmdir()
    # Built next to OUT and renamed into place: a killed merge leaves no half-merged OUT.
    work = out.with_name(f"{TEMP_PREFIX}{os.getpid()}-{out.name}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        summary = _merge_into(folders, work, job)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    summary.out_dir = str(out)
    summary.predictions_csv = str(out / PREDICTIONS_FILE)
    return summary


def _merge_into(folders: list[Path], out: Path, job: dict[str, Any]) -> MergeSummary:
    from pneumo_cli.core.files import atomic_write_json
    from pneumo_cli.inference.jobs import JOB_FILE
    from pneumo_cli.inference.outputs import (
        REJECTED_FILE,
        sorted_rejected,
        write_predictions,
        write_rejected,
    )

    summary = MergeSummary(parts=len(folders))
    records: dict[str, dict] = {}
    rejected: list[tuple[str, str]] = []
    for folder in folders:
        # Only the images the part's last finished call listed: a folder may also hold
        # files of images it no longer predicts (an earlier job, since removed inputs).
        listed = _listed_images(folder)
        for name, _ in _PER_IMAGE_FILES:
            if (folder / name).is_dir():  # the folders a single run would have, even if empty
                (out / name).mkdir(exist_ok=True)
                summary.files.setdefault(name, 0)
        for image_id in listed:
            records[image_id] = _read_record(folder, image_id)
            for name, suffix in _PER_IMAGE_FILES:
                if _copy_file(folder / name / f"{image_id}{suffix}", out / name):
                    summary.files[name] += 1
        rejected += _read_rejected(folder / REJECTED_FILE)
    if not records and rejected:
        source, reason = sorted_rejected(rejected)[0]
        raise InputError(
            f"no input of any part could be predicted ({len(rejected)} rejected, reasons in "
            f"each part's {REJECTED_FILE}); the first: {source}: {reason}"
        )
    write_rejected(out / REJECTED_FILE, rejected)
    write_predictions(out, [records[k] for k in sorted(records)])
    atomic_write_json(out / JOB_FILE, job)
    summary.images = len(records)
    summary.positive = sum(r["has_pneumothorax"] for r in records.values())
    summary.rejected = len(rejected)
    return summary


def _listed_images(folder: Path) -> list[str]:
    """The ImageIds in a part's ``predictions.csv``."""
    import csv

    from pneumo_cli.inference.outputs import PREDICTIONS_FILE

    path = folder / PREDICTIONS_FILE
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [row["ImageId"] for row in csv.DictReader(handle, strict=True)]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError) as exc:
        raise InputError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); predict that part again"
        ) from None


def _read_record(folder: Path, image_id: str) -> dict[str, Any]:
    path = folder / "records" / f"{image_id}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path} is missing or unreadable ({type(exc).__name__}); predict that part again"
        ) from None
    if not isinstance(record, dict) or record.get("ImageId") != image_id:
        raise InputError(f"{path} is not the record of {image_id}; predict that part again")
    return record


def _copy_file(source: Path, folder: Path) -> bool:
    """Copy ``source`` into ``folder`` if it exists."""
    if not source.is_file():
        return False
    shutil.copyfile(source, folder / source.name)
    return True


def _read_rejected(path: Path) -> list[tuple[str, str]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [(row["source"], row["reason"]) for row in csv.DictReader(handle)]
