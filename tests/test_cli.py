"""The app itself: help, version, exit codes and the error boundary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from pneumo_cli import __version__
from pneumo_cli.cli.main import app

runner = CliRunner()


def test_help_lists_commands_and_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "rle-decode" in result.output and "rle-encode" in result.output
    assert "Exit codes" in result.output


def test_no_arguments_prints_the_help_on_stderr_and_exits_2():
    # no_args_is_help makes a bare `pneumo` a usage error (exit 2) whose message is the help.
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == runner.invoke(app, ["--help"]).stdout
    listed = result.stderr.partition("\nCommands:\n")[2]
    names = re.findall(r"^  (\S+)", listed, re.MULTILINE)  # not the indented continuations
    assert names and sorted(names) == sorted(typer.main.get_command(app).commands)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pneumo {__version__}"


def test_help_does_not_import_tensorflow_or_pydicom():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from pneumo_cli.cli import app\n"
        "for args in (['--help'], ['rle-decode', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "names = ('tensorflow', 'pydicom', 'segmentation_models')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_usage_error_exits_2():
    result = runner.invoke(app, ["rle-decode"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2


def test_pneumo_error_is_one_red_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["rle-decode", str(tmp_path / "missing.csv"), str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error:") and "missing.csv: no such file" in lines[0]
    assert "Traceback" not in result.output


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    from pneumo_cli.io import rle_files

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(rle_files, "decode_csv", broken)
    result = runner.invoke(app, ["rle-decode", "x.csv", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_console_script_runs(tmp_path):
    exe = str(Path(sys.executable).with_name("pneumo"))
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"pneumo {__version__}"


BAD_SETTINGS = [
    (["train", "--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'"),
    (["train", "--loss", "dice"], "'dice' is not one of 'bce', 'bce-dice', 'focal-dice'"),
    (["train", "--encoder", "resnext50"], "'resnext50' is not one of 'resnet18'"),
    (["train", "--image-size", "100"], "image size 100 px must be a multiple of 32"),
    (["train", "--pos-fraction", "1.5"], "--pos-fraction '1.5' must be a fraction in [0, 1]"),
    (["preprocess", "raw", "cache", "--image-size", "100"], "must be a multiple of 32"),
    (["predict", "x.dcm", "--tta", "vflip"], "'vflip' is not one of 'none', 'hflip'"),
    (["evaluate", "--split", "holdout"], "'holdout' is not one of 'train', 'val', 'test'"),
    (["export", "--format", "pdf"], "'pdf' is not one of 'savedmodel', 'tflite', 'onnx'"),
    (["predict"], "give INPUT files/folders or --cache CACHE (exactly one of the two)"),
]


def test_bad_settings_are_usage_errors_before_tensorflow_loads():
    """Each setting is checked where it is defined (core.config / core.choices), by the option
    parser: exit 2 with the rule, and TensorFlow never imported."""
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from pneumo_cli.cli import app\n"
        "cases = json.loads(sys.argv[1])\n"
        "out = [[r.exit_code, r.output] for r in (CliRunner().invoke(app, a) for a, _ in cases)]\n"
        "print(json.dumps({'results': out, 'tf': 'tensorflow' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(BAD_SETTINGS)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["tf"] is False
    for (args, message), (code_, output) in zip(BAD_SETTINGS, report["results"], strict=True):
        assert code_ == 2, (args, output)
        assert message in " ".join(output.split()), (args, output)
