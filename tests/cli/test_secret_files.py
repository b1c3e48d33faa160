"""Secrets as files (systemd LoadCredential=, Docker secrets), every process started for real:
`gpuplane controlplane serve` with its admin key and S3 secret key only in files, the CLI with
GPUPLANE_API_KEY_FILE, `gpuplane daemon run --token-file`; a missing file is refused naming
the variable and the path. And the daemon checks its Docker engine before it spends a token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

from daemon.cli import EXIT_ERROR, EXIT_USAGE
from devstack import DockerEngine, NatsServer, S3Server, free_port
from tests.cli.conftest import CLI, Cli, port_open

pytestmark = [pytest.mark.timeout(180), pytest.mark.docker]
GPUPLANE = Path(sys.executable).parent / "gpuplane"


@dataclass
class Plane:
    addr: str
    admin_key_file: Path
    bucket: str


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("GPUPLANE_")}


def secret_file(path: Path, secret: str) -> Path:
    """`secret` and a newline (as `echo` writes it), mode 0600."""
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def plane_env(
    nats_server: NatsServer, s3_server: S3Server, secrets: Path, bucket: str
) -> dict[str, str]:
    """A control plane's environment whose secrets are only in files."""
    return {
        **clean_env(),
        "GPUPLANE_ALLOW_PLAINTEXT": "true",
        "GPUPLANE_METRICS_ADDR": "",
        "GPUPLANE_NATS_URL": nats_server.url,
        "GPUPLANE_S3_ENDPOINT": s3_server.endpoint,
        "GPUPLANE_S3_ACCESS_KEY": s3_server.access_key,
        "GPUPLANE_S3_BUCKET": bucket,
        "GPUPLANE_S3_SECRET_KEY_FILE": str(secrets / "s3-secret-key"),
        "GPUPLANE_BOOTSTRAP_ADMIN_KEY_FILE": str(secrets / "bootstrap-admin-key"),
    }


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer, s3_server: S3Server
) -> Iterator[Plane]:
    data_dir = tmp_path_factory.mktemp("secret-plane")
    secrets = tmp_path_factory.mktemp("credentials")
    secret_file(secrets / "s3-secret-key", s3_server.secret_key)
    admin_key = secret_file(secrets / "bootstrap-admin-key", f"gpk_{uuid.uuid4().hex}")
    bucket = f"sf-{uuid.uuid4().hex[:12]}"
    port = free_port()
    env = plane_env(nats_server, s3_server, secrets, bucket)
    argv = [*CLI, "controlplane", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    with (data_dir / "serve.log").open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"serve did not start:\n{(data_dir / 'serve.log').read_text()}")
        time.sleep(0.05)
    try:
        yield Plane(f"127.0.0.1:{port}", admin_key, bucket)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (data_dir / "serve.log").read_text()


@pytest.fixture
def admin(capsys: pytest.CaptureFixture[str], plane: Plane) -> Cli:
    """The CLI as the admin, whose key is only in GPUPLANE_API_KEY_FILE."""
    environ = {"GPUPLANE_ADDR": plane.addr, "GPUPLANE_PLAINTEXT": "1"}
    return Cli(capsys, {**environ, "GPUPLANE_API_KEY_FILE": str(plane.admin_key_file)})


def test_control_plane_uses_its_s3_secret_key_file(plane: Plane, s3_server: S3Server) -> None:
    """The plane makes its bucket at start: only with the secret key from the file can it."""
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    deadline = time.monotonic() + 30
    while not client.bucket_exists(plane.bucket):
        assert time.monotonic() < deadline, "the control plane did not make its bucket"
        time.sleep(0.2)


def new_token(admin: Cli) -> tuple[str, str]:
    """(provider tenant id, a fresh registration token's secret), as the admin from its file."""
    made = admin("--json", "admin", "tenants", "create", f"prov-{uuid.uuid4().hex[:8]}")
    assert made.code == 0, made.err
    provider = made.json()["tenant_id"]  # type: ignore[index]
    token = admin("admin", "tokens", "create", "--provider", provider)
    assert token.code == 0, token.err
    return str(provider), token.out.splitlines()[-1]


def token_uses(admin: Cli, provider: str) -> int:
    listed = admin("--json", "admin", "tokens", "list", "--provider", provider)
    assert listed.code == 0, listed.err
    tokens = listed.json()
    assert isinstance(tokens, list)
    assert len(tokens) == 1
    return int(tokens[0].get("uses", 0))


def daemon_argv(plane: Plane, data_dir: Path, docker_host: str, *extra: str) -> list[str]:
    argv = [str(GPUPLANE), "daemon", "run", "--plaintext", "--control-plane", plane.addr]
    argv += ["--data-dir", str(data_dir), "--docker-host", docker_host]
    return [*argv, "--simulate-gpus", "1xL4", *extra]


def test_daemon_registers_with_its_token_file(
    admin: Cli, plane: Plane, docker_engine: DockerEngine, tmp_path: Path
) -> None:
    provider, token = new_token(admin)
    token_file = secret_file(tmp_path / "registration-token", token)
    data_dir = tmp_path / "daemon"
    argv = daemon_argv(plane, data_dir, docker_engine.base_url, "--token-file", str(token_file))
    with (tmp_path / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(argv, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "host.json").exists():
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not register"
            time.sleep(0.1)
        assert token_uses(admin, provider) == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def test_daemon_without_a_docker_engine_keeps_its_token(
    admin: Cli, plane: Plane, tmp_path: Path
) -> None:
    """Nothing answers at the Docker address: one line naming the engine, exit 1, and the
    token (given through the environment's file variable) has every use left."""
    provider, token = new_token(admin)
    token_file = secret_file(tmp_path / "registration-token", token)
    env = {**clean_env(), "GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE": str(token_file)}
    nobody = f"tcp://127.0.0.1:{free_port()}"
    done = subprocess.run(
        daemon_argv(plane, tmp_path / "daemon", nobody),
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == EXIT_ERROR, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the Docker engine is not reachable"), done.stderr
    assert not (tmp_path / "daemon" / "host.json").exists()
    assert token_uses(admin, provider) == 0


def test_missing_secret_files_are_refused_by_name(
    plane: Plane, nats_server: NatsServer, s3_server: S3Server, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    daemon = subprocess.run(
        daemon_argv(plane, tmp_path / "d", "tcp://127.0.0.1:1", "--token-file", str(missing)),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert daemon.returncode == EXIT_USAGE, daemon.stderr
    assert f"GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE: cannot read {missing}" in daemon.stderr
    assert "Traceback" not in daemon.stderr

    secret_file(tmp_path / "bootstrap-admin-key", "gpk_only_the_s3_key_is_missing")
    env = plane_env(nats_server, s3_server, tmp_path, "unused")
    argv = [*CLI, "controlplane", "serve", "--data-dir", str(tmp_path / "cp")]
    serve = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert serve.returncode == EXIT_USAGE, serve.stderr
    assert f"GPUPLANE_S3_SECRET_KEY_FILE: cannot read {tmp_path / 's3-secret-key'}" in (
        serve.stderr
    )
    assert "Traceback" not in serve.stderr


def test_cli_key_file_missing_and_both_ways_at_once(
    capsys: pytest.CaptureFixture[str], plane: Plane, tmp_path: Path
) -> None:
    environ = {"GPUPLANE_ADDR": plane.addr, "GPUPLANE_PLAINTEXT": "1"}
    missing = Cli(capsys, {**environ, "GPUPLANE_API_KEY_FILE": str(tmp_path / "nope")})
    run = missing("whoami")
    assert run.code == EXIT_USAGE
    assert f"GPUPLANE_API_KEY_FILE: cannot read {tmp_path / 'nope'}" in run.err
    # A key on the command line (or in GPUPLANE_API_KEY) wins over the file.
    assert missing("whoami", key=plane.admin_key_file.read_text().strip()).code == 0
