"""Misspelt GPUPLANE_* variables are named at start by the control plane and the daemon (with
the closest setting), known ones are not, and no GPUPLANE_ name the repository uses would be."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.settings import Settings
from daemon.cli import EXIT_USAGE, add_daemon_parser, run_daemon
from daemon.settings import DaemonSettings
from messaging.envcheck import OTHER_GPUPLANE_VARIABLES, setting_variables, unknown_variables

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
GPUPLANE = Path(sys.executable).parent / "gpuplane"
NAME = re.compile(r"\bGPUPLANE_[A-Z0-9_]+")
# This module's own misspellings are on purpose; nothing else is scanned out.
MISSPELT_CP = "GPUPLANE_HEARTBEAT_TIMOUT_MS"
MISSPELT_DAEMON = "GPUPLANE_DAEMON_SIMULATE_GPU"
# Variables the control plane's environment may hold on purpose: none may be reported.
KNOWN_CP = {
    "GPUPLANE_HEARTBEAT_TIMEOUT_MS": "15000",
    "gpuplane_log_level": "INFO",  # pydantic-settings reads names case-insensitively
    "GPUPLANE_PROBE_N": "512",
    "GPUPLANE_ADDR": "127.0.0.1:1",
    "GPUPLANE_API_KEY": "k",
    "GPUPLANE_DAEMON_DATA_DIR": "/nowhere",
    "GPUPLANE_JOB_ID": "job-1",
}


def without_gpuplane_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("GPUPLANE_")}


def test_control_plane_start_names_misspelt_variables(tmp_path: Path) -> None:
    """`gpuplane controlplane serve` as run: it warns first, then (no TLS certificate and no
    allow_plaintext) refuses to serve; only the two unknown names are reported."""
    env = {**without_gpuplane_env(), **KNOWN_CP, MISSPELT_CP: "1", "GPUPLANE_ZZZ_QQQ": "x"}
    argv = [str(GPUPLANE), "controlplane", "serve", "--data-dir", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == EXIT_USAGE, done.stderr
    warned = [line for line in done.stderr.splitlines() if "is not a setting" in line]
    assert len(warned) == 2, done.stderr
    assert warned[0].endswith(
        "WARNING messaging.envcheck: GPUPLANE_HEARTBEAT_TIMOUT_MS is not a setting of the "
        "control plane (ignored); did you mean GPUPLANE_HEARTBEAT_TIMEOUT_MS?"
    )
    assert warned[1].endswith("GPUPLANE_ZZZ_QQQ is not a setting of the control plane (ignored)"), (
        "no suggestion when nothing is close"
    )
    assert "invalid TLS settings" in done.stderr


def test_daemon_start_names_misspelt_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """run_daemon, what `gpuplane daemon run` calls: the warning, then it runs on (and stops
    for want of a registration token)."""
    for name in list(os.environ):
        if name.upper().startswith("GPUPLANE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(MISSPELT_DAEMON, "2xL4")
    monkeypatch.setenv("GPUPLANE_DAEMON_LOCATION", "eu-west")
    monkeypatch.setenv("GPUPLANE_DAEMON_RECONNECT_MAX_SECONDS", "1")
    monkeypatch.setenv("GPUPLANE_ADDR", "127.0.0.1:1")  # the CLI's: not the daemon's prefix
    monkeypatch.setenv("GPUPLANE_HEARTBEAT_TIMEOUT_MS", "1000")  # the control plane's
    parser = argparse.ArgumentParser()
    add_daemon_parser(parser.add_subparsers())
    args = parser.parse_args(["run", "--data-dir", str(tmp_path), "--simulate-gpus", "1xL4"])
    with caplog.at_level(logging.WARNING, logger="messaging.envcheck"):
        assert run_daemon(args) == EXIT_USAGE
    assert [r.getMessage() for r in caplog.records if r.name == "messaging.envcheck"] == [
        "GPUPLANE_DAEMON_SIMULATE_GPU is not a setting of the daemon (ignored); "
        "did you mean GPUPLANE_DAEMON_SIMULATE_GPUS?"
    ]


def repository_names() -> set[str]:
    """Every GPUPLANE_ name in the repository's Python sources and deploy/ files."""
    names: set[str] = set()
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith((".", "__pycache__"))]
        in_deploy = Path(directory).is_relative_to(ROOT / "deploy")
        for file in files:
            path = Path(directory) / file
            if (file.endswith(".py") or in_deploy) and path != Path(__file__).resolve():
                names.update(NAME.findall(path.read_text(errors="replace")))
    return names


def test_no_gpuplane_name_the_repository_uses_is_reported_unknown() -> None:
    names = repository_names()
    assert "GPUPLANE_ADDR" in names  # the scan sees the sources
    assert "GPUPLANE_DAEMON_REGISTRATION_TOKEN" in names  # and deploy/
    known = setting_variables(Settings) + list(OTHER_GPUPLANE_VARIABLES)
    daemon_known = setting_variables(DaemonSettings)
    for name in sorted(names):
        if name.endswith("_"):  # a family named in prose, e.g. GPUPLANE_PROBE_*
            assert any(k.startswith(name) for k in known), f"{name}: no such family"
            continue
        assert not unknown_variables({name: ""}, Settings, OTHER_GPUPLANE_VARIABLES), (
            f"{name} would be reported as misspelt by the control plane: a setting, or add it "
            "to messaging/envcheck.py OTHER_GPUPLANE_VARIABLES"
        )
        if name.startswith("GPUPLANE_DAEMON_"):
            assert name in daemon_known, f"{name} is not a daemon setting"
    # And the list keeps only what is used.
    for entry in OTHER_GPUPLANE_VARIABLES:
        assert any(n.startswith(entry) for n in names), f"{entry} is used nowhere: drop it"
