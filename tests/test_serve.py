"""`pneumo serve` with real associations: pynetdicom senders, the node in a real process, and a
real PACS (Orthanc) that receives its SEGs.

One node (module fixture) serves the end-to-end test and the bad-input tests; kill -9, SIGTERM,
a port in use and a destination down each get their own processes. Patient names and IDs of
every X-ray sent are replaced by recognisable fakes, which must never reach the node's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.files import read_mask_png
from pneumo_cli.io.dicom_seg import SEG_SOP_CLASS_UID
from tests.orthanc import Orthanc, free_port, orthanc_binary, running_orthanc, wait_for
from tests.robustness.conftest import TEMP_PREFIX, cli_env, pneumo_command

SC = "1.2.840.10008.5.1.4.1.1.7"
CR = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
VERIFICATION = "1.2.840.10008.1.1"
MAX_SIZE = 600_000  # the SIIM files are ~130 kB
NEEDLES = ("Fakeperson", "Servetest", "SRVPHI")

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


# --- senders ----------------------------------------------------------------------------------


def sender(aet: str = "SENDER", classes: tuple[str, ...] = (SC, CR)):  # noqa: ANN201
    """A pynetdicom SCU proposing one context per (SOP class, transfer syntax), as storescu and
    Orthanc do, plus Verification."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    for sop_class in classes:
        for syntax in (JPEGBaseline8Bit, ExplicitVRLittleEndian):
            ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


@contextlib.contextmanager
def association(port: int, aet: str = "SENDER", called: str = "PNEUMO", **kwargs):
    assoc = sender(aet, **kwargs).associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store(port: int, *datasets: object) -> list[int]:
    """C-STORE each dataset (or file) on one association; their status codes."""
    with association(port) as assoc:
        assert assoc.is_established, "the node refused a sender it allows"
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]


def echo(port: int) -> int:
    with association(port) as assoc:
        return int(assoc.send_c_echo().Status)


# --- test X-rays ------------------------------------------------------------------------------


def with_fake_patient(source: Path, target: Path, i: int, new_uids: bool = False) -> str:
    """Copy a real DICOM with a recognisable fake patient; returns its SOP Instance UID."""
    ds = pydicom.dcmread(source)
    ds.PatientName = f"Fakeperson^Servetest{i:02d}"
    ds.PatientID = f"SRVPHI-4711-{i:03d}"
    if new_uids:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(target)
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def xrays(siim: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SOP Instance UID -> copy of each real SIIM DICOM (3 train, 10 sample), fake patients."""
    folder = tmp_path_factory.mktemp("serve_xrays")
    sources = [*sorted((siim / "dicom-images-train").rglob("*.dcm")),
               *sorted((siim / "dicom-sample").glob("*.dcm"))]  # fmt: skip
    assert len(sources) == 13
    return {
        with_fake_patient(path, folder / path.name, i): folder / path.name
        for i, path in enumerate(sources)
    }


@pytest.fixture(scope="module")
def gate(tiny_run, xrays: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Gate options giving partial masks on about half the X-rays and empty ones on the rest:
    threshold 0.5 and a minimum area at the median area (the tiny run is barely trained)."""
    import csv

    out = tmp_path_factory.mktemp("serve_probe")
    folder = next(iter(xrays.values())).parent
    args = ["--top-threshold", "0.5", "--bottom-threshold", "0.5"]
    result = CliRunner().invoke(app, ["predict", str(folder), "--run", str(tiny_run["run"]),
                                      "--out", str(out), "-q", *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as handle:
        areas = sorted(int(row["area_px"]) for row in csv.DictReader(handle))
    return [*args, "--min-area", str(areas[len(areas) // 2])]


@pytest.fixture(scope="module")
def reference(tiny_run, xrays, gate, tmp_path_factory) -> dict[str, np.ndarray]:
    """`pneumo predict`'s mask of every X-ray, same run and gate: SOP Instance UID -> mask."""
    folder = next(iter(xrays.values())).parent
    out = tmp_path_factory.mktemp("serve_reference") / "out"
    result = CliRunner().invoke(app, ["predict", str(folder), "--run", str(tiny_run["run"]),
                                      "--out", str(out), "-q", *gate])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {uid: read_mask_png(out / "masks" / f"{uid}.png") for uid in xrays}


# --- the node in a real process ---------------------------------------------------------------


class NodeProcess:
    """`pneumo serve --json ...` in a subprocess, its stderr (JSON lines) in a file."""

    def __init__(self, folder: Path, port: int, args: list[str]) -> None:
        self.folder, self.port = folder, port
        self.inbox = folder / "inbox"
        self.cwd = folder / "cwd"  # must stay empty: nothing is written outside the inbox
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.stderr_path = folder / f"stderr-{time.monotonic_ns()}.txt"
        command = pneumo_command("serve", "--json", "--host", "127.0.0.1", "--port", port,
                                 "--inbox", self.inbox, *args)  # fmt: skip
        with open(self.stderr_path, "wb") as err, open(folder / "stdout.txt", "wb") as out:
            self.process = subprocess.Popen(
                command, env=cli_env(), cwd=self.cwd, stdout=out, stderr=err
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict]:
        lines = [json.loads(line) for line in self.stderr().splitlines() if line.strip()]
        return [line for line in lines if name is None or line["event"] == name]

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 120) -> list[dict]:
        def seen() -> list[dict] | None:
            if self.process.poll() is not None:
                pytest.fail(f"the node exited ({self.process.returncode}): {self.stderr()}")
            found = self.events(name)
            return found if len(found) >= count else None

        return wait_for(seen, timeout, f"{count} '{name}' log line(s) from the node")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def node_args(tiny_run, pacs: Orthanc, *extra: str) -> list:
    return ["--run", tiny_run["run"], "--allow", "SENDER", "--allow", "ORTHANC",
            "--send-to", f"127.0.0.1:{pacs.dicom_port}:ORTHANC", "--max-size", str(MAX_SIZE),
            "--retry-max-seconds", "1", *extra]  # fmt: skip


def segs_by_source(pacs: Orthanc, cache: dict) -> dict[str, object]:
    """The SEGs stored in Orthanc, by the SOP Instance UID of the image they reference."""
    found = {}
    for ds in pacs.datasets(cache).values():
        if ds.SOPClassUID == SEG_SOP_CLASS_UID:
            ref = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            found[str(ref.ReferencedSOPInstanceUID)] = ds
    return found


def seg_frame(ds) -> np.ndarray:  # noqa: ANN001
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
    return bits[: rows * cols].reshape(rows, cols)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc with the module node as a DICOM modality, and the routing script of
    the README's "Next to a PACS" (new CR/DX go to pneumo)."""
    node_port = free_port()
    folder = tmp_path_factory.mktemp("orthanc")
    with running_orthanc(folder, {"pneumo": ("PNEUMO", node_port)}, ROUTE_LUA) as orthanc:
        orthanc.node_port = node_port
        yield orthanc


@pytest.fixture(scope="module")
def node(tiny_run, pacs, gate, tmp_path_factory):
    folder = tmp_path_factory.mktemp("node")
    process = NodeProcess(folder, pacs.node_port, node_args(tiny_run, pacs, *gate))
    try:
        process.wait_for_event("ready")
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.stderr()


# The Orthanc routing script of the README (test_the_documented_script_is_this_one).
ROUTE_LUA = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Send new chest X-rays (CR, DX) to pneumo, never what pneumo sent back (its SEGs).
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and origin['RemoteAet'] ~= 'PNEUMO' then
    SendToModality(instanceId, 'pneumo')
  end
end
"""


# --- end to end -------------------------------------------------------------------------------


def test_every_xray_gets_a_seg_in_the_pacs_equal_to_predicts_mask(
    node: NodeProcess, pacs: Orthanc, xrays: dict[str, Path], reference: dict[str, np.ndarray]
) -> None:
    """The 13 real DICOMs from 4 senders at once; Orthanc ends with one SEG per X-ray whose
    frame is `pneumo predict`'s mask of the same file."""
    paths = list(xrays.values())
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda part=paths[i::4]: statuses.extend(
        store(node.port, *part))) for i in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [0] * 13
    cache: dict = {}
    found = wait_for(lambda: (s := segs_by_source(pacs, cache)) and set(xrays) <= set(s) and s,
                     120, "a SEG in Orthanc for every X-ray sent")  # fmt: skip
    partial = negative = 0
    for uid, mask in reference.items():
        frame = seg_frame(found[uid])
        np.testing.assert_array_equal(frame, mask, err_msg=f"SEG of {uid} differs from predict")
        partial += 0 < mask.sum() < mask.size
        negative += not mask.any()
        source = pydicom.dcmread(xrays[uid], stop_before_pixels=True)
        assert found[uid].StudyInstanceUID == source.StudyInstanceUID
    assert partial >= 5 and negative >= 3, "partial and empty masks, or the test proves little"
    done = {line["sop_instance_uid"]: line for line in node.events("done")}
    for uid, mask in reference.items():
        assert done[uid]["area_px"] == int(mask.sum())
        assert done[uid]["result"] == ("positive" if mask.any() else "negative")
        assert {"receive_ms", "predict_ms", "seg_ms", "send_ms", "total_ms"} <= set(done[uid])
    assert sorted(p.name for p in (node.inbox / "done").iterdir()) >= sorted(
        f"{uid}.dcm" for uid in xrays
    )
    assert not list((node.inbox / "incoming").iterdir())


def test_orthanc_routes_new_xrays_to_pneumo_with_the_documented_script(
    node: NodeProcess, pacs: Orthanc, xrays: dict[str, Path], tmp_path: Path
) -> None:
    """An X-ray stored into Orthanc goes to pneumo (Lua OnStoredInstance) and its SEG comes back."""
    from pynetdicom import AE

    source = next(iter(xrays.values()))
    copy = tmp_path / "new.dcm"
    uid = with_fake_patient(source, copy, 99, new_uids=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SC, JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert assoc.is_established
    assert int(assoc.send_c_store(copy).Status) == 0
    assoc.release()
    found = wait_for(lambda: uid in (s := segs_by_source(pacs, {})) and s, 60,
                     "Orthanc routing the X-ray to pneumo and storing its SEG")  # fmt: skip
    assert found[uid].SeriesDescription.startswith("pneumo")
    # The node logs "done" once its C-STORE has returned, which can be after Orthanc shows the
    # SEG (seen in CI): wait for the line rather than read the log at once.
    wait_for(lambda: uid in {line["sop_instance_uid"] for line in node.events("done")}, 30,
             "the node's 'done' line for the routed X-ray")  # fmt: skip


def test_an_instance_sent_again_and_again_at_once_is_one_instance(
    node: NodeProcess, pacs: Orthanc, xrays: dict[str, Path], tmp_path: Path
) -> None:
    """A sender repeating an instance (on one association, and on two at once) gets success
    every time; the node goes on and the PACS gets the instance's SEG."""
    copy = tmp_path / "again.dcm"
    uid = with_fake_patient(next(iter(xrays.values())), copy, 30, new_uids=True)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.extend(store(node.port, *[copy] * 3)))
               for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [0] * 6
    wait_for(lambda: uid in segs_by_source(pacs, {}), 60, "the repeated instance's SEG")
    assert (node.inbox / "done" / f"{uid}.dcm").is_file()
    assert node.process.poll() is None and echo(node.port) == 0


def test_the_documented_script_is_this_one() -> None:
    docs = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert ROUTE_LUA in docs


# --- bad input, each with a real association --------------------------------------------------


def refusals(node: NodeProcess) -> list[dict]:
    return node.events("refused")


def test_unknown_calling_or_called_ae_title_is_rejected(node: NodeProcess) -> None:
    with association(node.port, aet="STRANGER") as assoc:
        assert assoc.is_rejected and not assoc.is_established
    with association(node.port, called="SOMEONE") as assoc:
        assert assoc.is_rejected
    lines = node.events("association-rejected")
    assert any(line["calling_aet"] == "STRANGER" for line in lines)
    assert echo(node.port) == 0  # the Verification SCP answers allowed senders


def test_a_structured_report_is_not_accepted(node: NodeProcess, xrays) -> None:
    with association(node.port, classes=(BASIC_TEXT_SR, SC)) as assoc:
        offered = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert BASIC_TEXT_SR not in offered and SC in offered
        report = pydicom.dcmread(next(iter(xrays.values())), stop_before_pixels=True)
        report.SOPClassUID = BASIC_TEXT_SR
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(report)


def test_no_pixels_multi_frame_and_broken_jpeg_fail_and_the_node_serves_on(
    node: NodeProcess, pacs: Orthanc, xrays: dict[str, Path], tmp_path: Path
) -> None:
    path = next(iter(xrays.values()))
    no_pixels = pydicom.dcmread(path)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    broken = pydicom.dcmread(path)
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(broken.PixelData, number_of_frames=1))
    broken.PixelData = encapsulate([frame[: len(frame) // 2]])
    broken.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    frames = uncompressed(64, 64, frames=2, uid="1.2.826.0.1.3680043.8.498.3")
    hostile = uncompressed(64, 64, uid="1.2.3/../../../etc/evil")
    good = tmp_path / "good.dcm"
    good_uid = with_fake_patient(path, good, 50, new_uids=True)
    assert store(node.port, no_pixels, frames, broken, hostile, good) == [
        0xA900, 0xA900, 0xC000, 0xC000, 0x0000,
    ]  # fmt: skip
    lines = {line["sop_instance_uid"]: line for line in refusals(node)}
    assert "pixel" in lines["1.2.826.0.1.3680043.8.498.1"]["reason"]
    assert "frames" in lines["1.2.826.0.1.3680043.8.498.3"]["reason"]
    assert "JPEG" in lines["1.2.826.0.1.3680043.8.498.2"]["reason"]
    assert "(invalid UID)" in lines
    wait_for(lambda: good_uid in segs_by_source(pacs, {}), 60, "the good instance's SEG")
    assert not any("evil" in str(p) for p in node.folder.rglob("*"))
    assert not list(node.cwd.iterdir()), "the node wrote outside --inbox"


def uncompressed(rows: int, cols: int, frames: int = 1, uid: str | None = None):  # noqa: ANN201
    """An 8-bit grey Secondary Capture dataset, Explicit VR Little Endian."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SC, uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CR", "Fakeperson^Servetest77", "SRVPHI-4711-77"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    rng = np.random.default_rng(rows * cols + frames)
    ds.PixelData = rng.integers(0, 255, (frames, rows, cols), dtype=np.uint8).tobytes()
    return ds


def test_over_max_size_fails_and_far_over_aborts_the_association(node: NodeProcess) -> None:
    over = uncompressed(800, 800)  # 640,000 bytes of pixels > MAX_SIZE
    assert store(node.port, over) == [0xA700]
    far_over = uncompressed(2048, 1024)  # more than twice MAX_SIZE: cut off while it arrives
    with association(node.port) as assoc:
        assert "Status" not in assoc.send_c_store(far_over)  # no response: aborted
        wait_for(lambda: not assoc.is_established, 10, "the association's end")
    assert any(line["event"] == "association-aborted" for line in node.events())
    assert echo(node.port) == 0


A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-ABORT PDU, service user, no reason


@pytest.mark.parametrize("how", ["abort", "close"])
def test_a_sender_that_stops_mid_transfer_leaves_nothing(node: NodeProcess, how: str) -> None:
    """An A-ABORT, or the socket closed, after the first P-DATA of a 500 kB instance."""
    from pynetdicom import evt

    big = uncompressed(700, 700)
    before = sorted(p.name for p in (node.inbox / "incoming").iterdir())

    def cut(event) -> None:  # noqa: ANN001
        if event.data[0] == 0x04 and len(event.data) > 1000:  # the first P-DATA of the data set
            raw = event.assoc.dul.socket.socket
            if how == "abort":
                raw.sendall(A_ABORT)
            raw.shutdown(socket.SHUT_RDWR)

    ae = sender()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMO",
                         evt_handlers=[(evt.EVT_DATA_SENT, cut)])  # fmt: skip
    assert assoc.is_established
    with contextlib.suppress(Exception):
        assoc.send_c_store(big)
    with contextlib.suppress(Exception):
        assoc.abort()
    time.sleep(0.5)
    assert sorted(p.name for p in (node.inbox / "incoming").iterdir()) == before
    assert big.SOPInstanceUID not in node.stderr()
    assert echo(node.port) == 0


def test_malformed_pdus_do_not_stop_the_node(node: NodeProcess) -> None:
    rng = np.random.default_rng(5)
    payloads = [
        rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64,  # an A-ASSOCIATE-RQ claiming 4 GB
        b"\x01\x00\x00\x00\x00\x44\x00\x01\x00\x00PNEUMO" + b"\x00" * 20,  # cut short
        b"\x04\x00\x00\x00\x00\x10" + b"\x00" * 16,  # P-DATA before any association
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", node.port), timeout=1) as raw:
            raw.sendall(payload)
            with contextlib.suppress(OSError):
                raw.recv(100)
    assert node.process.poll() is None
    assert echo(node.port) == 0


def test_the_destination_down_keeps_segs_in_the_outbox_until_it_is_back(
    node: NodeProcess, pacs: Orthanc, xrays: dict[str, Path], tmp_path: Path
) -> None:
    pacs.stop()
    try:
        copies = [tmp_path / f"down{i}.dcm" for i in range(2)]
        uids = [
            with_fake_patient(p, c, 60 + i, new_uids=True)
            for i, (p, c) in enumerate(zip(list(xrays.values())[:2], copies, strict=True))
        ]
        failures = len(node.events("send-failed"))
        assert store(node.port, *copies) == [0, 0]
        node.wait_for_event("send-failed", failures + 1, timeout=60)
        kept = {p.stem for p in (node.inbox / "outbox").glob("*.dcm")}
        assert set(uids) <= kept
    finally:
        pacs.start(orthanc_binary())

    def all_sent() -> bool:
        kept = {p.stem for p in (node.inbox / "outbox").glob("*.dcm")}
        return not kept & set(uids) and set(uids) <= set(segs_by_source(pacs, {}))

    wait_for(all_sent, 60, "the kept SEGs sent (and out of the outbox) once Orthanc is back")


def test_logs_are_json_lines_without_patient_names_or_ids(
    node: NodeProcess, xrays: dict[str, Path], tmp_path: Path
) -> None:
    with association(node.port, aet="STRANGER") as assoc:
        assert assoc.is_rejected
    # Header values pydicom warns about, quoting them: the warnings must not reach the log.
    odd = tmp_path / "odd.dcm"
    with_fake_patient(next(iter(xrays.values())), odd, 40, new_uids=True)
    ds = pydicom.dcmread(odd)
    ds.PatientName = "Fakeperson^Servetest^40^x^y^z^w"  # more than 5 components
    ds.PatientID = "SRVPHI-" + "9" * 70  # longer than an LO may be
    finished = len(node.events("done")) + len(node.events("failed"))
    assert store(node.port, ds) == [0]
    wait_for(lambda: len(node.events("done")) + len(node.events("failed")) > finished, 60,
             "the node's line for the odd instance")  # fmt: skip
    text = node.stderr()
    assert [needle for needle in NEEDLES if needle.lower() in text.lower()] == []
    events = node.events()
    assert all({"time", "event"} <= set(line) for line in events)
    assert {"listening", "ready", "done", "association-rejected"} <= {
        line["event"] for line in events
    }
    (ready,) = node.events("ready")  # the precision is resolved (and said) as predict does it
    assert ready["precision"] in ("fp32", "bf16") and ready["precision_reason"]


# --- processes: kill -9, SIGTERM, port in use --------------------------------------------------


def test_kill_9_after_acknowledging_loses_nothing(tiny_run, pacs, xrays, tmp_path) -> None:
    """Instances acknowledged while the model loads, then kill -9: the next start sends their
    SEGs (and exits when idle)."""
    port = free_port()
    first = NodeProcess(tmp_path, port, node_args(tiny_run, pacs))
    first.wait_for_event("listening", timeout=60)
    chosen = dict(list(xrays.items())[:3])
    copies = {}
    for i, (uid, path) in enumerate(chosen.items()):
        copies[with_fake_patient(path, tmp_path / f"k{i}.dcm", 80 + i, new_uids=True)] = uid
    assert store(port, *(tmp_path / f"k{i}.dcm" for i in range(3))) == [0, 0, 0]
    assert not first.events("ready"), "the model loaded before the kill: the test shows nothing"
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=30)
    incoming = sorted(p.name for p in (tmp_path / "inbox" / "incoming").iterdir())
    assert incoming == sorted(f"{uid}.dcm" for uid in copies)
    second = NodeProcess(tmp_path, port, node_args(tiny_run, pacs, "--exit-when-idle", "1"))
    assert second.process.wait(timeout=180) == 0, second.stderr()
    assert {line["sop_instance_uid"] for line in second.events("done")} == set(copies)
    found = segs_by_source(pacs, {})
    assert set(copies) <= set(found)
    assert not list((tmp_path / "inbox" / "incoming").iterdir())
    assert json.loads((tmp_path / "stdout.txt").read_text())["done"] == 3


def test_sigterm_finishes_the_image_in_hand_and_exits_0(tiny_run, pacs, xrays, tmp_path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, port, node_args(tiny_run, pacs, "--batch-size", "1"))
    node.wait_for_event("ready")
    copies = [tmp_path / f"t{i}.dcm" for i in range(4)]
    uids = [
        with_fake_patient(p, c, 90 + i, new_uids=True)
        for i, (p, c) in enumerate(zip(list(xrays.values())[:4], copies, strict=True))
    ]
    assert store(port, *copies) == [0] * 4
    node.wait_for_event("done", 1)
    assert node.stop(signal.SIGTERM, timeout=60) == 0, node.stderr()
    inbox = tmp_path / "inbox"
    done = {p.stem for p in (inbox / "done").glob("*.dcm")}
    waiting = {p.stem for p in (inbox / "incoming").glob("*.dcm")}
    segs = {p.stem for p in (inbox / "sent").glob("*.dcm")} | {
        p.stem for p in (inbox / "outbox").glob("*.dcm")
    }
    assert done | waiting == set(uids) and not done & waiting  # nothing acknowledged is lost
    assert done <= segs  # every image taken in hand was finished
    assert not [p for p in inbox.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert node.events()[-1]["event"] == "stopped"


def test_an_ensemble_serves_the_average_of_its_members(
    tiny_run, pacs, xrays, gate, reference, tmp_path: Path
) -> None:
    """`serve --run A --run B`: the SEG of each X-ray is `pneumo predict --run A --run B`'s
    mask, which is not run A's alone."""
    from pneumo_cli.core.config import TrainConfig
    from pneumo_cli.training.train import train_model

    config = TrainConfig(cache=str(tiny_run["cache"]), encoder="resnet18", encoder_weights="none",
                         epochs=1, batch_size=4, steps_per_epoch=2, patience=0, gpus=0,
                         precision="fp32", input_norm="trainable", seed=7)  # fmt: skip
    second = Path(train_model(config, tmp_path / "runs", "second").run_dir)
    # New SOP Instance UIDs: the module node's SEGs of the originals are in Orthanc too.
    copies, originals = {}, {}
    (tmp_path / "x").mkdir()
    for original, path in list(xrays.items())[:4]:
        ds = pydicom.dcmread(path)
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(tmp_path / "x" / f"{uid}.dcm")
        copies[uid], originals[uid] = tmp_path / "x" / f"{uid}.dcm", original
    members = ["--run", str(tiny_run["run"]), "--run", str(second)]
    out = tmp_path / "predicted"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x"), *members, "--out", str(out),
                                      "-q", *gate])  # fmt: skip
    assert result.exit_code == 0, result.output
    node = NodeProcess(tmp_path / "node", free_port(), [
        *members, "--allow", "SENDER", "--send-to", f"127.0.0.1:{pacs.dicom_port}:ORTHANC",
        "--max-size", str(MAX_SIZE), "--retry-max-seconds", "1", *gate])  # fmt: skip
    try:
        node.wait_for_event("ready")
        assert store(node.port, *copies.values()) == [0] * 4
        cache: dict = {}
        found = wait_for(lambda: (s := segs_by_source(pacs, cache)) and set(copies) <= set(s) and s,
                         120, "a SEG in Orthanc for every copy sent")  # fmt: skip
    finally:
        assert node.stop() == 0, node.stderr()
    differs = 0
    for uid in copies:
        mask = read_mask_png(out / "masks" / f"{uid}.png")
        np.testing.assert_array_equal(seg_frame(found[uid]), mask)
        differs += not np.array_equal(mask, reference[originals[uid]])
    assert differs, "the ensemble's masks equal the first member's: the test proves nothing"


def test_a_port_in_use_exits_1_with_one_line(tiny_run, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = pneumo_command("serve", "--run", tiny_run["run"], "--host", "127.0.0.1",
                                 "--port", port, "--allow", "SENDER", "--send-to",
                                 "127.0.0.1:104:PACS", "--inbox", tmp_path / "inbox")  # fmt: skip
        done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use" in lines[0] and str(port) in lines[0], done.stderr
    assert done.stdout == ""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["serve", "--inbox", str(tmp_path), "--send-to", "127.0.0.1:104:PACS"]
    assert runner.invoke(app, base).exit_code == 2  # no --allow
    assert runner.invoke(app, [*base, "--allow", "A" * 17]).exit_code == 2
    bad = ["serve", "--inbox", str(tmp_path), "--allow", "X", "--send-to", "host-without-port"]
    result = runner.invoke(app, bad)
    assert result.exit_code == 2 and "HOST:PORT:AET" in result.output
    assert not list(tmp_path.iterdir())
