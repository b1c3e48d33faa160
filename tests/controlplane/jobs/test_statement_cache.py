"""Every statement a job's hot path runs has a cache key, so SQLAlchemy compiles it once per
process, not on every call: submit, placement, RUNNING and FINISHED reports (settlement), a
cancel, reads of the job and the caller's balance, each run once to fill the cache and then
counted. A statement without a key (a multi-row VALUES, a literal list) is compiled on every
execution: the job's insert with its first event as a list of one cost each submit about
1 ms of CPU that way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.engine.interfaces import CacheStats

from devstack.factories import new_gpus, new_online_host
from tests.controlplane.jobs.test_report_batches import PRICE, _finished, _jobs, _running
from tests.harness import JobPlane

pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.plane(heartbeat_timeout_ms=600_000),
    pytest.mark.timeout(120),
]


@contextmanager
def uncacheable(plane: JobPlane) -> Iterator[list[str]]:
    """The statements executed meanwhile (on the plane's writer engine) that have no cache
    key or missed the cache (a key that differs on every call, or one not run before): each
    one's SQL, abridged."""
    assert plane.plane.db is not None
    engine = plane.plane.db.engine.sync_engine
    found: list[str] = []

    def seen(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: DefaultExecutionContext | None,
        executemany: bool,
    ) -> None:
        if context is not None and context.cache_hit in (
            CacheStats.NO_CACHE_KEY,
            CacheStats.CACHE_MISS,
        ):
            if context.compiled is not None:  # not a driver-level or text-only call
                found.append(f"{context.cache_hit.name}: {' '.join(statement.split())[:200]}")

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", seen)


async def test_the_job_path_runs_only_statements_sqlalchemy_can_cache(plane: JobPlane) -> None:
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(4), price_per_gpu_hour_micro_credits=PRICE
    )
    await _job_path(plane, host.host_id)  # every statement's first run (compiled, cached)
    with uncacheable(plane) as found:
        await _job_path(plane, host.host_id)
    assert found == []


async def _job_path(plane: JobPlane, host_id: str) -> None:
    """Two jobs submitted, placed, RUNNING and FINISHED (settled); one queued and cancelled;
    the jobs and the caller's balance read."""
    jobs = await _running(plane, host_id, 2)
    for job_id in jobs:
        assert await _jobs(plane).apply_report(_finished(job_id, host_id, 1000), host_id)
    queued = await plane.submit(gpu_count=64, max_duration_seconds=60)
    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=queued.job_id, reason="changed my mind"),
        metadata=plane.auth(),
    )
    await plane.wait_for(queued.job_id, [types_pb2.JOB_STATE_CANCELLED])
    for job_id in jobs:
        assert (await plane.get(job_id)).charged_micro_credits == 1000
    await plane.balance(plane.consumer_tenant)
