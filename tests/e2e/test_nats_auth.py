"""NATS in operator mode: each host's user reaches only its own subjects (the server refuses the
rest), RevokeHost cuts its NATS user and gRPC credential off, and a job runs end to end."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    messaging_pb2,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)
from nats.aio.client import Client, RawCredentials

from daemon.agent import Agent
from daemon.bus import DaemonBus
from daemon.identity import HostIdentity
from devstack import DockerEngine, NatsServer, S3Server
from devstack.certs import TestCerts
from devstack.factories import GIB, new_host, new_tenant, new_token
from devstack.nats import NatsTls
from messaging.natsjwt import NatsKeys, decode_claims
from messaging.signing import SigningKey
from messaging.subjects import (
    DISPATCH_STREAM,
    dispatch_durable,
    dispatch_subject,
    events_subject,
    logs_subject,
    report_msg_id,
)
from messaging.tls import nats_tls_context
from tests.e2e.test_job_path import settings as daemon_settings
from tests.harness import JobPlane, job_plane
from tests.serving import serve

S = types_pb2
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nats_keys() -> NatsKeys:
    return NatsKeys.generate()


@pytest.fixture(scope="module")
def auth_nats(
    tmp_path_factory: pytest.TempPathFactory, nats_keys: NatsKeys
) -> Iterator[NatsServer]:
    """nats-server in operator mode, trusting only `nats_keys`' operator."""
    directory = tmp_path_factory.mktemp("nats-auth")
    include = directory / "auth.conf"
    include.write_text(nats_keys.server_include(str(directory / "jwt")))
    yield from serve(NatsServer(directory, auth_include=include))


@pytest.fixture
async def plane(
    tmp_path: Path, auth_nats: NatsServer, s3_server: S3Server, nats_keys: NatsKeys
) -> AsyncIterator[JobPlane]:
    def configure(options: dict[str, Any]) -> None:
        options["nats_operator_seed"] = nats_keys.operator_seed
        options["nats_account_seed"] = nats_keys.account_seed
        options["nats_system_account_seed"] = nats_keys.system_account_seed

    async with job_plane(tmp_path / "cp", auth_nats.url, s3_server, configure=configure) as p:
        yield p


async def register(
    plane: JobPlane, name: str, machine_id: str = ""
) -> registry_pb2.RegisterHostResponse:
    return await new_host(
        plane.channel,
        await plane.token(),
        machine_id=machine_id or f"machine-{name}-{time.monotonic_ns()}",
        hostname=name,
        gpus=[S.Gpu(uuid=f"GPU-{name}-{time.monotonic_ns()}", name="A100", memory_total_bytes=GIB)],
        location="",
    )


class Errors:
    """The asynchronous errors the server sends a client (permissions violations)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def record(self, error: Exception) -> None:
        self.seen.append(str(error).lower())
        self.changed.set()

    async def wait_for(self, text: str, timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not any(text.lower() in seen for seen in self.seen):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no error with {text!r} among {self.seen}") from None


async def connect_as(
    reply: registry_pb2.RegisterHostResponse, errors: Errors, **options: Any
) -> Client:
    return await nats.connect(
        reply.nats.servers[0],
        user_credentials=RawCredentials(reply.nats.credentials),
        inbox_prefix=reply.nats.inbox_prefix,
        error_cb=errors.record,
        **options,
    )


async def test_host_users_reach_only_their_own_subjects(plane: JobPlane) -> None:
    a, b = await register(plane, "host-a"), await register(plane, "host-b")
    assert a.nats.credentials
    assert a.nats.inbox_prefix == f"_INBOX_{a.host_id}"
    claims = decode_claims(a.nats.credentials.split("\n")[1])
    assert claims["sub"] != decode_claims(b.nats.credentials.split("\n")[1])["sub"]
    assert "_INBOX.>" not in claims["nats"]["sub"]["allow"]

    # Its own dispatches (the daemon's code path: pull consumer created on first use) ...
    bus = await DaemonBus.connect(list(a.nats.servers), a.nats.credentials, a.nats.inbox_prefix)
    errors = Errors()
    client = await connect_as(a, errors)
    try:
        await bus.subscribe(a.nats.dispatch_subject, a.nats.stream, a.nats.durable)
        assert plane.plane.bus.js is not None
        await plane.plane.bus.js.publish(dispatch_subject(a.host_id), b"work for a")
        taken: list[bytes] = []

        async def on_dispatch(message: Any) -> None:
            taken.append(message.data)
            await message.ack()

        pull = asyncio.create_task(bus.take_dispatches(on_dispatch, lambda: not taken))
        async with asyncio.timeout(10):
            while not taken:
                await asyncio.sleep(0.05)
        pull.cancel()
        assert taken == [b"work for a"]
        # ... and its own reports, stored by JetStream.
        report = messaging_pb2.JobReport(job_id="job-none", attempt=1, host_id=a.host_id, seq=1)
        await bus.publish_report(report)
        await bus.publish_log(
            logs_subject(a.host_id, "job-none", 1), b"x", {"Gpuplane-Log-End": "1"}
        )

        # Everything of host b's, and every inbox, is refused by the server.
        await client.subscribe(dispatch_subject(b.host_id))
        await errors.wait_for(f'subscription to "{dispatch_subject(b.host_id)}"')
        await client.subscribe("_INBOX.>")
        await errors.wait_for('subscription to "_inbox.>"')
        next_b = f"$JS.API.CONSUMER.MSG.NEXT.{DISPATCH_STREAM}.{dispatch_durable(b.host_id)}"
        await client.publish(next_b, b'{"batch":1}')
        await errors.wait_for(f'publish to "{next_b}"')
        with pytest.raises(nats.errors.TimeoutError):
            await client.jetstream().publish(
                events_subject(b.host_id, "job-none"),
                b"forged",
                timeout=1,
                headers={"Nats-Msg-Id": report_msg_id("job-none", 1, 9)},
            )
        await errors.wait_for(f'publish to "{events_subject(b.host_id, "job-none")}"')
        # Its own consumer is fine; creating one filtered to b's subject is not.
        create_b = (
            f"$JS.API.CONSUMER.CREATE.{DISPATCH_STREAM}.{dispatch_durable(a.host_id)}."
            f"{dispatch_subject(b.host_id)}"
        )
        await client.publish(create_b, b"{}")
        await errors.wait_for(f'publish to "{create_b}"')
    finally:
        await client.close()
        await bus.close()


async def read_until_error(call: Any) -> None:
    while True:
        await call.read()


def user_of(reply: registry_pb2.RegisterHostResponse) -> str:
    return str(decode_claims(reply.nats.credentials.split("\n")[1])["sub"])


def closed_reasons(server: NatsServer, user: str) -> list[str]:
    """Why the server closed `user`'s connections (its monitoring endpoint)."""
    url = f"{server.monitor_url}/connz?state=closed&auth=true&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as response:
        connz = json.loads(response.read())
    return [
        str(c.get("reason", ""))
        for c in connz.get("connections") or []
        if c.get("authorized_user") == user
    ]


async def test_revoked_host_is_cut_off_from_nats_and_grpc(
    plane: JobPlane, auth_nats: NatsServer
) -> None:
    a, b = await register(plane, "host-a"), await register(plane, "host-b")
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    host_auth = (("authorization", f"Bearer {a.host_credential}"),)
    session: Any = stub.Connect(metadata=host_auth)  # type: ignore[call-arg]
    await session.write(
        registry_pb2.DaemonMessage(hello=registry_pb2.DaemonHello(host_id=a.host_id))
    )
    assert (await session.read()).WhichOneof("msg") == "hello_ack"
    errors = Errors()
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    client = await connect_as(a, errors, closed_cb=on_closed, max_reconnect_attempts=2)
    other = await connect_as(b, Errors())
    try:
        revoked = await stub.RevokeHost(
            registry_pb2.RevokeHostRequest(host_id=a.host_id, reason="stolen disk"),
            metadata=plane.auth(),
        )
        assert revoked.host.state == S.HOST_STATE_LOST
        assert revoked.host.revoked_reason == "stolen disk"
        assert revoked.host.HasField("revoked_at")

        # The server drops the live connection and refuses the same creds from then on.
        async with asyncio.timeout(10):
            await closed.wait()
        reasons = await asyncio.to_thread(closed_reasons, auth_nats, user_of(a))
        assert any("revoked" in r.lower() for r in reasons), reasons
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                a.nats.servers[0],
                user_credentials=RawCredentials(a.nats.credentials),
                allow_reconnect=False,
                connect_timeout=2,
            )
        # Host b is untouched.
        await other.flush(timeout=2)
        assert other.is_connected

        # gRPC: the open Connect stream ends, the credential is refused, no re-registration.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(read_until_error(session), 5)
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        admin = admin_pb2_grpc.AdminServiceStub(plane.channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=host_auth)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Kept in the database: the account JWT a (re)started server gets names the key.
        assert plane.plane.nats_auth is not None
        account = decode_claims(await plane.plane.nats_auth.account_jwt())
        user = decode_claims(a.nats.credentials.split("\n")[1])["sub"]
        assert user in account["nats"]["revocations"]
        assert (
            decode_claims(b.nats.credentials.split("\n")[1])["sub"]
            not in account["nats"]["revocations"]
        )
    finally:
        session.cancel()
        await other.close()
        await client.close()


async def test_re_registration_revokes_the_earlier_nats_user(plane: JobPlane) -> None:
    machine = f"machine-again-{time.monotonic_ns()}"
    first = await register(plane, "again", machine)
    second = await register(plane, "again", machine)
    assert first.host_id == second.host_id
    assert user_of(first) != user_of(second)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            first.nats.servers[0],
            user_credentials=RawCredentials(first.nats.credentials),
            allow_reconnect=False,
            connect_timeout=2,
        )
    client = await connect_as(second, Errors())
    await client.flush(timeout=2)
    await client.close()


async def test_revoke_host_names_the_field(plane: JobPlane) -> None:
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.RevokeHost(registry_pb2.RevokeHostRequest(), metadata=plane.auth())
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "host_id" in (missing.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.RevokeHost(
            registry_pb2.RevokeHostRequest(host_id="host_nope"), metadata=plane.auth()
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.docker
@pytest.mark.timeout(90)
async def test_job_runs_end_to_end_with_nats_auth(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    token = await plane.token()
    agent = Agent(
        daemon_settings(plane, token, tmp_path / "d", s3_server, docker_engine, "1xA100-80GB")
    )
    await agent.start()
    try:
        identity = HostIdentity.load(agent.settings.host_file)
        assert identity is not None
        assert "BEGIN NATS USER JWT" in identity.nats_credentials
        assert agent.settings.host_file.stat().st_mode & 0o777 == 0o600
        job = await plane.submit(
            image=test_image, command=["sh", "-c", "sleep 1; echo hello from auth"], gpu_count=1
        )
        logs = plane.jobs.StreamLogs(
            jobs_pb2.StreamLogsRequest(job_id=job.job_id, follow=True),
            metadata=plane.auth(plane.consumer_key),
        )
        async with asyncio.timeout(40):
            live = b"".join([chunk.data async for chunk in logs])
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED])
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert live == b"hello from auth\n"

        # Another host, on its own subject, writing about this host's job: dropped, counted.
        # A host with a key of its own, signing its forgery: refused as foreign, not unsigned.
        intruder_key = SigningKey.generate()
        intruder = await new_host(
            plane.channel,
            await plane.token(),
            hostname="intruder",
            gpus=[S.Gpu(uuid=f"GPU-in-{time.monotonic_ns()}", name="A100", memory_total_bytes=GIB)],
            signing_public_key=intruder_key.public_bytes,
        )
        bus = await DaemonBus.connect(
            list(intruder.nats.servers), intruder.nats.credentials, intruder.nats.inbox_prefix
        )
        bus.signer = intruder_key
        try:
            forged = messaging_pb2.JobReport(
                job_id=job.job_id,
                attempt=1,
                host_id=intruder.host_id,
                seq=99,
                kind=messaging_pb2.JOB_REPORT_KIND_FINISHED,
                exit_code=3,
            )
            await bus.publish_report(forged)
        finally:
            await bus.close()
        background = plane.plane.background
        assert background is not None
        async with asyncio.timeout(10):
            while background.report_consumer is None or background.report_consumer.foreign < 1:
                await asyncio.sleep(0.05)
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_SUCCEEDED
    finally:
        await agent.stop()


async def test_revocation_is_pushed_over_tls(
    tmp_path: Path, s3_server: S3Server, nats_keys: NatsKeys, test_certs: TestCerts
) -> None:
    """The production combination: NATS in operator mode requiring TLS and client
    certificates, gRPC over TLS. Hosts' users connect over TLS, and RevokeHost's account
    push (its own connection) reaches the server through the same TLS settings."""
    include = tmp_path / "auth.conf"
    include.write_text(nats_keys.server_include(str(tmp_path / "jwt")))
    tls = NatsTls(test_certs.server_cert, test_certs.server_key, ca_file=test_certs.ca_cert)
    server = NatsServer(tmp_path / "nats", auth_include=include, tls=tls)
    server.start()

    def configure(options: dict[str, Any]) -> None:
        options["nats_operator_seed"] = nats_keys.operator_seed
        options["nats_account_seed"] = nats_keys.account_seed
        options["nats_system_account_seed"] = nats_keys.system_account_seed

    context = nats_tls_context(test_certs.ca_cert, test_certs.client_cert, test_certs.client_key)
    try:
        async with job_plane(
            tmp_path / "cp", server.url, s3_server, configure=configure, tls=test_certs
        ) as plane:
            reply = await register(plane, "tls-host")
            assert reply.nats.servers[0].startswith("tls://")
            closed = asyncio.Event()

            async def on_closed() -> None:
                closed.set()

            client = await connect_as(
                reply, Errors(), tls=context, closed_cb=on_closed, max_reconnect_attempts=2
            )
            try:
                await client.flush(timeout=5)
                stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
                await stub.RevokeHost(
                    registry_pb2.RevokeHostRequest(host_id=reply.host_id, reason="tls"),
                    metadata=plane.auth(),
                )
                async with asyncio.timeout(10):
                    await closed.wait()
                reasons = await asyncio.to_thread(closed_reasons, server, user_of(reply))
                assert any("revoked" in r.lower() for r in reasons), reasons
            finally:
                await client.close()
    finally:
        server.stop()


async def test_revoke_provider_cuts_every_host_of_it_off_nats(plane: JobPlane) -> None:
    """RevokeProvider: both hosts of the provider (one connected, one never) lose their NATS
    users at once; another provider's host keeps its connection."""
    a, b = await register(plane, "prov-a"), await register(plane, "prov-b")
    stranger, _ = await new_tenant(plane, "another provider", S.ROLE_PROVIDER)
    c = await new_host(
        plane.channel,
        (await new_token(plane, stranger)).secret,
        hostname="prov-c",
        gpus=[S.Gpu(uuid=f"GPU-prov-c-{time.monotonic_ns()}", name="A100", memory_total_bytes=GIB)],
    )
    closed = {name: asyncio.Event() for name in "ab"}

    def closer(name: str) -> Any:
        async def on_closed() -> None:
            closed[name].set()

        return on_closed

    clients = [
        await connect_as(a, Errors(), closed_cb=closer("a"), max_reconnect_attempts=2),
        await connect_as(b, Errors(), closed_cb=closer("b"), max_reconnect_attempts=2),
    ]
    other = await connect_as(c, Errors())
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
        reply = await stub.RevokeProvider(
            registry_pb2.RevokeProviderRequest(provider_tenant_id=plane.provider_tenant),
            metadata=plane.auth(),
        )
        assert set(reply.host_ids) == {a.host_id, b.host_id}
        async with asyncio.timeout(10):
            await asyncio.gather(closed["a"].wait(), closed["b"].wait())
        for revoked in (a, b):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(
                    revoked.nats.servers[0],
                    user_credentials=RawCredentials(revoked.nats.credentials),
                    allow_reconnect=False,
                    connect_timeout=2,
                )
        await other.flush(timeout=2)
        assert other.is_connected
        assert plane.plane.nats_auth is not None
        account = decode_claims(await plane.plane.nats_auth.account_jwt())
        assert {user_of(a), user_of(b)} <= set(account["nats"]["revocations"])
        assert user_of(c) not in account["nats"]["revocations"]
    finally:
        await other.close()
        for client in clients:
            await client.close()
