"""Labels for preprocessing: masks from a SIIM RLE CSV or from a folder of mask images,
matched to the X-rays by ImageId."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import InputError
from pneumo_cli.data.inputs import Candidate


@dataclass
class Labels:
    """Where masks come from: an RLE CSV, a mask folder, or nothing (unlabelled cache)."""

    kind: str = "none"
    origin: str = ""
    digest: str = ""
    rle: dict[str, list[Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, str]:
        """Identity of the label input (kind and content hash), compared when resuming."""
        return {"kind": self.kind, "sha256": self.digest}

    def match(self, candidates: list[Candidate]) -> tuple[dict[str, tuple], list[str]]:
        """Pair images with labels, checking every label fits its image's size.

        A label is found under the image's ImageId, else under its SOPInstanceUID or
        MediaStorageSOPInstanceUID (a DICOMDIR's ``IM000000`` is labelled by its UID, the
        Kaggle ImageId). Returns (ImageId -> label spec, sorted names of labels without an
        image).

        Raises:
            RleError: an RLE row runs past its image (its mask is for another size).
            InputError: a mask file's size differs from its image's.
        """
        from pneumo_cli.core.errors import RleError
        from pneumo_cli.core.files import image_file_size
        from pneumo_cli.io.mask_files import mask_threshold
        from pneumo_cli.io.rle import parse_runs, row_context

        label_of: dict[str, tuple] = {}
        used: set[str] = set()
        for item in candidates:
            key = next((k for k in item.label_keys if k in self.rle or k in self.files), None)
            if key is None:
                continue
            used.add(key)
            if key in self.rle:
                rows = self.rle[key]
                for row in rows:
                    try:
                        parse_runs(row.encoded, item.rows, item.cols)
                    except RleError as exc:
                        reason = str(exc).split("; check")[0]
                        raise RleError(
                            f"{row_context(self.origin, row)}: {reason}; the mask does not fit "
                            f"its image {item.source} ({item.cols}x{item.rows})"
                        ) from None
                label_of[item.image_id] = ("rle", [row.encoded for row in rows])
            else:
                path = self.files[key]
                rows, cols = image_file_size(path)
                if (rows, cols) != (item.rows, item.cols):
                    raise InputError(
                        f"mask {path} is {cols}x{rows} but its image {item.source} "
                        f"is {item.cols}x{item.rows}; masks must have their image's size"
                    )
                label_of[item.image_id] = ("file", str(path), mask_threshold(path))
        unmatched = sorted((set(self.rle) | set(self.files)) - used)
        return label_of, unmatched


def read_labels(
    rle_csv: str | os.PathLike[str] | None, masks_dir: str | os.PathLike[str] | None
) -> Labels:
    import hashlib

    from pneumo_cli.core.files import iter_files, read_input_bytes
    from pneumo_cli.io.mask_files import MASK_SUFFIXES, mask_image_id
    from pneumo_cli.io.rle import read_rle_csv

    if rle_csv is not None:
        rows = read_rle_csv(rle_csv)
        grouped: dict[str, list[Any]] = {}
        for row in rows:
            grouped.setdefault(row.image_id, []).append(row)
        digest = hashlib.sha256(read_input_bytes(rle_csv)).hexdigest()
        return Labels("rle", str(rle_csv), digest, rle=grouped)
    if masks_dir is not None:
        folder = Path(masks_dir)
        if not folder.is_dir():
            raise InputError(f"--masks {folder} is not a folder of mask images")
        files: dict[str, Path] = {}
        listing = hashlib.sha256()
        for path in iter_files(folder, MASK_SUFFIXES):
            image_id = mask_image_id(path)
            if image_id in files:
                raise InputError(
                    f"masks {files[image_id]} and {path} are both for ImageId '{image_id}'; "
                    "keep one"
                )
            files[image_id] = path
            listing.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
        return Labels("masks", str(folder), listing.hexdigest(), files=files)
    return Labels()
