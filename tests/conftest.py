"""Shared test fixtures, and the guards every test runs under.

Real SIIM files live in ``../shared/siim/`` beside the repository. A user's clone has no such
folder: tests that need it skip with a visible reason. In CI (``CI=true``) a missing folder is a
failure, never a skip.

Guards, for the whole session (collection and session fixtures included):

- no network: connecting a socket to anything but loopback (127.0.0.0/8, ::1, ``localhost``)
  raises :class:`NetworkBlockedError` before any packet or DNS query leaves; Unix sockets work.
- ``KERAS_HOME`` is a temporary folder (a fresh one per test), so no test reads weights from or
  writes to ``~/.keras``; subprocesses inherit it.
- ``PNEUMO_PATIENT_KEY_SECRET_FILE`` names a file in a temporary folder (one for the session, so
  caches built by session fixtures can be extended by later tests), so no test creates the
  per-installation patient-key secret in ``~/.config/pneumo``; subprocesses inherit it.

The ``tf`` mark: tests that start TensorFlow, in-process or in a subprocess, are marked ``tf``
here (see :func:`starts_tensorflow`); ``pytest --no-tf`` (``make test-fast``) runs the others and
makes importing TensorFlow an error, so a test that needs the mark and lacks it fails loudly.
"""

from __future__ import annotations

import importlib.abc
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIIM = REPO.parent / "shared" / "siim"

# Real training DICOMs: SOPInstanceUID -> union mask area in pixels at 1024 x 1024.
REAL_TRAIN_AREAS = {
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819": 0,
    "1.2.276.0.7230010.3.1.4.8323329.301.1517875162.280319": 10133,
    "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533": 69274,
}


@pytest.fixture(scope="session")
def siim() -> Path:
    """Path to ``../shared/siim``; skips (or fails under CI=true) when it is absent."""
    if not (SIIM / "README.md").is_file():
        message = f"real SIIM fixtures not found at {SIIM} (they live beside the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must have them")
        pytest.skip(message)
    return SIIM


@pytest.fixture(scope="session")
def real_rle_csv(siim: Path) -> Path:
    return siim / "csv" / "train-rle.csv.gz"


@pytest.fixture(scope="session")
def real_train_dicoms(siim: Path) -> dict[str, Path]:
    """SOPInstanceUID -> path of the three real training DICOMs."""
    files = sorted((siim / "dicom-images-train").rglob("*.dcm"))
    return {path.stem: path for path in files}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real, tiny pipeline run shared by the predict/evaluate tests: 40 synthetic DICOMs in the
    SIIM layout -> `preprocess` at 64 px -> `train` (resnet18, random start, 2 short epochs).

    Returns the paths ``raw`` (demo dataset), ``cache`` and ``run``. The model is barely trained:
    tests built on it check plumbing and geometry, not accuracy.
    """
    from pneumo_cli.core.config import PreprocessConfig, TrainConfig
    from pneumo_cli.data.demo import write_demo_dataset
    from pneumo_cli.data.preprocess import run_preprocess
    from pneumo_cli.training.train import train_model as train

    root = tmp_path_factory.mktemp("tiny_run")
    raw = root / "raw"
    write_demo_dataset(raw, n=40, seed=3, size=128)
    cache = root / "cache"
    run_preprocess(
        raw, cache, PreprocessConfig(image_size=64), rle_csv=raw / "train-rle.csv", workers=1
    )
    config = TrainConfig(
        cache=str(cache),
        encoder="resnet18",
        encoder_weights="none",
        epochs=2,
        batch_size=4,
        steps_per_epoch=3,
        patience=0,
        gpus=0,
        # Fixed, not the defaults: `auto` precision depends on the CPU, and this barely trained
        # network's int8 export must agree with it on 99% of mask pixels (test_export); with the
        # frozen input normalisation its masks sit nearer the threshold and agree on ~98.5%.
        precision="fp32",
        input_norm="trainable",
    )
    result = train(config, runs_dir=root / "runs")
    return {"raw": raw, "cache": cache, "run": Path(result.run_dir)}


# --- no network ---------------------------------------------------------------------------------


class NetworkBlockedError(RuntimeError):
    """A test tried to reach the network (not an OSError, so no retry or offline path hides it)."""


def _is_loopback(host: object) -> bool:
    """Whether ``host`` (an address tuple's host part) is loopback, without resolving a name:
    resolving one would already be a DNS query."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone ("::1%lo")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _check_destination(family: int, address: object) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # Unix sockets, netlink, ...: not the network
    host = address[0] if isinstance(address, tuple) and address else address
    if not _is_loopback(host):
        raise NetworkBlockedError(
            f"tests must not use the network: connection to {address!r} blocked by "
            "tests/conftest.py (only loopback and Unix sockets are allowed)"
        )


def block_network(patch: pytest.MonkeyPatch) -> None:
    """Refuse, with :class:`NetworkBlockedError`, every socket connection that is not local.

    The check runs before the real ``connect``; ``create_connection`` (urllib, http.client,
    requests) is checked before it resolves the name.
    """
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection = socket.create_connection

    def guarded_connect(self: socket.socket, address: object) -> None:
        _check_destination(self.family, address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> int:
        _check_destination(self.family, address)
        return connect_ex(self, address)

    def guarded_create_connection(address: tuple, *args: object, **kwargs: object) -> socket.socket:
        _check_destination(socket.AF_INET, address)
        return create_connection(address, *args, **kwargs)

    patch.setattr(socket.socket, "connect", guarded_connect)
    patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    patch.setattr(socket, "create_connection", guarded_create_connection)


# --- tests that start TensorFlow ------------------------------------------------------------------

# Modules whose every test starts TensorFlow (some import it when collected).
TF_MODULES = {
    "tests/test_fastpaths.py",
    "tests/test_losses.py",
    "tests/test_model.py",
    "tests/test_precision.py",
    "tests/test_quickstart.py",
    "tests/test_serve.py",
    "tests/test_tf_startup.py",
    "tests/test_train.py",
    "tests/robustness/test_kill_tf.py",
    "tests/robustness/test_model_files.py",
}
# Tests elsewhere that start TensorFlow without the tiny_run fixture or the slow mark: module ->
# test function names. The in-process ones are caught by `--no-tf` if missing here; the ones
# that start it in a subprocess (train, predict, evaluate --run, export) are not, so list them.
TF_TESTS = {
    "tests/test_data.py": {
        "test_load_arrays_decodes_the_pngs_exactly",
        "test_train_pipeline_is_deterministic_and_resumable",
        "test_streaming_and_in_memory_pipelines_agree",
        "test_augmentation_moves_image_and_mask_together",
        "test_eval_pipeline_is_every_record_in_order_unaugmented",
    },
    "tests/test_distribute.py": {"test_sharded_pipelines_rebuild_the_single_process_batches"},
    "tests/robustness/test_exit_codes.py": {
        "test_train_error_in_a_real_process_is_the_only_stderr_line",  # subprocess
    },
    "tests/robustness/test_privacy.py": {
        "test_train_predict_evaluate_never_write_or_print_patient_fields",
    },
}
TF_FIXTURES = {"tiny_run"}  # a trained run: every test using it (even indirectly) runs a model


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def starts_tensorflow(item: pytest.Item) -> bool:
    """Whether a collected test starts TensorFlow (then it is marked ``tf``)."""
    module = _relative(Path(item.path))
    name = getattr(item, "originalname", item.name)
    return (
        module in TF_MODULES
        or name in TF_TESTS.get(module, ())
        or item.get_closest_marker("slow") is not None  # slow = trains or runs a model
        or not TF_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
    )


class _TensorFlowBlocker(importlib.abc.MetaPathFinder):
    """Under ``--no-tf``, importing TensorFlow fails, and so does the test that tried."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.partition(".")[0] in ("tensorflow", "tf_keras"):
            self.attempts.append(fullname)
            raise ImportError(f"{fullname} imported under pytest --no-tf (see tests/conftest.py)")
        return None


_BLOCKER = pytest.StashKey[_TensorFlowBlocker]()
_SESSION_PATCH = pytest.StashKey[pytest.MonkeyPatch]()
_SESSION_KERAS_HOME = pytest.StashKey[Path]()
_SESSION_SECRET_HOME = pytest.StashKey[Path]()


# --- hooks ----------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-tf",
        action="store_true",
        help="run only the tests that start no TensorFlow (make test-fast): deselect the tests "
        "marked tf and make importing TensorFlow an error",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Session-wide, so collection-time imports and session fixtures (tiny_run) are covered too.
    patch = pytest.MonkeyPatch()
    keras_home = Path(tempfile.mkdtemp(prefix="pneumo-tests-keras-"))
    patch.setenv("KERAS_HOME", str(keras_home))
    secret_home = Path(tempfile.mkdtemp(prefix="pneumo-tests-secret-"))
    patch.setenv("PNEUMO_PATIENT_KEY_SECRET_FILE", str(secret_home / "patient-key.secret"))
    block_network(patch)
    config.stash[_SESSION_PATCH], config.stash[_SESSION_KERAS_HOME] = patch, keras_home
    config.stash[_SESSION_SECRET_HOME] = secret_home
    if config.getoption("no_tf"):
        expression = config.option.markexpr
        config.option.markexpr = f"({expression}) and not tf" if expression else "not tf"
        blocker = _TensorFlowBlocker()
        config.stash[_BLOCKER] = blocker
        sys.meta_path.insert(0, blocker)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_PATCH in config.stash:
        config.stash[_SESSION_PATCH].undo()
        shutil.rmtree(config.stash[_SESSION_KERAS_HOME], ignore_errors=True)
        shutil.rmtree(config.stash[_SESSION_SECRET_HOME], ignore_errors=True)
    if _BLOCKER in config.stash:
        sys.meta_path.remove(config.stash[_BLOCKER])


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Under --no-tf, do not even import the TensorFlow modules (two import it when collected).
    if config.getoption("no_tf") and _relative(collection_path) in TF_MODULES:
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    names: dict[str, set[str]] = {}
    for item in items:
        names.setdefault(_relative(Path(item.path)), set()).add(
            getattr(item, "originalname", item.name)
        )
        if starts_tensorflow(item):
            item.add_marker(pytest.mark.tf)
    for module, listed in TF_TESTS.items():
        stale = listed - names[module] if module in names else set()
        if stale:
            warnings.warn(
                f"tests/conftest.py TF_TESTS names tests {module} no longer has: "
                f"{', '.join(sorted(stale))}",
                pytest.PytestConfigWarning,
                stacklevel=1,
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    blocker = item.config.stash.get(_BLOCKER, None)
    if blocker is not None and blocker.attempts:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} imports TensorFlow ({blocker.attempts[0]}) but is not marked tf: "
            "add it to TF_MODULES or TF_TESTS in tests/conftest.py"
        )
        blocker.attempts.clear()
    return report


@pytest.fixture(autouse=True)
def private_keras_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A fresh, empty ``KERAS_HOME`` for each test (the network is blocked session-wide)."""
    folder = tmp_path_factory.mktemp("keras-home")
    monkeypatch.setenv("KERAS_HOME", str(folder))
    return folder
