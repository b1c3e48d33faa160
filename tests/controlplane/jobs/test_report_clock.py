"""Reports bounded by the control plane's own clock, on SQLite and PostgreSQL: run time capped
at what it observed (event, counter, reliability once per attempt), seq jumps refused while a
terminal report always lands, and heartbeats that disagree with live attempts answered by a
resync whose "not running here" loses the attempt at once. The daemon is a scripted host."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from sqlalchemy import select

from controlplane.commands.models import HostCommand
from controlplane.db.engine import Database
from controlplane.jobs.clock import MAX_SEQ_JUMP
from controlplane.jobs.models import JobAttempt, JobEvent
from controlplane.ledger.service import charge_for
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000
SLACK_MS = 2000
pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.timeout(60),
    pytest.mark.plane(run_time_slack_ms=SLACK_MS, reconcile_interval_ms=200),
]


def database(plane: JobPlane) -> Database:
    db = plane.plane.db
    assert db is not None
    return db


async def attempt_row(plane: JobPlane, job_id: str, attempt: int = 1) -> JobAttempt:
    async with database(plane).read() as session:
        row = await session.get(JobAttempt, (job_id, attempt))
    assert row is not None
    return row


async def events(plane: JobPlane, job_id: str) -> Sequence[JobEvent]:
    async with database(plane).read() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        return (await session.scalars(query)).all()


async def reliability(plane: JobPlane, host_id: str) -> int:
    reply = await registry_pb2_grpc.RegistryServiceStub(plane.channel).GetHost(
        registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth()
    )
    return int(reply.host.reliability_permille)


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := await check()):
            await asyncio.sleep(0.05)
    return value


def capped(plane: JobPlane) -> float:
    registry = plane.plane.metrics.registry
    return registry.get_sample_value("gpuplane_job_reports_capped_total") or 0.0


async def running_job(plane: JobPlane, **host: Any) -> tuple[ScriptedHost, Any, Any]:
    """A scripted host, and a job of one GPU it took and reported RUNNING."""
    scripted = await scripted_host(plane, price=PRICE, gpus=1, **host)
    job = await plane.submit(gpu_count=1)
    dispatch = await scripted.next_dispatch()
    await scripted.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
    return scripted, job, dispatch


async def test_run_time_is_capped_at_what_the_control_plane_observed(plane: JobPlane) -> None:
    host, job, dispatch = await running_job(plane)
    try:
        before = capped(plane)
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=3_600_000)

        async def noted() -> list[JobEvent]:
            return [e for e in await events(plane, job.job_id) if "capped" in e.reason]

        [event] = await eventually(noted)
        assert "3600000 ms" in event.reason
        assert event.state == "running"  # a note, not a state change
        row = await attempt_row(plane, job.job_id)
        assert row.started_at is not None
        observed = (event.time - row.started_at) // timedelta(milliseconds=1)
        assert row.run_time_ms <= observed + SLACK_MS
        assert row.capped_reports == 1
        # A second overclaim is capped and counted too, but noted (and held against the
        # host) only once per attempt.
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=7_200_000)
        await eventually(lambda: _capped_twice(plane, job.job_id))
        assert capped(plane) == before + 2
        await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=3_600_000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
        row = await attempt_row(plane, job.job_id)
        assert row.finished_at is not None
        assert row.started_at is not None
        window = (row.finished_at - row.started_at) // timedelta(milliseconds=1)
        assert row.run_time_ms <= window + SLACK_MS
        assert done.charged_micro_credits == charge_for(PRICE, 1, row.run_time_ms)
        assert done.charged_micro_credits < charge_for(PRICE, 1, 60_000)
        assert len([e for e in await events(plane, job.job_id) if "capped" in e.reason]) == 1
        # One good outcome (it finished) and one bad (it overclaimed): 5.5 / 7 of the prior.
        assert await reliability(plane, host.host_id) == 786
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def _capped_twice(plane: JobPlane, job_id: str) -> bool:
    return (await attempt_row(plane, job_id)).capped_reports == 2


async def test_a_run_time_within_the_window_is_taken_as_reported(plane: JobPlane) -> None:
    host, job, dispatch = await running_job(plane)
    try:
        await asyncio.sleep(0.5)
        await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=2000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.usage.run_time_ms == 2000
        assert (await attempt_row(plane, job.job_id)).capped_reports == 0
        assert not [e for e in await events(plane, job.job_id) if "capped" in e.reason]
        assert await reliability(plane, host.host_id) == 917  # 5.5 / 6: no bad outcome
    finally:
        await host.close()


async def test_a_seq_jump_is_refused_and_a_terminal_report_always_lands(plane: JobPlane) -> None:
    host, job, dispatch = await running_job(plane)
    background = plane.plane.background
    assert background is not None
    try:
        applied = (await attempt_row(plane, job.job_id)).report_seq
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, seq=applied + MAX_SEQ_JUMP + 1)

        async def refused() -> bool:
            consumer = background.report_consumer
            return consumer is not None and consumer.refused["seq_jump"] == 1

        await eventually(refused)
        assert (await attempt_row(plane, job.job_id)).report_seq == applied
        # Within the bound: applied; the daemon's own next reports are stale now ...
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, seq=applied + MAX_SEQ_JUMP)
        await eventually(
            lambda: _seq_is(plane, job.job_id, applied + MAX_SEQ_JUMP),
        )
        await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, seq=applied + 1, exit_code=0)
        # ... but its final report still ends the job.
        await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, seq=applied + 2, exit_code=0)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.attempt == 1
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def _seq_is(plane: JobPlane, job_id: str, seq: int) -> bool:
    return (await attempt_row(plane, job_id)).report_seq == seq


async def test_an_attempt_missing_from_heartbeats_is_resynced_and_lost_when_not_run(
    plane: JobPlane,
) -> None:
    host, job, dispatch = await running_job(plane, auto_ack=False)
    key = (dispatch.job_id, dispatch.attempt)
    try:
        # Listed: no resync, however long it runs.
        await asyncio.sleep(1.0)
        assert host.resyncs.empty()
        # The daemon says it runs it after all (the heartbeat raced it): nothing is lost.
        host.taken.discard(key)
        message = await asyncio.wait_for(host.resyncs.get(), 10)
        missing = message.resync.missing
        assert (missing.job_id, missing.attempt) == key
        assert [(j.job_id, j.attempt) for j in message.resync.known_jobs] == [key]
        host.taken.add(key)
        await host.ack(message.command_id)
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=500)
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_RUNNING
        # Gone from its heartbeats again; this time its daemon does not run it.
        host.taken.discard(key)
        message = await asyncio.wait_for(host.resyncs.get(), 10)
        await host.ack(message.command_id, registry_pb2.COMMAND_ANSWER_NOT_RUNNING_HERE)
        requeued = await plane.wait_for(job.job_id, [S.JOB_STATE_QUEUED, S.JOB_STATE_SCHEDULED])
        first = requeued.attempts[0]
        assert first.attempt_state == S.ATTEMPT_STATE_LOST
        assert "not running here" in first.reason
        assert first.charged_micro_credits == 0  # what metering charged went back
        assert requeued.charged_micro_credits == 0
        async with database(plane).read() as session:
            rows = (
                await session.scalars(select(HostCommand).where(HostCommand.kind == "resync"))
            ).all()
        assert [r.answer for r in rows][:2] == ["applied", "not_running"]
        # A check that read the attempt live just before it was lost may store one more: it
        # is closed as moot, never answered.
        assert {r.answer for r in rows[2:]} <= {None, "moot"}
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def test_a_listed_attempt_that_is_not_live_resyncs_the_host(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        host.taken.add(("job_unknown", 1))
        message = await asyncio.wait_for(host.resyncs.get(), 10)
        assert not message.resync.HasField("missing")
        assert list(message.resync.known_jobs) == []
    finally:
        await host.close()
