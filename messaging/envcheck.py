"""Environment variables with a process's settings prefix that no setting reads, reported at start.

pydantic-settings ignores a variable it has no field for (`extra="ignore"`), so a misspelt
one would silently leave its setting at the default. Each process calls
`warn_unknown_settings` once it has its settings and its logging: one WARNING per such
variable, naming it and the closest setting (difflib). Only names are logged, never values.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping

from pydantic_settings import BaseSettings

log = logging.getLogger(__name__)

# GPUPLANE_* variables that are not the control plane's settings but are used on purpose, so
# the control plane (prefix GPUPLANE_) must not call them misspelt. A name ending in "_" is a
# family. tests/messaging/test_envcheck.py fails when a GPUPLANE_ name in the repository's
# Python sources or deploy/ is neither a setting nor listed here.
OTHER_GPUPLANE_VARIABLES: tuple[str, ...] = (
    # The daemon's settings (daemon/settings.py); the daemon checks its own.
    "GPUPLANE_DAEMON_",
    # The CLI (gpuplane_cli/client.py, jobs.py, main.py): whom to call and how.
    "GPUPLANE_ADDR",
    "GPUPLANE_API_KEY",
    "GPUPLANE_API_KEY_FILE",
    "GPUPLANE_ENV_FILE",
    "GPUPLANE_CA_FILE",
    "GPUPLANE_CERT_FILE",
    "GPUPLANE_KEY_FILE",
    "GPUPLANE_PLAINTEXT",
    "GPUPLANE_ALLOW_SIMULATED",
    # The other keys `gpuplane up` writes to DATA_DIR/gpuplane.env (gpuplane_cli/stackinfo.py).
    "GPUPLANE_ADMIN_API_KEY",
    "GPUPLANE_PROVIDER_API_KEY",
    # Set by the daemon inside a job's container (daemon/runtime.py).
    "GPUPLANE_JOB_ID",
    "GPUPLANE_ATTEMPT",
    # Read by the verification probe inside its container (deploy/probe/probe.c); N, ROUNDS
    # and SEEDS are also set there from the control plane's GPUPLANE_PROBE_* settings.
    "GPUPLANE_PROBE_OUTPUT",
    "GPUPLANE_PROBE_SEEDS",
    # Tests only (tests/reliability/test_hostile.py; tests/browser/conftest.py: 1 copies the
    # README's screenshots to docs/img/).
    "GPUPLANE_HOSTILE_EXAMPLES",
    "GPUPLANE_UPDATE_SCREENSHOTS",
)


def setting_variables(settings: type[BaseSettings]) -> list[str]:
    """The environment variable of each field of `settings` (its prefix + the field's name)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    return [f"{prefix}{name}".upper() for name in settings.model_fields]


def unknown_variables(
    environ: Mapping[str, str],
    settings: type[BaseSettings],
    also_known: Iterable[str] = (),
) -> list[str]:
    """Names in `environ` with the prefix of `settings` that are neither one of its fields nor
    in `also_known` (exact names, or families ending in "_"), sorted. Case-insensitive, as
    pydantic-settings reads them."""
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    known = set(setting_variables(settings))
    others = [name.upper() for name in also_known]
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known:
            continue
        if any(upper == o or (o.endswith("_") and upper.startswith(o)) for o in others):
            continue
        unknown.append(name)
    return sorted(unknown)


def warn_unknown_settings(
    environ: Mapping[str, str],
    settings: type[BaseSettings],
    process: str,
    also_known: Iterable[str] = (),
) -> list[str]:
    """Logs a WARNING per unknown variable (see `unknown_variables`), with the closest setting
    when one is close; returns the names."""
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    # Compared without the prefix they all share, which would make any two names look close.
    fields = [name[len(prefix) :] for name in setting_variables(settings)]
    unknown = unknown_variables(environ, settings, also_known)
    for name in unknown:
        close = difflib.get_close_matches(name.upper()[len(prefix) :], fields, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        log.warning("%s is not a setting of the %s (ignored)%s", name, process, hint)
    return unknown
