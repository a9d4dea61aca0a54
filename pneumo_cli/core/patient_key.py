"""The secret behind ``patient_key``: a keyed hash (HMAC-SHA-256) of the PatientID.

``patient_key`` keeps one patient's images in one split without writing the PatientID anywhere.
A plain or salted hash with a salt in the source code is no pseudonym: medical record numbers
are short (a 7-digit one is one of 10 million), so anyone with the manifest can hash every
candidate and read the PatientIDs back in seconds. The key is therefore an HMAC under a secret
that the cache does not contain:

- by default a per-installation secret, 32 random bytes created on first use in
  ``$XDG_CONFIG_HOME/pneumo/patient-key.secret`` (``~/.config/pneumo/...`` without
  ``XDG_CONFIG_HOME``), or in the file ``PNEUMO_PATIENT_KEY_SECRET_FILE`` names, with mode 0600
  in a 0700 folder;
- or a secret the user gives (``pneumo preprocess --patient-key-secret FILE``), e.g. one per
  project, shared by the people who build its caches.

The cache records only the secret's identifier (:attr:`PatientKeySecret.identifier`, an HMAC of
a fixed text: it tells two secrets apart and reveals nothing about either), so that a later run
into the same cache can refuse a different secret, whose keys would split one patient's images.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_cli.core.errors import ConfigError, InputError, OutputError

SECRET_ENV = "PNEUMO_PATIENT_KEY_SECRET_FILE"
SECRET_NAME = "patient-key.secret"
SCHEME = "hmac-sha256-v2"
MIN_SECRET_BYTES = 32
_MAX_SECRET_BYTES = 4096
_IDENTIFIER_TEXT = b"pneumo patient-key secret identifier v1"


@dataclass(frozen=True)
class PatientKeySecret:
    """A loaded secret: where it came from, and its bytes (never written into a cache)."""

    path: Path
    key: bytes = field(repr=False)

    @property
    def identifier(self) -> str:
        """16 hex digits that name this secret (HMAC of a fixed text): safe to store."""
        return hmac.new(self.key, _IDENTIFIER_TEXT, hashlib.sha256).hexdigest()[:16]

    def patient_key(self, patient_id: str) -> str:
        """The 16-hex-digit HMAC-SHA-256 of ``patient_id``; "" for an empty or blank id."""
        return patient_key_of(patient_id, self.key)


def patient_key_of(patient_id: str, key: bytes) -> str:
    """The 16-hex-digit HMAC-SHA-256 of ``patient_id`` under ``key``; "" for a blank id."""
    patient_id = patient_id.strip()
    if not patient_id:
        return ""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def default_secret_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the per-installation secret lives: ``$PNEUMO_PATIENT_KEY_SECRET_FILE``, else
    ``$XDG_CONFIG_HOME/pneumo/patient-key.secret``, else ``~/.config/pneumo/...``."""
    environ = os.environ if environ is None else environ
    if environ.get(SECRET_ENV):
        return Path(environ[SECRET_ENV]).expanduser()
    config_home = environ.get("XDG_CONFIG_HOME") or ""
    base = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    return base / "pneumo" / SECRET_NAME


def load_secret(given: str | os.PathLike[str] | None = None) -> PatientKeySecret:
    """The secret for this run: the file ``given`` (``--patient-key-secret``; it must exist),
    else the per-installation secret, created on first use (see the module docstring).

    Raises:
        InputError: ``given`` missing, unreadable, shorter than 32 bytes, or readable or
            writable by other users.
        OutputError: the per-installation secret cannot be created.
    """
    if given is not None:
        return _read_secret(Path(given), "--patient-key-secret")
    path = default_secret_path()
    if not path.exists():
        _create_secret(path)
    return _read_secret(path, f"the patient-key secret (${SECRET_ENV} or the default)")


def check_same_secret(recorded: object, secret: PatientKeySecret, cache: Path) -> None:
    """Refuse a cache whose patient keys were made with another secret or scheme.

    Raises:
        ConfigError: one line naming both identifiers and the ways out.
    """
    if recorded == {"scheme": SCHEME, "id": secret.identifier}:
        return
    if not isinstance(recorded, dict) or recorded.get("scheme") != SCHEME:
        raise ConfigError(
            f"{cache} holds patient keys made by an older pneumo (a hash with a public salt, "
            "reversible for numeric PatientIDs); rebuild it with --overwrite"
        )
    raise ConfigError(
        f"{cache} was made with another patient-key secret (id {recorded.get('id')}; this run "
        f"uses {secret.identifier} from {secret.path}): its images would lose their patient "
        "grouping; give that secret with --patient-key-secret FILE (or "
        f"{SECRET_ENV}), or rebuild with --overwrite"
    )


def secret_record(secret: PatientKeySecret) -> dict[str, str]:
    """What a cache stores about its secret: the scheme and the identifier, never the key."""
    return {"scheme": SCHEME, "id": secret.identifier}


def _read_secret(path: Path, what: str) -> PatientKeySecret:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} {path} is not a file")
        if info.st_mode & 0o007:
            raise InputError(
                f"{what} {path} is readable or writable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); restrict it with `chmod 600 {path}`"
            )
        with open(path, "rb") as handle:
            key = handle.read(_MAX_SECRET_BYTES + 1).strip()
    except FileNotFoundError:
        raise InputError(
            f"{what} {path} does not exist; create one with `head -c 32 /dev/urandom | "
            f"base64 > {path} && chmod 600 {path}`"
        ) from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror})") from None
    if not MIN_SECRET_BYTES <= len(key) <= _MAX_SECRET_BYTES:
        raise InputError(
            f"{what} {path} holds {len(key)} bytes; a secret needs {MIN_SECRET_BYTES} to "
            f"{_MAX_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64`)"
        )
    return PatientKeySecret(path, key)


def _create_secret(path: Path) -> None:
    """Create ``path`` holding 64 random hex digits, mode 0600, without ever replacing a secret
    another process created meanwhile (hard link: fails if the target exists)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as exc:
        raise OutputError(
            f"cannot create the patient-key secret {path} ({exc.strerror}); set {SECRET_ENV} "
            "to a writable place or give --patient-key-secret FILE"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
