"""`pneumo serve` next to a real PACS (Orthanc): latency of one X-ray and throughput of 4 senders.

Run: .venv/bin/python benchmarks/bench_serve.py [--latency-images 10] [--copies 4]

Builds a resnet34 U-Net run at 256 px (random weights, one training step: speed does not depend
on the weights; or give --run), starts Orthanc (Debian package `orthanc`) on free ports and
`pneumo serve` in its own process sending its SEGs there, then measures on copies of the 13 real
SIIM DICOMs (3 train, 10 sample), each copy with new UIDs so that every one is a new instance:

- latency, warm model: one X-ray at a time, from the end of its C-STORE (the node's success
  response) to its SEG stored in Orthanc (seen in Orthanc's /changes, polled every 5 ms);
  median and worst of ``--latency-images``; issue 19 asks for <= 500 ms. The node's own
  per-stage times (its log line) are shown too.
- throughput: 4 senders at once, each on its own association, C-STORE all copies; from the
  first C-STORE to the last SEG in Orthanc, against ``predict_sources`` with the SEG stage
  (`pneumo predict --dicom-seg`) and without it, on the same files and the same run, with the
  node idle; issue 19 asks for >= 80% of predict's images/s, with nothing lost (every copy
  acknowledged and its SEG in Orthanc).

Wall-clock times on a 2-core machine where the senders, the node and Orthanc share the CPU:
anything else running slows them down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_predict import SIIM, build_run  # benchmarks/ (the script's own folder)
from machine import machine_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SC = "1.2.840.10008.5.1.4.1.1.7"


def real_copies(folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of each of the 13 real DICOMs, each with new study/series/SOP UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted((SIIM / "dicom-images-train").rglob("*.dcm"))
    sources += sorted((SIIM / "dicom-sample").glob("*.dcm"))
    folder.mkdir(parents=True)
    paths = []
    for _ in range(copies):
        for source in sources:
            ds = pydicom.dcmread(source)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            paths.append(path)
    return paths


def sender_ae():  # noqa: ANN201
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(SC, JPEGBaseline8Bit)
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    return ae


def send_all(port: int, paths: list[Path], statuses: list[int]) -> None:
    import pydicom

    assoc = sender_ae().associate("127.0.0.1", port, ae_title="PNEUMO")
    for path in paths:
        statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
    assoc.release()


def last_change(pacs) -> int:  # noqa: ANN001
    return int(pacs.get_json("/changes?last")["Last"])


def wait_new_instances(pacs, since: int, count: int, timeout: float = 120) -> tuple[float, int]:  # noqa: ANN001
    """Poll Orthanc's /changes until ``count`` new instances are stored after change ``since``;
    returns the time they were all seen and the last change number."""
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes = pacs.get_json(f"/changes?since={since}&limit=1000")
        seen += sum(1 for c in changes["Changes"] if c["ChangeType"] == "NewInstance")
        since = int(changes["Last"])
        if seen >= count:
            return time.perf_counter(), since
        time.sleep(0.005)
    raise SystemExit(f"only {seen} of {count} SEGs reached Orthanc in {timeout} s")


def start_node(root: Path, run: Path, pacs) -> tuple[subprocess.Popen, int, Path]:  # noqa: ANN001
    from tests.orthanc import free_port
    from tests.robustness.conftest import cli_env, pneumo_command

    port, log = free_port(), root / "node-stderr.txt"
    command = pneumo_command(
        "serve", "--json", "--run", run, "--host", "127.0.0.1", "--port", port,
        "--allow", "BENCH", "--send-to", f"127.0.0.1:{pacs.dicom_port}:ORTHANC",
        "--inbox", root / "inbox",
    )  # fmt: skip
    with open(log, "wb") as err:
        node = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 180
    while '"ready"' not in log.read_text() and time.monotonic() < deadline:
        if node.poll() is not None:
            raise SystemExit(f"pneumo serve exited: {log.read_text()}")
        time.sleep(0.2)
    return node, port, log


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process so far (this one when ``pid`` is None)."""
    if pid is None:
        usage = os.times()
        return usage.user + usage.system
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def predict_rates(run: Path, paths: list[Path], root: Path) -> dict[str, float]:
    """``predict_sources`` images/s on ``paths``, with and without the SEG stage (warm)."""
    from pneumo_cli.inference.dicom_outputs import SegStage
    from pneumo_cli.inference.predict import predict_sources
    from pneumo_cli.inference.predictor import load_predictor
    from pneumo_cli.inference.sources import file_loader, file_sources

    predictor = load_predictor(run)
    sources, _ = file_sources(paths)
    load = file_loader(predictor.settings)
    ids = [image_id for image_id, _ in sources]
    predict_sources(predictor, sources[:8], root / "warm", load=load)
    rates = {}
    for kind in ("without", "with"):
        stages = [SegStage("benchmark run", ids, overwrite=True)] if kind == "with" else []
        start, cpu = time.perf_counter(), cpu_seconds()
        summary = predict_sources(predictor, sources, root / kind, load=load, stages=stages)
        rates[kind] = summary.predicted / (time.perf_counter() - start)
        rates[f"{kind} cpu"] = (cpu_seconds() - cpu) / summary.predicted
    return rates


def stage_rows(done: list[dict], stages: tuple[str, ...]) -> list[tuple[str, str]]:
    """Median time of each stage in the node's log lines."""
    rows = []
    for stage in stages:
        values = [line[stage] for line in done if line.get(stage) is not None]
        if values:
            name = stage.removesuffix("_ms")
            rows.append((f"  node's {name}, median ms", f"{statistics.median(values):.0f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--run", type=Path, help="a trained run instead of a random-weights one")
    parser.add_argument("--latency-images", type=int, default=10)
    parser.add_argument("--copies", type=int, default=4, help="copies of the 13 real DICOMs")
    args = parser.parse_args()
    orthanc = shutil.which("Orthanc")
    if not SIIM.is_dir() or orthanc is None:
        sys.exit("needs ../shared/siim and Orthanc (apt-get install -y orthanc)")
    from tests.orthanc import Orthanc

    root = Path(tempfile.mkdtemp(prefix="pneumo-bench-serve-"))
    pacs = Orthanc(root / "orthanc", {})
    node, log = None, None
    try:
        run = args.run or build_run(root / "run", args.encoder, args.image_size)
        paths = real_copies(root / "inputs", args.copies)
        singles = real_copies(root / "singles", 1)[: args.latency_images + 2]
        rates = predict_rates(run, paths, root / "predict")
        pacs.start(orthanc)
        node, port, log = start_node(root, run, pacs)
        since = last_change(pacs)
        latencies = []
        for index, path in enumerate(singles):
            statuses: list[int] = []
            send_all(port, [path], statuses)
            sent = time.perf_counter()
            seen, since = wait_new_instances(pacs, since, 1)
            if index >= 2:  # two warm-up images: the first SEG of a header kind is read back
                latencies.append(seen - sent)
        statuses = []
        parts = [paths[i::4] for i in range(4)]
        threads = [threading.Thread(target=send_all, args=(port, p, statuses)) for p in parts]
        pids = {"node": node.pid, "Orthanc": pacs.process.pid, "senders": None}
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        seen, since = wait_new_instances(pacs, since, len(paths), timeout=600)
        for thread in threads:
            thread.join()
        serve_rate = len(paths) / (seen - start)
        cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
        pacs.stop()
        text = log.read_text() if log is not None else ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        shutil.rmtree(root, ignore_errors=True)
    done = [line for line in lines if line["event"] == "done"]
    names = {p.stem for p in paths}
    stored = sum(1 for line in done if line["sop_instance_uid"] in names)

    stages = ("receive_ms", "wait_ms", "predict_ms", "seg_ms", "send_ms", "total_ms")
    warm = done[2 : 2 + len(latencies)]
    print(machine_line())
    print(f"{args.encoder} U-Net at {args.image_size} px, float32; node, Orthanc and 4 senders "
          "on this machine")  # fmt: skip
    print(f"{'measurement':66s} {'value':>8s}")
    rows = [
        (f"one X-ray, end of C-STORE -> SEG in Orthanc, median of {len(latencies)}, ms",
         f"{statistics.median(latencies) * 1e3:.0f}"),
        ("same, worst, ms (goal <= 500)", f"{max(latencies) * 1e3:.0f}"),
    ]  # fmt: skip
    rows += stage_rows(warm, stages)
    rows += [
        (f"4 senders, {len(paths)} X-rays, images/s to SEGs in Orthanc", f"{serve_rate:.1f}"),
        *stage_rows([line for line in done if line["sop_instance_uid"] in names], stages),
        *((f"  CPU seconds per X-ray, {name}", f"{seconds / len(paths):.3f}")
          for name, seconds in cpu.items()),
        ("acknowledged / SEGs stored (nothing lost)",
         f"{statuses.count(0)}/{stored}"),
        ("predict_sources --dicom-seg, same files, images/s", f"{rates['with']:.1f}"),
        ("  CPU seconds per X-ray", f"{rates['with cpu']:.3f}"),
        ("predict_sources without SEG, same files, images/s", f"{rates['without']:.1f}"),
        ("serve / predict --dicom-seg (goal >= 80%)", f"{serve_rate / rates['with']:.0%}"),
        ("serve / predict without SEG", f"{serve_rate / rates['without']:.0%}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:66s} {value:>8s}")


if __name__ == "__main__":
    main()
