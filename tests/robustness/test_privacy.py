"""Patient privacy: names, IDs, birth dates, institutions and accession numbers in the DICOM
headers never reach an artifact or the console, whatever the command; `preprocess --keep-phi`
is the one way to keep them, in CACHE/phi.csv only."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.io.dicom_read import PHI_FIELDS
from pneumo_cli.io.dicom_write import write_dicom
from tests.robustness.conftest import fake_xray, run_pneumo, write_rle_csv

runner = CliRunner()

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def phi_of(i: int) -> dict[str, str]:
    return {
        "PatientID": f"PHI-ID-4815162{i}",
        "PatientName": f"Fakeperson^Jolene{i}",
        "PatientBirthDate": f"1923041{i}",
        "InstitutionName": "Hospital of Saint Nowhere",
        "AccessionNumber": f"ACC-2342-XYZ{i}",
    }


# Every value, and the parts a formatter might split them into.
NEEDLES = ["PHI-ID-481516", "4815162", "Fakeperson", "Jolene", "1923041", "Saint Nowhere",
           "Nowhere", "ACC-2342", "2342-XYZ"]  # fmt: skip


def leaks(data: bytes) -> list[str]:
    lowered = data.lower()
    return [needle for needle in NEEDLES if needle.lower().encode() in lowered]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 good DICOMs with patient fields, plus a truncated one, a constant one and a duplicate
    SOPInstanceUID, each with patient fields too (rejection messages must not leak them)."""
    root = tmp_path_factory.mktemp("phi") / "raw"
    root.mkdir()
    rng = np.random.default_rng(9)
    for i in range(5):
        fields = phi_of(i)
        write_dicom(root / f"p{i}.dcm", fake_xray(rng, 256, border=6), sop_uid=f"1.2.9.{i}",
                    patient_id=fields["PatientID"], extra=fields)  # fmt: skip
    bad = phi_of(7)
    write_dicom(root / "trunc.dcm", fake_xray(rng, 256), patient_id=bad["PatientID"], extra=bad)
    data = (root / "trunc.dcm").read_bytes()
    (root / "trunc.dcm").write_bytes(data[: len(data) - 4000])
    flat = np.full((256, 256), 90, np.uint8)
    write_dicom(root / "flat.dcm", flat, patient_id=bad["PatientID"], extra=bad)
    write_dicom(root / "zdup.dcm", fake_xray(rng, 256), sop_uid="1.2.9.0",
                patient_id=bad["PatientID"], extra=bad)  # fmt: skip
    assert all(leaks((root / f"p{i}.dcm").read_bytes()) for i in range(5))  # the test can fail
    return root


def test_no_command_writes_or_prints_patient_fields(raw: Path, tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(5)] + ["nolabel"]
    labels = tmp_path / "labels.csv"
    write_rle_csv(labels, ids, 256, seed=1)
    cache, masks, ov = tmp_path / "cache", tmp_path / "masks", tmp_path / "overlays"
    runs = [
        ["preprocess", raw, cache, "--rle", labels, "--workers", "2", "--json"],
        ["preprocess", raw, cache, "--rle", labels, "--workers", "1"],  # table, all reused
        ["preprocess", raw, cache, "--rle", labels, "--image-size", "64"],  # refused: settings
        ["preprocess", raw, cache, "--rle", labels, "--strict"],  # refused: rejections
        ["rle-decode", labels, masks, "--width", "256", "--height", "256", "--json"],
        ["rle-encode", cache / "masks", tmp_path / "cache_masks.csv", "--json"],
        ["rle-encode", masks, tmp_path / "pred.csv"],
        ["overlay", raw, "--masks", masks, "--rle", labels, "--out", ov, "--json"],
        ["overlay", raw, "--masks", masks, "--out", ov, "--overwrite"],
        ["evaluate", "--predictions", tmp_path / "pred.csv", "--truth", cache / "truth.csv",
         "--height", "256", "--width", "256", "--allow-missing", "--out", tmp_path / "ev"],
        ["evaluate", "--predictions", tmp_path / "pred.csv", "--truth", cache / "truth.csv",
         "--height", "256", "--width", "256", "--allow-missing", "--json"],
    ]  # fmt: skip
    codes = []
    for number, args in enumerate(runs):
        if number == 0:  # a real process with worker processes
            done = run_pneumo(*args)
            code, console = done.returncode, (done.stdout + done.stderr).encode()
        else:  # in-process is faster and captures the same streams (and logging's fallback)
            result = runner.invoke(app, [str(arg) for arg in args])
            code, console = result.exit_code, (result.stdout + result.stderr).encode()
        codes.append(code)
        assert leaks(console) == [], f"pneumo {args[0]} printed patient fields: {console[:300]}"
    assert codes == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    rejected = (cache / "rejected.csv").read_text()
    assert "trunc.dcm" in rejected and "flat.dcm" in rejected and "zdup.dcm" in rejected
    artifacts = [p for p in tmp_path.rglob("*") if p.is_file() and p != labels]
    assert len(artifacts) > 30
    found = {str(p.relative_to(tmp_path)): leaks(p.read_bytes()) for p in artifacts}
    assert {name: hits for name, hits in found.items() if hits} == {}
    assert not (cache / "phi.csv").exists()


def test_keep_phi_writes_the_fields_to_phi_csv_only(raw: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = run_pneumo("preprocess", raw, cache, "--keep-phi", "--workers", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["phi_csv"] == str(cache / "phi.csv")
    assert leaks((done.stdout + done.stderr).encode()) == []
    rows = list(csv.DictReader(io.StringIO((cache / "phi.csv").read_text())))
    assert [row["ImageId"] for row in rows] == [f"p{i}" for i in range(5)]
    for i, row in enumerate(rows):
        assert row["source"] == f"p{i}.dcm"
        assert {name: row[name] for name in PHI_FIELDS} == phi_of(i)
    others = [p for p in cache.rglob("*") if p.is_file() and p.name != "phi.csv"]
    assert {str(p): leaks(p.read_bytes()) for p in others if leaks(p.read_bytes())} == {}

    again = run_pneumo("preprocess", raw, cache, "--workers", "1", "-q")  # without --keep-phi
    assert again.returncode == 0, again.stderr
    assert not (cache / "phi.csv").exists()
    assert not [p for p in cache.rglob("*") if p.is_file() and leaks(p.read_bytes())]


# --- the TensorFlow commands and demo-data ------------------------------------------------------


@pytest.fixture(scope="module")
def phi_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 labelled DICOMs of 14 patients, each with all five patient fields, plus a truncated
    one with patient fields (its rejection reason must not leak them either)."""
    root = tmp_path_factory.mktemp("phi_tf")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(21)
    for i in range(14):
        fields = phi_of(i % 10) | {"PatientID": f"PHI-ID-4815162{i:02d}"}
        write_dicom(raw / f"q{i:02d}.dcm", fake_xray(rng, 128, border=4),
                    patient_id=fields["PatientID"], extra=fields)  # fmt: skip
    bad = phi_of(7)
    write_dicom(raw / "trunc.dcm", fake_xray(rng, 128), patient_id=bad["PatientID"], extra=bad)
    data = (raw / "trunc.dcm").read_bytes()
    (raw / "trunc.dcm").write_bytes(data[: len(data) // 2])
    write_rle_csv(root / "labels.csv", [f"q{i:02d}" for i in range(14)], 128, seed=4)
    return raw


def test_train_predict_evaluate_never_write_or_print_patient_fields(
    phi_raw: Path, tmp_path: Path
) -> None:
    """preprocess (64 px) -> train (resnet18, 1 short epoch) -> predict --dicom-seg (in a real
    process, so native logs are searched too) -> evaluate --tune and on test -> overlay of the
    predicted masks -> a refused resume:
    no console output holds a patient field, and no artifact but the DICOM SEGs, which carry
    their source's patient module so that a PACS files them with the patient."""
    labels = phi_raw.parent / "labels.csv"
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    run = runs / "phi"
    steps = [
        ["preprocess", phi_raw, cache, "--rle", labels, "--image-size", "64", "--workers", "1",
         "--val-fraction", "0.25", "--test-fraction", "0.2"],
        ["train", "--cache", cache, "--runs-dir", runs, "--name", "phi", "--encoder", "resnet18",
         "--encoder-weights", "none", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size",
         "2", "--gpus", "0"],
        ["predict", phi_raw, "--run", run, "--out", tmp_path / "pred", "--save-probs",
         "--dicom-seg", "--json"],
        ["evaluate", "--run", run, "--tune", "--out", tmp_path / "ev"],
        ["evaluate", "--run", run, "--split", "test", "--at", "model", "--json"],
        ["overlay", phi_raw, "--masks", tmp_path / "pred" / "masks", "--out", tmp_path / "ov"],
        ["train", "--resume", run],  # refused: the run has finished
    ]  # fmt: skip
    codes = []
    for args in steps:
        if args[0] == "predict" and args[1] == phi_raw:  # a real process: native logs too
            done = run_pneumo(*args, timeout=300)
            code, console = done.returncode, (done.stdout + done.stderr).encode()
        else:
            result = runner.invoke(app, [str(arg) for arg in args])
            code, console = result.exit_code, (result.stdout + result.stderr).encode()
        codes.append(code)
        assert leaks(console) == [], f"pneumo {args[0]} printed patient fields: {console[:300]}"
    assert codes == [0, 0, 0, 0, 0, 0, 1]
    assert "trunc.dcm" in (tmp_path / "pred" / "rejected.csv").read_text()
    artifacts = [p for p in tmp_path.rglob("*") if p.is_file()]
    folders = {p.relative_to(tmp_path).parts[0] for p in artifacts}
    assert {"cache", "runs", "pred", "ev", "ov"} <= folders
    assert (run / "best.keras").is_file() and (run / "eval-test" / "metrics.json").is_file()
    assert len(artifacts) > 60
    segs = sorted((tmp_path / "pred" / "dicom-seg").glob("*.dcm"))
    assert len(segs) == 14
    for seg in segs:  # filed with its patient: the source's own name and ID are inside
        fields = phi_of(int(seg.stem[1:]) % 10) | {"PatientID": f"PHI-ID-4815162{seg.stem[1:]}"}
        data = seg.read_bytes()
        assert fields["PatientID"].encode() in data and fields["PatientName"].encode() in data
    found = {str(p.relative_to(tmp_path)): leaks(p.read_bytes()) for p in artifacts}
    leaking = {name for name, hits in found.items() if hits}
    assert leaking == {str(seg.relative_to(tmp_path)) for seg in segs}


def test_demo_data_never_prints_the_patient_fields_it_writes(tmp_path: Path) -> None:
    import pydicom

    result = runner.invoke(app, ["demo-data", str(tmp_path / "demo"), "--n", "4", "--size",
                                 "128", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = set()
    for path in (tmp_path / "demo").rglob("*.dcm"):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the demo's corrupt files on purpose
            continue
        written |= {str(header.PatientID), str(header.PatientName)}
    written.discard("")  # the demo's broken files
    assert "SYNTHETIC^PHANTOM" in written and len(written) >= 3
    console = result.stdout + result.stderr
    assert [value for value in written if value in console] == []
    assert json.loads(result.stdout)["images"] == 4
