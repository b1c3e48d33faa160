"""Stored commands to daemons: a drain or cancel issued on one control plane reaches the host
whichever replica holds its Connect stream (two replicas on one PostgreSQL), is re-sent until
the daemon acknowledges it, follows the host to another replica, and a cancel answered "not
running here" loses its attempt at once (never charged; retried by the usual rules). The
daemon is played by a scripted host that answers as the test says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from sqlalchemy import select

from controlplane.commands.delivery import CommandDelivery
from controlplane.commands.models import HostCommand, HostStreamHolder
from controlplane.db.engine import Database
from controlplane.ledger.service import charge_for
from controlplane.registry.streams import HostStreams
from devstack import NatsServer, S3Server
from devstack.factories import new_online_host
from tests.controlplane.scheduler.planes import (
    PRICE,
    Fleet,
    InProcessPlane,
    fleet,
    plane_options,
    until,
)
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.postgres]
NOT_RUNNING = registry_pb2.COMMAND_ANSWER_NOT_RUNNING_HERE


async def commands_of(db: Database, host_id: str) -> Sequence[HostCommand]:
    async with db.read() as session:
        query = select(HostCommand).where(HostCommand.host_id == host_id)
        return (await session.scalars(query.order_by(HostCommand.id))).all()


async def holder_of(db: Database, host_id: str) -> str | None:
    async with db.read() as session:
        holder = await session.get(HostStreamHolder, host_id)
        return holder.replica if holder is not None else None


async def next_command(host: ScriptedHost, kind: str, timeout: float = 5.0) -> Any:
    """The next delivery of a `kind` command to the host (others are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await host.commands.get()
            if message.WhichOneof("msg") == kind:
                return message


async def host_on(plane: InProcessPlane, planes: Fleet, **kw: Any) -> ScriptedHost:
    """A scripted host whose Connect stream is on `plane`; it answers only when told."""
    host = ScriptedHost(
        plane.api.channel, plane.api.nats_url, await plane.api.token(), auto_ack=False, **kw
    )
    await host.start()
    planes.hosts.append(host)
    return host


async def move(host: ScriptedHost, to: InProcessPlane) -> None:
    """The daemon's Connect stream breaks and it connects again, to `to` (what the first
    stream delivered is forgotten)."""
    await host.close()
    while not host.commands.empty():
        host.commands.get_nowait()
    host.channel = to.api.channel
    await host.start()


def registry(api: JobPlane) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return registry_pb2_grpc.RegistryServiceStub(api.channel)


Two = tuple[Fleet, InProcessPlane, InProcessPlane]


@pytest.fixture
async def two(
    tmp_path: Path,
    pg_url: str,
    nats_server: NatsServer,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Two]:
    """Replicas `a` and `b` on one PostgreSQL, quick to poll and to re-send."""
    options = plane_options(
        pg_url, nats_server, s3_server, command_poll_interval_ms=100, command_resend_ms=300
    )
    async with fleet(tmp_path, options, monkeypatch) as planes:
        a = await planes.start("a")
        b = await planes.start("b")
        yield planes, a, b


async def test_a_drain_issued_on_a_reaches_a_daemon_on_b_and_is_resent_until_acked(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes)
    assert b.plane.registry is not None
    assert a.plane.registry is not None
    assert b.plane.registry.streams.connected(host.host_id)
    assert not a.plane.registry.streams.connected(host.host_id)
    assert await holder_of(planes.db, host.host_id) == b.plane.registry.commands.replica

    reply = await registry(a.api).DrainHost(
        registry_pb2.DrainHostRequest(host_id=host.host_id, reason="kernel upgrade"),
        metadata=a.api.auth(),
    )
    assert reply.host.state == S.HOST_STATE_DRAINED  # idle: drained at once
    first = await next_command(host, "drain")
    assert first.command_id > 0
    assert (first.drain.draining, first.drain.reason) == (True, "kernel upgrade")
    # Unanswered: B sends it again, the same command.
    again = await next_command(host, "drain")
    assert again.command_id == first.command_id
    await host.ack(first.command_id)
    await until(
        lambda: _acked(planes.db, host.host_id, first.command_id, "applied"), 5, "the ack lands"
    )
    (row,) = await commands_of(planes.db, host.host_id)
    assert row.deliveries >= 2
    await asyncio.sleep(1.0)  # past several re-send periods: acknowledged, never sent again
    while not host.commands.empty():
        assert host.commands.get_nowait().command_id != first.command_id

    await registry(a.api).UndrainHost(
        registry_pb2.UndrainHostRequest(host_id=host.host_id), metadata=a.api.auth()
    )
    undrain = await next_command(host, "drain")
    assert undrain.command_id > first.command_id
    assert not undrain.drain.draining


async def test_a_replica_hears_of_another_ones_command_at_once_over_nats(
    tmp_path: Path,
    pg_url: str,
    nats_server: NatsServer,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Polls ten seconds apart: only the announcement over NATS makes B look sooner.
    options = plane_options(pg_url, nats_server, s3_server, command_poll_interval_ms=10_000)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        a = await planes.start("a")
        b = await planes.start("b")
        host = await host_on(b, planes)
        await asyncio.sleep(0.5)  # B's loop has looked and waits for its next poll
        await registry(a.api).DrainHost(
            registry_pb2.DrainHostRequest(host_id=host.host_id), metadata=a.api.auth()
        )
        started = asyncio.get_running_loop().time()
        command = await next_command(host, "drain", timeout=3)
        assert command.command_id > 0
        assert asyncio.get_running_loop().time() - started < 3


async def _acked(db: Database, host_id: str, command_id: int, answer: str) -> bool:
    rows = {r.id: r for r in await commands_of(db, host_id)}
    row = rows[command_id]
    return row.acked_at is not None and row.answer == answer


async def test_an_unacked_command_follows_the_daemon_to_another_replica(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes)
    await registry(a.api).DrainHost(
        registry_pb2.DrainHostRequest(host_id=host.host_id, reason="move me"),
        metadata=a.api.auth(),
    )
    lost = await next_command(host, "drain")  # its ack never makes it
    await move(host, a)
    assert a.plane.registry is not None
    await until(
        lambda: a.plane.registry is not None and a.plane.registry.streams.connected(host.host_id),
        5,
        "connected to A",
    )
    assert await holder_of(planes.db, host.host_id) == a.plane.registry.commands.replica
    # On connect: the stored command again (after the drain told from the host's state).
    delivered = [await next_command(host, "drain") for _ in range(2)]
    assert lost.command_id in [m.command_id for m in delivered]
    await host.ack(lost.command_id)
    await until(lambda: _acked(planes.db, host.host_id, lost.command_id, "applied"), 5, "acked")


async def test_after_a_duplicate_connect_commands_go_to_the_latest_stream(two: Two) -> None:
    planes, a, b = two
    old = await host_on(b, planes)
    # The same daemon connects again, to A, while its stream on B is still open (half-open).
    latest = ScriptedHost(a.api.channel, a.api.nats_url, "", auto_ack=False)
    latest.host_id, latest.credential = old.host_id, old.credential
    await latest.start()
    planes.hosts.append(latest)
    assert a.plane.registry is not None
    assert await holder_of(planes.db, old.host_id) == a.plane.registry.commands.replica
    await registry(b.api).DrainHost(
        registry_pb2.DrainHostRequest(host_id=old.host_id, reason="first"), metadata=b.api.auth()
    )
    first = await next_command(latest, "drain")
    await latest.ack(first.command_id)
    # The old stream ends: the latest keeps the host's commands.
    await old.close()
    await asyncio.sleep(0.3)
    assert await holder_of(planes.db, old.host_id) == a.plane.registry.commands.replica
    await registry(b.api).DrainHost(
        registry_pb2.DrainHostRequest(host_id=old.host_id, reason="second"),
        metadata=b.api.auth(),
    )
    second = await next_command(latest, "drain")
    assert second.drain.reason == "second"


async def running_job(api: JobPlane, host: ScriptedHost, **spec: Any) -> tuple[Any, Any]:
    job = await api.submit(gpu_count=1, **spec)
    dispatch = await host.next_dispatch()
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await api.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
    return job, dispatch


async def test_a_cancel_issued_on_a_stops_the_job_on_a_daemon_on_b(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes, price=PRICE, gpus=1)
    job, dispatch = await running_job(a.api, host)
    reply = await a.api.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id, reason="wrong data"),
        metadata=a.api.auth(a.api.consumer_key),
    )
    assert reply.job.state == S.JOB_STATE_RUNNING  # cancel requested
    command = await next_command(host, "cancel")
    assert (command.cancel.job_id, command.cancel.attempt) == (job.job_id, 1)
    assert command.cancel.reason == "cancelled: wrong data"
    await host.ack(command.command_id)
    await host.report(
        dispatch, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED, run_time_ms=3000
    )
    done = await a.api.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
    assert done.state_reason == "cancelled: wrong data"
    assert done.charged_micro_credits == charge_for(PRICE, 1, 3000)
    await until(lambda: _acked(planes.db, host.host_id, command.command_id, "applied"), 5, "ack")
    await a.api.assert_ledger_consistent()


async def test_not_running_here_loses_a_cancelled_attempt_at_once_uncharged(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes, price=PRICE, gpus=1)
    job = await a.api.submit(gpu_count=1)
    await host.next_dispatch()  # taken off the queue, but this daemon never runs it
    await a.api.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=a.api.auth(a.api.consumer_key)
    )
    command = await next_command(host, "cancel")
    await host.ack(command.command_id, NOT_RUNNING)
    # At once, not after the dispatch-ack timeout (two minutes).
    done = await a.api.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=5)
    (attempt,) = done.attempts
    assert attempt.attempt_state == S.ATTEMPT_STATE_LOST
    assert "not running here" in attempt.reason
    assert done.charged_micro_credits == 0
    consumer = await a.api.balance(a.api.consumer_tenant)
    assert (consumer.available_micro_credits, consumer.held_micro_credits) == (100 * CREDIT, 0)
    await until(
        lambda: _acked(planes.db, host.host_id, command.command_id, "not_running"), 5, "ack"
    )
    await a.api.assert_ledger_consistent()


async def test_not_running_here_requeues_a_budget_stopped_attempt_and_refunds_it(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes, price=PRICE, gpus=1)
    budget = charge_for(PRICE, 1, 30_000)
    job, dispatch = await running_job(a.api, host, budget_micro_credits=budget, max_retries=1)
    await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=30_000)
    command = await next_command(host, "cancel")
    assert command.cancel.stop_reason == K.STOP_REASON_BUDGET_EXHAUSTED
    # The daemon restarted and lost it: the attempt is lost, refunded, and tried again.
    await host.ack(command.command_id, NOT_RUNNING)
    second = await host.next_dispatch()
    assert (second.job_id, second.attempt) == (job.job_id, 2)
    requeued = await a.api.get(job.job_id)
    first = next(x for x in requeued.attempts if x.attempt == 1)
    assert first.attempt_state == S.ATTEMPT_STATE_LOST
    assert first.charged_micro_credits == 0
    assert requeued.charged_micro_credits == 0
    await a.api.assert_ledger_consistent()


async def test_answers_only_count_for_the_hosts_own_commands(
    two: Two,
) -> None:
    planes, a, b = two
    owner = await host_on(b, planes, price=PRICE, gpus=1)
    job, _ = await running_job(a.api, owner)
    other = await host_on(a, planes, price=PRICE, gpus=1)
    await a.api.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=a.api.auth(a.api.consumer_key)
    )
    command = await next_command(owner, "cancel")
    # Another host answering the owner's command id changes nothing.
    await other.ack(command.command_id, NOT_RUNNING)
    await asyncio.sleep(0.5)
    assert (await a.api.get(job.job_id)).state == S.JOB_STATE_RUNNING
    (row,) = [r for r in await commands_of(planes.db, owner.host_id) if r.kind == "cancel"]
    assert row.acked_at is None
    # An unknown id is ignored too, and the stream stays up.
    await owner.ack(10**12, NOT_RUNNING)
    again = await next_command(owner, "cancel")
    assert again.command_id == command.command_id


async def test_a_cancel_whose_attempt_ended_is_not_sent(
    two: Two,
) -> None:
    planes, a, b = two
    host = await host_on(b, planes, price=PRICE, gpus=1)
    job, dispatch = await running_job(a.api, host)
    await host.stop_heartbeats()  # disconnected: the cancel waits in the database
    await a.api.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=a.api.auth(a.api.consumer_key)
    )
    await host.report(
        dispatch, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED, run_time_ms=1000
    )
    await a.api.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
    await host.close()
    await host.start()  # back on B: the cancel is moot, closed instead of sent
    (row,) = [r for r in await commands_of(planes.db, host.host_id) if r.kind == "cancel"]
    await until(lambda: _acked(planes.db, host.host_id, row.id, "moot"), 5, "closed as moot")
    await asyncio.sleep(0.3)
    while not host.commands.empty():
        assert host.commands.get_nowait().WhichOneof("msg") != "cancel"


async def test_a_host_credential_cannot_send_acks_before_hello(
    two: Two,
) -> None:
    planes, _, b = two
    host = await host_on(b, planes)
    metadata = (("authorization", f"Bearer {host.credential}"),)
    call = registry(b.api).Connect(metadata=metadata)  # type: ignore[call-arg]
    ack = registry_pb2.CommandAck(command_id=1, answer=NOT_RUNNING)
    await call.write(registry_pb2.DaemonMessage(command_ack=ack))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in (refused.value.details() or "")


@pytest.mark.databases("sqlite", "postgresql")
@pytest.mark.plane(command_poll_interval_ms=100, command_resend_ms=300)
async def test_one_plane_resends_until_acked_and_loses_what_is_not_running(
    plane: JobPlane,
) -> None:
    db = plane.plane.db
    assert db is not None
    metrics = plane.plane.metrics.registry
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), auto_ack=False)
    await host.start()
    try:
        job = await plane.submit(gpu_count=1)
        await host.next_dispatch()
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        first = await next_command(host, "cancel")
        again = await next_command(host, "cancel")
        assert again.command_id == first.command_id
        await until(
            lambda: metrics.get_sample_value("gpuplane_host_commands_unacked") == 1,
            5,
            "the gauge counts the unacknowledged cancel",
        )
        await host.ack(first.command_id, NOT_RUNNING)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=5)
        assert done.attempts[0].attempt_state == S.ATTEMPT_STATE_LOST
        assert done.charged_micro_credits == 0
        await until(lambda: _acked(db, host.host_id, first.command_id, "not_running"), 5, "ack")
        await until(
            lambda: metrics.get_sample_value("gpuplane_host_commands_unacked") == 0, 5, "gauge"
        )
        await plane.assert_ledger_consistent()
    finally:
        await host.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_commands_of_hosts_that_stay_away_are_closed(plane: JobPlane) -> None:
    db = plane.plane.db
    registry_service = plane.plane.registry
    assert db is not None
    assert registry_service is not None
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), auto_ack=False)
    await host.start()
    try:
        job, dispatch = await running_job(plane, host)
        await host.stop_heartbeats()  # away: the cancel waits in the database
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        await host.report(dispatch, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED)
        await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
        assert await registry_service.commands.close_moot() == 1
        (cancel,) = await commands_of(db, host.host_id)
        assert cancel.answer == "moot"
        assert await registry_service.commands.close_moot() == 0

        await registry(plane).DrainHost(
            registry_pb2.DrainHostRequest(host_id=host.host_id), metadata=plane.auth()
        )
        await registry(plane).RevokeHost(
            registry_pb2.RevokeHostRequest(host_id=host.host_id), metadata=plane.auth()
        )
        rows = await commands_of(db, host.host_id)
        assert [(r.kind, r.answer) for r in rows] == [("cancel", "moot"), ("drain", "moot")]
    finally:
        await host.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_closed_streams_release_their_holders_together_but_never_a_new_claim(
    plane: JobPlane,
) -> None:
    """A thousand daemons dropping at once cost one write, not a thousand; a host that
    connected again before that write keeps its claim."""
    db = plane.plane.db
    assert db is not None
    hosts = [(await new_online_host(plane.channel, await plane.token())).host_id for _ in range(3)]
    streams = HostStreams()
    delivery = CommandDelivery(db, streams, replica="test-replica")
    for host_id in hosts:
        streams.open(host_id)
        await delivery.opened(host_id)
    assert [await holder_of(db, h) for h in hosts] == ["test-replica"] * 3
    for host_id in hosts:
        delivery.closed(host_id)
    back = streams.open(hosts[0])  # the first one is back before the release is written
    await delivery.opened(back.host_id)
    assert [await holder_of(db, h) for h in hosts] == ["test-replica"] * 3  # not yet written
    await delivery.release_closed()
    assert [await holder_of(db, h) for h in hosts] == ["test-replica", None, None]
