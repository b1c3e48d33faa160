"""The control plane's secrets given as files (GPUPLANE_<SECRET>_FILE), mixed into Settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from messaging.secretfiles import apply_secret_files

# Each secret field of Settings that may come from a file, read by messaging/secretfiles.py.
SECRETS = (
    "bootstrap_admin_key",
    "s3_secret_key",
    "nats_operator_seed",
    "nats_account_seed",
    "nats_system_account_seed",
)
_FILE = (
    "File holding {what} (one trailing newline stripped), e.g. a systemd credential "
    "($CREDENTIALS_DIRECTORY/{name}) or a Docker secret (/run/secrets/{name}); excludes "
    "{variable}, which puts the secret in the process's environment."
)


def _described(name: str, what: str) -> str:
    return _FILE.format(what=what, name=name.replace("_", "-"), variable=f"GPUPLANE_{name.upper()}")


class SecretFileFields(BaseSettings):
    """Where the secrets of Settings are read from when they are files (the preferred way:
    systemd LoadCredential=, Docker secrets); `apply_secret_files` reads them at start."""

    bootstrap_admin_key_file: Path | None = Field(
        default=None, description=_described("bootstrap_admin_key", "bootstrap_admin_key")
    )
    s3_secret_key_file: Path | None = Field(
        default=None, description=_described("s3_secret_key", "s3_secret_key")
    )
    nats_operator_seed_file: Path | None = Field(
        default=None, description=_described("nats_operator_seed", "nats_operator_seed")
    )
    nats_account_seed_file: Path | None = Field(
        default=None, description=_described("nats_account_seed", "nats_account_seed")
    )
    nats_system_account_seed_file: Path | None = Field(
        default=None,
        description=_described("nats_system_account_seed", "nats_system_account_seed"),
    )

    @model_validator(mode="after")
    def _read_secret_files(self) -> SecretFileFields:
        apply_secret_files(self, SECRETS)
        return self
