"""The probability maps `pneumo evaluate` scores: one pass of a run or ensemble over a split,
each map kept in float32 as `pneumo predict` gates it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumo_cli.core.errors import InputError
from pneumo_cli.core.workers import single_threaded_opencv


@dataclass(frozen=True)
class Scored:
    """One image of the split: its manifest row, prepared item and probability map (S, S)."""

    row: Any
    item: Any
    prob: np.ndarray
    part: str = ""  # out of fold: the fold model that made the map


def predict_split(
    predictor: Any,
    sources: list,
    load: Callable,
    batch_size: int,
    workers: int,
    progress: Any,
    part: str = "",
    on_members: Callable[[Any, Any, np.ndarray], None] | None = None,
) -> list[Scored]:
    """The maps of ``sources``; with ``on_members`` (an ensemble) each image's members' maps
    (M, S, S) are passed to it as they come, and only their mean is kept."""
    from pneumo_cli.inference.predict import predict_items
    from pneumo_cli.inference.sources import Rejected

    if on_members is not None:
        predictor = MembersAndMean(predictor)
    rows = {image_id: row for image_id, row in sources}
    scored: list[Scored] = []
    with single_threaded_opencv(), ThreadPoolExecutor(workers) as pool:  # as predict loads

        def prepare(source: tuple[str, Any]) -> Any:
            try:
                return load(source[1])
            except InputError as exc:
                return Rejected(source[0], str(exc))

        for result in predict_items(predictor, pool.map(prepare, sources), batch_size):
            if isinstance(result, Rejected):
                raise InputError(f"cached image {result.source} unreadable: {result.reason}")
            item, prob = result
            if on_members is not None:
                on_members(item, rows[item.image_id], prob[1:])
                prob = prob[0]
            # Kept in float32, exactly as `pneumo predict` gates it: a float16 copy rounds values
            # near a threshold (0.5002 -> 0.5) and so scored masks predict would not write.
            scored.append(Scored(rows[item.image_id], item, np.asarray(prob, np.float32), part))
            progress(1)
    return scored


class MembersAndMean:
    """An ensemble whose ``probabilities`` gives, per image, (1 + M, S, S): the ensemble's map
    (the members' mean, exactly as the ensemble computes it) then each member's."""

    def __init__(self, ensemble: Any) -> None:
        self.ensemble = ensemble

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        maps = self.ensemble.member_probabilities(images)
        mean = self.ensemble.mean_of(maps)
        return np.stack([mean, *maps], axis=1)
