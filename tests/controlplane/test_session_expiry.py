"""The control plane's side of a session's life, against a scripted daemon that does only what
it is told: the dispatch carries the session, an extension reaches the host as an
ExtendCommand, the expiry is warned of, a session its daemon did not stop is stopped by the
control plane (charged no more than its duration), every connected host is resynced
periodically with its live attempts, and a later extension supersedes an unacknowledged one."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, sessions_pb2, sessions_pb2_grpc, types_pb2
from sqlalchemy import select

from controlplane.commands.models import HostCommand
from controlplane.ledger.transfers import charge_for
from tests.controlplane.scripted_host import scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
S = types_pb2
PRICE = 2 * CREDIT
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.plane(
        session_check_interval_ms=100, session_overdue_grace_ms=300, host_resync_interval_ms=200
    ),
]


async def next_command(
    commands: asyncio.Queue[registry_pb2.ControlMessage], kind: str
) -> registry_pb2.ControlMessage:
    async with asyncio.timeout(15):
        while (message := await commands.get()).WhichOneof("msg") != kind:
            pass
    return message


async def test_an_overdue_session_is_stopped_by_the_control_plane(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1, price=PRICE)
    stub = sessions_pb2_grpc.SessionServiceStub(plane.channel)
    auth = plane.auth(plane.consumer_key)
    try:
        spec = S.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE)
        created = await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(spec=spec, duration_seconds=4), metadata=auth
        )
        session_id = created.session.session_id
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == session_id
        assert dispatch.spec.HasField("session")
        assert (dispatch.spec.max_duration_seconds, dispatch.spec.max_retries) == (4, 0)
        await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(session_id, [S.JOB_STATE_RUNNING])
        # 4 s leave room for the resync and the extension below on a loaded machine (with
        # 2 s, the control plane sometimes stopped the session before it was extended).
        resync = await next_command(host.resyncs, "resync")  # periodic: no disagreement here
        assert [(j.job_id, j.attempt) for j in resync.resync.known_jobs] == [(session_id, 1)]
        assert not resync.resync.HasField("missing")

        extend = sessions_pb2.ExtendSessionRequest(session_id=session_id, duration_seconds=1)
        await stub.ExtendSession(extend, metadata=auth)
        told = await next_command(host.commands, "extend")
        assert (told.extend.job_id, told.extend.attempt) == (session_id, 1)
        assert told.extend.max_duration_seconds == 5

        get = sessions_pb2.GetSessionRequest(session_id=session_id)
        async with asyncio.timeout(10):
            while not (await stub.GetSession(get, metadata=auth)).session.warning:
                await asyncio.sleep(0.05)
        # The scripted daemon does not stop it at 5 s: the control plane does, 0.3 s later.
        stop = await next_command(host.commands, "cancel")
        assert stop.cancel.stop_reason == R.STOP_REASON_TIMED_OUT
        await host.report(
            dispatch, K.JOB_REPORT_KIND_STOPPED, stop_reason=R.STOP_REASON_TIMED_OUT,
            run_time_ms=5_400, reason=stop.cancel.reason,
        )  # fmt: skip
        await plane.wait_for(session_id, [S.JOB_STATE_TIMED_OUT])
        ended = (await stub.GetSession(get, metadata=auth)).session
        assert ended.state_reason == "session expired: its 5 s were up"
        assert ended.HasField("destroyed_at")
        assert ended.charged_micro_credits == charge_for(PRICE, 1, 5_000)  # not the late 0.4 s
        balance = await plane.balance(plane.consumer_tenant)
        assert balance.held_micro_credits == 0
        assert balance.available_micro_credits == 100 * CREDIT - ended.charged_micro_credits
        await plane.assert_ledger_consistent()
    finally:
        await host.close()


async def test_a_later_extension_supersedes_an_unacknowledged_one(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1, price=PRICE, auto_ack=False)
    stub = sessions_pb2_grpc.SessionServiceStub(plane.channel)
    auth = plane.auth(plane.consumer_key)
    try:
        spec = S.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE)
        created = await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(spec=spec, duration_seconds=600), metadata=auth
        )
        session_id = created.session.session_id
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(session_id, [S.JOB_STATE_RUNNING])
        for seconds in (60, 120):
            extend = sessions_pb2.ExtendSessionRequest(
                session_id=session_id, duration_seconds=seconds
            )
            await stub.ExtendSession(extend, metadata=auth)
        assert plane.plane.jobs is not None
        async with plane.plane.jobs.db.read() as db_session:
            query = select(HostCommand).where(
                HostCommand.host_id == host.host_id, HostCommand.kind == "extend"
            )
            rows = (await db_session.scalars(query.order_by(HostCommand.id))).all()
        assert [(r.answer, r.acked_at is None) for r in rows] == [
            ("superseded", False),
            (None, True),
        ]
        latest = registry_pb2.ControlMessage.FromString(rows[-1].payload)
        assert latest.extend.max_duration_seconds == 780
        # The first may have gone out before it was superseded; the latest goes out too.
        async with asyncio.timeout(10):
            while (await next_command(host.commands, "extend")).extend.max_duration_seconds != 780:
                pass
    finally:
        await host.close()
