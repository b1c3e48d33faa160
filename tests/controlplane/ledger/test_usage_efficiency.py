"""GPU utilisation stored per attempt, on SQLite and PostgreSQL, against a real control plane
with the daemons played by the test (telemetry included): GetJob, GetUsage (per job, day,
month, GPU model and provider, and platform-wide for admins) and GetJobEfficiency show the
same figures; flushes from several processes add up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, messaging_pb2, registry_pb2, types_pb2

from controlplane.jobs.repository import JobRepository
from controlplane.registry.utilization import GpuUtilization
from devstack.factories import GIB, new_key, new_tenant, new_token
from tests.controlplane.registry.test_telemetry import TelemetryHost, eventually
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
L = ledger_pb2
PRICE = 2_000_000  # 2 credits per GPU-hour
A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"
HOUR_MS = 3_600_000
pytestmark = [pytest.mark.databases("sqlite", "postgresql"), pytest.mark.timeout(90)]


async def start_host(plane: JobPlane, provider: str, model: str) -> TelemetryHost:
    """A one-GPU host of `provider` that sends telemetry when told."""
    token = (await new_token(plane, provider)).secret
    host = TelemetryHost(plane.channel, plane.nats_url, token, gpus=1, model=model, price=PRICE)
    await host.start()
    return host


async def stored_samples(plane: JobPlane, job_id: str, key: str) -> int:
    job = (
        await plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=plane.auth(key))
    ).job
    return sum(a.gpu_utilization_samples for a in job.attempts)


async def run_measured(
    plane: JobPlane,
    host: TelemetryHost,
    utilizations: Sequence[int],
    run_time_ms: int,
    *,
    key: str | None = None,
    memory_gib: int = 3,
    stored_while_running: bool = True,
) -> types_pb2.Job:
    """A job that runs on `host`, whose GPU reports `utilizations` (one sample each, its
    process holding `memory_gib`), stored before it finishes after `run_time_ms` (or, not
    `stored_while_running`, once it has finished)."""
    key = key or plane.consumer_key
    submitted = await new_job_as(plane, key, gpu_models=[host.model])
    dispatch = await host.next_dispatch()
    assert dispatch.job_id == submitted.job_id
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    host.running = [registry_pb2.RunningJob(job_id=dispatch.job_id, attempt=dispatch.attempt)]
    process = S.GpuProcess(pid=7, used_memory_bytes=memory_gib * GIB, job_id=dispatch.job_id)
    monitor = plane.plane.monitor
    assert monitor is not None

    async def attributed() -> bool:
        """The control plane knows the job is on the host (heartbeat or placement), so each
        sample sent from now on counts for it."""
        seen = monitor.buffer.hosts.get(host.host_id)
        if seen is None:
            return False
        placed = seen.assignments.get(host.uuid(0))
        if placed is None:  # then the sample's process names the job
            return dispatch.job_id in seen.running
        return placed == (dispatch.job_id, dispatch.attempt)

    await eventually(attributed)
    for value in utilizations:
        await host.send(host.sample(0, utilization_gpu_percent=value, processes=[process]))

    async def all_stored() -> bool:
        return await stored_samples(plane, dispatch.job_id, key) == len(utilizations)

    if stored_while_running:
        await eventually(all_stored, timeout=10)
    await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=run_time_ms)
    host.running = []
    done = await wait_done(plane, dispatch.job_id, key)
    if stored_while_running:
        return done
    await eventually(all_stored, timeout=10)
    return await wait_done(plane, dispatch.job_id, key)


async def new_job_as(plane: JobPlane, key: str, **spec: object) -> types_pb2.Job:
    from devstack.factories import new_job

    return await new_job(plane, key, gpu_count=1, max_duration_seconds=7200, **spec)


async def wait_done(plane: JobPlane, job_id: str, key: str) -> types_pb2.Job:
    async def done() -> types_pb2.Job | None:
        reply = await plane.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=job_id), metadata=plane.auth(key)
        )
        return reply.job if reply.job.state == S.JOB_STATE_SUCCEEDED else None

    job: types_pb2.Job = await eventually(done, timeout=20)
    return job


async def usage(plane: JobPlane, key: str, **request: object) -> L.GetUsageResponse:
    reply: L.GetUsageResponse = await plane.ledger.GetUsage(
        L.GetUsageRequest(**request),  # type: ignore[arg-type]
        metadata=plane.auth(key),
    )
    return reply


async def revenue(plane: JobPlane) -> int:
    platform = await plane.balance("platform")
    kinds = {a.kind: a.balance_micro_credits for a in platform.accounts}
    return kinds[S.ACCOUNT_KIND_REVENUE]


@dataclass
class Fleet:
    """Two measured jobs of the consumer: A on an A100 of the plane's provider (70 % for an
    hour), B on an H100 of a second provider (30 % for half an hour)."""

    a: types_pb2.Job
    b: types_pb2.Job
    second_provider: str


async def two_measured_jobs(plane: JobPlane) -> Fleet:
    second, _ = await new_tenant(plane, "provider-b", S.ROLE_PROVIDER)
    first_host = await start_host(plane, plane.provider_tenant, A100)
    second_host = await start_host(plane, second, H100)
    try:
        a = await run_measured(plane, first_host, [80, 60], HOUR_MS)
        b = await run_measured(plane, second_host, [30, 30], HOUR_MS // 2, memory_gib=5)
    finally:
        await first_host.close()
        await second_host.close()
    return Fleet(a, b, second)


async def test_get_job_usage_and_efficiency_agree_and_every_grouping_adds_up(
    plane: JobPlane,
) -> None:
    fleet = await two_measured_jobs(plane)
    a, b = fleet.a, fleet.b
    assert (a.usage.avg_gpu_utilization_basis_points, a.usage.avg_gpu_utilization_percent) == (
        7000,
        70,
    )
    assert a.usage.peak_gpu_memory_bytes == 3 * GIB
    assert (
        a.attempts[0].avg_gpu_utilization_basis_points,
        a.attempts[0].peak_gpu_memory_bytes,
    ) == (
        7000,
        3 * GIB,
    )
    assert b.usage.avg_gpu_utilization_basis_points == 3000
    assert a.charged_micro_credits == 2 * CREDIT
    assert b.charged_micro_credits == CREDIT

    consumer = plane.consumer_key
    by_job = await usage(plane, consumer)
    rows = {r.job_id: r for r in by_job.rows}
    assert set(rows) == {a.job_id, b.job_id}
    for job in (a, b):
        row = rows[job.job_id]
        assert row.avg_gpu_utilization_basis_points == job.usage.avg_gpu_utilization_basis_points
        assert row.avg_gpu_utilization_percent == job.usage.avg_gpu_utilization_percent
        assert row.cost_micro_credits == job.charged_micro_credits
    assert rows[a.job_id].utilized_gpu_time_ms == HOUR_MS * 7 // 10
    assert rows[b.job_id].utilized_gpu_time_ms == HOUR_MS // 2 * 3 // 10
    assert rows[a.job_id].provider_tenant_id == plane.provider_tenant
    total_cost = 3 * CREDIT
    assert (by_job.total_gpu_time_ms, by_job.total_cost_micro_credits) == (
        HOUR_MS * 3 // 2,
        total_cost,
    )

    # Per day and month: one row, utilisation weighted by GPU time (1 h at 70 %, ½ h at 30 %).
    for grouping in (L.USAGE_GROUPING_DAY, L.USAGE_GROUPING_MONTH):
        (period,) = (await usage(plane, consumer, group_by=grouping)).rows
        assert period.job_count == 2
        assert period.avg_gpu_utilization_basis_points == 5667  # (3600×70 + 1800×30) / 5400
        assert period.utilized_gpu_time_ms == HOUR_MS * 7 // 10 + HOUR_MS // 2 * 3 // 10
        assert (period.gpu_time_ms, period.cost_micro_credits) == (HOUR_MS * 3 // 2, total_cost)
        assert period.gpu_model == ""  # two models

    models = await usage(plane, consumer, group_by=L.USAGE_GROUPING_GPU_MODEL)
    by_model = {r.gpu_model: r for r in models.rows}
    assert set(by_model) == {A100, H100}
    assert (by_model[A100].gpu_time_ms, by_model[A100].cost_micro_credits) == (HOUR_MS, 2 * CREDIT)
    assert by_model[A100].avg_gpu_utilization_basis_points == 7000
    assert (by_model[H100].gpu_time_ms, by_model[H100].cost_micro_credits) == (HOUR_MS // 2, CREDIT)
    assert by_model[H100].provider_tenant_id == fleet.second_provider
    assert models.total_cost_micro_credits == total_cost

    providers = await usage(plane, consumer, group_by=L.USAGE_GROUPING_PROVIDER)
    by_provider = {r.provider_tenant_id: r for r in providers.rows}
    assert set(by_provider) == {plane.provider_tenant, fleet.second_provider}
    assert by_provider[fleet.second_provider].gpu_model == H100
    assert by_provider[fleet.second_provider].avg_gpu_utilization_basis_points == 3000
    assert by_provider[plane.provider_tenant].job_count == 1
    assert sum(r.cost_micro_credits for r in providers.rows) == total_cost

    # A page of one GPU-model row at a time, then the other, then none.
    first = await usage(plane, consumer, group_by=L.USAGE_GROUPING_GPU_MODEL, page_size=1)
    rest = await usage(
        plane,
        consumer,
        group_by=L.USAGE_GROUPING_GPU_MODEL,
        page_size=1,
        page_token=first.next_page_token,
    )
    assert [r.gpu_model for r in (*first.rows, *rest.rows)] == [H100, A100]  # newest first
    assert rest.next_page_token == ""

    efficiency = await plane.jobs.GetJobEfficiency(
        jobs_pb2.GetJobEfficiencyRequest(job_id=a.job_id), metadata=plane.auth(consumer)
    )
    (attempt,) = efficiency.attempts
    total = efficiency.total
    for e in (attempt, total):
        assert (e.paid_gpu_time_ms, e.utilized_gpu_time_ms) == (HOUR_MS, HOUR_MS * 7 // 10)
        assert e.avg_gpu_utilization_basis_points == a.usage.avg_gpu_utilization_basis_points
        assert (e.charged_micro_credits, e.idle_micro_credits) == (2 * CREDIT, 600_000)
        assert (e.samples, e.peak_gpu_memory_bytes, e.gpu_model) == (2, 3 * GIB, A100)
    assert attempt.attempt_state == S.ATTEMPT_STATE_SUCCEEDED
    assert (total.attempt, total.attempt_state) == (0, S.ATTEMPT_STATE_UNSPECIFIED)


async def test_platform_report_is_for_admins_and_covers_every_tenant(plane: JobPlane) -> None:
    other, other_key = await new_tenant(plane, "other-consumer", S.ROLE_CONSUMER)
    await plane.deposit(other, 100, "other")
    host = await start_host(plane, plane.provider_tenant, A100)
    try:
        mine = await run_measured(plane, host, [50], HOUR_MS // 4)
        theirs = await run_measured(plane, host, [90], HOUR_MS // 4, key=other_key)
    finally:
        await host.close()
    admin = plane.admin_key
    everyone = await usage(plane, admin, all_tenants=True)
    assert {r.job_id for r in everyone.rows} == {mine.job_id, theirs.job_id}
    (month,) = (await usage(plane, admin, all_tenants=True, group_by=L.USAGE_GROUPING_MONTH)).rows
    assert month.avg_gpu_utilization_basis_points == 7000  # two equal quarter hours
    assert month.cost_micro_credits == mine.charged_micro_credits + theirs.charged_micro_credits
    only_mine = await usage(plane, plane.consumer_key)
    assert [r.job_id for r in only_mine.rows] == [mine.job_id]
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await usage(plane, plane.consumer_key, all_tenants=True)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "all_tenants" in (denied.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as both:
        await usage(plane, admin, all_tenants=True, tenant_id=other)
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "all_tenants" in (both.value.details() or "")
    # Revenue: the platform's fee on both jobs, in its balance and in the report.
    charged = mine.charged_micro_credits + theirs.charged_micro_credits
    assert await revenue(plane) == charged // 10 == month.fee_micro_credits
    assert everyone.total_fee_micro_credits == charged // 10
    assert {r.job_id: r.fee_micro_credits for r in everyone.rows} == {
        mine.job_id: mine.charged_micro_credits // 10,
        theirs.job_id: theirs.charged_micro_credits // 10,
    }
    # A full refund takes the fee back from revenue: the report follows the ledger.
    await plane.ledger.RefundJob(
        L.RefundJobRequest(job_id=mine.job_id, reason="slow", idempotency_key="usage-refund"),
        metadata=plane.auth(admin),
    )
    refunded = await usage(plane, admin, all_tenants=True, group_by=L.USAGE_GROUPING_PROVIDER)
    (provider_row,) = refunded.rows
    assert (provider_row.cost_micro_credits, provider_row.fee_micro_credits) == (
        theirs.charged_micro_credits,
        theirs.charged_micro_credits // 10,
    )
    assert refunded.total_fee_micro_credits == await revenue(plane)
    # Another consumer's job is not found, as a missing one.
    for job_id in (theirs.job_id, "job_missing"):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await plane.jobs.GetJobEfficiency(
                jobs_pb2.GetJobEfficiencyRequest(job_id=job_id),
                metadata=plane.auth(plane.consumer_key),
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await plane.jobs.GetJobEfficiency(
            jobs_pb2.GetJobEfficiencyRequest(), metadata=plane.auth(plane.consumer_key)
        )
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_flushes_from_several_processes_add_up_and_keep_the_peak(plane: JobPlane) -> None:
    host = await start_host(plane, plane.provider_tenant, A100)
    try:
        job = await run_measured(plane, host, [40], HOUR_MS)
    finally:
        await host.close()
    key = (job.job_id, 1, host.host_id)
    db = plane.plane.db
    assert db is not None
    # What two other replicas measured (and one before a restart) for the same attempt.
    for increment in (
        GpuUtilization(utilization_sum=100, samples=1, peak_memory_bytes=GIB),
        GpuUtilization(utilization_sum=160, samples=2, peak_memory_bytes=7 * GIB),
    ):
        async with db.transaction() as session:
            await JobRepository(session).add_utilization({key: increment})
    got = await plane.get(job.job_id)
    (attempt,) = got.attempts
    assert attempt.gpu_utilization_samples == 4
    assert attempt.avg_gpu_utilization_basis_points == 7500  # (40 + 100 + 160) / 4
    assert attempt.peak_gpu_memory_bytes == 7 * GIB
    assert got.usage.avg_gpu_utilization_basis_points == 7500
    # An attempt nobody placed is not created by a flush, and another host's claim on this
    # one is dropped.
    async with db.transaction() as session:
        await JobRepository(session).add_utilization(
            {
                ("job_ghost", 1, host.host_id): GpuUtilization(5, 1, 1),
                (job.job_id, 1, "host_elsewhere"): GpuUtilization(0, 50, 80 * GIB),
            }
        )
    (row,) = (await usage(plane, plane.consumer_key)).rows
    assert row.avg_gpu_utilization_basis_points == 7500
    assert (await plane.get(job.job_id)).usage.peak_gpu_memory_bytes == 7 * GIB


async def test_a_host_naming_another_hosts_job_measures_nothing_for_it(plane: JobPlane) -> None:
    honest = await start_host(plane, plane.provider_tenant, A100)
    liar = await start_host(plane, plane.provider_tenant, H100)
    try:
        job = await new_job_as(plane, plane.consumer_key, gpu_models=[A100])
        dispatch = await honest.next_dispatch()
        await honest.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        # The other host claims the job in its heartbeats and its GPU's processes, at 0 %.
        liar.running = [registry_pb2.RunningJob(job_id=job.job_id, attempt=1)]
        process = S.GpuProcess(pid=9, used_memory_bytes=GIB, job_id=job.job_id)
        monitor = plane.plane.monitor
        assert monitor is not None

        async def claimed() -> bool:
            seen = monitor.buffer.hosts.get(liar.host_id)
            return seen is not None and job.job_id in seen.running

        await eventually(claimed)
        for _ in range(3):
            await liar.send(liar.sample(0, utilization_gpu_percent=0, processes=[process]))
        await honest.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=1000)
        liar.running = []
        await wait_done(plane, job.job_id, plane.consumer_key)
        await monitor.flush()
    finally:
        await honest.close()
        await liar.close()
    (attempt,) = (await plane.get(job.job_id)).attempts
    assert attempt.gpu_utilization_samples == 0  # nothing of the liar's was written
    assert attempt.peak_gpu_memory_bytes == 0


@pytest.mark.plane(job_usage_flush_seconds=3600)
async def test_an_attempt_is_written_when_it_ends_not_only_every_interval(plane: JobPlane) -> None:
    host = await start_host(plane, plane.provider_tenant, A100)
    try:
        job = await run_measured(plane, host, [90, 70], HOUR_MS, stored_while_running=False)
    finally:
        await host.close()
    # No flush interval passed: the attempt's end (its GPU freed, its host no longer naming
    # it) had its increments written.
    assert job.usage.avg_gpu_utilization_basis_points == 8000
    assert job.attempts[0].gpu_utilization_samples == 2


async def test_a_provider_sees_only_what_its_hosts_ran(plane: JobPlane) -> None:
    second, second_key = await new_tenant(plane, "provider-b", S.ROLE_PROVIDER)
    first_key = await new_key(plane, plane.provider_tenant, S.ROLE_PROVIDER)
    lost_host = await start_host(plane, plane.provider_tenant, A100)
    job = await new_job_as(plane, plane.consumer_key, max_retries=2)
    await lost_host.next_dispatch()
    other_host = await start_host(plane, second, A100)
    try:
        await lost_host.stop_heartbeats()  # lost: the job is retried on the other host
        retry = await other_host.next_dispatch(timeout=20)
        assert (retry.job_id, retry.attempt) == (job.job_id, 2)
        await other_host.report(retry, K.JOB_REPORT_KIND_RUNNING)
        await other_host.report(
            retry, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=HOUR_MS // 2
        )
        done = await wait_done(plane, job.job_id, plane.consumer_key)
    finally:
        await lost_host.close()
        await other_host.close()
    assert done.charged_micro_credits == CREDIT
    (theirs,) = (await usage(plane, first_key)).rows
    assert (theirs.job_id, theirs.gpu_time_ms, theirs.cost_micro_credits) == (job.job_id, 0, 0)
    assert list((await usage(plane, first_key, group_by=L.USAGE_GROUPING_PROVIDER)).rows) == []
    (ours,) = (await usage(plane, second_key)).rows
    assert (ours.gpu_time_ms, ours.cost_micro_credits) == (HOUR_MS // 2, CREDIT)
    (own,) = (await usage(plane, second_key, group_by=L.USAGE_GROUPING_PROVIDER)).rows
    assert (own.provider_tenant_id, own.cost_micro_credits) == (second, CREDIT)
    # The consumer sees the whole job, the lost attempt naming nothing.
    (whole,) = (await usage(plane, plane.consumer_key)).rows
    assert (whole.gpu_time_ms, whole.provider_tenant_id) == (HOUR_MS // 2, second)
