"""SIGTERM stops a served control plane and a daemon within 5 s, with no ERROR line; a daemon
whose host was revoked exits with one clear error line instead of retrying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import DockerEngine, NatsServer, S3Server, free_port
from gpuplane_cli.main import main
from tests.cli.conftest import CLI, port_open

STOP_BUDGET = 5.0


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {text!r} in {self.log}:\n{self.text()}")
            time.sleep(0.05)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        return code, time.monotonic() - began

    def errors(self) -> list[str]:
        return [
            line for line in self.text().splitlines() if " ERROR " in line or "Traceback" in line
        ]


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> Child:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT)
    return Child(process, log)


@dataclass
class Served:
    child: Child
    addr: str
    admin_key: str

    def cli(self, *argv: str, key: str = "") -> None:
        """Runs a CLI command in this process (as admin by default), with --json output (on
        stdout)."""
        words = ["--api-key", key or self.admin_key, *argv, "--json"]
        assert main(words, environ=self.environ) == 0, argv

    @property
    def environ(self) -> dict[str, str]:
        return {"GPUPLANE_ADDR": self.addr, "GPUPLANE_PLAINTEXT": "1"}


@pytest.fixture
def served(tmp_path: Path, nats_server: NatsServer, s3_server: S3Server) -> Iterator[Served]:
    data_dir = tmp_path / "plane"
    data_dir.mkdir()
    port = free_port()
    env = {
        "GPUPLANE_METRICS_ADDR": "127.0.0.1:0",
        "GPUPLANE_ALLOW_PLAINTEXT": "true",
        "GPUPLANE_ALLOW_SIMULATED_BY_DEFAULT": "true",
        "GPUPLANE_ALLOW_UNVERIFIED_BY_DEFAULT": "true",
        "GPUPLANE_NATS_URL": nats_server.url,
        "GPUPLANE_S3_ENDPOINT": s3_server.endpoint,
        "GPUPLANE_S3_ACCESS_KEY": s3_server.access_key,
        "GPUPLANE_S3_SECRET_KEY": s3_server.secret_key,
    }
    argv = [*CLI, "controlplane", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(data_dir), "--log-level", "INFO"]
    child = spawn(argv, data_dir / "serve.log", env)
    key_file = data_dir / "admin.key"
    deadline = time.monotonic() + 60
    while not (key_file.exists() and port_open(port)):
        if child.process.poll() is not None or time.monotonic() > deadline:
            child.process.kill()
            pytest.fail(f"controlplane serve did not start:\n{child.text()}")
        time.sleep(0.05)
    try:
        yield Served(child, f"127.0.0.1:{port}", key_file.read_text().strip())
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


def new_tenant(served: Served, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    served.cli("admin", "tenants", "create", f"tenant-{uuid.uuid4().hex[:8]}")
    return str(json.loads(capsys.readouterr().out)["tenant_id"])


def registration_token(served: Served, capsys: pytest.CaptureFixture[str]) -> str:
    """A token of a fresh provider tenant."""
    tenant = new_tenant(served, capsys)
    served.cli("admin", "tokens", "create", "--provider", tenant)
    return str(json.loads(capsys.readouterr().out)["secret"])


def run_a_job(served: Served, image: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A funded consumer runs one job to success (on the only host there is)."""
    tenant = new_tenant(served, capsys)
    served.cli("admin", "keys", "create", "--tenant", tenant, "--role", "consumer")
    key = str(json.loads(capsys.readouterr().out)["secret"])
    served.cli("ledger", "deposit", "10", "--tenant", tenant)
    words = ["jobs", "submit", "--image", image, "--max-duration", "1m", "--wait"]
    served.cli(*words, "--", "echo", "hello", key=key)


def start_daemon(served: Served, token: str, engine: DockerEngine, data_dir: Path) -> Child:
    argv = [*CLI, "daemon", "run", "--control-plane", served.addr, "--plaintext"]
    argv += ["--token", token, "--data-dir", str(data_dir), "--simulate-gpus", "1xA100-80GB"]
    argv += ["--docker-host", engine.base_url, "--log-level", "INFO"]
    env = {"GPUPLANE_DAEMON_MACHINE_ID": f"test-{uuid.uuid4().hex}"}
    data_dir.mkdir(parents=True)
    child = spawn(argv, data_dir.parent / f"{data_dir.name}.log", env)
    child.wait_for("connected to the control plane as host", timeout=60)
    return child


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_sigterm_stops_a_daemon_and_a_control_plane_within_5s(
    served: Served,
    docker_engine: DockerEngine,
    test_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = start_daemon(
        served, registration_token(served, capsys), docker_engine, tmp_path / "daemon"
    )
    run_a_job(served, test_image, capsys)
    # Then idle: its dispatch fetches (5 s each) time out a few times. A drain of its NATS
    # connection then waited out its whole 30 s timeout and logged a DrainTimeoutError.
    time.sleep(12)
    # The control plane first, with the daemon connected: its Connect stream ends at once
    # rather than holding the server's 5 s grace; then the daemon, while it reconnects.
    code, plane_took = served.child.terminate()
    assert code == 0, served.child.text()
    assert plane_took < STOP_BUDGET, served.child.text()
    assert served.child.errors() == []

    code, took = daemon.terminate()
    assert code == 0, daemon.text()
    assert took < STOP_BUDGET, daemon.text()
    assert daemon.errors() == []
    with capsys.disabled():
        print(f"\n[timing] SIGTERM: daemon {took:.2f}s, control plane {plane_took:.2f}s")


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_a_revoked_daemon_exits_with_one_error_line(
    served: Served,
    docker_engine: DockerEngine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = start_daemon(
        served, registration_token(served, capsys), docker_engine, tmp_path / "daemon"
    )
    host_id = json.loads((tmp_path / "daemon" / "host.json").read_text())["host_id"]
    served.cli("hosts", "revoke", host_id, "--reason", "test")
    try:
        code = daemon.process.wait(30)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        pytest.fail(f"a revoked daemon keeps running:\n{daemon.text()}")
    assert code == 2, daemon.text()
    last = daemon.text().splitlines()[-1]
    assert last.startswith("error: "), daemon.text()
    assert host_id in last
    assert "revoked" in last
    assert daemon.text().count("giving up") == 1
