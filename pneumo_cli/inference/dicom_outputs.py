"""DICOM outputs of `pneumo predict`: a DICOM Segmentation for every DICOM input (``--dicom-seg``).

The SEG is written as a stage of the predict pipeline (:class:`SegStage`), in the writer threads,
after the image's mask and before its record, so an image counts as finished only once its SEG
exists: a predict that is interrupted and run again writes the missing SEGs, and ``--overwrite``
replaces them. All SEGs of one predict job share one new series per study; the series is saved
in ``OUT/dicom-seg/series.json`` so a resumed job keeps adding to it (``--overwrite`` starts a
new one).

Per image the record notes what happened: ``dicom_seg`` is the SEG's file name, or "" for an
input that is not DICOM (PNG/JPEG get no SEG, only a note) or whose header cannot make a valid
SEG (the reason goes to ``OUT/dicom-seg/rejected.csv``; its mask and CSV row are kept).

Privacy: a SEG carries the source's patient module, as it must to be filed with that patient;
nothing else written here holds patient data.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError
from pneumo_cli.core.files import atomic_write_json, atomic_write_text, remove_stale_temporaries
from pneumo_cli.core.jobs import file_sha256
from pneumo_cli.inference.sources import Item

SEG_FOLDER = "dicom-seg"
SERIES_FILE = "series.json"
SEG_REJECTED_FILE = "rejected.csv"
NOT_DICOM = "not DICOM"


class SegStage:
    """Writes ``OUT/dicom-seg/<ImageId>.dcm`` for each predicted DICOM input.

    ``source`` names what made the masks (it goes into the SEG's algorithm identification);
    ``image_ids`` are every ImageId of the job, numbered in sorted order as the SEGs'
    InstanceNumber, so a resumed job numbers them as an uninterrupted one would.
    """

    def __init__(self, source: str, image_ids: list[str], overwrite: bool = False) -> None:
        self.source = source
        self.instance_numbers = {image_id: n for n, image_id in enumerate(sorted(image_ids), 1)}
        self.overwrite = overwrite
        self.series: Any = None
        # write_seg changes process-wide warning and validation settings while it runs.
        self._lock = threading.Lock()
        # Header signatures whose SEGs highdicom has read back in this job (see write_seg).
        self._read_back: set[tuple] = set()

    def prepare(self, out: Path) -> None:
        from pneumo_cli import __version__
        from pneumo_cli.io.dicom_seg import SegSeries, new_seg_series

        folder = out / SEG_FOLDER
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)
        saved = folder / SERIES_FILE
        if saved.is_file() and not self.overwrite:
            self.series = _read_series(saved, SegSeries)
        else:
            self.series = new_seg_series(self.source, __version__)
            atomic_write_json(saved, dataclasses.asdict(self.series))

    def done(self, out: Path, record: dict[str, Any]) -> bool:
        name = record.get("dicom_seg")
        if name is None:
            return False  # predicted without --dicom-seg
        return name == "" or (out / SEG_FOLDER / name).is_file()

    def write(self, out: Path, item: Item, mask: np.ndarray) -> dict[str, Any]:
        from pneumo_cli.io.dicom_seg import write_seg
        from pneumo_cli.io.xrays import is_dicom_file

        if item.source is None or not is_dicom_file(item.source):
            return {"dicom_seg": "", "dicom_seg_note": NOT_DICOM}
        name = f"{item.image_id}.dcm"
        try:
            with self._lock:
                write_seg(
                    item.source,
                    mask,
                    self.series,
                    out / SEG_FOLDER / name,
                    instance_number=self.instance_numbers.get(item.image_id, 1),
                    full_check=self._read_back,
                )
        except InputError as exc:
            reason = " ".join(str(exc).split()).removeprefix(f"{item.source}: ")
            return {"dicom_seg": "", "dicom_seg_note": f"refused: {reason}"}
        return {"dicom_seg": name}

    def finish(self, out: Path, records: list[dict[str, Any]]) -> dict[str, int]:
        """Write ``dicom-seg/rejected.csv`` and count what the job's records say."""
        refused = [
            (r["ImageId"], r["dicom_seg_note"].removeprefix("refused: "))
            for r in records
            if r.get("dicom_seg_note", "").startswith("refused: ")
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["ImageId", "reason"])
        writer.writerows(refused)
        atomic_write_text(out / SEG_FOLDER / SEG_REJECTED_FILE, buffer.getvalue())
        return {
            "dicom_seg_written": sum(1 for r in records if r.get("dicom_seg")),
            "dicom_seg_not_dicom": sum(1 for r in records if r.get("dicom_seg_note") == NOT_DICOM),
            "dicom_seg_refused": len(refused),
        }


def _read_series(path: Path, cls: type) -> Any:
    """The saved series of a job being resumed.

    Raises:
        InputError: the file is damaged (the message says how to go on).
    """
    import json

    try:
        return cls(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"{path} is damaged ({exc}); delete it (the job's next SEGs start a new series) or "
            "use --overwrite"
        ) from None


def model_file_sha256(predictor: Any) -> str:
    """SHA-256 of the file a predictor's network came from: a run's best.keras, or an export's
    model file (its manifest for a SavedModel folder); "" when there is none to hash. A file
    unchanged since it was last hashed (same size and modification time) is not read again:
    predict's job record and the SEG's algorithm source both ask for it."""
    members = getattr(predictor, "member_models", None)  # an ensemble's model files
    if members is not None:
        return members_sha256([cached_file_sha256(model) for model in members])
    path = Path(predictor.source)
    info = getattr(predictor, "info", None)  # an exported model's manifest
    own = getattr(predictor, "model_path", None)  # a run's model file
    model = Path(own or path / "best.keras") if info is None else Path(info.model_path)
    if info is not None and model.is_dir():
        model = path / "pneumo-model.json"
    return cached_file_sha256(model) if model.is_file() else ""


def members_sha256(member_hashes: list[str]) -> str:
    """One hash for an ensemble's model files, in member order."""
    return hashlib.sha256("\n".join(member_hashes).encode()).hexdigest()


def cached_file_sha256(path: Path) -> str:
    """SHA-256 of a file, not read again while its size and modification time are unchanged."""
    stat = path.stat()
    return _hashed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def algorithm_source(predictor: Any) -> str:
    """What made the masks, for the SEG's algorithm identification (a DICOM LO, <= 64 chars):
    the run or export folder's name and a short hash of its model file."""
    kind = "run" if getattr(predictor, "info", None) is None else "export"
    digest = model_file_sha256(predictor)
    digest = f" model sha256 {digest[:12]}" if digest else ""
    name = Path(predictor.source).name[: 64 - len(kind) - len(digest) - 1]
    return f"{kind} {name}{digest}"
