"""SessionService's refusals on a real control plane (no host: sessions stay queued), on SQLite
and PostgreSQL: durations out of 1 s … 12 h and bad SSH keys name their field; an extension
past 12 hours or past the tenant's credit changes nothing; another tenant sees no session."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, sessions_pb2, sessions_pb2_grpc, types_pb2

from controlplane.ledger.transfers import charge_for
from devstack.factories import new_tenant
from tests.harness import CREDIT, JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.databases("sqlite", "postgresql")]
PRICE = 2 * CREDIT  # per GPU-hour: what the hold of a session on no host assumes
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnyiHyW0lHc+ZtFDYeGfnWCTZh2Hp3ojQ0Q0aFxT4pW a@b"
HOUR = 3600


def stub(plane: JobPlane) -> sessions_pb2_grpc.SessionServiceAsyncStub:
    return sessions_pb2_grpc.SessionServiceStub(plane.channel)


def request(
    seconds: int, ssh_public_keys: Sequence[str] = (), idempotency_key: str = ""
) -> sessions_pb2.CreateSessionRequest:
    spec = S.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE)
    return sessions_pb2.CreateSessionRequest(
        spec=spec,
        duration_seconds=seconds,
        ssh_public_keys=ssh_public_keys,
        idempotency_key=idempotency_key,
    )


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


async def test_durations_and_keys_out_of_bounds_name_their_field(plane: JobPlane) -> None:
    auth = plane.auth(plane.consumer_key)
    for seconds in (0, 13 * HOUR, 12 * HOUR + 1):
        details = await refused(
            stub(plane).CreateSession(request(seconds), metadata=auth),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.startswith("duration_seconds:"), details
    for key in ("ssh-dss AAAA", "ssh-ed25519 not*base64", "ssh-ed25519 AAAAB3NzaC1yc2E="):
        details = await refused(
            stub(plane).CreateSession(request(HOUR, ssh_public_keys=[KEY, key]), metadata=auth),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details.startswith("ssh_public_keys[1]:"), details
    bad = request(HOUR)
    bad.spec.max_duration_seconds = 60
    details = await refused(
        stub(plane).CreateSession(bad, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("spec.max_duration_seconds:")
    # Only CreateSession makes a session: SubmitJob refuses the field.
    job = S.JobSpec(image="busybox", max_duration_seconds=60, session=S.SessionSpec())
    details = await refused(
        plane.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=job), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("spec.session:")
    listed = await stub(plane).ListSessions(sessions_pb2.ListSessionsRequest(), metadata=auth)
    assert list(listed.sessions) == []
    balance = await plane.balance(plane.consumer_tenant)
    assert (balance.held_micro_credits, balance.available_micro_credits) == (0, 100 * CREDIT)


async def test_twelve_hours_is_the_most_and_an_extension_is_paid_for_or_refused(
    plane: JobPlane,
) -> None:
    auth = plane.auth(plane.consumer_key)
    created = await stub(plane).CreateSession(
        request(11 * HOUR, ssh_public_keys=[KEY + "  "], idempotency_key="s1"), metadata=auth
    )
    first = created.session
    assert first.session_id.startswith("ses_")
    assert first.state == S.JOB_STATE_QUEUED
    assert list(first.ssh_public_keys) == [KEY]
    assert first.hold_micro_credits == charge_for(PRICE, 1, 11 * HOUR * 1000)
    again = await stub(plane).CreateSession(
        request(11 * HOUR, ssh_public_keys=[KEY + "  "], idempotency_key="s1"), metadata=auth
    )
    assert again.session.session_id == first.session_id

    extend = sessions_pb2.ExtendSessionRequest(session_id=first.session_id)
    extend.duration_seconds = HOUR + 1
    details = await refused(
        stub(plane).ExtendSession(extend, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("duration_seconds:")
    assert "12-hour" in details
    extend.duration_seconds = HOUR
    reply = await stub(plane).ExtendSession(extend, metadata=auth)
    assert reply.session.duration_seconds == 12 * HOUR
    assert reply.session.hold_micro_credits == charge_for(PRICE, 1, 12 * HOUR * 1000)
    balance = await plane.balance(plane.consumer_tenant)
    assert balance.held_micro_credits == 24 * CREDIT

    # 76 credits left: sessions of 6, 12, 12 and 6 hours hold 72 of them; the 4 left cannot
    # pay for 3 hours more of the second (6 credits).
    second = await stub(plane).CreateSession(request(6 * HOUR), metadata=auth)
    for hours in (12, 12, 6):
        await stub(plane).CreateSession(request(hours * HOUR), metadata=auth)
    before = await plane.balance(plane.consumer_tenant)
    assert before.available_micro_credits == 4 * CREDIT
    extend = sessions_pb2.ExtendSessionRequest(
        session_id=second.session.session_id, duration_seconds=3 * HOUR
    )
    details = await refused(
        stub(plane).ExtendSession(extend, metadata=auth), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "insufficient credit" in details
    after = await plane.balance(plane.consumer_tenant)
    assert (after.available_micro_credits, after.held_micro_credits) == (
        before.available_micro_credits,
        before.held_micro_credits,
    )
    unchanged = await stub(plane).GetSession(
        sessions_pb2.GetSessionRequest(session_id=second.session.session_id), metadata=auth
    )
    assert unchanged.session.duration_seconds == 6 * HOUR
    assert unchanged.session.hold_micro_credits == 12 * CREDIT
    await plane.assert_ledger_consistent()

    # Destroyed while queued: nothing ran, nothing is charged, the hold is released.
    destroyed = await stub(plane).DestroySession(
        sessions_pb2.DestroySessionRequest(session_id=second.session.session_id), metadata=auth
    )
    assert destroyed.session.state == S.JOB_STATE_CANCELLED
    assert destroyed.session.charged_micro_credits == 0
    details = await refused(
        stub(plane).ExtendSession(extend, metadata=auth), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "has ended" in details
    assert (await plane.balance(plane.consumer_tenant)).available_micro_credits == 16 * CREDIT


async def test_another_tenant_cannot_see_extend_or_end_a_session(plane: JobPlane) -> None:
    mine = await stub(plane).CreateSession(request(HOUR), metadata=plane.auth(plane.consumer_key))
    session_id = mine.session.session_id
    _, other_key = await new_tenant(plane, "other", S.ROLE_CONSUMER, micro_credits=50 * CREDIT)
    other = plane.auth(other_key)
    calls = [
        stub(plane).GetSession(
            sessions_pb2.GetSessionRequest(session_id=session_id), metadata=other
        ),
        stub(plane).ExtendSession(
            sessions_pb2.ExtendSessionRequest(session_id=session_id, duration_seconds=60),
            metadata=other,
        ),
        stub(plane).FinishSession(
            sessions_pb2.FinishSessionRequest(session_id=session_id), metadata=other
        ),
        stub(plane).DestroySession(
            sessions_pb2.DestroySessionRequest(session_id=session_id), metadata=other
        ),
    ]
    for call in calls:
        details = await refused(call, grpc.StatusCode.NOT_FOUND)
        assert details.startswith("session_id:")
    listed = await stub(plane).ListSessions(sessions_pb2.ListSessionsRequest(), metadata=other)
    assert list(listed.sessions) == []
    # A job's id is no session's.
    job = await plane.submit(image="busybox", max_duration_seconds=60)
    await refused(
        stub(plane).GetSession(
            sessions_pb2.GetSessionRequest(session_id=job.job_id),
            metadata=plane.auth(plane.consumer_key),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    owner = await stub(plane).GetSession(
        sessions_pb2.GetSessionRequest(session_id=session_id),
        metadata=plane.auth(plane.consumer_key),
    )
    assert owner.session.duration_seconds == HOUR
    assert owner.session.state == S.JOB_STATE_QUEUED
