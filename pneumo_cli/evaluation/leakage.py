"""No training image is scored as held out: `evaluate` checks that a cache's split assignment
agrees with the one the run was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumo_cli.core.errors import ConfigError

# The preprocess settings that decide which split an image is in.
SPLIT_SETTINGS = ("seed", "val_fraction", "test_fraction", "folds")


def check_split_unchanged(
    run_dir: Path, run_config: dict[str, Any], cache_dir: Path, split: str, image_ids: list[str]
) -> None:
    """Refuse to score ``image_ids`` (the cache's ``split``) when any was in another split of
    the run's training cache, so a re-split cache cannot put training images into val or test.

    The run's own record (``RUN/splits.csv``) decides; for a run made before pneumo wrote it,
    the cache's split settings must equal those the run recorded.

    Raises:
        ConfigError: naming the cache, how many images moved (one example) and the fix.
    """
    from pneumo_cli.core.config import to_dict
    from pneumo_cli.data.cache import load_cache_settings
    from pneumo_cli.training.runs import read_splits

    hint = (
        f"evaluate on the run's own cache ({run_config.get('cache', '?')}) or preprocess again "
        "with the run's split settings"
    )
    recorded = read_splits(run_dir)
    if recorded is not None:
        moved = [i for i in image_ids if i in recorded and recorded[i] != split]
        if moved:
            raise ConfigError(
                f"{cache_dir} puts {len(moved)} image(s) into split '{split}' that were in "
                f"another split when {run_dir} was trained (e.g. {moved[0]}: "
                f"'{recorded[moved[0]]}' then), so training images would be scored as held "
                f"out; {hint}"
            )
        return
    now = to_dict(load_cache_settings(cache_dir))
    then = run_config.get("preprocess", {})
    differing = [f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in SPLIT_SETTINGS
                 if then.get(k) != now.get(k)]  # fmt: skip
    if differing:
        raise ConfigError(
            f"{cache_dir} was split with other settings than {run_dir}'s cache "
            f"({'; '.join(differing)}), so training images could be scored as held out; {hint}"
        )
