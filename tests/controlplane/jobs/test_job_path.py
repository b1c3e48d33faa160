"""The control plane's job path against real NATS and S3, with the daemon played by the test:
submit → hold → placement → dispatch → reports → settlement, fencing, loss and retry."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, types_pb2

from controlplane.ledger.service import charge_for, split_fee
from devstack.factories import new_tenant
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane, job_plane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000  # 2 credits per GPU-hour
pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def run_to_success(host: ScriptedHost, dispatch: Any, run_time_ms: int) -> None:
    await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=0, run_time_ms=run_time_ms)
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=run_time_ms,
        manifest=[S.ResultObject(key="k", path="logs/stdout", size_bytes=1, sha256="00")],
    )


async def test_bad_spec_fields_are_named(plane: JobPlane) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"image": ""}, "spec.image"),
        ({"image": "Not A Ref!"}, "spec.image"),
        ({"max_duration_seconds": 0}, "spec.max_duration_seconds"),
        ({"gpu_count": 1000}, "spec.gpu_count"),
        ({"env": {"1BAD": "x"}}, "spec.env"),
        ({"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "spec.env"),
        ({"min_compute_capability": "eight"}, "spec.min_compute_capability"),
        ({"priority": 5000}, "spec.priority"),
    ]
    for fields, name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await plane.submit(**fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert (caught.value.details() or "").startswith(name), caught.value.details()
    listed = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(), metadata=plane.auth(plane.consumer_key)
    )
    assert list(listed.jobs) == []


async def test_insufficient_credit_creates_nothing(plane: JobPlane) -> None:
    before = await plane.balance(plane.consumer_tenant)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.submit(gpu_count=8, max_duration_seconds=3600 * 24)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient credit" in (caught.value.details() or "")
    assert await plane.balance(plane.consumer_tenant) == before
    listed = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(), metadata=plane.auth(plane.consumer_key)
    )
    assert list(listed.jobs) == []
    await plane.assert_ledger_consistent()


async def test_idempotent_submit(plane: JobPlane) -> None:
    spec = S.JobSpec(image="gpuplane-test/busybox:1", max_duration_seconds=60, gpu_count=1)
    request = jobs_pb2.SubmitJobRequest(spec=spec, idempotency_key="train-42")
    first = await plane.jobs.SubmitJob(request, metadata=plane.auth(plane.consumer_key))
    again = await plane.jobs.SubmitJob(request, metadata=plane.auth(plane.consumer_key))
    assert again.job.job_id == first.job.job_id
    changed = jobs_pb2.SubmitJobRequest(spec=spec, idempotency_key="train-42")
    changed.spec.gpu_count = 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.jobs.SubmitJob(changed, metadata=plane.auth(plane.consumer_key))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    balance = await plane.balance(plane.consumer_tenant)
    assert balance.held_micro_credits == first.job.hold_micro_credits  # held once, not twice


async def test_placement_disjoint_gpus_then_queue_then_settle(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=4)
    try:
        a = await plane.submit(gpu_count=2, max_duration_seconds=600)
        b = await plane.submit(gpu_count=2, max_duration_seconds=600)
        da = await host.next_dispatch()
        db = await host.next_dispatch()
        assert {da.job_id, db.job_id} == {a.job_id, b.job_id}
        assert len(da.gpu_uuids) == 2
        assert len(db.gpu_uuids) == 2
        assert set(da.gpu_uuids).isdisjoint(db.gpu_uuids)
        assert set(da.gpu_uuids) | set(db.gpu_uuids) == {g.uuid for g in host.gpus()}

        c = await plane.submit(gpu_count=2, max_duration_seconds=600)
        await asyncio.sleep(0.5)
        queued = await plane.get(c.job_id)
        assert queued.state == S.JOB_STATE_QUEUED
        assert queued.state_reason == (
            "0 of 1 online hosts have 2×GPU free; 1 lacks enough free matching GPUs right now"
        )

        # A duplicated report (same seq) and a stale one change nothing.
        await run_to_success(host, da, run_time_ms=90_000)
        await host.report(da, K.JOB_REPORT_KIND_FINISHED, seq=4, exit_code=0, run_time_ms=999_999)
        done = await plane.wait_for(da.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.exit_code == 0
        expected = charge_for(PRICE, 2, 90_000)
        assert done.charged_micro_credits == expected == 100_000

        dc = await host.next_dispatch()
        assert dc.job_id == c.job_id
        assert set(dc.gpu_uuids) == set(da.gpu_uuids)
    finally:
        await host.close()
    provider = await plane.balance(plane.provider_tenant)
    share, fee = split_fee(expected, 1000)
    assert provider.earnings_micro_credits == share
    consumer = await plane.balance(plane.consumer_tenant)
    held = b.hold_micro_credits + c.hold_micro_credits
    assert consumer.held_micro_credits == held
    assert consumer.available_micro_credits == 100 * CREDIT - expected - held
    await plane.assert_ledger_consistent()


async def test_end_states_from_reports(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=4)
    try:
        failing = await plane.submit(gpu_count=1)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await host.report(d, K.JOB_REPORT_KIND_FINISHED, exit_code=3, run_time_ms=1000)
        job = await plane.wait_for(failing.job_id, [S.JOB_STATE_FAILED])
        assert job.exit_code == 3
        assert job.state_reason == "exit code 3"

        slow = await plane.submit(gpu_count=1, max_duration_seconds=5)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=137,
            run_time_ms=5000,
            stop_reason=K.STOP_REASON_TIMED_OUT,
        )
        job = await plane.wait_for(slow.job_id, [S.JOB_STATE_TIMED_OUT])
        assert job.charged_micro_credits == charge_for(PRICE, 1, 5000)

        missing = await plane.submit(gpu_count=1, image="nowhere/nothing:1")
        d = await host.next_dispatch()
        await host.report(
            d,
            K.JOB_REPORT_KIND_FAILED_TO_START,
            reason="image 'nowhere/nothing:1' is not on this host",
        )
        job = await plane.wait_for(missing.job_id, [S.JOB_STATE_FAILED])
        assert "nowhere/nothing:1" in job.state_reason
        assert job.charged_micro_credits == 0
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def test_cancel_queued_and_running(plane: JobPlane) -> None:
    queued = await plane.submit(gpu_count=1)  # no host yet: stays queued
    before = await plane.balance(plane.consumer_tenant)
    assert before.held_micro_credits == queued.hold_micro_credits
    reply = await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=queued.job_id), metadata=plane.auth(plane.consumer_key)
    )
    assert reply.job.state == S.JOB_STATE_CANCELLED
    after = await plane.balance(plane.consumer_tenant)
    assert after.held_micro_credits == 0
    assert after.available_micro_credits == 100 * CREDIT

    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        running = await plane.submit(gpu_count=1)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(running.job_id, [S.JOB_STATE_RUNNING])
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=running.job_id, reason="changed my mind"),
            metadata=plane.auth(plane.consumer_key),
        )
        command = await asyncio.wait_for(_next_cancel(host), timeout=5)
        assert command.cancel.job_id == running.job_id
        assert command.cancel.attempt == 1
        await host.report(
            d, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED, run_time_ms=2000
        )
        job = await plane.wait_for(running.job_id, [S.JOB_STATE_CANCELLED])
        assert job.charged_micro_credits == charge_for(PRICE, 1, 2000)
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def _next_cancel(host: ScriptedHost) -> Any:
    while True:
        message = await host.commands.get()
        if message.WhichOneof("msg") == "cancel":
            return message


async def test_lost_host_retries_elsewhere_and_charges_only_the_second_attempt(
    plane: JobPlane,
) -> None:
    first = await scripted_host(plane, price=PRICE, gpus=1)
    job = await plane.submit(gpu_count=1, max_retries=2)
    d1 = await first.next_dispatch()
    await first.report(d1, K.JOB_REPORT_KIND_RUNNING)
    await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
    second = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        await first.stop_heartbeats()  # the daemon dies mid-job
        d2 = await second.next_dispatch(timeout=15)
        assert d2.job_id == job.job_id
        assert d2.attempt == 2
        # The first daemon's late reports are fenced off: it no longer owns the job.
        await first.report(d1, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=600_000)
        await run_to_success(second, d2, run_time_ms=60_000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await first.close()
        await second.close()
    assert done.attempt == 2
    attempts = {a.attempt: a for a in done.attempts}
    assert attempts[1].charged_micro_credits == 0
    assert attempts[2].charged_micro_credits == charge_for(PRICE, 1, 60_000)
    assert done.charged_micro_credits == charge_for(PRICE, 1, 60_000)
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - done.charged_micro_credits
    assert consumer.held_micro_credits == 0
    await plane.assert_ledger_consistent()


async def test_watch_streams_state_changes(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        seen: list[int] = []

        async def watch() -> None:
            stream = plane.jobs.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
            )
            async for event in stream:
                seen.append(event.state)

        watcher = asyncio.create_task(watch())
        d = await host.next_dispatch()
        await run_to_success(host, d, run_time_ms=1000)
        await asyncio.wait_for(watcher, timeout=10)
    finally:
        await host.close()
    assert seen == [
        S.JOB_STATE_QUEUED,
        S.JOB_STATE_SCHEDULED,
        S.JOB_STATE_STARTING,
        S.JOB_STATE_RUNNING,
        S.JOB_STATE_UPLOADING,
        S.JOB_STATE_SUCCEEDED,
    ]


async def test_other_tenant_cannot_see_job(plane: JobPlane) -> None:
    job = await plane.submit(gpu_count=1)
    _, other_key = await new_tenant(plane, "other", S.ROLE_CONSUMER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=plane.auth(other_key)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(other_key)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await plane.get(job.job_id)).state == S.JOB_STATE_QUEUED


async def test_dispatch_never_taken_is_requeued(
    tmp_path: Path, nats_server: Any, s3_server: Any
) -> None:
    def quick(options: dict[str, Any]) -> None:
        options["dispatch_ack_timeout_ms"] = 700

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=quick) as plane:
        silent = await scripted_host(plane, price=PRICE, gpus=1)  # heartbeats, but never reports
        job = await plane.submit(gpu_count=1, max_retries=1)
        first = await silent.next_dispatch()
        assert first.attempt == 1
        second = await silent.next_dispatch(timeout=10)
        assert second.job_id == job.job_id
        assert second.attempt == 2
        await silent.close()
        requeued = await plane.get(job.job_id)
        assert requeued.attempts[0].reason == "daemon never took it"
        assert requeued.attempts[0].charged_micro_credits == 0


async def test_provider_fault_requeues_without_charge(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=1)
        d1 = await host.next_dispatch()
        await host.report(d1, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d1,
            K.JOB_REPORT_KIND_STOPPED,
            stop_reason=K.STOP_REASON_HOST_ERROR,
            reason="host error: docker died",
            run_time_ms=50_000,
        )
        d2 = await host.next_dispatch()
        assert (d2.job_id, d2.attempt) == (job.job_id, 2)
        await run_to_success(host, d2, run_time_ms=10_000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await host.close()
    assert done.attempts[0].reason == "host fault: host error: docker died"
    assert done.attempts[0].charged_micro_credits == 0
    assert done.charged_micro_credits == charge_for(PRICE, 1, 10_000)
    await plane.assert_ledger_consistent()


async def test_list_jobs_filters_labels_before_paging(plane: JobPlane) -> None:
    """Label filters select in the query, so every page is full of matching jobs (filtering
    after the limit gave short or empty pages when newer jobs did not match)."""
    wanted = [
        await plane.submit(gpu_count=1, labels={"team": "a", "run": str(n)}) for n in range(2)
    ]
    for n in range(3):  # newer, not matching
        await plane.submit(gpu_count=1, labels={"team": "b", "run": str(n)})
    seen: list[str] = []
    token = ""
    for _ in range(3):
        page = await plane.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(labels={"team": "a"}, page_size=1, page_token=token),
            metadata=plane.auth(plane.consumer_key),
        )
        assert len(page.jobs) == 1, page
        seen.append(page.jobs[0].job_id)
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.job_id for j in reversed(wanted)]
    both = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(labels={"team": "a", "run": "1"}),
        metadata=plane.auth(plane.consumer_key),
    )
    assert [j.job_id for j in both.jobs] == [wanted[1].job_id]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(labels={"bad key!": "x"}),
            metadata=plane.auth(plane.consumer_key),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels['bad key!']" in (caught.value.details() or "")


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of sample `name{labels}` in a /metrics page (0.0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def test_fleet_gauges_and_scheduler_metrics(plane: JobPlane) -> None:
    """/metrics tells jobs by state (the queue depth), hosts by state, the outbox backlog and
    scheduling cycles, refreshed from the database."""
    url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback
            return str(reply.read().decode())

    async def until(check: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + 10
        while True:
            text = await asyncio.to_thread(scrape)
            if check(text) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.1)

    queued = [await plane.submit(gpu_count=2) for _ in range(2)]
    text = await until(lambda t: _metric(t, "gpuplane_jobs", 'state="queued"') == 2)
    assert _metric(text, "gpuplane_jobs", 'state="queued"') == 2
    assert _metric(text, "gpuplane_jobs", 'state="running"') == 0
    assert 'gpuplane_hosts{state="online"} 0.0' in text
    host = await scripted_host(plane, price=PRICE, gpus=2)
    try:
        placed = await plane.wait_for(queued[0].job_id, [S.JOB_STATE_SCHEDULED])  # oldest first
        assert placed.host_id == host.host_id
        text = await until(
            lambda t: (
                _metric(t, "gpuplane_jobs", 'state="scheduled"') == 1
                and _metric(t, "gpuplane_hosts", 'state="online"') == 1
            )
        )
        assert _metric(text, "gpuplane_jobs", 'state="queued"') == 1
        assert _metric(text, "gpuplane_jobs", 'state="scheduled"') == 1
        assert _metric(text, "gpuplane_hosts", 'state="online"') == 1
        assert _metric(text, "gpuplane_jobs_placed_total") == 1
        assert _metric(text, "gpuplane_scheduler_cycle_seconds_count") >= 1
        # The placement's dispatch was published: nothing waits in the outbox.
        text = await until(lambda t: _metric(t, "gpuplane_outbox_unpublished") == 0)
        assert _metric(text, "gpuplane_outbox_unpublished") == 0
        assert _metric(text, "gpuplane_outbox_oldest_unpublished_seconds") == 0
    finally:
        await host.close()
