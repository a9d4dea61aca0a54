"""`pneumo predict` resumes only the job that made its output folder, locks the folder, and
exits 1 when nothing at all could be predicted (issue: wrong results with exit 0)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.locks import folder_lock
from pneumo_cli.inference.postprocess import Gate, save_gate

runner = CliRunner()
pytestmark = pytest.mark.slow


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def run(tiny_run, tmp_path: Path) -> Path:
    """A private copy of the tiny run, whose gate a test may change."""
    return Path(shutil.copytree(tiny_run["run"], tmp_path / "run", symlinks=True))


@pytest.fixture()
def scans(tiny_run, tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for path in sorted((tiny_run["raw"] / "dicom-images-train").rglob("*.dcm"))[:6]:
        shutil.copy(path, folder / path.name)
    return folder


def test_a_new_gate_is_not_resumed_into_old_outputs(run: Path, scans: Path, tmp_path) -> None:
    out = tmp_path / "P"
    first = invoke("predict", scans, "--run", run, "--out", out, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["positive"] == 6  # the barely trained run marks them all
    job = json.loads((out / "job.json").read_text())
    assert job["gate"]["top_threshold"] == 0.5 and job["tta"] == "none"
    # As `evaluate --tune` would: a new gate, here so strict that no image is positive.
    save_gate(run / "postprocess.json", Gate(top_threshold=1.0, bottom_threshold=1.0))
    again = invoke("predict", scans, "--run", run, "--out", out)
    assert again.exit_code == 1
    assert "holds the outputs of another predict job" in again.stderr
    assert "gate bottom_threshold 0.5 -> 1.0" in " ".join(again.stderr.split())
    assert all(r["has_pneumothorax"] == "1" for r in rows(out))  # nothing was mixed in
    fresh = invoke("predict", scans, "--run", run, "--out", tmp_path / "fresh", "--json")
    replaced = invoke("predict", scans, "--run", run, "--out", out, "--overwrite", "--json")
    assert replaced.exit_code == 0 and fresh.exit_code == 0
    assert json.loads(replaced.stdout)["positive"] == json.loads(fresh.stdout)["positive"] == 0
    assert rows(out) == rows(tmp_path / "fresh")


def test_other_gate_options_or_tta_are_refused_too(run: Path, scans: Path, tmp_path) -> None:
    out = tmp_path / "P"
    assert invoke("predict", scans, "--run", run, "--out", out, "-q").exit_code == 0
    for extra in (["--top-threshold", "0.9"], ["--tta", "hflip"]):
        result = invoke("predict", scans, "--run", run, "--out", out, *extra)
        assert result.exit_code == 1 and "another predict job" in result.stderr, extra
    same = invoke("predict", scans, "--run", run, "--out", out, "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["skipped_existing"] == 6


def test_outputs_of_an_older_pneumo_without_a_job_file_are_not_resumed(run, scans, tmp_path):
    out = tmp_path / "P"
    assert invoke("predict", scans, "--run", run, "--out", out, "-q").exit_code == 0
    (out / "job.json").unlink()
    result = invoke("predict", scans, "--run", run, "--out", out)
    assert result.exit_code == 1 and "without a job.json" in result.stderr


def test_a_second_predict_into_a_folder_in_use_is_refused(run, scans, tmp_path) -> None:
    out = tmp_path / "P"
    out.mkdir()
    with folder_lock(out, "predict"):  # as a predict running in another process holds it
        result = invoke("predict", scans, "--run", run, "--out", out)
    assert result.exit_code == 1
    assert "predict" in result.stderr and not (out / "predictions.csv").exists()
    assert invoke("predict", scans, "--run", run, "--out", out, "-q").exit_code == 0


def test_nothing_predictable_exits_1_with_the_first_reason(run, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    (bad / "b.png").write_bytes(b"not a png")
    out = tmp_path / "P"
    result = invoke("predict", bad, "--run", run, "--out", out)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no input could be predicted (2 rejected" in lines[0]
    assert "a.dcm" in lines[0]
    assert (out / "rejected.csv").is_file() and not (out / "predictions.csv").exists()


def test_overlay_with_nothing_drawable_exits_1(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "x.png").write_bytes(b"not a png")
    result = invoke("overlay", images, "--masks", masks, "--out", tmp_path / "ov")
    assert result.exit_code == 1
    assert "no overlay could be drawn (1 input(s) rejected" in " ".join(result.stderr.split())


def test_pacs_export_layout_is_named_by_sop_instance_uid(run: Path, scans: Path, tmp_path) -> None:
    """Two `.../SE000000/IM000000` files: predict names them by SOPInstanceUID, as preprocess
    does, instead of rejecting the second as a duplicate `IM000000`."""
    import pydicom

    export = tmp_path / "export"
    expected = set()
    for n, path in enumerate(sorted(scans.glob("*.dcm"))[:2]):
        member = export / "PT000000" / "ST000000" / f"SE00000{n}" / "IM000000"
        member.parent.mkdir(parents=True)
        shutil.copy(path, member)
        expected.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    out = tmp_path / "P"
    result = invoke("predict", export, "--run", run, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rejected"] == 0
    assert {r["ImageId"] for r in rows(out)} == expected
    assert {p.stem for p in (out / "masks").glob("*.png")} == expected
