"""Untrusted model and config files: pneumo never runs code stored in them.

`model.load_model` accepts only the .keras zip format, checks its config.json (parsed as JSON)
for layers that hold code or name foreign modules, and builds the model in Keras safe mode.
Every refusal is one line naming the file. Config files (config.json, postprocess.json,
state.json) are parsed as JSON and checked, never evaluated.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.choices import CODE_ENCODERS
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.engine.tf import import_tf
from pneumo_cli.model import build, encoders
from pneumo_cli.model.build import build_model
from pneumo_cli.model.saving import load_model
from tests.robustness.conftest import REPO, copy_run, error_lines

runner = CliRunner()


def _tf():
    return import_tf()


def _lambda_model(marker: Path):
    """A tiny Keras model whose Lambda layer creates ``marker`` whenever its code runs."""
    tf = _tf()
    inputs = tf.keras.Input((8, 8, 3))
    touch = lambda x, p=str(marker): (__import__("pathlib").Path(p).touch(), x)[1]  # noqa: E731
    outputs = tf.keras.layers.Lambda(touch, name="innocent")(inputs)
    model = tf.keras.Model(inputs, outputs)
    marker.unlink()  # building the model ran the code once, here in the test
    return model


def _refused(result_or_error, path: Path, *words: str) -> str:
    message = str(result_or_error)
    assert "\n" not in message and message.startswith(str(path)), message
    for word in words:
        assert word in message, message
    return message


def test_pneumo_models_load_with_every_weight_from_the_file(tiny_run) -> None:
    path = tiny_run["run"] / "best.keras"
    model = load_model(path)
    import h5py

    with zipfile.ZipFile(path) as archive:
        weights = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights, "r") as h5:
        stored = []
        h5.visititems(
            lambda name, item: (
                stored.append(np.asarray(item)) if isinstance(item, h5py.Dataset) else None
            )
        )

    def digests(arrays) -> list[str]:
        return sorted(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays)

    assert len(stored) == len(model.weights) > 100
    assert digests(stored) == digests(model.get_weights())
    assert model.compiled_loss is None  # loaded for inference only


def test_a_keras_file_with_a_lambda_layer_is_refused_by_predict(tiny_run, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    run = copy_run(tiny_run["run"], tmp_path / "run")
    (run / "best.keras").unlink()
    _lambda_model(marker).save(run / "best.keras")
    dicom = next((tiny_run["raw"] / "dicom-images-train").rglob("*.dcm"))
    argv = ["predict", str(dicom), "--run", str(run), "-o", str(tmp_path / "p")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0] == (
        f"error: {run / 'best.keras'}: refused to load this model file: its layer 'innocent' is "
        "a Lambda layer, which holds code; pneumo never runs code from model files"
    )
    assert not marker.exists()
    assert not (tmp_path / "p").exists()


def test_an_hdf5_model_renamed_to_keras_is_refused_without_running_its_code(
    tmp_path: Path,
) -> None:
    """Keras loads any non-zip file through its legacy HDF5 path, where safe mode does not apply:
    the Lambda's bytecode would run."""
    marker = tmp_path / "code-ran"
    model = _lambda_model(marker)
    model.save(tmp_path / "model.h5")
    disguised = tmp_path / "best.keras"
    (tmp_path / "model.h5").rename(disguised)
    with pytest.raises(InputError) as refused:
        load_model(disguised)
    _refused(refused.value, disguised, "not a .keras zip archive", "HDF5")
    assert not marker.exists()


def _keras_archive(path: Path, config: object, members: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", "{}")
        for name, data in (members or {"model.weights.h5": b""}).items():
            archive.writestr(name, data)
    return path


def test_a_layer_naming_a_foreign_module_is_refused_before_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keras imports the module a layer's config names; a planted module must never run."""
    (tmp_path / "planted_pneumo_module.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'code-ran')!r}).touch()\n"
        "class Evil:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    layer = {"module": "planted_pneumo_module", "class_name": "Evil", "config": {"name": "evil"},
             "registered_name": "Evil"}  # fmt: skip
    config = {"module": "keras", "class_name": "Functional", "config": {"name": "m",
              "layers": [layer]}}  # fmt: skip
    path = _keras_archive(tmp_path / "planted.keras", config)
    with pytest.raises(InputError) as refused:
        load_model(path)
    _refused(refused.value, path, "'evil'", "'planted_pneumo_module'")
    assert "planted_pneumo_module" not in sys.modules
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a readable Keras model (not a .keras zip archive"),
        (b"PK\x03\x04 truncated zip", "not a .keras zip archive"),
        ("no-config", "not a model written by pneumo (missing members in archive)"),
        ("assets", "not a model written by pneumo (unexpected 'assets/x.txt' in archive)"),
        ("bad-json", "not a readable Keras model"),
        ("json-list", "not a readable Keras model (config.json is not an object)"),
        ("empty-weights", "not a readable Keras model"),
    ],
)
def test_broken_model_archives_give_one_line(content, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "best.keras"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "no-config":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model.weights.h5", b"")
    elif content == "assets":
        _keras_archive(path, {}, {"model.weights.h5": b"", "assets/x.txt": b"1"})
    elif content == "bad-json":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{'class_name': eval('1')}")
            archive.writestr("model.weights.h5", b"")
    elif content == "json-list":
        _keras_archive(path, [1, 2])
    else:  # a real model's config with a weights member that is not HDF5
        tf = _tf()
        inputs = tf.keras.Input((4,))
        tf.keras.Model(inputs, tf.keras.layers.Dense(2)(inputs)).save(tmp_path / "small.keras")
        with zipfile.ZipFile(tmp_path / "small.keras") as source:
            config = json.loads(source.read("config.json"))
        _keras_archive(path, config, {"model.weights.h5": b"not hdf5"})
    with pytest.raises(InputError) as refused:
        load_model(path)
    _refused(refused.value, path, expected)


def test_no_code_path_evaluates_or_unpickles_files() -> None:
    """Config and model files are parsed (json, zipfile, h5py), never evaluated or unpickled."""
    forbidden = re.compile(
        r"\b(eval|exec)\(|\bpickle\b|\bmarshal\b|yaml\.(unsafe_)?load\b|allow_pickle\s*=\s*True"
        r"|safe_mode\s*=\s*False|enable_unsafe_deserialization|literal_eval|__import__"
    )
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "pneumo_cli").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if forbidden.search(line)
    ]
    assert hits == []
    loads = [p for p in (REPO / "pneumo_cli").rglob("*.py") if "keras.models.load_model" in
             p.read_text(encoding="utf-8")]  # fmt: skip
    assert loads == [], "Keras models must be loaded through model.load_model only"


# --- config.json with unexpected types ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "command", "expected"),
    [
        (lambda c: [1, 2], "predict", "expected a JSON object"),
        (lambda c: "not json {", "predict", "unreadable"),
        (lambda c: {**c, "preprocess": "abc"}, "predict", "'preprocess' must be a JSON object"),
        (lambda c: {**c, "preprocess": {**c["preprocess"], "image_size": "64"}}, "predict",
         "config.json: image_size must be an integer, got \"64\""),
        (lambda c: {**c, "preprocess": None}, "predict", "'preprocess' must be a JSON object"),
        (lambda c: {**c, "preprocess": [64]}, "evaluate", "'preprocess' must be a JSON object"),
        (lambda c: {**c, "cache": 5}, "evaluate", "'cache' must be a string, got 5"),
        (lambda c: {**c, "input_scaling": 5}, "predict", "input_scaling"),
        (lambda c: {**c, "preprocess": {**c["preprocess"], "clahe": "no"}}, "predict",
         "clahe must be true or false, got \"no\""),
    ],
    ids=["list", "not-json", "preprocess-str", "size-str", "preprocess-null", "preprocess-list",
         "cache-int", "scaling-int", "clahe-str"],
)  # fmt: skip
def test_config_json_with_unexpected_types_gives_one_line(
    change, command: str, expected: str, tiny_run, tmp_path: Path
) -> None:
    run = copy_run(tiny_run["run"], tmp_path / "run")
    config = change(json.loads((run / "config.json").read_text()))
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if command == "predict":
        dicom = next((tiny_run["raw"] / "dicom-images-train").rglob("*.dcm"))
        argv = ["predict", str(dicom), "--run", str(run), "-o", str(tmp_path / "out"), "-q"]
    else:
        argv = ["evaluate", "--run", str(run), "--out", str(tmp_path / "out"), "-q"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert 'File "' not in lines[0] and "Traceback" not in result.output
    assert expected in lines[0]


def test_postprocess_json_with_unexpected_types_gives_one_line(tiny_run, tmp_path: Path) -> None:
    run = copy_run(tiny_run["run"], tmp_path / "run")
    (run / "postprocess.json").write_text('{"top_threshold": "__import__(\'os\')"}')
    dicom = next((tiny_run["raw"] / "dicom-images-train").rglob("*.dcm"))
    result = runner.invoke(app, ["predict", str(dicom), "--run", str(run), "-o", str(tmp_path)])
    assert result.exit_code == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'postprocess.json'}: "), lines


def test_state_json_with_unexpected_types_gives_one_line(tiny_run, tmp_path: Path) -> None:
    run = copy_run(tiny_run["run"], tmp_path / "run")
    (run / "state.json").write_text('{"epoch": [], "checkpoint": {"a": 1}, "status": 7}')
    resumed = runner.invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 1, (resumed.output, resumed.exception)
    lines = error_lines(resumed.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'state.json'}: "), lines
    assert "'epoch' must be an integer >= 0, got []" in lines[0]


def test_every_model_build_model_accepts_can_be_loaded_again() -> None:
    """An encoder must be refused before training if its runs could never be loaded."""
    try:
        net = build_model("seresnet18", 64, "none")
    except ConfigError:
        return  # refused up front: fine
    assert [layer.name for layer in net.layers if type(layer).__name__ == "Lambda"] == []


def test_encoders_whose_unet_holds_code_are_refused_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    usable = encoders.available_encoders()
    assert "resnet18" in usable and not set(usable) & set(CODE_ENCODERS)
    with pytest.raises(ConfigError) as refused:
        encoders.check_encoder("resnext50")
    message = str(refused.value)
    assert "\n" not in message and "Lambda layers" in message and "refuses to load" in message
    assert message.endswith(f"choose one of: {', '.join(usable)}")
    with pytest.raises(ConfigError, match="^unknown encoder 'resnet35'; choose one of: resnet18"):
        encoders.check_encoder("resnet35")
    # build_model also checks the network it built (a future segmentation_models may differ)
    monkeypatch.setattr(build, "check_encoder", lambda name: name)
    with pytest.raises(ConfigError, match=r"encoder 'seresnet18' cannot be used: .*\('lambda"):
        build.build_model("seresnet18", 64, "none")
