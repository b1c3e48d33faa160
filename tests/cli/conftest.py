"""Fixtures: `gpuplane controlplane serve` as a child process, and running the CLI in-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devstack import NatsServer, S3Server, free_port
from gpuplane_cli.main import main

CLI = [sys.executable, "-m", "gpuplane_cli.main"]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Served:
    """A control plane started by `gpuplane controlplane serve`."""

    addr: str
    admin_key: str
    data_dir: Path


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@dataclass
class Cli:
    """Runs `gpuplane` in this process with a clean environment of its own."""

    capsys: pytest.CaptureFixture[str]
    environ: dict[str, str] = field(default_factory=dict)

    def __call__(self, *argv: str, key: str | None = None) -> Run:
        self.capsys.readouterr()
        words = list(argv) if key is None else ["--api-key", key, *argv]
        code = main(words, environ=dict(self.environ))
        captured = self.capsys.readouterr()
        return Run(code, captured.out, captured.err)


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    s3_server: S3Server,
) -> Iterator[Served]:
    """The control plane of a test module; a module's SERVE_ARGS are added to its flags."""
    data_dir = tmp_path_factory.mktemp("served")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    env.update(
        GPUPLANE_METRICS_ADDR="127.0.0.1:0",
        GPUPLANE_ALLOW_PLAINTEXT="true",
        GPUPLANE_NATS_URL=nats_server.url,
        GPUPLANE_S3_ENDPOINT=s3_server.endpoint,
        GPUPLANE_S3_ACCESS_KEY=s3_server.access_key,
        GPUPLANE_S3_SECRET_KEY=s3_server.secret_key,
    )
    argv = [*CLI, "controlplane", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    argv += getattr(request.module, "SERVE_ARGS", [])
    with (data_dir / "serve.log").open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    key_file = data_dir / "admin.key"
    deadline = time.monotonic() + 60
    while not (key_file.exists() and port_open(port)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"controlplane serve did not start:\n{(data_dir / 'serve.log').read_text()}"
            )
        time.sleep(0.05)
    try:
        yield Served(f"127.0.0.1:{port}", key_file.read_text().strip(), data_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, (data_dir / "serve.log").read_text()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], served: Served) -> Cli:
    return Cli(capsys, {"GPUPLANE_ADDR": served.addr, "GPUPLANE_PLAINTEXT": "1"})
