"""Retries by cause: infrastructure faults (an image pull blocked by the host's network, a
host error) are retried by default and never charged; user failures end the job unless their
exit code is listed; a job out of retries fails with every attempt's cause."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from controlplane.jobs.repository import JobRepository
from controlplane.ledger.service import charge_for
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000
pytestmark = [pytest.mark.databases("sqlite", "postgresql"), pytest.mark.timeout(60)]


async def succeed(host: ScriptedHost, dispatch: Any, run_time_ms: int) -> None:
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=run_time_ms)


async def pull_failed(host: ScriptedHost, dispatch: Any) -> None:
    await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FAILED_TO_START,
        stop_reason=K.STOP_REASON_IMAGE_PULL_FAILED,
        reason="image 'x/y:1' is not on this host and could not be pulled: dial tcp: timeout",
    )


async def test_an_image_pull_blocked_by_the_network_is_retried_at_no_charge(
    plane: JobPlane,
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)  # max_retries unset: 2
        assert job.spec.max_retries == 2
        d1 = await host.next_dispatch()
        await pull_failed(host, d1)
        d2 = await host.next_dispatch()
        assert (d2.job_id, d2.attempt) == (job.job_id, 2)
        await succeed(host, d2, run_time_ms=30_000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await host.close()
    first = done.attempts[0]
    assert first.charged_micro_credits == 0
    assert first.reason.startswith("image pull failed on the host: image 'x/y:1'")
    assert done.charged_micro_credits == charge_for(PRICE, 1, 30_000)
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - done.charged_micro_credits
    assert consumer.held_micro_credits == 0
    await plane.assert_ledger_consistent()


async def test_exhausted_retries_fail_listing_every_attempts_cause(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=1)
        d1 = await host.next_dispatch()
        await pull_failed(host, d1)
        d2 = await host.next_dispatch()
        await host.report(d2, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d2,
            K.JOB_REPORT_KIND_STOPPED,
            stop_reason=K.STOP_REASON_HOST_ERROR,
            reason="docker died",
            run_time_ms=40_000,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    why = done.state_reason
    assert why.startswith("attempt 2 lost: host fault: docker died; no retries left (")
    assert f"attempt 1 on {host.host_id}: image pull failed on the host" in why
    assert f"attempt 2 on {host.host_id}: host fault: docker died" in why
    assert done.charged_micro_credits == 0
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT
    assert consumer.held_micro_credits == 0
    await plane.assert_ledger_consistent()


@pytest.mark.parametrize(
    ("stop_reason", "fields"),
    [
        (K.STOP_REASON_IMAGE_UNAVAILABLE, {"reason": "manifest unknown"}),
        (K.STOP_REASON_EXITED_WITH_ERROR, {"exit_code": 3}),
        (K.STOP_REASON_OOM_KILLED, {"exit_code": 137, "oom_killed": True}),
    ],
)
async def test_user_failures_are_not_retried_by_default(
    plane: JobPlane, stop_reason: int, fields: dict[str, Any]
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        d1 = await host.next_dispatch()
        kind = (
            K.JOB_REPORT_KIND_FAILED_TO_START
            if stop_reason == K.STOP_REASON_IMAGE_UNAVAILABLE
            else K.JOB_REPORT_KIND_FINISHED
        )
        await host.report(d1, kind, stop_reason=stop_reason, **fields)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.attempt == 1
    assert len(done.attempts) == 1


async def test_a_listed_exit_code_is_retried_and_charged(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, retry_on_exit_codes=[3, 75])
        d1 = await host.next_dispatch()
        await host.report(d1, K.JOB_REPORT_KIND_RUNNING)
        await host.report(d1, K.JOB_REPORT_KIND_UPLOADING, exit_code=75, run_time_ms=60_000)
        logs = S.ResultObject(key="k1", path="logs/stdout", size_bytes=1, sha256="00")
        await host.report(
            d1,
            K.JOB_REPORT_KIND_FINISHED,
            stop_reason=K.STOP_REASON_EXITED_WITH_ERROR,
            exit_code=75,
            run_time_ms=60_000,
            manifest=[logs],
        )
        d2 = await host.next_dispatch()
        assert d2.attempt == 2
        await host.report(d2, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d2,
            K.JOB_REPORT_KIND_FINISHED,
            stop_reason=K.STOP_REASON_EXITED_WITH_ERROR,
            exit_code=1,  # not listed: the job ends
            run_time_ms=30_000,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.attempt == 2
    assert done.exit_code == 1
    attempts = {a.attempt: a for a in done.attempts}
    assert attempts[1].reason == "exit code 75"
    assert attempts[1].exit_code == 75
    db = plane.plane.db
    assert db is not None
    async with db.read() as session:
        first = await JobRepository(session).attempt(job.job_id, 1)
    assert first is not None
    assert [o["key"] for o in first.manifest] == ["k1"]  # what the failed attempt stored
    assert attempts[1].charged_micro_credits == charge_for(PRICE, 1, 60_000)
    assert attempts[2].charged_micro_credits == charge_for(PRICE, 1, 30_000)
    assert done.charged_micro_credits == charge_for(PRICE, 1, 60_000) + charge_for(PRICE, 1, 30_000)
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - done.charged_micro_credits
    assert consumer.held_micro_credits == 0
    await plane.assert_ledger_consistent()


async def test_max_retries_zero_means_no_retry(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=0)
        assert job.spec.HasField("max_retries")
        assert job.spec.max_retries == 0
        d1 = await host.next_dispatch()
        await pull_failed(host, d1)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.attempt == 1
    assert "no retries left" in done.state_reason
    assert done.charged_micro_credits == 0


async def test_bad_retry_exit_codes_are_named(plane: JobPlane) -> None:
    for codes, field in (([0], "spec.retry_on_exit_codes[0]"), ([3, 300], "[1]")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await plane.submit(retry_on_exit_codes=codes)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
