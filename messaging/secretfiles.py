"""Secrets given as files (systemd LoadCredential=, Docker secrets), read into their settings.

Each secret setting X has a sibling setting X_file: a path whose content is the secret, with
one trailing newline stripped (what `echo secret > file` leaves). A file readable by every
user is read, with a warning naming it. Setting both X (not empty) and X_file is refused:
which one wins would be a guess. A missing, unreadable or empty file is a ValueError naming
the setting's variable and the path, so the process refuses to start instead of running
without it.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads key files here and must start without pydantic
    from pydantic_settings import BaseSettings

log = logging.getLogger(__name__)


class SecretFileError(ValueError):
    """A secret file that cannot be used; the message names the variable and the path."""


def read_secret_file(path: Path, variable: str) -> str:
    """The secret in `path` (one trailing newline stripped); `variable` names it in errors."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SecretFileError(f"{variable}: cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{variable}: {path} is not UTF-8 text") from None
    if mode & stat.S_IROTH:
        log.warning("%s: %s is readable by every user; chmod o-r it", variable, path)
    secret = text.removesuffix("\n")
    if not secret.strip():
        raise SecretFileError(f"{variable}: {path} is empty")
    return secret


def apply_secret_files(settings: BaseSettings, secrets: Iterable[str]) -> None:
    """For each secret field named in `secrets` whose `<name>_file` field is set: reads the
    file into the field (as a SecretStr). Call from a model validator (mode="after")."""
    from pydantic import SecretStr  # only the settings' validators need it

    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    for name in secrets:
        path = getattr(settings, f"{name}_file")
        if path is None:
            continue
        variable = f"{prefix}{name.upper()}_FILE"
        given = getattr(settings, name)
        if name in settings.model_fields_set and given is not None and given.get_secret_value():
            raise SecretFileError(
                f"{prefix}{name.upper()} and {variable} exclude each other: set one (the file)"
            )
        setattr(settings, name, SecretStr(read_secret_file(Path(path), variable)))
