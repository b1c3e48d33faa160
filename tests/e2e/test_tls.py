"""TLS on loopback: clients verify the control plane (CA, server name), client certificates
when the control plane requires them (daemons register and heartbeat only with one), the CLI's
switches, plaintext only when allowed, and NATS refusing clients without its CA or a client
certificate. The whole job path over TLS is tests/e2e/test_job_path.py's tls variant."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client
from pydantic import SecretStr, ValidationError

from controlplane.server import ControlPlane
from controlplane.settings import ClientAuth, Settings
from controlplane.tls import TlsConfigError
from daemon.channel import PLAINTEXT, ChannelConfigError, ChannelSecurity, open_channel
from daemon.connect import ConnectClient
from daemon.gpus import simulated_gpus
from daemon.identity import register
from daemon.settings import DaemonSettings
from devstack import NatsServer
from devstack.certs import TestCerts, issue_test_certs
from devstack.factories import new_tenant, new_token
from gpuplane_cli.client import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from gpuplane_cli.main import main
from messaging.tls import nats_tls_context
from tests.harness import JobPlane

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def wrong_certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    """Certificates from another CA: right names, wrong signer."""
    return issue_test_certs(tmp_path_factory.mktemp("wrong-ca"), name="impostor")


@asynccontextmanager
async def tls_plane(
    data_dir: Path, certs: TestCerts, client_auth: ClientAuth = "off"
) -> AsyncIterator[ControlPlane]:
    """A TLS control plane on SQLite; NATS and S3 unreachable (the API serves regardless)."""
    plane = ControlPlane(
        Settings(
            data_dir=data_dir,
            listen_addr="127.0.0.1:0",
            metrics_addr="",
            nats_url="nats://127.0.0.1:1",
            s3_endpoint="127.0.0.1:1",
            tls_cert_file=certs.server_cert,
            tls_key_file=certs.server_key,
            tls_client_ca_file=certs.ca_cert,
            tls_client_auth=client_auth,
            heartbeat_interval_ms=100,
        )
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(grace=0)


async def health(address: str, security: ChannelSecurity) -> grpc.StatusCode | str:
    """SERVING, or the status code the call failed with."""
    async with open_channel(address, security) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_clients_verify_the_server_against_their_ca(
    tmp_path: Path, test_certs: TestCerts, wrong_certs: TestCerts
) -> None:
    async with tls_plane(tmp_path / "cp", test_certs) as plane:
        port = plane.port
        trusting = ChannelSecurity(ca_file=test_certs.ca_cert)
        # The certificate's SANs: the DNS name and the IP both verify.
        assert await health(f"localhost:{port}", trusting) == "SERVING"
        assert await health(f"127.0.0.1:{port}", trusting) == "SERVING"
        # A list of replicas (resolved to IPs) is verified against the first one's name.
        assert await health(f"localhost:{port},127.0.0.1:{port}", trusting) == "SERVING"
        unavailable = grpc.StatusCode.UNAVAILABLE
        # The system's roots do not know the test CA; another CA is no better.
        assert await health(f"127.0.0.1:{port}", ChannelSecurity()) == unavailable
        wrong = ChannelSecurity(ca_file=wrong_certs.ca_cert)
        assert await health(f"127.0.0.1:{port}", wrong) == unavailable
        # The right CA, but a name the certificate does not carry.
        misnamed = ChannelSecurity(ca_file=test_certs.ca_cert, server_name="cp.example.com")
        assert await health(f"127.0.0.1:{port}", misnamed) == unavailable
        assert await health(f"127.0.0.1:{port}", PLAINTEXT) == unavailable
        # Client auth off: a daemon already given a certificate connects too (rollout order:
        # certificates to the daemons first, then tls_client_auth=require).
        with_cert = ChannelSecurity(
            ca_file=test_certs.ca_cert,
            cert_file=test_certs.client_cert,
            key_file=test_certs.client_key,
        )
        assert await health(f"127.0.0.1:{port}", with_cert) == "SERVING"


def daemon_settings(plane: ControlPlane, token: str, data_dir: Path, **tls: Any) -> DaemonSettings:
    return DaemonSettings(
        control_plane=f"127.0.0.1:{plane.port}",
        registration_token=SecretStr(token),
        data_dir=data_dir,
        simulate_gpus="1xL4",
        **tls,
    )


async def test_required_client_certificate_gates_daemons(
    tmp_path: Path, test_certs: TestCerts, wrong_certs: TestCerts
) -> None:
    async with tls_plane(tmp_path / "cp", test_certs, client_auth="require") as plane:
        assert plane.admin_key_file is not None
        admin_key = Path(plane.admin_key_file).read_text().strip()
        admin_security = ChannelSecurity(
            ca_file=test_certs.ca_cert,
            cert_file=test_certs.client_cert,
            key_file=test_certs.client_key,
        )
        async with open_channel(f"127.0.0.1:{plane.port}", admin_security) as admin:
            api = JobPlane(plane, "", admin_key, admin, "")
            provider, _ = await new_tenant(api, "provider", types_pb2.ROLE_PROVIDER)
            token = (await new_token(api, provider)).secret

            def attempt(name: str, **tls: Any) -> DaemonSettings:
                return daemon_settings(plane, token, tmp_path / name, **tls)

            refused: list[tuple[str, DaemonSettings]] = [
                ("no client certificate", attempt("none", tls_ca_file=test_certs.ca_cert)),
                (
                    "a certificate of another CA",
                    attempt(
                        "other",
                        tls_ca_file=test_certs.ca_cert,
                        tls_cert_file=wrong_certs.client_cert,
                        tls_key_file=wrong_certs.client_key,
                    ),
                ),
            ]
            for why, settings in refused:
                inventory = simulated_gpus("1xL4", settings.machine_id)
                async with open_channel(settings.control_plane, settings.channel_security()) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as refusal:
                        await register(settings, inventory, ch)
                assert refusal.value.code() == grpc.StatusCode.UNAVAILABLE, why
                assert not settings.host_file.exists(), why

            settings = attempt(
                "good",
                tls_ca_file=test_certs.ca_cert,
                tls_cert_file=test_certs.client_cert,
                tls_key_file=test_certs.client_key,
            )
            inventory = simulated_gpus("1xL4", settings.machine_id)
            async with open_channel(settings.control_plane, settings.channel_security()) as ch:
                identity = await register(settings, inventory, ch)
                session = ConnectClient(
                    ch,
                    host_id=identity.host_id,
                    credential=identity.host_credential,
                    daemon_version="test",
                    gpus=list(inventory.gpus),
                    running_jobs=list,
                    on_command=_ignore,
                    heartbeat_interval_ms=identity.heartbeat_interval_ms,
                )
                running = asyncio.create_task(session.run())
                try:
                    beats = await heartbeats_seen(admin, admin_key, identity.host_id, 2)
                finally:
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
            assert identity.heartbeat_interval_ms == 100
            assert len(set(beats)) == 2  # the host's last heartbeat moved on: it heartbeats


async def _ignore(message: registry_pb2.ControlMessage) -> None:
    return None


async def heartbeats_seen(
    channel: grpc.aio.Channel, admin_key: str, host_id: str, count: int
) -> list[int]:
    """Distinct last-heartbeat times (ns) of an ONLINE host, until `count` were seen."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    seen: list[int] = []
    async with asyncio.timeout(20):
        while len(seen) < count:
            reply = await stub.GetHost(
                registry_pb2.GetHostRequest(host_id=host_id),
                metadata=(("authorization", f"Bearer {admin_key}"),),
            )
            host = reply.host
            at = host.last_heartbeat_at.ToNanoseconds()
            if host.state == types_pb2.HOST_STATE_ONLINE and at and at not in seen:
                seen.append(at)
            await asyncio.sleep(0.1)
    return seen


async def test_cli_verifies_the_server_and_plaintext_is_a_switch(
    tmp_path: Path, test_certs: TestCerts, capsys: pytest.CaptureFixture[str]
) -> None:
    async with tls_plane(tmp_path / "cp", test_certs) as plane:
        assert plane.admin_key_file is not None
        key = Path(plane.admin_key_file).read_text().strip()
        addr = f"localhost:{plane.port}"

        def cli(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str]:
            capsys.readouterr()
            code = main(["--addr", addr, "--api-key", key, "--timeout", "5", *argv], environ or {})
            return code, capsys.readouterr().err

        run: Callable[..., Any] = asyncio.to_thread
        code, err = await run(cli, "whoami")  # the system's roots: not our CA
        assert code == EXIT_UNAVAILABLE
        assert "--cacert" in err
        code, _ = await run(cli, "--plaintext", "whoami")
        assert code == EXIT_UNAVAILABLE
        assert (await run(cli, "--cacert", str(test_certs.ca_cert), "whoami"))[0] == EXIT_OK
        from_env = {"GPUPLANE_CA_FILE": str(test_certs.ca_cert)}
        assert (await run(cli, "whoami", environ=from_env))[0] == EXIT_OK
        code, err = await run(cli, "--plaintext", "--cacert", str(test_certs.ca_cert), "whoami")
        assert code == EXIT_USAGE
        assert "exclude each other" in err


def test_plaintext_and_tls_files_are_checked(
    tmp_path: Path,
    test_certs: TestCerts,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [n for n in os.environ if n.startswith("GPUPLANE_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        Settings(data_dir=tmp_path, tls_cert_file=test_certs.server_cert)
    with pytest.raises(ValidationError, match="tls_client_ca_file"):
        Settings(
            data_dir=tmp_path,
            tls_cert_file=test_certs.server_cert,
            tls_key_file=test_certs.server_key,
            tls_client_auth="require",
        )
    # Neither a certificate nor allow_plaintext: `gpuplane controlplane serve` refuses to
    # start and says what to set, without a traceback.
    assert main(["controlplane", "serve", "--data-dir", str(tmp_path / "cp")], {}) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "GPUPLANE_TLS_CERT_FILE" in err
    assert "GPUPLANE_ALLOW_PLAINTEXT=true" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cp").exists()  # refused before anything was set up
    with pytest.raises(ValidationError, match="exclude each other"):
        DaemonSettings(data_dir=tmp_path, plaintext=True, tls_ca_file=test_certs.ca_cert)
    with pytest.raises(ChannelConfigError, match="needs its key"):
        ChannelSecurity(cert_file=test_certs.client_cert)


async def test_unreadable_certificate_fails_start_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("not a key\n")
    plane = ControlPlane(
        Settings(
            data_dir=tmp_path / "cp",
            listen_addr="127.0.0.1:0",
            metrics_addr="",
            tls_cert_file=tmp_path / "missing.pem",
            tls_key_file=tmp_path / "key.pem",
        )
    )
    with pytest.raises(TlsConfigError, match="tls_cert_file: cannot read .*missing.pem"):
        await plane.start()
    await plane.stop(grace=0)
    assert plane.port == 0  # nothing was served


async def connect(url: str, **options: Any) -> Client:
    return await nats.connect(
        url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **options
    )


async def test_nats_refuses_clients_without_the_ca_or_a_client_certificate(
    nats_tls_server: NatsServer, test_certs: TestCerts, wrong_certs: TestCerts
) -> None:
    url = nats_tls_server.url
    assert url.startswith("tls://")
    plain_url = url.replace("tls://", "nats://")
    ca_only = nats_tls_context(test_certs.ca_cert)
    refusals: list[tuple[str, str, Any]] = [
        ("the system's roots", url, None),
        ("nats:// and the system's roots", plain_url, None),
        ("another CA", url, nats_tls_context(wrong_certs.ca_cert)),
        ("no client certificate", url, ca_only),
    ]
    for why, target, context in refusals:
        with pytest.raises((OSError, nats.errors.Error, TimeoutError)):  # noqa: PT012
            client = await connect(target, tls=context) if context else await connect(target)
            await client.flush(timeout=2)  # a refused client certificate shows here
            pytest.fail(f"connected with {why}")
    full = nats_tls_context(test_certs.ca_cert, test_certs.client_cert, test_certs.client_key)
    for target in (url, plain_url):  # nats:// upgrades to TLS when the server requires it
        client = await connect(target, tls=full)
        try:
            assert client.is_connected
            info = await client.jetstream().account_info()
            assert info.limits is not None
        finally:
            await client.close()
