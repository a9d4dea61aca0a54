"""Is a faster precision as good as float32 for this run on this machine? Measured, then cached.

Before ``predict``, ``evaluate`` or ``serve`` use a run's network in bf16 (or fp16 on a GPU),
the same images go through the float32 network and the candidate, each map goes through the
run's gate, and the two masks of every image are compared. The candidate passes when

- at least :data:`MIN_PIXEL_AGREEMENT` of all mask pixels agree,
- the mean per-image Dice between the two masks is at least :data:`MIN_MEAN_DICE` (two empty
  masks score 1), and
- at most :data:`MAX_FLIPPED_SHARE` of the images change between empty and non-empty.

The images are the run's own validation images (up to :data:`PARITY_VAL_IMAGES`) when its cache
is at hand, else the first :data:`PARITY_INPUT_IMAGES` inputs of the command. Masks are made at
the model's resolution with gate areas scaled as for a 1024 x 1024 X-ray (SIIM's size).

The result is kept in ``RUN/precision-parity.json``, one entry per machine kind (CPU model and
bfloat16 flags, GPU names), precision, TTA, gate, model file and package versions, so the check
runs once per run and machine kind; a file that is damaged, was written by another pneumo
version or holds checks of an older format (:data:`CHECK_FORMAT`) is ignored (and said so) and
the check runs again. Each candidate's speed is timed side by side with the float32 network
(:func:`paired_rates`), and ``auto`` takes the fastest candidate that passes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_cli.inference.postprocess import Gate, apply_gate, area_scale_for

PARITY_FILE = "precision-parity.json"
MIN_PIXEL_AGREEMENT = 0.999
MIN_MEAN_DICE = 0.99
MAX_FLIPPED_SHARE = 0.005
PARITY_VAL_IMAGES = 256
PARITY_INPUT_IMAGES = 64
_ENTRIES_KEPT = 16
# Rounds of side-by-side timing per candidate (:func:`paired_rates`).
TIMING_ROUNDS = 5
# What the file's entries mean; entries of another format are measured again. 2: the speeds are
# timed side by side with the float32 network (format 1 timed each network alone, one after the
# other, so a pause of the machine could decide between engines).
CHECK_FORMAT = 2
# Gate areas are in original pixels; the check's masks are at the model's size, as if each image
# came from a 1024 x 1024 SIIM X-ray.
_ORIGINAL_HW = (1024, 1024)


@dataclass(frozen=True)
class PrecisionParity:
    """How masks of ``precision`` compare with float32 masks on ``images`` inputs."""

    precision: str
    images: int
    inputs: str
    pixel_agreement: float
    mean_dice: float
    flipped: int
    seconds: float = 0.0
    failures: tuple[str, ...] = ()
    engine: str = "keras"
    # Speed on the check's images, and that of the float32 Keras network in the same run.
    images_per_second: float = 0.0
    reference_images_per_second: float = 0.0

    @property
    def speedup(self) -> float:
        """How much faster than the float32 Keras network, measured side by side."""
        if self.reference_images_per_second <= 0:
            return 0.0
        return self.images_per_second / self.reference_images_per_second

    @property
    def passed(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        """The numbers in one phrase, e.g. for a note."""
        return (
            f"{self.pixel_agreement:.3%} of mask pixels agree, mean Dice {self.mean_dice:.4f}, "
            f"{self.flipped} of {self.images} images change between empty and non-empty"
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["failures"] = list(self.failures)
        values["passed"] = self.passed
        return values


def compare_masks(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, int]:
    """(pixel agreement, mean per-image Dice, images flipped) of two (N, H, W) mask stacks.

    Dice of two empty masks is 1; an image is flipped when exactly one of its masks is empty.
    """
    from pneumo_cli.core.metrics import batch_dice, mean_over_images

    reference, candidate = np.asarray(reference, bool), np.asarray(candidate, bool)
    if reference.shape != candidate.shape:
        raise ValueError(f"mask stacks differ in shape: {reference.shape} vs {candidate.shape}")
    if not len(reference):
        return 1.0, 1.0, 0
    agreement = float(np.mean(reference == candidate))
    dice = mean_over_images(batch_dice(reference, candidate, empty_score=1.0))
    flipped = int(np.sum(reference.any(axis=(1, 2)) != candidate.any(axis=(1, 2))))
    return agreement, dice, flipped


def judge(
    precision: str, reference: np.ndarray, candidate: np.ndarray, gate: Gate, inputs: str
) -> PrecisionParity:
    """Gate two (N, S, S) float32 probability stacks and judge the candidate's masks."""
    size = reference.shape[-1]
    scale = area_scale_for(_ORIGINAL_HW, (size, size))
    ref_masks = np.stack([apply_gate(p, gate, scale) for p in reference])
    cand_masks = np.stack([apply_gate(np.nan_to_num(p), gate, scale) for p in candidate])
    agreement, dice, flipped = compare_masks(ref_masks, cand_masks)
    failures = []
    if agreement < MIN_PIXEL_AGREEMENT:
        failures.append(f"pixel agreement {agreement:.3%} < {MIN_PIXEL_AGREEMENT:.1%}")
    if dice < MIN_MEAN_DICE:
        failures.append(f"mean Dice {dice:.4f} < {MIN_MEAN_DICE}")
    if flipped > MAX_FLIPPED_SHARE * len(reference):
        failures.append(f"{flipped} of {len(reference)} images flipped > {MAX_FLIPPED_SHARE:.1%}")
    return PrecisionParity(
        precision, len(reference), inputs, agreement, dice, flipped, failures=tuple(failures)
    )


def network_maps(
    network: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 8
) -> np.ndarray:
    """float32 (N, S, S) maps of uint8 (N, S, S) ``images``, ``batch_size`` at a time."""
    maps = [
        np.asarray(network(images[first : first + batch_size]), np.float32)
        for first in range(0, len(images), batch_size)
    ]
    size = images.shape[-1]
    return np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)


def paired_rates(
    reference: Callable[[np.ndarray], np.ndarray],
    candidate: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = 8,
    warmed: bool = False,
) -> tuple[float, float]:
    """(reference, candidate) images/s, timed side by side on the same batches.

    After one untimed warm-up batch each (none when both have just run over ``images``:
    ``warmed``), :data:`TIMING_ROUNDS` rounds time one batch through both networks, the first
    batches of ``images`` in turn, the order swapped every round; each rate is that of its
    median batch. A pause of the machine, or its clock settling, then
    slows both sides of a round alike instead of the network that happened to run alone.
    """
    full = max(1, min(len(images) // batch_size, TIMING_ROUNDS))
    batches = [images[i * batch_size : (i + 1) * batch_size] for i in range(full)]
    if not warmed:
        reference(batches[0])
        candidate(batches[0])
    seconds: dict[int, list[float]] = {0: [], 1: []}
    sides = ((0, reference), (1, candidate))
    for round_ in range(TIMING_ROUNDS):
        batch = batches[round_ % full]
        for side, network in sides if round_ % 2 == 0 else sides[::-1]:
            began = time.perf_counter()
            np.asarray(network(batch))
            seconds[side].append(time.perf_counter() - began)
    rates = [len(batches[0]) / float(np.median(seconds[side])) for side in (0, 1)]
    return round(rates[0], 2), round(rates[1], 2)


def measure(
    precision: str,
    reference: Callable[[np.ndarray], np.ndarray],
    candidate: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    gate: Gate,
    inputs: str,
    batch_size: int = 8,
    reference_maps: np.ndarray | None = None,
) -> PrecisionParity:
    """Run uint8 (N, S, S) ``images`` through both networks, time them side by side
    (:func:`paired_rates`) and :func:`judge` the candidate. ``reference_maps`` are the float32
    network's maps of ``images`` when made already (one reference pass for many candidates)."""
    start = time.perf_counter()
    if reference_maps is None:
        reference_maps = network_maps(reference, images, batch_size)
    maps = network_maps(candidate, images, batch_size)
    reference_rate, rate = paired_rates(reference, candidate, images, batch_size, warmed=True)
    result = judge(precision, reference_maps, maps, gate, inputs)
    return dataclasses.replace(
        result,
        seconds=round(time.perf_counter() - start, 2),
        images_per_second=rate,
        reference_images_per_second=reference_rate,
    )


@dataclass(frozen=True)
class ParityKey:
    """What a cached check is valid for: the machine kind, the precision and the model's use."""

    precision: str
    tta: str
    gate: dict[str, float]
    model_sha256: str
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    engine: str = "keras"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_kind(gpus: list[str]) -> dict[str, Any]:
    """The machine as far as numerics go: CPU model, its bfloat16 flags, the GPUs."""
    from pneumo_cli.engine.precision import cpu_bf16_flags, cpu_model

    return {"cpu": cpu_model(), "cpu_bf16": cpu_bf16_flags(), "gpus": list(gpus)}


def parity_key(
    precision: str, tta: str, gate: Gate, model_sha256: str, gpus: list[str], engine: str = "keras"
) -> ParityKey:
    from pneumo_cli.core.provenance import MODEL_PACKAGES, package_versions

    names = MODEL_PACKAGES + (("openvino",) if engine == "openvino" else ())
    return ParityKey(
        precision, tta, asdict(gate), model_sha256, machine_kind(gpus), package_versions(names),
        engine,
    )  # fmt: skip


def _read_file(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The entries of a parity file and, when it cannot be used, why (for a note)."""
    from pneumo_cli import __version__

    if not path.is_file():
        return [], None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        version, entries = content["pneumo_version"], content["entries"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("entries is not a list of objects")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return [], f"{path} is damaged ({type(exc).__name__}); checking again"
    if version != __version__:
        return [], f"{path} was written by pneumo {version}; checking again with {__version__}"
    if content.get("check_format") != CHECK_FORMAT:
        return [], f"{path} holds checks timed the old way (each network alone); checking again"
    return entries, None


def cached_parity(run_dir: Path, key: ParityKey) -> tuple[PrecisionParity | None, str | None]:
    """The cached check for ``key`` (None when there is none) and a note about the file."""
    entries, note = _read_file(run_dir / PARITY_FILE)
    wanted = key.to_dict()
    for entry in entries:
        if entry.get("key") == wanted:
            try:
                result = dict(entry["result"])
                result.pop("passed", None)
                result["failures"] = tuple(result["failures"])
                return PrecisionParity(**result), note
            except (KeyError, TypeError, ValueError):
                return None, f"{run_dir / PARITY_FILE} holds a damaged entry; checking again"
    return None, note


def store_parity(run_dir: Path, key: ParityKey, result: PrecisionParity) -> str | None:
    """Add ``result`` to the run's parity file (atomically); a note when it cannot be written
    (a read-only run folder: the check then runs again next time)."""
    from pneumo_cli import __version__
    from pneumo_cli.core.errors import OutputError
    from pneumo_cli.core.files import atomic_write_json

    path = run_dir / PARITY_FILE
    entries, _ = _read_file(path)
    wanted = key.to_dict()
    entries = [e for e in entries if e.get("key") != wanted][-(_ENTRIES_KEPT - 1) :]
    entries.append({"key": wanted, "result": result.to_dict()})
    try:
        content = {"pneumo_version": __version__, "check_format": CHECK_FORMAT, "entries": entries}
        atomic_write_json(path, content)
    except (OSError, OutputError) as exc:
        return f"cannot save the precision check in {path} ({exc}); it runs again next time"
    return None


@dataclass(frozen=True)
class Candidate:
    """A way to run the network: an engine (``keras`` or ``openvino``) and a precision."""

    engine: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.precision} ({self.engine})"


REFERENCE = Candidate("keras", "fp32")


@dataclass
class NetworkChoice:
    """The way a predictor runs its network, why, the check behind it, and notes for stderr
    (``(kind, text)`` with kind ``"note"`` or ``"warning"``)."""

    candidate: Candidate
    reason: str
    check: PrecisionParity | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Checks:
    """The checks of one choice: cached or measured once, images and networks made lazily."""

    run: Any
    tta: str
    gpus: list[str]
    build: Callable[[Candidate], Callable[[np.ndarray], np.ndarray]]
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None
    notes: list[tuple[str, str]] = field(default_factory=list)
    images: tuple[np.ndarray, str] | None = None
    reference: tuple[Callable[[np.ndarray], np.ndarray], np.ndarray] | None = None  # made once

    def check_images(self) -> tuple[np.ndarray, str]:
        from pneumo_cli.inference.run_images import cache_images

        if self.images is None:
            run = self.run
            self.images = cache_images(run.config, run.image_size, ("val",), PARITY_VAL_IMAGES)
            if not len(self.images[0]) and self.parity_inputs is not None:
                self.images = self.parity_inputs(run.settings, PARITY_INPUT_IMAGES)
        return self.images

    def result(self, candidate: Candidate) -> PrecisionParity | None:
        """The check of ``candidate`` (None when there are no images to check it on)."""
        from pneumo_cli.inference.dicom_outputs import cached_file_sha256

        run = self.run
        digest = cached_file_sha256(run.model_path)
        key = parity_key(
            candidate.precision, self.tta, run.gate, digest, self.gpus, candidate.engine
        )
        cached, note = cached_parity(run.run_dir, key)
        if note and ("note", note) not in self.notes:
            self.notes.append(("note", note))
        if cached is not None:
            return cached
        images, inputs = self.check_images()
        if not len(images):
            return None
        if self.reference is None:
            network = self.build(REFERENCE)
            self.reference = network, network_maps(network, images)
        network, maps = self.reference
        measured = measure(candidate.precision, network, self.build(candidate), images, run.gate,
                           inputs, reference_maps=maps)  # fmt: skip
        measured = dataclasses.replace(measured, engine=candidate.engine)
        stored = store_parity(run.run_dir, key, measured)
        if stored:
            self.notes.append(("note", stored))
        return measured


def choose_network(
    run: Any,
    candidates: list[Candidate],
    reason: str,
    build: Callable[[Candidate], Callable[[np.ndarray], np.ndarray]],
    tta: str,
    gpus: list[str],
    parity_inputs: Callable[[Any, int], tuple[np.ndarray, str]] | None = None,
) -> NetworkChoice:
    """The fastest of ``candidates`` (most wanted first) whose masks match float32 Keras here.

    Each candidate but the float32 Keras network itself (``REFERENCE``) is checked
    (:func:`measure`, cached per machine kind) and timed against it in the same run; the
    fastest that passes wins, ``REFERENCE`` counting as passing at speed 1. When none passes
    (``REFERENCE`` not among them: an explicit ``--precision`` or ``--engine``), the first runs
    as asked, with a warning. ``build(candidate)`` makes a network ``uint8 (B, S, S) -> float32
    (B, S, S)``; only the ones needed are made.
    """
    checks = _Checks(run, tta, gpus, build, parity_inputs)
    results = {c: checks.result(c) for c in candidates if c != REFERENCE}
    passing = [c for c in candidates if c == REFERENCE or (results[c] and results[c].passed)]
    first = candidates[0]
    if not passing:
        verdict = _verdict(results.get(first))
        checks.notes.append(("warning", f"{first.name} as asked, but it {verdict}"))
        return NetworkChoice(first, reason, results.get(first), checks.notes)
    best = max(passing, key=lambda c: 1.0 if c == REFERENCE else results[c].speedup)
    check = results.get(best)
    said = reason
    if best != first:
        verdict = _verdict(results.get(first))
        said = f"{reason}, but {first.name} {verdict}"
        checks.notes.append(("note", f"{first.name} {verdict}; using {best.name}"))
    if check is not None:
        said += (
            f"; {best.name} masks match float32 on {check.inputs} ({check.describe()}), at "
            f"{check.speedup:.2f}x the speed of float32 Keras"
        )
    return NetworkChoice(best, f"{said}; running {best.name}", check, checks.notes)


def _verdict(result: PrecisionParity | None) -> str:
    """What a check found, to follow a candidate's name ("bf16 (keras) ...")."""
    if result is None:
        return "could not be checked: no images to check it on (the run's cache is gone)"
    if result.passed:
        return f"is slower here ({result.speedup:.2f}x float32 Keras)"
    return (
        f"gives masks that differ from float32 for this run ({result.describe()} on "
        f"{result.inputs}; {'; '.join(result.failures)})"
    )
