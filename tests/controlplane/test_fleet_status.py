"""AdminService.GetFleetStatus on SQLite and PostgreSQL: a queued job with no host to run it,
a drain command no daemon acknowledged, an outbox row another relay holds unpublished, the
scheduler's cycles that looked at the job; and the cycle window's bound and percentiles."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, timedelta

import pytest
from gpuplane.v1 import admin_pb2, jobs_pb2, registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.fleet import CycleWindow
from controlplane.outbox.repository import OutboxRepository
from controlplane.scheduler.service import CycleStats
from devstack.factories import new_online_host, new_token
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(60), pytest.mark.databases("sqlite", "postgresql")]
HELD_AGO = 30.0


async def fleet_when(
    plane: JobPlane, ready: Callable[[admin_pb2.GetFleetStatusResponse], bool]
) -> admin_pb2.GetFleetStatusResponse:
    """The fleet status once `ready` holds (the scheduler and the relay run every 0.1 s)."""
    for _ in range(200):
        status = await plane.admin.GetFleetStatus(
            admin_pb2.GetFleetStatusRequest(), metadata=plane.auth()
        )
        if ready(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"fleet status never became ready: {status}")


async def hold_unpublished(db: Database, ago: float, lease: float = 300.0) -> int:
    """An outbox row enqueued `ago` seconds back that another replica's relay has leased for
    `lease` seconds and not yet published (it died mid-batch): unpublished until the lease
    passes. Its id."""
    async with db.transaction() as session:
        outbox = OutboxRepository(session)
        created = utcnow() - timedelta(seconds=ago)
        outbox.enqueue("gpuplane.test.fleet", "fleet-held", b"held", created)
        await session.flush()
        leased = await outbox.lease(1000, utcnow(), utcnow() + timedelta(seconds=lease))
        held = [row.id for row in leased if row.msg_id == "fleet-held"]
        assert held, "the relay published the row before it was leased"
        return held[0]


async def publish_held(db: Database, row_id: int) -> None:
    """The held row marked published, as its relay would have (before its lease passes and
    the plane's relay publishes it to a subject no stream takes)."""
    async with db.transaction() as session:
        await OutboxRepository(session).mark_published([row_id], utcnow())


async def drained_host_never_told(plane: JobPlane) -> None:
    """A host that said hello once and hung up, drained by the admin: the drain command waits
    for a daemon that never reconnects (unacknowledged), and the host offers nothing."""
    token = await new_token(plane, plane.provider_tenant)
    host = await new_online_host(plane.channel, token.secret)
    await registry_pb2_grpc.RegistryServiceStub(plane.channel).DrainHost(
        registry_pb2.DrainHostRequest(host_id=host.host_id, reason="fleet test"),
        metadata=plane.auth(),
    )


async def test_fleet_status_counts_queue_outbox_commands_and_cycles(plane: JobPlane) -> None:
    await drained_host_never_told(plane)
    job = await plane.submit(gpu_count=1)  # no host offers a GPU: it stays queued
    assert plane.plane.db is not None
    await hold_unpublished(plane.plane.db, HELD_AGO)
    status = await fleet_when(
        plane, lambda s: s.scheduler.last_considered >= 1 and s.outbox_backlog == 1
    )

    assert status.queue_depth == 1
    jobs = {c.state: c.count for c in status.jobs}
    assert jobs[types_pb2.JOB_STATE_QUEUED] == 1
    assert sum(jobs.values()) == 1
    assert set(jobs) == set(types_pb2.JobState.values()) - {types_pb2.JOB_STATE_UNSPECIFIED}
    hosts = {c.state: c.count for c in status.hosts}
    assert set(hosts) == set(types_pb2.HostState.values()) - {types_pb2.HOST_STATE_UNSPECIFIED}
    assert sum(hosts.values()) == 1  # drained, or lost since (no heartbeat)
    assert hosts[types_pb2.HOST_STATE_ONLINE] == 0
    assert HELD_AGO <= status.outbox_oldest_seconds < HELD_AGO + 30
    assert status.commands_unacked == 1
    assert 0 < status.commands_oldest_seconds < 30

    assert status.scheduler_leader_here
    cycles = status.scheduler
    assert cycles.last_considered == 1
    assert cycles.last_placed == 0
    assert 0 < cycles.last_cycle_seconds < 5
    assert cycles.cycles_in_window >= 1
    assert 0 < cycles.p50_seconds <= cycles.p99_seconds < 5
    ran_ago = (utcnow() - cycles.last_cycle_at.ToDatetime(tzinfo=UTC)).total_seconds()
    assert 0 <= ran_ago < 10

    # Cancelled, the job leaves the queue; idle passes (nothing queued) are no cycles, so
    # the last cycle is still the one that looked at it.
    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id),
        metadata=plane.auth(plane.consumer_key),
    )
    status = await fleet_when(plane, lambda s: s.queue_depth == 0)
    assert status.scheduler.last_considered == 1
    assert {c.state: c.count for c in status.jobs}[types_pb2.JOB_STATE_CANCELLED] == 1


def test_cycle_window_keeps_the_latest_cycles_and_their_percentiles() -> None:
    window = CycleWindow(size=100)
    empty = window.snapshot()
    assert (empty.last, empty.last_at, empty.count, empty.p50_seconds) == (None, None, 0, 0.0)
    for slow in range(50):
        window.observe(CycleStats(seconds=9.0 + slow))  # pushed out by the next 100
    for n in range(1, 101):
        window.observe(CycleStats(considered=n, placed=n // 2, seconds=n / 1000))
    cycles = window.snapshot()
    assert cycles.count == 100
    assert cycles.p50_seconds == 0.050
    assert cycles.p99_seconds == 0.099
    assert cycles.last == CycleStats(considered=100, placed=50, seconds=0.1)
    assert cycles.last_at is not None
