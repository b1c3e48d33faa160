"""The systemd units: both pass `systemd-analyze verify`; the control plane's is hardened at
least as the daemon's is, passes each secret as a credential its *_FILE setting names, and
with controlplane.env.example as its EnvironmentFile reads those secrets from the files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.settings import Settings
from controlplane.settings_secrets import SECRETS
from tests.deploy.formats import read_env_file

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("gpuplane-daemon.service", "gpuplane-controlplane.service")
INSTALLED_GPUPLANE = "/opt/gpuplane/venv/bin/gpuplane"
# Hardening the daemon cannot have (NVML needs /dev/nvidia*, GPU processes are found through
# /proc, driver ioctls) and the control plane has.
CONTROL_PLANE_ONLY = {"PrivateDevices", "ProtectProc", "SystemCallFilter", "CapabilityBoundingSet"}


def directives(unit: str, *, commented: bool = False) -> list[tuple[str, str]]:
    """(key, value) of each KEY=VALUE line, in order; `commented` adds the #KEY=VALUE ones."""
    found = []
    for line in (DEPLOY / unit).read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Za-z]+)=(.*)", line.strip())
        if match and (commented or not match.group(1)):
            found.append((match.group(2), match.group(3)))
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit as installed, its ExecStart this checkout's
    gpuplane (verify wants the program to exist)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed (apt install systemd)"
    gpuplane = Path(sys.executable).parent / "gpuplane"
    text = (DEPLOY / unit).read_text()
    assert f"ExecStart={INSTALLED_GPUPLANE} " in text
    (tmp_path / unit).write_text(text.replace(INSTALLED_GPUPLANE, str(gpuplane)))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_control_plane_is_hardened_at_least_as_the_daemon() -> None:
    daemon = dict(directives("gpuplane-daemon.service"))
    plane = dict(directives("gpuplane-controlplane.service"))
    hardening = {k for k in daemon if k.startswith(("Protect", "Restrict", "NoNew", "Lock"))}
    assert hardening
    for key in hardening - {"RestrictAddressFamilies"}:
        assert plane.get(key) == daemon[key], key
    assert set(plane["RestrictAddressFamilies"].split()) < set(
        daemon["RestrictAddressFamilies"].split()
    )
    assert CONTROL_PLANE_ONLY <= set(plane)
    assert plane["CapabilityBoundingSet"] == ""
    assert plane["User"] == "gpuplane"
    assert "ReadWritePaths" not in plane, "its only writable place is its StateDirectory"
    assert plane["Environment"]  # (the last one; every one is checked below)


def test_each_secret_is_a_credential_its_file_setting_names() -> None:
    """Every Environment=<SECRET>_FILE=%d/NAME (commented ones too) has LoadCredential=NAME,
    and SECRET is one that may come from a file; nothing else is a credential."""
    lines = directives("gpuplane-controlplane.service", commented=True)
    credentials = {v.partition(":")[0] for k, v in lines if k == "LoadCredential"}
    named = {}
    for key, value in lines:
        if key == "Environment" and "=%d/" in value:
            variable, _, path = value.partition("=")
            named[path.removeprefix("%d/")] = variable
    assert credentials == set(named)
    assert {v.removeprefix("GPUPLANE_").removesuffix("_FILE").lower() for v in named.values()} == (
        set(SECRETS)
    )


def test_example_env_file_with_the_units_credentials_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the service's process sees: the unit's Environment= (%d = its credentials
    directory, here holding the files), then the example's values (EnvironmentFile= wins):
    the settings are valid and the secrets are the files' contents. Were the example to set
    a secret the unit passes as a file, this would fail (a secret set both ways)."""
    lines = directives("gpuplane-controlplane.service")
    env_file = next(v for k, v in lines if k == "EnvironmentFile")
    assert env_file in (DEPLOY / "controlplane.env.example").read_text().splitlines()[1]
    environ = {}
    for key, value in lines:
        if key == "Environment":
            variable, _, setting = value.partition("=")
            environ[variable] = setting.replace("%d", str(tmp_path))
        if key == "LoadCredential":
            name = value.partition(":")[0]
            (tmp_path / name).write_text(f"{name}-secret\n")
            (tmp_path / name).chmod(0o600)
    environ.update(read_env_file(DEPLOY / "controlplane.env.example").values)
    for key in list(os.environ):
        if key.upper().startswith("GPUPLANE_"):
            monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.s3_secret_key.get_secret_value() == "s3-secret-key-secret"
    assert settings.bootstrap_admin_key is not None
    assert settings.bootstrap_admin_key.get_secret_value() == "bootstrap-admin-key-secret"
