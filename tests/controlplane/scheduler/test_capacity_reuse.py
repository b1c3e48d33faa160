"""A fleet whose capacity is slow to read keeps its scheduler's capacity index between cycles
(scheduler/service.py, capacity.reusable): cycles then place on the kept index, taking from
it what they place, and a GPU, host or price that changed since it was read is never placed
on (the allocation checks each against its row; the cycle rolls back and reads afresh)."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import types_pb2
from sqlalchemy import update

from controlplane.registry.models import Gpu, Host
from controlplane.scheduler import service
from controlplane.scheduler.service import Scheduler
from tests.controlplane.scheduler.test_service import check_allocations
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]
PRICE = 1_000_000


@pytest.fixture
def kept_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's kept index never ages out, however small the fleet: only a failed
    cycle (or a new term) reads the capacity again. The market view is left as it is."""
    monkeypatch.setattr(service, "reusable", lambda *read: True)


def scheduler_of(plane: JobPlane) -> Scheduler:
    scheduler = plane.plane.scheduler
    assert scheduler is not None
    return scheduler


async def set_host(plane: JobPlane, host_id: str, **values: object) -> None:
    """Changes the host's row as another replica would: this one is not told."""
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        await session.execute(update(Host).where(Host.id == host_id).values(**values))


async def still_queued(plane: JobPlane, job_id: str, cycles: int = 3) -> None:
    """Checks the job stays queued through `cycles` more scheduling cycles that saw it."""
    scheduler = scheduler_of(plane)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    for _ in range(cycles):
        seen = scheduler.last
        plane.plane.notifier.schedule.set()
        while scheduler.last is seen:
            assert (await plane.get(job_id)).state == types_pb2.JOB_STATE_QUEUED
            assert loop.time() < deadline, "no scheduling cycle saw the job"
            await asyncio.sleep(0.02)
    assert (await plane.get(job_id)).state == types_pb2.JOB_STATE_QUEUED


@pytest.mark.usefixtures("kept_index")
async def test_a_kept_index_places_without_reading_and_never_on_what_changed(
    plane: JobPlane,
) -> None:
    scheduler = scheduler_of(plane)
    host = await scripted_host(plane, gpus=6, price=2 * PRICE)
    try:
        spec = {"gpu_count": 1, "max_price_per_gpu_hour_micro_credits": 3 * PRICE}
        first = await plane.submit(**spec)
        assert (await host.next_dispatch()).job_id == first.job_id
        loads = scheduler.loads
        # The next placement plans on the kept index: no read, and not the GPU taken before.
        second = await plane.submit(**spec)
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == second.job_id
        assert scheduler.loads == loads
        held = await check_allocations(plane)
        assert len(held) == 2

        # The host's price fell behind this replica's back: the kept index still has the old
        # one, the allocation refuses it (the job would pay the old price), and the cycle is
        # planned again on a fresh read.
        await set_host(plane, host.host_id, price_per_gpu_hour=PRICE)
        third = await plane.submit(**spec)
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == third.job_id
        assert dispatch.price_per_gpu_hour_micro_credits == PRICE
        assert scheduler.loads > loads
        loads = scheduler.loads

        # A sick GPU: the kept index still offers it; the allocation refuses it.
        assert plane.plane.db is not None
        async with plane.plane.db.transaction() as session:
            await session.execute(
                update(Gpu)
                .where(Gpu.job_id.is_(None), Gpu.host_id == host.host_id)
                .values(healthy=False)
            )
        sick = await plane.submit(**spec)
        await still_queued(plane, sick.job_id)
        assert scheduler.loads > loads
        assert len(await check_allocations(plane)) == 3
        async with plane.plane.db.transaction() as session:
            await session.execute(update(Gpu).values(healthy=True))

        # The host left the schedulable states (a drain committed elsewhere): nothing more
        # is placed on it, though the kept index was read while it was online.
        scheduler.reset()  # the next cycle reads: the GPUs are healthy again in the index
        plane.plane.notifier.schedule.set()
        assert (await host.next_dispatch()).job_id == sick.job_id
        await set_host(plane, host.host_id, state="draining")
        loads = scheduler.loads
        drained = await plane.submit(**spec)
        await still_queued(plane, drained.job_id)
        assert scheduler.loads > loads
        assert len(await check_allocations(plane)) == 4
    finally:
        await host.close()


async def test_a_small_fleets_read_is_never_kept(plane: JobPlane) -> None:
    """A small fleet reads its capacity for every cycle that plans (as before reuse), however
    long its read took on a busy machine."""
    scheduler = scheduler_of(plane)
    host = await scripted_host(plane, gpus=4, price=PRICE)
    try:
        for _ in range(3):
            loads = scheduler.loads
            await plane.submit(gpu_count=1)
            await host.next_dispatch()
            assert scheduler.loads > loads
    finally:
        await host.close()


@pytest.mark.usefixtures("kept_index")
async def test_a_kept_index_places_no_gpu_less_job_on_a_host_that_left(plane: JobPlane) -> None:
    """A job asking for no GPU takes none to allocate: its host is checked on its own."""
    scheduler = scheduler_of(plane)
    host = await scripted_host(plane, gpus=2, price=PRICE)
    try:
        first = await plane.submit(gpu_count=1)
        assert (await host.next_dispatch()).job_id == first.job_id
        await set_host(plane, host.host_id, state="draining")
        loads = scheduler.loads
        cpu_only = await plane.submit(gpu_count=0)
        await still_queued(plane, cpu_only.job_id)
        assert scheduler.loads > loads  # planned on the kept index, refused, read again
        await set_host(plane, host.host_id, state="online")
        scheduler.reset()
        plane.plane.notifier.schedule.set()
        assert (await host.next_dispatch()).job_id == cpu_only.job_id
    finally:
        await host.close()
