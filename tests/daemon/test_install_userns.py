"""The installer and user namespaces: preflight reads userns-remap from the engine; on an engine
without it (a second private dockerd, started without remapping) the installer turns it on in
the engine's daemon.json, keeping its other settings, and restarts Docker; on one with it (the
harness's engine) it leaves Docker alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import DockerEngine
from tests.daemon.test_install import Host, run

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    return Host(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def plain_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    with DockerEngine(tmp_path_factory.mktemp("plain-docker"), userns=False) as engine:
        yield engine


def test_an_engine_without_remapping_gets_it_from_the_installer(
    host: Host, plain_engine: DockerEngine
) -> None:
    host.env["DOCKER_HOST"] = plain_engine.base_url
    docker_config = host.tmp / "docker" / "daemon.json"
    docker_config.parent.mkdir()
    docker_config.write_text(json.dumps({"log-driver": "journald"}))
    argv = ("--simulate-gpus", "1xL4", "--control-plane", "c:1", "--token", "t")
    code, out = run(host, "--dry-run", "--docker-config", str(docker_config), *argv)
    assert code == 0, out
    assert "[warn] Docker user namespaces: userns-remap is off" in out
    assert f'set "userns-remap": "default" in {docker_config}' in out
    assert "run: systemctl restart docker" in out

    code, out = run(host, "--no-start", "--docker-config", str(docker_config), *argv)
    assert code == 0, out
    assert json.loads(docker_config.read_text()) == {
        "log-driver": "journald",
        "userns-remap": "default",
    }
    calls = [c for c in host.calls() if " -c " not in c]
    assert calls[0] == "systemctl restart docker"

    # Asked not to: Docker is left as it is.
    host.log.write_text("")
    code, out = run(host, "--no-start", "--no-userns-remap", *argv)
    assert code == 0, out
    assert "run: systemctl restart docker" not in out
    assert not [c for c in host.calls() if "restart docker" in c]


def test_a_remapped_engine_passes_and_is_left_alone(
    host: Host, docker_engine: DockerEngine
) -> None:
    host.env["DOCKER_HOST"] = docker_engine.base_url
    argv = ("--simulate-gpus", "1xL4", "--control-plane", "c:1", "--token", "t")
    code, out = run(host, "--dry-run", *argv)
    assert code == 0, out
    assert "[ok  ] Docker user namespaces: userns-remap is on" in out
    assert "run: systemctl restart docker" not in out
