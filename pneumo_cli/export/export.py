"""`pneumo export`: a trained run -> a verified SavedModel, TFLite or ONNX model for deployment.

The export is written into a temporary folder beside ``OUT``, loaded back with the runtime that
will serve it (``inference.exported.load_runner``) and compared with the run's Keras model on fixed
images: the run cache's validation images when the cache is still there, synthetic phantoms
otherwise. Only an export that passes its parity check is renamed to ``OUT``; a failing one is
deleted and the command exits 1. ``OUT/pneumo-model.json`` records what the model expects
(input size and range, preprocessing settings), the post-processing gate, package versions and
the parity results.

Parity, per image set: the largest and mean absolute probability difference, the fraction of
pixels whose post-processed mask agrees, and the mean per-image Dice between the Keras float32
masks and the export's masks (two empty masks count as Dice 1). Tolerances per model kind are in
:data:`TOLERANCES`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pneumo_cli import __version__
from pneumo_cli.core.choices import ExportFormat, Precision, Quantization, check_choice
from pneumo_cli.core.config import to_dict
from pneumo_cli.core.errors import ConfigError, OutputError, PneumoError, UsageError
from pneumo_cli.core.files import TEMP_PREFIX, atomic_write_json, describe_os_error
from pneumo_cli.export.parity import (
    PARITY_ORIGINAL_HW,
    TOLERANCES,
    Parity,
    calibration_images,
    compare_probabilities,
    parity_images,
    run_in_batches,
)
from pneumo_cli.inference.exported import (
    INPUT_NAME,
    MANIFEST_FILE,
    OUTPUT_NAME,
    load_runner,
)
from pneumo_cli.inference.postprocess import (
    area_scale_for,
)


@dataclass
class ExportSummary:
    """What ``export_run`` wrote and how the parity check went."""

    run: str
    format: str
    quantize: str | None
    out_dir: str
    model: str
    size_mb: float
    parity: Parity
    calibration: str | None = None
    seconds: float = 0.0
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "parity"}
        parity = self.parity
        values.update(
            parity_inputs=parity.inputs,
            parity_images=parity.images,
            max_abs_diff=float(f"{parity.max_abs_diff:.3g}"),
            mean_abs_diff=float(f"{parity.mean_abs_diff:.3g}"),
            mask_agreement=round(parity.mask_agreement, 6),
            dice_agreement=round(parity.dice_agreement, 6),
            parity_passed=parity.passed,
        )
        return values


def check_request(fmt: str, quantize: str | None, precision: str = "auto") -> str:
    """Refuse an unknown format or quantization, quantization outside TFLite, or a compute
    precision the format cannot hold; returns the precision the export computes in.

    ``auto`` is fp32 for every format: an export is made once and run on other machines, and
    float32 runs everywhere (OpenVINO runs a float32 ONNX model in bf16 by itself on CPUs with
    bfloat16 instructions). bf16 is held by a SavedModel only.

    Raises:
        ConfigError: bad format or quantization.
        UsageError: a precision the format cannot compute in.
    """
    check_choice(ExportFormat, fmt, "--format")
    if quantize is not None:
        check_choice(Quantization, quantize, "--quantize")
    if quantize is not None and fmt != "tflite":
        raise ConfigError(f"--quantize works with --format tflite only, not {fmt}")
    try:
        check_choice(Precision, precision, "--precision")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if precision == "fp16":
        raise UsageError(
            "--precision fp16: no export format computes in float16 here; for half-size "
            "weights use --format tflite --quantize float16"
        )
    if precision == "bf16" and fmt != "savedmodel":
        why = {
            "onnx": "ONNX Runtime has no bfloat16 convolutions on the CPU (OpenVINO runs a "
            "float32 ONNX model in bf16 by itself)",
            "tflite": "TFLite has no bfloat16 kernels",
        }[fmt]
        raise UsageError(
            f"--precision bf16 cannot be held by a {fmt} export: {why}; use --precision fp32, "
            "or --format savedmodel for a bf16 graph"
        )
    return "bf16" if precision == "bf16" else "fp32"


def default_out(run_dir: Path, fmt: str, quantize: str | None, precision: str = "fp32") -> Path:
    """``RUN/exports/<format>``, ``RUN/exports/tflite-<quantize>`` or ``.../savedmodel-bf16``."""
    suffix = quantize or (precision if precision != "fp32" else None)
    return run_dir / "exports" / (f"{fmt}-{suffix}" if suffix else fmt)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_versions(fmt: str) -> dict[str, str]:
    """Versions of the packages that wrote (and will run) the export."""
    from pneumo_cli.core.provenance import MODEL_PACKAGES, ONNX_PACKAGES, package_versions

    names = MODEL_PACKAGES + (ONNX_PACKAGES if fmt == "onnx" else ())
    return {"pneumo": __version__, **package_versions(names)}


def _check_out(out: Path, overwrite: bool, run_dir: Path) -> None:
    """Refuse an ``out`` that would replace anything but an earlier export (or empty folder)."""
    resolved = out.resolve()
    if resolved == run_dir.resolve() or resolved in run_dir.resolve().parents:
        raise OutputError(f"--out {out} would replace the run {run_dir}; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another --out")
    if not overwrite:
        raise OutputError(f"{out} exists already; add --overwrite to replace it or choose --out")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise OutputError(
            f"{out} is not an export written by `pneumo export` (no {MANIFEST_FILE}); "
            "--overwrite replaces only exports: choose another --out"
        )


def _replace_folder(source: Path, target: Path) -> None:
    """Move the finished ``source`` folder to ``target``, replacing an old ``target``."""
    old = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-old-{target.name}")
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class _ExportJob:
    opened: Any  # inference.predictor.RunForInference
    model: Any
    fmt: str
    quantize: str | None
    out: Path
    overwrite: bool
    say: Callable[[str], None]
    precision: str = "fp32"
    members: list[dict[str, str]] | None = None  # an ensemble's model files


def _write_checked_export(job: _ExportJob) -> tuple[Path, Parity, str | None]:
    """Convert in a scratch folder beside ``job.out``, check parity, then move it into place.

    Returns the model file written, the parity result and the int8 calibration note.
    """
    from pneumo_cli.export import backends as export_backends

    opened, fmt, quantize, out = job.opened, job.fmt, job.quantize, job.out
    size, scaling = opened.image_size, opened.input_scaling
    images, inputs = parity_images(opened.config, size)
    keras_forward = export_backends.serving_function(job.model, scaling, size)
    reference = run_in_batches(lambda batch: keras_forward(batch)[OUTPUT_NAME].numpy(), images)
    calibration, calibration_note = (None, None)
    if quantize == "int8":
        calibration, calibration_note = calibration_images(opened.config, size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out.parent}: {describe_os_error(exc)}") from None
    scratch = out.with_name(f"{TEMP_PREFIX}{os.getpid()}-{out.name}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir()
        label = fmt + (
            f" ({quantize or job.precision})" if quantize or job.precision != "fp32" else ""
        )
        job.say(f"converting to {label}")
        model = job.model
        if job.precision != "fp32":
            from pneumo_cli.model.build import precision_copy

            model = precision_copy(job.model, job.precision)
        written = export_backends.write_export(
            model, fmt, scaling, size, scratch, quantize, calibration
        )
        job.say(f"checking parity on {inputs}")
        exported = run_in_batches(load_runner(fmt, written), images)
        area_scale = area_scale_for(PARITY_ORIGINAL_HW, (size, size))
        tolerance = TOLERANCES[quantize or ("bf16" if job.precision == "bf16" else "float32")]
        parity = compare_probabilities(
            reference, exported, opened.gate, tolerance, inputs, area_scale
        )
        if not parity.passed:
            raise PneumoError(
                f"{label} export of {opened.run_dir} failed its parity check against Keras on "
                f"{inputs}: {'; '.join(parity.failures)}; nothing was written"
            )
        manifest = _manifest(opened, fmt, quantize, written, calibration_note, parity, job.members)
        manifest["precision"] = job.precision
        atomic_write_json(scratch / MANIFEST_FILE, manifest)
        _check_out(out, job.overwrite, opened.run_dir)  # another process may have made it
        _replace_folder(scratch, out)
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise OutputError(f"cannot write {out}: {describe_os_error(exc)}") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return written, parity, calibration_note


def _manifest(
    opened: Any,
    fmt: str,
    quantize: str | None,
    written: Path,
    calibration_note: str | None,
    parity: Parity,
    members: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """``pneumo-model.json``: what the exported model expects, made of and was checked on
    (``members``: an ensemble's model files, averaged in the graph; None for one model)."""
    size = opened.image_size
    return {
        "pneumo_version": __version__,
        "format": fmt,
        "quantize": quantize,
        "model_file": written.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {
            "name": INPUT_NAME,
            "shape": [None, size, size, 1],
            "dtype": "float32",
            "range": "grey pixel values 0..255 of the prepared (cropped, CLAHE, resized) image",
            "scaling_in_graph": opened.input_scaling,
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [None, size, size, 1],
            "dtype": "float32",
            "range": "pneumothorax probability 0..1 per pixel",
        },
        "image_size": size,
        "input_scaling": opened.input_scaling,
        "encoder": opened.config.get("encoder"),
        "preprocess": to_dict(opened.settings),
        "postprocess": to_dict(opened.gate),
        "source_run": {
            "path": str(opened.run_dir.resolve()),
            "model": opened.model_path.name if not members else None,
            "model_sha256": _sha256(opened.model_path) if not members else None,
        },
        "members": members,
        "calibration": calibration_note,
        "versions": export_versions(fmt),
        "parity": parity.to_dict(),
    }


def _open_models(run: Any) -> tuple[Any, list[tuple[Any, Path]], bool]:
    """The run (or ensemble) to export as one ``RunForInference`` (for an ensemble: the first
    member's, with the ensemble's folder and gate), every (member, model file) it runs, and
    whether it is several runs given one by one (no folder of its own).

    Raises:
        ConfigError: members with other image sizes, input scalings, crop or CLAHE settings.
    """
    import dataclasses

    from pneumo_cli.inference.ensemble import check_members_agree, ensemble_gate, resolve_members
    from pneumo_cli.inference.predictor import open_run_for_inference

    members = resolve_members(run)
    opened = [open_run_for_inference(member) for member in members.runs]
    files = [(o, path) for o in opened for path in o.model_paths]
    if len(files) == 1:
        return opened[0], files, False
    check_members_agree(opened)
    first = opened[0]
    for other in opened[1:]:
        for name, mine, theirs in (
            ("image size", other.image_size, first.image_size),
            ("input scaling", other.input_scaling, first.input_scaling),
        ):
            if mine != theirs:
                raise ConfigError(
                    f"ensemble member {other.run_dir} has {name} {mine}, {first.run_dir} "
                    f"{theirs}: one exported graph needs one {name}; export the members of "
                    "one size and encoder family together, or predict with --run instead"
                )  # fmt: skip
    if len(opened) == 1:
        gate = first.gate  # one run's own checkpoints
    else:
        gate, _, _ = ensemble_gate(members, [o.gate for o in opened])
    ensemble = dataclasses.replace(first, run_dir=members.source, gate=gate)
    return ensemble, files, len(opened) > 1 and not members.sweep


def _load_models(files: list[tuple[Any, Path]], say: Callable[[str], None]) -> Any:
    """One Keras model: the single model file, or a graph averaging the members' outputs."""
    from pneumo_cli.model.saving import load_model

    models = []
    for _, path in files:
        say(f"loading {path}")
        models.append(load_model(path))
    if len(models) == 1:
        return models[0]
    from pneumo_cli.engine.tf import import_tf

    tf = import_tf()
    inputs = tf.keras.Input(models[0].input_shape[1:], name="scaled_image")
    outputs = []
    for index, model in enumerate(models):
        model._name = f"member{index}"  # nested models need distinct names
        outputs.append(tf.keras.layers.Activation("linear", dtype="float32")(model(inputs)))
    mean = tf.keras.layers.Average(name="ensemble_mean", dtype="float32")(outputs)
    return tf.keras.Model(inputs, mean, name="pneumo_ensemble")


def export_run(
    run: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    quantize: str | None = None,
    precision: str = "auto",
    overwrite: bool = False,
    notify: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Export a run's model as ``fmt`` into ``out`` after a passing parity check.

    Args:
        run: run folder (default: the latest run under ./runs); several runs or a `train --cv`
            folder (or a run that keeps its top checkpoints as an ensemble) give one graph that
            averages the members' probabilities. Such members must share the image size and
            the input scaling as well as the crop and CLAHE settings.
        fmt: ``savedmodel``, ``tflite`` or ``onnx``.
        out: export folder (default: ``RUN/exports/<format>[-<quantize>]``).
        quantize: TFLite only: ``float16`` or ``int8`` (calibrated on cache training images).
        precision: the graph's compute type: ``auto``/``fp32``, or ``bf16`` for a SavedModel
            (see :func:`check_request`).
        overwrite: replace an existing ``out``.
        notify: told each step as it starts.

    Raises:
        ConfigError: bad format or quantization, not a run, a missing converter package,
            ensemble members that cannot be one graph.
        InputError: the run has no model.
        OutputError: ``out`` exists (without ``overwrite``) or cannot be written.
        PneumoError: the export failed its parity check (nothing is left behind).
    """
    precision = check_request(fmt, quantize, precision)
    say = notify or (lambda message: None)
    started = time.perf_counter()
    opened, model_files, given_one_by_one = _open_models(run)
    run_dir = opened.run_dir
    if out is None and given_one_by_one:
        raise UsageError("runs given one by one have no folder of their own for the export; "
                         "give --out")  # fmt: skip
    out = Path(out) if out is not None else default_out(run_dir, fmt, quantize, precision)
    _check_out(out, overwrite, run_dir)
    members = None
    if len(model_files) > 1:
        if precision != "fp32":
            raise UsageError(
                f"--precision {precision}: an ensemble exports in fp32 only; drop --precision"
            )
        members = [{"run": str(o.run_dir.resolve()), "model": str(path.relative_to(o.run_dir)),
                    "model_sha256": _sha256(path)} for o, path in model_files]  # fmt: skip
    model = _load_models(model_files, say)
    job = _ExportJob(opened, model, fmt, quantize, out, overwrite, say, precision, members)
    written, parity, calibration_note = _write_checked_export(job)
    model_out = out / written.name
    return ExportSummary(
        run=str(run_dir),
        format=fmt,
        quantize=quantize,
        precision=precision,
        out_dir=str(out),
        model=str(model_out),
        size_mb=round(_size_bytes(model_out) / 1e6, 2),
        parity=parity,
        calibration=calibration_note,
        seconds=round(time.perf_counter() - started, 1),
    )
