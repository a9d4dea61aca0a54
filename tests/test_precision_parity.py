"""Inference precision: the check of bf16 (or fp16) masks against float32, its cache in the run
folder, `auto`'s fall-back, and the usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.inference import precision_parity as parity
from pneumo_cli.inference.postprocess import Gate

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- the comparison, on hand-made masks ---------------------------------------------------------


def test_compare_masks_counts_agreement_dice_and_flips() -> None:
    reference = np.zeros((4, 2, 2), np.uint8)
    candidate = np.zeros((4, 2, 2), np.uint8)
    reference[0, 0, :] = 1  # image 0: 2 px vs 1 px, overlap 1 -> Dice 2/3
    candidate[0, 0, 0] = 1
    reference[1, 1, 1] = 1  # image 1: positive -> empty (a flip), Dice 0
    # image 2: both empty, Dice 1; image 3: empty -> 1 px (a flip), Dice 0
    candidate[3, 0, 0] = 1
    agreement, dice, flipped = parity.compare_masks(reference, candidate)
    assert agreement == pytest.approx(13 / 16)  # 3 of the 16 pixels differ
    assert dice == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert flipped == 2


def test_judge_applies_the_three_limits_after_the_gate() -> None:
    size = 32
    reference = np.zeros((1000, size, size), np.float32)
    reference[:, 8:24, 8:24] = 0.9  # 256 px in every image
    same = parity.judge("bf16", reference, reference.copy(), Gate(), "hand-made")
    assert same.passed and same.pixel_agreement == 1.0 and same.mean_dice == 1.0

    one_pixel = reference.copy()
    one_pixel[:, 8, 8] = 0.4  # 1 of 1024 px per image flips under the 0.5 threshold
    result = parity.judge("bf16", reference, one_pixel, Gate(), "hand-made")
    # 99.902% of pixels agree (passes 99.9%), Dice 510/511 = 0.998 (passes 0.99)
    assert result.passed, result.failures
    two_pixels = one_pixel.copy()
    two_pixels[:, 8, 9] = 0.4  # 2 px per image: 99.80% of pixels agree
    failed = parity.judge("bf16", reference, two_pixels, Gate(), "hand-made")
    assert failed.failures == ("pixel agreement 99.805% < 99.9%",)

    flips = reference.copy()
    flips[:6] = 0.1  # 6 of 1000 images become empty: 0.6% > 0.5%
    flipped = parity.judge("bf16", reference, flips, Gate(), "hand-made")
    assert flipped.flipped == 6 and any("6 of 1000 images flipped" in f for f in flipped.failures)
    five = reference.copy()
    five[:5] = 0.1  # 5 of 1000: at the limit, allowed by this rule
    assert not any(
        "flipped" in f for f in parity.judge("bf16", reference, five, Gate(), "").failures
    )

    nan = reference.copy()
    nan[0] = np.nan  # a broken candidate map counts as empty, never as agreeing
    assert parity.judge("bf16", reference, nan, Gate(), "").flipped == 1


# --- the cache file -----------------------------------------------------------------------------


def _key(**changes) -> parity.ParityKey:
    values = dict(precision="bf16", tta="none", gate={"top_threshold": 0.5}, model_sha256="ab",
                  machine={"cpu": "CPU A", "cpu_bf16": ["avx512_bf16"], "gpus": []},
                  versions={"tensorflow": "2.21.0"})  # fmt: skip
    return parity.ParityKey(**(values | changes))


def _result(**changes) -> parity.PrecisionParity:
    values = dict(precision="bf16", images=8, inputs="8 val", pixel_agreement=0.9995,
                  mean_dice=0.995, flipped=0, seconds=1.5)  # fmt: skip
    return parity.PrecisionParity(**(values | changes))


def test_cached_results_are_found_by_machine_kind_and_setting(tmp_path: Path) -> None:
    assert parity.cached_parity(tmp_path, _key()) == (None, None)
    assert parity.store_parity(tmp_path, _key(), _result()) is None
    failing = _result(failures=("mean Dice 0.9 < 0.99",), mean_dice=0.9)
    assert parity.store_parity(tmp_path, _key(tta="hflip"), failing) is None
    assert parity.cached_parity(tmp_path, _key()) == (_result(), None)
    assert parity.cached_parity(tmp_path, _key(tta="hflip")) == (failing, None)
    # Another machine kind, model file, gate or TensorFlow: not known yet.
    other_cpu = {"cpu": "CPU B", "cpu_bf16": ["amx_bf16", "avx512_bf16"], "gpus": []}
    for key in (_key(machine=other_cpu), _key(model_sha256="cd"), _key(gate={"top_threshold": 0.6}),
                _key(versions={"tensorflow": "2.22.0"})):  # fmt: skip
        assert parity.cached_parity(tmp_path, key) == (None, None)


def test_a_damaged_or_foreign_cache_file_is_ignored_with_a_note(tmp_path: Path) -> None:
    from pneumo_cli import __version__

    path = tmp_path / parity.PARITY_FILE
    for content in ("{not json", '{"entries": 3}', "[]"):
        path.write_text(content)
        result, note = parity.cached_parity(tmp_path, _key())
        assert result is None and note.startswith(f"{path} is damaged")
    path.write_text(json.dumps({"pneumo_version": "0.0.1", "entries": []}))
    result, note = parity.cached_parity(tmp_path, _key())
    assert result is None and note == (
        f"{path} was written by pneumo 0.0.1; checking again with {__version__}"
    )
    # This version, but checks timed the old way (format 1 had no "check_format"): measured again.
    entry = {"key": _key().to_dict(), "result": _result().to_dict()}
    path.write_text(json.dumps({"pneumo_version": __version__, "entries": [entry]}))
    result, note = parity.cached_parity(tmp_path, _key())
    assert result is None and note == (
        f"{path} holds checks timed the old way (each network alone); checking again"
    )
    assert parity.store_parity(tmp_path, _key(), _result()) is None  # replaces the old file
    assert parity.cached_parity(tmp_path, _key()) == (_result(), None)


def test_a_parity_file_that_cannot_be_written_gets_a_note_not_an_error(tmp_path: Path) -> None:
    (tmp_path / parity.PARITY_FILE).mkdir()  # unwritable for root too (a read-only run folder)
    note = parity.store_parity(tmp_path, _key(), _result())
    assert note and note.startswith(f"cannot save the precision check in {tmp_path}")
    assert note.endswith("it runs again next time")


# --- the choice between ways to run the network ------------------------------------------------


class _FakeRun:
    """What choose_network reads of a run, with no cache (the images come from the inputs)."""

    def __init__(self, folder: Path) -> None:
        self.run_dir = folder
        self.config: dict = {}
        self.image_size = 16
        self.gate = Gate()
        self.model_path = folder / "best.keras"
        self.model_path.write_bytes(b"weights")
        self.settings = None


def _network(maps: np.ndarray, delay_s: float):
    import time

    def run(images: np.ndarray) -> np.ndarray:
        time.sleep(delay_s)
        return maps[: len(images)]

    return run


def test_the_fastest_way_that_matches_float32_wins(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = (rng.random((8, 16, 16)) > 0.5).astype(np.float32) * 0.8 + 0.1
    wrong = 1.0 - truth
    inputs = lambda settings, n: (np.zeros((8, 16, 16), np.uint8), "8 inputs")  # noqa: E731
    fast_wrong, fast_right = parity.Candidate("openvino", "bf16"), parity.Candidate("keras", "bf16")
    slow_right = parity.Candidate("openvino", "fp32")
    networks = {parity.REFERENCE: _network(truth, 0.02), fast_wrong: _network(wrong, 0.0),
                fast_right: _network(truth, 0.005), slow_right: _network(truth, 0.04)}  # fmt: skip
    built = []
    build = lambda c: built.append(c) or networks[c]  # noqa: E731
    order = [fast_wrong, fast_right, slow_right, parity.REFERENCE]
    choice = parity.choose_network(_FakeRun(tmp_path), order, "auto", build, "none", [], inputs)
    assert choice.candidate == fast_right and choice.check.speedup > 1
    assert choice.notes == [("note", choice.notes[0][1])]
    assert choice.notes[0][1].startswith("bf16 (openvino) gives masks that differ from float32")
    assert choice.notes[0][1].endswith("; using bf16 (keras)")
    assert built.count(parity.REFERENCE) == 1  # one reference pass serves every candidate
    # A second choice reads every answer from the run's file: no network is run or made.
    built.clear()
    again = parity.choose_network(_FakeRun(tmp_path), order, "auto", build, "none", [], inputs)
    assert again.candidate == fast_right and built == []
    # Only the wrong one asked for (an explicit --precision and --engine): run, with a warning.
    asked = parity.choose_network(_FakeRun(tmp_path), [fast_wrong], "asked", build, "none", [],
                                  inputs)  # fmt: skip
    assert asked.candidate == fast_wrong and asked.notes[0][0] == "warning"
    # Slower than float32 Keras and not wanted first: float32 Keras runs.
    other = tmp_path / "other"
    other.mkdir()
    slow = parity.choose_network(_FakeRun(other), [slow_right, parity.REFERENCE], "auto", build,
                                 "none", [], inputs)  # fmt: skip
    assert slow.candidate == parity.REFERENCE
    assert "is slower here" in slow.notes[-1][1]


def test_speeds_are_timed_side_by_side_so_a_pause_does_not_pick_the_engine() -> None:
    """The machine is 4x slower for a while (a pause, another process, the clock settling).
    Timed one after the other, the network that ran during the slow stretch looked 4x slower;
    timed in alternating rounds, both see it alike and the ratio stays the true one (2x)."""
    import time

    calls = []

    def network(seconds: float):
        def run(images: np.ndarray) -> np.ndarray:
            calls.append(1)
            time.sleep(seconds * (4 if 3 <= len(calls) <= 6 else 1))
            return np.zeros(images.shape, np.float32)

        return run

    images = np.zeros((16, 4, 4), np.uint8)
    # Sleeps long enough that a busy CI machine's scheduling delays barely move the ratio.
    reference_rate, rate = parity.paired_rates(network(0.06), network(0.03), images, batch_size=8)
    assert len(calls) == 2 + 2 * parity.TIMING_ROUNDS  # a warm-up each, then the rounds
    assert 1.6 < rate / reference_rate < 2.5, (reference_rate, rate)
    assert 8 / (4 * 0.06) < reference_rate < 8 / 0.06  # rates of one 8-image batch
    # Fewer images than a batch, and one network on both sides: both rates measured.
    same = network(0.03)
    reference_rate, rate = parity.paired_rates(same, same, images[:3], batch_size=8)
    assert 3 / (4 * 0.03) < min(reference_rate, rate) <= max(reference_rate, rate) < 3 / 0.03


# --- on a real run --------------------------------------------------------------------------------


def _near_threshold_run(tiny_run: dict, target: Path) -> Path:
    """A copy of the tiny run whose logits sit at 0 for about half of the pixels: its last bias
    is moved by the median logit, so float32 and bf16 disagree on many pixels."""
    from pneumo_cli.inference.run_images import cache_images
    from pneumo_cli.model.saving import load_model, save_model
    from pneumo_cli.training.runs import load_run_config

    shutil.copytree(tiny_run["run"], target, symlinks=True)
    (target / parity.PARITY_FILE).unlink(missing_ok=True)
    model = load_model(target / "best.keras")
    config = load_run_config(target)
    images, _ = cache_images(config, 64, ("val",), 8)
    from pneumo_cli.model.encoders import scale_input

    inputs = scale_input(images[..., None], config["input_scaling"])
    probs = np.clip(model.predict(inputs, verbose=0), 1e-6, 1 - 1e-6)
    median_logit = float(np.median(np.log(probs / (1 - probs))))
    conv = model.get_layer("final_conv")
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel, bias - median_logit])
    save_model(model, target / "best.keras")
    return target


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `auto` consider bf16 whatever this CPU is (TensorFlow runs bf16 on any x86 CPU,
    emulated where the instructions are missing), so the test does not depend on the machine."""
    from pneumo_cli.engine import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: ["avx512_bf16"])
    monkeypatch.setattr(precision, "gpu_names", lambda: [])


def test_auto_falls_back_to_fp32_when_bf16_flips_decisions(tiny_run, tmp_path, bf16_cpu):
    run = _near_threshold_run(tiny_run, tmp_path / "run")
    out = tmp_path / "auto"
    result = invoke("predict", "--run", run, "--cache", tiny_run["cache"], "--split", "test",
                    "--out", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["precision"] == "fp32"
    check = summary["precision_check"]  # the check of what runs: fp32 in OpenVINO, or Keras
    assert check is None or (check["precision"] == "fp32" and check["passed"])
    entries = json.loads((run / parity.PARITY_FILE).read_text())["entries"]
    bf16 = [e["result"] for e in entries if e["key"]["precision"] == "bf16"]
    assert bf16 and not any(r["passed"] for r in bf16) and all(r["failures"] for r in bf16)
    assert all(r["inputs"].endswith(f" val) of cache {tiny_run['cache']}") for r in bf16)
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: bf16 (")]
    assert len(notes) == 1 and "; using fp32 (" in notes[0], result.stderr
    assert "gives masks that differ from float32" in notes[0] and "of mask pixels agree" in notes[0]
    job = json.loads((out / "job.json").read_text())
    assert (job["precision"], job["engine"]) == ("fp32", summary["engine"])

    asked = invoke("predict", "--run", run, "--cache", tiny_run["cache"], "--split", "test",
                   "--out", tmp_path / "bf16", "--precision", "bf16", "--json")  # fmt: skip
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["precision"] == "bf16"
    warnings = [line for line in asked.stderr.splitlines() if line.startswith("warning: ")]
    assert any("as asked, but it gives masks that differ from float32" in w for w in warnings)


def test_the_check_runs_once_per_machine_kind(tiny_run, tmp_path, bf16_cpu, monkeypatch):
    from pneumo_cli.engine import precision
    from pneumo_cli.inference.predictor import load_predictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    (run / parity.PARITY_FILE).unlink(missing_ok=True)
    calls = []
    measure = parity.measure
    monkeypatch.setattr(parity, "measure", lambda *a, **k: calls.append(1) or measure(*a, **k))
    first = load_predictor(run, precision="bf16", engine="keras")
    assert calls == [1] and (run / parity.PARITY_FILE).is_file()
    again = load_predictor(run, precision="bf16", engine="keras")
    assert calls == [1] and again.precision_check == first.precision_check  # from the cache
    monkeypatch.setattr(precision, "cpu_model", lambda *a: "Another CPU")
    load_predictor(run, precision="bf16", engine="keras")
    assert calls == [1, 1]  # another kind of machine checks again
    entries = json.loads((run / parity.PARITY_FILE).read_text())["entries"]
    assert len(entries) == 2 and "Another CPU" in {e["key"]["machine"]["cpu"] for e in entries}
    (run / parity.PARITY_FILE).write_text("{damaged")
    damaged = load_predictor(run, precision="bf16", engine="keras")
    assert calls == [1, 1, 1]
    assert any("is damaged" in text for _, text in damaged.notes)


def test_without_images_auto_stays_fp32(tiny_run, tmp_path, bf16_cpu):
    from pneumo_cli.inference.predictor import load_predictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    (run / parity.PARITY_FILE).unlink(missing_ok=True)
    config = json.loads((run / "config.json").read_text())
    config["cache"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    predictor = load_predictor(run, engine="keras")
    assert (
        predictor.precision == "fp32" and "no images to check it on" in predictor.precision_reason
    )
    empty = np.zeros((0, 64, 64), np.uint8)
    asked = load_predictor(run, precision="bf16", engine="keras",
                           parity_inputs=lambda settings, n: (empty, ""))  # fmt: skip
    assert asked.precision == "bf16" and asked.notes[0][0] == "warning"
    assert "as asked, but it could not be checked" in asked.notes[0][1]


def test_fp16_without_a_gpu_and_precision_with_an_export_are_usage_errors(
    tiny_run, tmp_path, monkeypatch
):
    from pneumo_cli.engine import precision as engine_precision

    monkeypatch.setattr(engine_precision, "gpu_names", lambda: [])  # GPU-less, on any host
    result = invoke("predict", "--run", tiny_run["run"], "--cache", tiny_run["cache"],
                    "--out", tmp_path / "o", "--precision", "fp16")  # fmt: skip
    assert result.exit_code == 2
    assert "--precision fp16 needs an NVIDIA GPU to predict on" in result.stderr
    assert not (tmp_path / "o").exists()
    result = invoke("evaluate", "--run", tiny_run["run"], "--precision", "fp16")
    assert result.exit_code == 2 and "fp16 needs an NVIDIA GPU" in result.stderr
    for fmt, precision, message in [
        ("onnx", "bf16", "cannot be held by a onnx export: ONNX Runtime has no bfloat16"),
        ("tflite", "bf16", "cannot be held by a tflite export"),
        ("savedmodel", "fp16", "no export format computes in float16"),
    ]:
        result = invoke("export", "--run", tiny_run["run"], "--format", fmt, "--precision",
                        precision, "--out", tmp_path / fmt)  # fmt: skip
        assert result.exit_code == 2 and message in result.stderr, (fmt, result.stderr)
        assert not (tmp_path / fmt).exists()


def test_evaluate_records_the_precision(tiny_run, tmp_path):
    result = invoke("evaluate", "--run", tiny_run["run"], "--split", "test", "--precision", "fp32",
                    "--engine", "keras", "--out", tmp_path / "e")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["inference"] == {
        "precision": "fp32", "engine": "keras", "reason": "asked for with --precision"
    }  # fmt: skip
    assert isinstance(metrics["precision"], float)  # the positive predictive value, untouched


def test_the_inference_copy_changes_no_float32_result(tiny_run):
    """Folded padding and the other fast paths give float32 maps equal to the plain model's."""
    from pneumo_cli.engine.tf import import_tf
    from pneumo_cli.model.build import precision_copy
    from pneumo_cli.model.saving import load_model

    tf = import_tf()
    model = load_model(tiny_run["run"] / "best.keras")
    images = np.random.default_rng(0).uniform(-2, 2, (4, 64, 64, 3)).astype(np.float32)
    plain = model(tf.constant(images), training=False).numpy()
    fast = precision_copy(model, "fp32")
    assert fast is not model
    np.testing.assert_allclose(fast(tf.constant(images), training=False).numpy(), plain, atol=1e-5)
    mixed = precision_copy(model, "bf16")
    assert mixed.get_layer("final_conv").compute_dtype == "bfloat16"
    assert mixed.layers[-1].compute_dtype == "float32" and mixed.output.dtype == tf.float32


def test_openvino_is_imported_with_its_telemetry_off() -> None:
    """OpenVINO's conversion API reports usage to an analytics service unless its telemetry
    package is missing; pneumo makes it missing in its own process (checked in a fresh one)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pneumo_cli.engine.openvino import import_openvino\n"
        "import_openvino()\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(telemetry_utils.tm.__name__, 'openvino_telemetry' in sys.modules and "
        "sys.modules['openvino_telemetry'] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "False"]


def test_openvino_with_auto_runs_the_cpus_precision_on_a_machine_with_a_gpu(
    tiny_run, tmp_path, monkeypatch
):
    """OpenVINO computes on the CPU: a GPU's fp16 is not what `auto` means for it."""
    from pneumo_cli.engine import precision as engine_precision

    monkeypatch.setattr(engine_precision, "gpu_names", lambda: ["NVIDIA A100-SXM4-40GB"])
    monkeypatch.setattr(engine_precision, "cpu_bf16_flags", lambda *a: [])
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    result = invoke("predict", "--run", run, "--cache", tiny_run["cache"], "--split", "test",
                    "--out", tmp_path / "o", "--engine", "openvino", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["engine"], summary["precision"]) == ("openvino", "fp32")
    assert "no bfloat16 instructions" in summary["precision_reason"]
    result = invoke("predict", "--run", run, "--cache", tiny_run["cache"], "--split", "test",
                    "--out", tmp_path / "o16", "--engine", "openvino",
                    "--precision", "fp16")  # fmt: skip
    assert result.exit_code == 2 and "--engine openvino cannot run fp16" in result.stderr
