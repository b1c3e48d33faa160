"""Re-running `gpuplane daemon install` restarts the running service when what it runs changed
(a new package, unit or settings), and only then. systemd cannot run in a test container:
systemctl is the recording stand-in of tests/daemon/test_install.py, which keeps whether the
service runs; pip is a stand-in that, when told to, installs a "new release" (a RECORD)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devstack import DockerEngine
from tests.daemon.test_install import FAKE_PYTHON, Host, executable, run

pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]
RESTART = "systemctl restart gpuplane-daemon.service"
# The venv's pip installs the release named in {release} (when that file exists) as a
# dist-info RECORD, where pip keeps each installed file's hash.
UPGRADING_PIP = """\
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ -e "{release}" ]; then
    site="$(dirname "$0")/../lib/python3.11/site-packages"
    rm -rf "$site"/gpuplane-*.dist-info
    mkdir -p "$site/gpuplane-$(cat "{release}").dist-info"
    dist="$site/gpuplane-$(cat "{release}").dist-info"
    echo "daemon/agent.py,sha256=$(cat "{release}"),1" > "$dist/RECORD"
fi
"""


@pytest.fixture
def host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_nvml: Path, docker_engine: DockerEngine
) -> Host:
    host = Host(tmp_path, monkeypatch)
    host.add_gpu_stack(fake_nvml)
    host.env["DOCKER_HOST"] = docker_engine.base_url
    fake = FAKE_PYTHON.format(log=host.log, python=sys.executable)
    head, _, tail = fake.partition("if [")
    hook = UPGRADING_PIP.format(release=host.tmp / "release")
    executable(host.python, head + hook + "if [" + tail)
    return host


def release(host: Host, version: str) -> None:
    (host.tmp / "release").write_text(version)


def install_again(host: Host, *argv: str) -> list[str]:
    """The systemctl calls of one more install."""
    host.log.write_text("")
    code, out = run(host, *argv)
    assert code == 0, out
    return [c for c in host.calls() if c.startswith("systemctl ")]


def test_an_upgrade_restarts_the_running_service_and_only_then(host: Host) -> None:
    release(host, "0.1.0")
    first = install_again(host, "--control-plane", "cp:50051", "--token", "grt_x")
    assert first[-1] == "systemctl enable --now gpuplane-daemon.service"
    assert RESTART not in first, "a first install starts the service; nothing to restart"
    assert host.active.exists()

    same = install_again(host)
    assert RESTART not in same, "nothing changed: the running daemon is left alone"

    release(host, "0.2.0")
    upgraded = install_again(host)
    assert upgraded[0] == "systemctl is-active --quiet gpuplane-daemon.service"
    assert upgraded[-2:] == ["systemctl enable --now gpuplane-daemon.service", RESTART]

    settings = install_again(host, "--location", "eu-west")
    assert settings[-1] == RESTART, "a changed setting is read at start only"


def test_a_stopped_service_is_started_not_restarted(host: Host) -> None:
    release(host, "0.1.0")
    install_again(host, "--control-plane", "cp:50051", "--token", "grt_x")
    host.active.unlink()  # the operator stopped it
    release(host, "0.2.0")
    calls = install_again(host)
    assert RESTART not in calls
    assert calls[-1] == "systemctl enable --now gpuplane-daemon.service"


def test_no_start_neither_starts_nor_restarts(host: Host) -> None:
    release(host, "0.1.0")
    install_again(host, "--control-plane", "cp:50051", "--token", "grt_x")
    release(host, "0.2.0")
    calls = install_again(host, "--no-start")
    assert calls == ["systemctl daemon-reload", "systemctl enable gpuplane-daemon.service"]


def test_dry_run_says_it_would_restart(host: Host) -> None:
    code, out = run(host, "--dry-run", "--control-plane", "cp:50051", "--token", "grt_x")
    assert code == 0, out
    assert f"{RESTART} if it was running and what it runs changed" in out
    assert not host.active.exists()
