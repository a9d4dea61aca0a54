"""The app itself: help, version, exit codes and the error boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pneumo_cli import __version__
from pneumo_cli.cli.main import app

runner = CliRunner()


def test_help_lists_commands_and_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "rle-decode" in result.output and "rle-encode" in result.output
    assert "Exit codes" in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output
    assert "rle-decode" in result.output


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
