"""Multi-worker training: TF_CONFIG checks, sharding, precision choice, and two real worker
processes on 127.0.0.1 (CPU, resnet18 at 64 px) that must agree and survive a lost peer."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.errors import ConfigError, UsageError
from pneumo_cli.data import cache as data_cache
from pneumo_cli.data import pipeline as data_pipeline
from pneumo_cli.engine import precision as precisions
from pneumo_cli.engine import tf as tf_engine
from pneumo_cli.model import saving
from pneumo_cli.training import distribute, resume, runs, settings
from tests.cachefactory import synthetic_cache

REPO = Path(__file__).resolve().parents[1]


def _config(task: dict, cluster: dict | None = None) -> str:
    cluster = cluster or {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}
    return json.dumps({"cluster": cluster, "task": task})


def test_tf_config_roles() -> None:
    first = distribute.parse_tf_config(_config({"type": "worker", "index": 0}))
    assert first == distribute.WorkerRole("worker", 0, 2, 0, True)  # worker 0 is the chief
    second = distribute.parse_tf_config(_config({"type": "worker", "index": 1}))
    assert (second.is_chief, second.worker_id) == (False, 1)
    cluster = {"chief": ["10.0.0.1:2222"], "worker": ["10.0.0.2:2222", "10.0.0.3:2222"]}
    chief = distribute.parse_tf_config(_config({"type": "chief", "index": 0}, cluster))
    assert (chief.is_chief, chief.workers, chief.worker_id) == (True, 3, 0)
    worker0 = distribute.parse_tf_config(_config({"type": "worker", "index": 0}, cluster))
    assert (worker0.is_chief, worker0.worker_id) == (False, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "--multi-worker needs the TF_CONFIG environment variable"),
        ("  ", "--multi-worker needs the TF_CONFIG environment variable"),
        ("{'cluster': 1}", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker"}}', "TF_CONFIG has no 'cluster' object"),
        (_config({"type": "ps", "index": 0}, {"worker": ["h:1"], "ps": ["h:2"]}),
         "has job.s. ps; pneumo trains with 'chief' and 'worker' tasks only"),
        (_config({"type": "worker", "index": 0}, {"worker": ["h1", "h2:22"]}),
         r"cluster 'worker' must be a non-empty list of 'host:port' strings, got \[\"h1\""),
        (_config({"type": "worker", "index": 0}, {"worker": []}), "must be a non-empty list"),
        (_config({"type": "chief", "index": 0}, {"worker": ["h:1"]}),
         "must name a job of the cluster .worker. in 'type'"),
        (_config({"type": "worker", "index": 2}), "task index 2 is outside the 2 'worker'"),
        (_config({"type": "worker", "index": "0"}), 'task index "0" must be an integer'),
        (_config({"type": "chief"}, {"chief": ["a:1", "b:2"]}), "more than one chief"),
    ],
)  # fmt: skip
def test_malformed_tf_config_is_one_clear_line(text: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        distribute.parse_tf_config(text)
    assert "\n" not in str(caught.value)


def test_shards_take_their_slice_of_every_global_batch() -> None:
    plan = np.arange(12, dtype=np.int64)  # 3 steps of a global batch of 4
    seeds = np.stack([np.zeros(12, np.int64), 100 + plan], axis=1)
    first, first_seeds = data_pipeline.shard_plan(plan, seeds, 4, 2, 0)
    second, _ = data_pipeline.shard_plan(plan, seeds, 4, 2, 1)
    np.testing.assert_array_equal(first, [0, 1, 4, 5, 8, 9])
    np.testing.assert_array_equal(second, [2, 3, 6, 7, 10, 11])
    np.testing.assert_array_equal(first_seeds[:, 1], [100, 101, 104, 105, 108, 109])
    with pytest.raises(ConfigError, match="global batch 4 does not split over 3 input pipelines"):
        data_pipeline.shard_plan(plan, seeds, 4, 3, 0)


def test_sharded_pipelines_rebuild_the_single_process_batches(tmp_path: Path) -> None:
    tf = tf_engine.import_tf()
    cache = synthetic_cache(tmp_path, image_size=32, n_train=6, n_val=2)
    records = data_cache.select_split(data_cache.read_cache(cache), "train")
    kwargs = dict(seed=3, epochs=1, augment=True)
    whole = [y.numpy() for _, y in data_pipeline.make_train_dataset(records, 32, "raw-0-255", 4, 3,
                                                          **kwargs).dataset]  # fmt: skip
    parts = []
    for index in range(2):
        context = tf.distribute.InputContext(2, index, num_replicas_in_sync=2)
        pipeline = data_pipeline.make_train_dataset(
            records, 32, "raw-0-255", 4, 3, input_context=context, **kwargs
        )
        parts.append([y.numpy() for _, y in pipeline.dataset])
    assert [p.shape for p in parts[0]] == [(2, 32, 32, 1)] * 3
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]),
                                      whole[step])  # fmt: skip


def test_auto_precision_choices(tmp_path: Path) -> None:
    choose = precisions.choose_precision
    assert choose("auto", on_gpu=True, gpu_names=["NVIDIA A100"])[0] == "fp16"
    assert choose("auto", on_gpu=False, cpu_flags=[]) == (
        "fp32", "auto: this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16)"
    )  # fmt: skip
    # Detected, not assumed: any CPU reporting bfloat16 instructions gets bf16.
    for flags in (["avx512_bf16"], ["amx_bf16"]):
        chosen = choose("auto", on_gpu=False, cpu_flags=flags)
        assert chosen == ("bf16", f"auto: the CPU has {flags[0]} (native bfloat16 arithmetic)")
    assert choose("bf16", on_gpu=False) == ("bf16", "asked for with --precision")
    with pytest.raises(UsageError, match="--precision fp16 needs an NVIDIA GPU to train on"):
        choose("fp16", on_gpu=False)
    with pytest.raises(UsageError, match="fp16 needs an NVIDIA GPU to predict on"):
        choose("fp16", on_gpu=False, purpose="predict")
    with pytest.raises(
        ConfigError, match="--precision 'fp8': choose one of: auto, fp32, bf16, fp16"
    ):
        choose("fp8", on_gpu=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) X\nflags\t\t: fpu avx512f amx_bf16 "
        "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: other\n"
    )
    assert precisions.cpu_bf16_flags(cpuinfo) == ["avx512_bf16", "amx_bf16"]
    assert precisions.cpu_model(cpuinfo) == "Intel(R) Xeon(R) X"
    cpuinfo.write_text("flags\t: fpu avx2\n")
    assert precisions.cpu_bf16_flags(cpuinfo) == []
    assert precisions.cpu_bf16_flags(tmp_path / "absent") == []


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cache"), image_size=64, n_train=8, n_val=4)


TINY = ["--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "2",
        "--steps-per-epoch", "2", "--patience", "0", "--gpus", "0"]  # fmt: skip


@pytest.mark.slow
def test_bad_multi_worker_and_precision_input_exits_1_with_one_line(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    base = ["train", "--cache", str(cache), "--runs-dir", str(tmp_path / "runs"), *TINY]
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cases = [
        ({}, ["--multi-worker"], "--multi-worker needs the TF_CONFIG environment variable"),
        ({"TF_CONFIG": "{nope"}, ["--multi-worker"], "TF_CONFIG is not valid JSON"),
        ({"TF_CONFIG": _config({"type": "worker", "index": 0})}, ["--multi-worker", "--gpus",
         "2"], r"--gpus 2 asks for more GPUs than are visible \(0: none\)"),
        ({}, ["--precision", "fp16"], "--precision fp16 needs an NVIDIA GPU"),
    ]  # fmt: skip
    for env, extra, message in cases:
        result = runner.invoke(app, [*base, *extra], env=env)
        usage = extra == ["--precision", "fp16"]  # an option this machine cannot honour
        assert result.exit_code == (2 if usage else 1), (extra, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
        assert "Traceback" not in result.stderr
    # An unknown precision is a usage error, refused by the option parser before TensorFlow.
    unknown = runner.invoke(app, [*base, "--precision", "fp64"])
    assert unknown.exit_code == 2 and "'fp64' is not one of 'auto', 'fp32'" in unknown.stderr
    assert not (tmp_path / "runs").exists()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_workers(cache: Path, folder: Path, epochs: int) -> list[subprocess.Popen]:
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(folder / "tmp")}
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        )
        command = [sys.executable, "-m", "pneumo_cli", "train", "--multi-worker", "--cache",
                   str(cache), "--runs-dir", str(folder / "runs"), "--epochs", str(epochs),
                   "--json", *TINY]  # fmt: skip
        with (
            open(folder / f"out{index}.json", "w") as out,
            open(folder / f"err{index}.txt", "w") as err,
        ):
            processes.append(
                subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=out, stderr=err)
            )
    return processes


def _wait(process: subprocess.Popen, seconds: float) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.mark.slow
def test_two_workers_train_one_run_with_identical_weights(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    workers = _start_workers(cache, tmp_path, epochs=2)
    codes = [_wait(process, 240) for process in workers]
    errors = [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], [text[-1500:] for text in errors]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert results[0]["best_val_dice"] == results[1]["best_val_dice"]

    run_dir = tmp_path / "runs" / "train"
    assert results[0]["run_dir"] == str(run_dir)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "train"]
    assert list((tmp_path / "tmp").iterdir()) == []  # worker 1's folder is gone
    assert "worker 1 of 2: the chief writes the run" in errors[1]
    saved = runs.load_run_config(run_dir)
    assert (saved["workers"], saved["replicas"], saved["global_batch_size"]) == (2, 2, 4)
    assert saved["strategy"].startswith("MultiWorkerMirroredStrategy, worker 0 of 2")
    assert [row["epoch"] for row in runs.read_history(run_dir)] == [1, 2]
    # The chief's saved model holds exactly the weights both workers ended with.
    assert (
        saving.weights_sha256(saving.load_model(run_dir / "last.keras"))
        == (results[1]["weights_sha256"])
    )


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_and_resume_continues(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    chief, other = _start_workers(cache, tmp_path, epochs=4)
    state_file = tmp_path / "runs" / "train" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and chief.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text())["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert chief.poll() is None, (tmp_path / "err0.txt").read_text()[-1500:]
    other.kill()
    killed = time.monotonic()
    # A dead peer is found at once when its port refuses connections, and within the
    # coordination heartbeat timeout when it is silent: allow that plus slack for a busy box.
    assert _wait(chief, distribute.HEARTBEAT_TIMEOUT_S + 30) == 1
    assert time.monotonic() - killed < distribute.HEARTBEAT_TIMEOUT_S + 30
    lines = (tmp_path / "err0.txt").read_text().splitlines()
    message = next(line for line in lines if line.startswith("error: "))
    assert message.startswith("error: lost contact with another worker during epoch")
    assert f"--resume {tmp_path / 'runs' / 'train'} --multi-worker" in message
    state = json.loads(state_file.read_text())
    assert state["status"] == "interrupted" and state["epoch"] >= 1
    done = state["epoch"]

    notes: list[str] = []
    reporter = settings.SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    resumed = resume.resume_training(tmp_path / "runs" / "train", tmp_path / "runs", reporter)
    assert resumed.status == "completed" and resumed.epochs_done == 4
    assert notes[0].startswith(f"resuming {tmp_path / 'runs' / 'train'} at epoch {done + 1} ")
    history = runs.read_history(tmp_path / "runs" / "train")
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
