"""core/patient_key.py: patient_key is an HMAC under a secret the cache does not hold."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumo_cli.cli.main import app
from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.errors import ConfigError, InputError
from pneumo_cli.core.patient_key import (
    SECRET_ENV,
    default_secret_path,
    load_secret,
)
from pneumo_cli.data.cache import load_manifest
from pneumo_cli.data.preprocess import run_preprocess
from pneumo_cli.io.dicom_write import write_dicom

PATIENT_ID = 4821937  # a 7-digit medical record number
OLD_SALT = "pneumo-patient-key-v1"  # the constant salt pneumo's source used to hold


def _raw(folder: Path, patient_ids: list[str]) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, patient_id in enumerate(patient_ids):
        image = (rng.random((128, 128)) * 180 + 40).astype(np.uint8)
        write_dicom(folder / f"x{i}.dcm", image, jpeg=False, patient_id=patient_id)
    return folder


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _salted(candidate: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}\x00{candidate}".encode()).hexdigest()[:16]


def _keyed(candidate: int, key: bytes) -> str:
    return hmac.new(key, str(candidate).encode(), hashlib.sha256).hexdigest()[:16]


def test_a_numeric_patient_id_cannot_be_brute_forced_from_the_manifest(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "raw", [str(PATIENT_ID)])
    cache = tmp_path / "cache"
    run_preprocess(raw, cache, PreprocessConfig(image_size=32), workers=1)
    key = load_manifest(cache)["patient_key"].iloc[0]
    assert len(key) == 16
    candidates = range(PATIENT_ID - 50_000, PATIENT_ID + 50_000)  # 100,000 guesses
    # What an attacker holding the cache and pneumo's source can try: a constant salt (this
    # search found the PatientID when pneumo used one), no salt, and everything the cache
    # records about the secret.
    assert [n for n in candidates if _salted(n, OLD_SALT) == key] == []
    assert [n for n in candidates if _salted(n, "") == key] == []
    recorded = json.loads((cache / "preprocess.json").read_text())["patient_key_secret"]
    for text in (json.dumps(recorded), recorded["id"]):
        assert [n for n in candidates if _keyed(n, text.encode()) == key] == []
    # The same search with the secret finds the PatientID: it is a real search.
    secret = load_secret()
    assert [n for n in candidates if _keyed(n, secret.key) == key] == [PATIENT_ID]
    # And the secret itself is nowhere in the cache.
    for path in cache.rglob("*"):
        if path.is_file():
            assert secret.key not in path.read_bytes(), path


def test_the_installation_secret_is_created_once_private_and_outside_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    path = home / ".config" / "pneumo" / "patient-key.secret"
    assert default_secret_path() == path
    first = load_secret()
    assert first.path == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert len(path.read_text().strip()) == 64  # 32 random bytes as hex
    assert load_secret().key == first.key  # created once, then reused
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_secret_path() == tmp_path / "xdg" / "pneumo" / "patient-key.secret"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the XDG spec: ignore it
    assert default_secret_path() == path
    monkeypatch.setenv(SECRET_ENV, str(tmp_path / "elsewhere.secret"))
    assert load_secret().path == tmp_path / "elsewhere.secret"
    assert load_secret().key != first.key


def test_tests_never_touch_the_real_home() -> None:
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir).resolve()
    used = default_secret_path().resolve()
    assert os.environ.get(SECRET_ENV) and not used.is_relative_to(real_home)


def test_a_cache_refuses_another_secret_and_accepts_its_own(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "raw", ["P-1", "P-1", "P-2"])
    one = _secret_file(tmp_path / "one.secret", "a" * 40)
    two = _secret_file(tmp_path / "two.secret", "b" * 40)
    cache = tmp_path / "cache"
    settings = PreprocessConfig(image_size=32)
    run_preprocess(raw, cache, settings, workers=1, patient_key_secret=one)
    keys = list(load_manifest(cache)["patient_key"])
    assert keys[0] == keys[1] != keys[2]  # one patient, one key
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    runner = CliRunner()
    command = ["preprocess", str(raw), str(cache), "--image-size", "32", "-j", "1", "-q"]
    result = runner.invoke(app, [*command, "--patient-key-secret", str(two)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "made with another patient-key secret" in lines[0]
    assert load_secret(one).identifier in lines[0] and load_secret(two).identifier in lines[0]
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before
    # The installation secret is another secret too.
    with pytest.raises(ConfigError, match="another patient-key secret"):
        run_preprocess(raw, cache, settings, workers=1)
    result = runner.invoke(app, [*command, "--patient-key-secret", str(one), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reused"] == 3
    recorded = json.loads((cache / "preprocess.json").read_text())["patient_key_secret"]
    assert recorded == {"scheme": "hmac-sha256-v2", "id": load_secret(one).identifier}
    run_preprocess(raw, cache, settings, workers=1, overwrite=True, patient_key_secret=two)
    assert list(load_manifest(cache)["patient_key"]) != keys


def test_a_cache_with_the_old_constant_salt_keys_is_refused(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "raw", ["P-1"])
    cache = tmp_path / "cache"
    run_preprocess(raw, cache, PreprocessConfig(image_size=32), workers=1)
    info = json.loads((cache / "preprocess.json").read_text())
    del info["patient_key_secret"]  # as an older pneumo wrote it
    (cache / "preprocess.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="older pneumo .* rebuild it with --overwrite"):
        run_preprocess(raw, cache, PreprocessConfig(image_size=32), workers=1)


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "does not exist; create one with"),
        ("short", 0o600, "holds 5 bytes; a secret needs 32"),
        ("c" * 40, 0o644, r"readable or writable by other users \(mode 0644\)"),
    ],
)
def test_a_bad_secret_file_is_refused_before_anything_is_written(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    path = tmp_path / "given.secret"
    if content is not None:
        path.write_text(content)
        path.chmod(mode)
    raw = _raw(tmp_path / "raw", ["P-1"])
    with pytest.raises(InputError, match=message):
        run_preprocess(raw, tmp_path / "cache", PreprocessConfig(image_size=32),
                       patient_key_secret=path)  # fmt: skip
    assert not (tmp_path / "cache").exists()
