"""The scheduler service on a real control plane (SQLite and PostgreSQL, NATS, S3) with
scripted hosts: concurrent submits never share a GPU, "why pending" and dry-run quotes are
exact for hand-built markets."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, types_pb2
from sqlalchemy import select

from controlplane.jobs.models import JobAttempt
from controlplane.registry.models import Gpu
from tests.controlplane.scheduler.planes import until
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

K = messaging_pb2
S = types_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]
SUBMITTED = "waiting for the scheduler"  # the reason a job has until a cycle looked at it


async def check_allocations(plane: JobPlane) -> dict[str, list[str]]:
    """The database's own view: every GPU is held by at most one live attempt, the GPU rows
    agree with the attempts, and an attempt's GPUs are all on its host."""
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        if not plane.plane.db.sqlite:
            # One snapshot for both reads (READ COMMITTED would let a placement committed
            # between them show GPUs busy for attempts not yet seen). SQLite's read
            # transaction is one snapshot already.
            await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        live = (await session.scalars(select(JobAttempt).where(JobAttempt.live.is_(True)))).all()
        gpus = {g.uuid: g for g in (await session.scalars(select(Gpu))).all()}
    held: dict[str, list[str]] = {}
    for attempt in live:
        for uuid in attempt.gpu_uuids:
            assert uuid not in held, f"{uuid} held by {held.get(uuid)} and {attempt.job_id}"
            held[uuid] = [attempt.job_id]
            assert gpus[uuid].host_id == attempt.host_id
            assert (gpus[uuid].job_id, gpus[uuid].attempt) == (attempt.job_id, attempt.attempt)
    busy = {u for u, g in gpus.items() if g.job_id is not None}
    assert busy == set(held)
    return held


async def test_concurrent_submits_never_share_a_gpu_and_respect_constraints(
    plane: JobPlane,
) -> None:
    hosts = [
        await scripted_host(plane, gpus=4, price=1_000_000),
        await scripted_host(plane, gpus=4, price=1_500_000, model="NVIDIA H100 80GB HBM3"),
        await scripted_host(plane, gpus=8, price=2_000_000),
    ]
    rng = random.Random(7)
    policies = [S.PLACEMENT_POLICY_CHEAPEST, S.PLACEMENT_POLICY_PACK, S.PLACEMENT_POLICY_SPREAD]
    specs = [
        {
            "gpu_count": rng.choice([1, 1, 2, 3, 4]),
            "gpu_models": rng.choice([[], [], ["h100"], ["a100"]]),
            "placement_policy": rng.choice(policies),
            "max_price_per_gpu_hour_micro_credits": rng.choice([2_000_000, 1_500_000]),
            "max_duration_seconds": 600,
        }
        for _ in range(30)
    ]
    try:
        jobs = await asyncio.gather(*(plane.submit(**s) for s in specs))
        deadline = time.monotonic() + 20
        while True:
            held = await check_allocations(plane)
            listed = [await plane.get(j.job_id) for j in jobs]
            placed = [j for j in listed if j.state != S.JOB_STATE_QUEUED]
            # Stable once every queued job has been explained (a cycle passed over it).
            waiting = [j for j in listed if j.state == S.JOB_STATE_QUEUED]
            if placed and all(j.state_reason != SUBMITTED for j in waiting):
                break
            assert time.monotonic() < deadline, f"{len(held)} GPUs held, {len(placed)} placed"
            await asyncio.sleep(0.1)
        by_host = {h.host_id: h for h in hosts}
        for job in placed:
            host = by_host[job.host_id]
            assert len(job.gpu_uuids) == job.spec.gpu_count
            assert set(job.gpu_uuids) <= {g.uuid for g in host.gpus()}
            limit = job.spec.max_price_per_gpu_hour_micro_credits
            assert job.price_per_gpu_hour_micro_credits <= limit
            for model in job.spec.gpu_models:
                assert model in host.model.lower()
        per_host = Counter(job.host_id for job in placed for _ in job.gpu_uuids)
        assert all(per_host[h.host_id] <= h.gpu_count for h in hosts)
        for job in waiting:
            assert job.state_reason.startswith("0 of 3 online hosts have "), job.state_reason
    finally:
        for host in hosts:
            await host.close()


async def test_why_pending_and_quotes_are_exact(plane: JobPlane) -> None:
    cheap = await scripted_host(plane, gpus=4, price=1_000_000)
    dear = await scripted_host(plane, gpus=8, price=3_000_000)
    try:
        quote = await dry_run(plane, gpu_count=2, max_price_per_gpu_hour_micro_credits=2_000_000)
        assert quote.explanation == (
            f"can start now on {cheap.host_id} at 1.000000 credits per GPU-hour"
        )
        assert [(o.host_id, o.free_gpu_count) for o in quote.offers] == [(cheap.host_id, 4)]
        assert quote.matching_host_count == 1
        assert quote.estimated_start.seconds > 0

        quote = await dry_run(plane, gpu_count=8, max_price_per_gpu_hour_micro_credits=2_500_000)
        assert quote.explanation == (
            "0 of 2 online hosts have 8×GPU free; "
            "1 has too few matching GPUs; 1 would fit but exceeds max_price_per_gpu_hour"
        )
        assert not quote.HasField("estimated_start")
        assert (quote.matching_host_count, list(quote.offers)) == (0, [])

        # Fill the cheap host for 600 s: a 4-GPU job then waits, and the quote says when.
        running = await plane.submit(gpu_count=4, max_duration_seconds=600)
        dispatch = await cheap.next_dispatch()
        await cheap.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await cheap.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        started = (await plane.wait_for(running.job_id, [S.JOB_STATE_RUNNING])).started_at
        quote = await dry_run(plane, gpu_count=4, max_price_per_gpu_hour_micro_credits=2_000_000)
        assert quote.explanation == (
            "0 of 2 online hosts have 4×GPU free; "
            "1 would fit but exceeds max_price_per_gpu_hour; "
            "1 lacks enough free matching GPUs right now; "
            f"earliest start on {cheap.host_id} when its running jobs reach their "
            "max_duration, unless queued jobs take it first"
        )
        assert abs(quote.estimated_start.seconds - (started.seconds + 600)) <= 1

        waiting = await plane.submit(gpu_count=4, max_price_per_gpu_hour_micro_credits=2_000_000)
        deadline = time.monotonic() + 10
        while (job := await plane.get(waiting.job_id)).state_reason == SUBMITTED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert job.state == S.JOB_STATE_QUEUED
        assert job.state_reason == (
            "0 of 2 online hosts have 4×GPU free; "
            "1 would fit but exceeds max_price_per_gpu_hour; "
            "1 lacks enough free matching GPUs right now"
        )
        for job_id in (running.job_id, waiting.job_id):
            await plane.jobs.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job_id), metadata=plane.auth(plane.consumer_key)
            )
    finally:
        await cheap.close()
        await dear.close()


async def dry_run(plane: JobPlane, **spec: Any) -> jobs_pb2.Quote:
    spec.setdefault("image", "gpuplane-test/busybox:1")
    spec.setdefault("max_duration_seconds", 600)
    reply = await plane.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=types_pb2.JobSpec(**spec), dry_run=True),
        metadata=plane.auth(plane.consumer_key),
    )
    assert not reply.HasField("job")
    return reply.quote


async def test_a_cycle_that_took_the_last_free_gpu_asks_for_no_second_at_once(
    plane: JobPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a cycle that placed jobs, the scheduler runs another at once only while GPUs are
    free (jobs past the cycle's window could use them); with every GPU taken it waits for a
    wake-up instead of planning the whole queue again for nothing."""
    assert plane.plane.background is not None
    scheduler = plane.plane.background.scheduler
    placing: list[tuple[int, bool]] = []
    run_once = scheduler.run_once

    async def recorded() -> int:
        placed = await run_once()
        if placed:
            placing.append((placed, scheduler.more))
        return placed

    async def queued(jobs: list[Any]) -> list[bool]:
        return [(await plane.get(j.job_id)).state == S.JOB_STATE_QUEUED for j in jobs]

    async def any_placed(jobs: list[Any]) -> bool:
        return not all(await queued(jobs))

    monkeypatch.setattr(scheduler, "run_once", recorded)
    host = await scripted_host(plane, gpus=2, price=1_000_000)
    spec: dict[str, Any] = {"gpu_count": 1, "max_duration_seconds": 600}
    try:
        first = await plane.submit(**spec)
        await until(lambda: any_placed([first]), 20, "the first job was placed")
        assert placing == [(1, True)]  # one GPU still free
        rest = [await plane.submit(**spec) for _ in range(3)]
        await until(lambda: any_placed(rest), 20, "a second job was placed")
        assert placing[1:] == [(1, False)], placing  # the last GPU taken
        # The other two wait for a GPU, and no later cycle places anything.
        await asyncio.sleep(1.0)
        assert (await queued(rest)).count(True) == 2
        assert len(placing) == 2, placing
    finally:
        await host.close()
