"""Parity of an export with the Keras model: the images it is checked on, the tolerances
per model kind, and the comparison of probabilities and masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pneumo_cli.core.errors import ConfigError
from pneumo_cli.inference.postprocess import (
    Gate,
    apply_gate,
)
from pneumo_cli.inference.run_images import cache_images, synthetic_images

PARITY_IMAGES = 16
CALIBRATION_IMAGES = 64
# Gate areas are in original pixels; parity masks are made at the model's size as if the image
# came from a 1024 x 1024 SIIM X-ray.
PARITY_ORIGINAL_HW = (1024, 1024)


@dataclass(frozen=True)
class Tolerance:
    """What an export must meet: probability differences (None: not checked) and agreement."""

    max_abs_diff: float | None
    mean_abs_diff: float | None
    min_mask_agreement: float


TOLERANCES = {
    "float32": Tolerance(max_abs_diff=1e-3, mean_abs_diff=None, min_mask_agreement=0.999),
    "float16": Tolerance(max_abs_diff=5e-2, mean_abs_diff=1e-3, min_mask_agreement=0.999),
    "int8": Tolerance(max_abs_diff=None, mean_abs_diff=2e-2, min_mask_agreement=0.99),
    # A bf16 graph is held to the masks, as `predict --precision bf16` is
    # (inference.precision_parity): per-pixel differences of 1e-2 are normal in bfloat16.
    "bf16": Tolerance(max_abs_diff=None, mean_abs_diff=None, min_mask_agreement=0.999),
}


@dataclass(frozen=True)
class Parity:
    """How closely an export reproduces the Keras float32 model on ``images`` inputs."""

    inputs: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    mask_agreement: float
    dice_agreement: float
    tolerance: Tolerance
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["failures"] = list(self.failures)
        values["passed"] = self.passed
        return values


def dice_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image Dice of two (N, H, W) {0,1} mask stacks; two empty masks score 1."""
    from pneumo_cli.core.metrics import batch_dice, mean_over_images

    return mean_over_images(batch_dice(a, b, empty_score=1.0)) if len(a) else 1.0


def compare_probabilities(
    reference: np.ndarray,
    exported: np.ndarray,
    gate: Gate,
    tolerance: Tolerance,
    inputs: str = "",
    area_scale: float = 1.0,
) -> Parity:
    """Compare two (N, H, W) float32 probability stacks and check them against ``tolerance``.

    Masks come from :func:`postprocess.apply_gate` with ``gate`` and ``area_scale``.
    """
    reference = np.asarray(reference, np.float32)
    exported = np.asarray(exported, np.float32)
    if reference.shape != exported.shape:
        raise ConfigError(
            f"exported model returns shape {exported.shape}, the Keras model {reference.shape}"
        )
    diff = np.abs(reference.astype(np.float64) - exported)
    # NaN must fail the checks, so it becomes an infinite difference.
    diff = np.where(np.isnan(diff), np.inf, diff)
    masks_ref = np.stack([apply_gate(p, gate, area_scale) for p in reference])
    masks_exp = np.stack([apply_gate(np.nan_to_num(p), gate, area_scale) for p in exported])
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    agreement = float(np.mean(masks_ref == masks_exp)) if diff.size else 1.0
    failures = []
    if tolerance.max_abs_diff is not None and not max_abs <= tolerance.max_abs_diff:
        failures.append(f"max abs difference {max_abs:.3g} > {tolerance.max_abs_diff:g}")
    if tolerance.mean_abs_diff is not None and not mean_abs <= tolerance.mean_abs_diff:
        failures.append(f"mean abs difference {mean_abs:.3g} > {tolerance.mean_abs_diff:g}")
    if agreement < tolerance.min_mask_agreement:
        failures.append(
            f"mask agreement {agreement:.4%} < {tolerance.min_mask_agreement:.2%} of pixels"
        )
    return Parity(
        inputs=inputs,
        images=len(reference),
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        mask_agreement=agreement,
        dice_agreement=dice_agreement(masks_ref, masks_exp),
        tolerance=tolerance,
        failures=tuple(failures),
    )


def parity_images(config: dict[str, Any], image_size: int) -> tuple[np.ndarray, str]:
    """The fixed parity inputs: cached validation images if any, else synthetic phantoms."""
    images, description = cache_images(config, image_size, ("val", "test", "train"), PARITY_IMAGES)
    if len(images):
        return images, description
    return synthetic_images(image_size, PARITY_IMAGES), f"{PARITY_IMAGES} synthetic phantoms"


def calibration_images(config: dict[str, Any], image_size: int) -> tuple[np.ndarray, str]:
    """int8 calibration inputs: the cache's training images, else synthetic phantoms."""
    images, description = cache_images(
        config, image_size, ("train", "val", "test"), CALIBRATION_IMAGES
    )
    if len(images):
        return images, description
    count = CALIBRATION_IMAGES
    return synthetic_images(image_size, count, seed=1), f"{count} synthetic phantoms"


def run_in_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """(N, S, S) float32 probabilities of uint8 (N, S, S) images through ``run``, 8 at a time."""
    batches = []
    for start in range(0, len(images), 8):
        batch = images[start : start + 8].astype(np.float32)[..., np.newaxis]
        batches.append(np.asarray(run(batch))[..., 0])
    return np.concatenate(batches).astype(np.float32)
