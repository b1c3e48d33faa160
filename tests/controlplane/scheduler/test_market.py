"""The market view holds are priced on: the dearest matching offer on a hand-built index, and
how old a view submits may use before the database is read again."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.scheduler.capacity import REUSE_FACTOR, REUSE_MIN_HOSTS
from controlplane.scheduler.demand import demand_of
from controlplane.scheduler.index import CapacityIndex, HostEntry
from controlplane.scheduler.market import Market, MarketView
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

GIB = 1 << 30


def hand_built() -> MarketView:
    index = CapacityIndex()
    a100 = index.gpu_class("NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0")
    l4 = index.gpu_class("NVIDIA L4", 24 * GIB, "8.9")
    hosts = [
        # id, price, class, free, busy, location, simulated
        ("cheap-a100", 1, a100, 4, 0, "eu", False),
        ("busy-a100", 5, a100, 0, 8, "us", False),
        ("dear-l4", 9, l4, 2, 0, "eu", False),
        ("sim-a100", 20, a100, 8, 0, "eu", True),
    ]
    for host_id, price, gpu_class, free, busy, location, simulated in hosts:
        entry = HostEntry(host_id, price, location, {}, simulated, verified=not simulated)
        entry.free[gpu_class.id] = [f"{host_id}-{i}" for i in range(free)]
        entry.busy_until[gpu_class.id] = [0.0] * busy
        index.add_host(entry)
    return MarketView.of(index, 0.0)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"gpu_count": 1}, 9),  # any model: the L4 host is dearest (simulated ones excluded)
        ({"gpu_count": 1, "allow_simulated": True, "allow_unverified": True}, 20),
        ({"gpu_count": 1, "allow_simulated": True}, 9),  # simulated hosts are never verified
        ({"gpu_count": 1, "allow_unverified": True}, 9),
        ({"gpu_count": 1, "gpu_models": ["a100"]}, 5),  # busy GPUs match too
        ({"gpu_count": 8, "gpu_models": ["a100"]}, 5),
        ({"gpu_count": 9}, None),  # no host has 9 GPUs of one class
        ({"gpu_count": 1, "min_vram_gib": 40}, 5),
        ({"gpu_count": 1, "locations": ["eu"], "gpu_models": ["a100"]}, 1),
        ({"gpu_count": 1, "max_price_per_gpu_hour_micro_credits": 4}, 1),
        ({"gpu_count": 1, "exclude_host_ids": ["dear-l4", "busy-a100"]}, 1),
        ({"gpu_count": 0}, 9),  # CPU only: any host passing the host constraints
        ({"gpu_count": 1, "host_labels": {"rack": "7"}}, None),
    ],
)
def test_dearest_match_is_the_highest_price_among_hosts_that_could_take_the_job(
    fields: dict[str, object], expected: int | None
) -> None:
    demand = demand_of("", "", types_pb2.JobSpec(**fields), 0.0)  # type: ignore[arg-type]
    assert hand_built().dearest_match(demand) == expected


@pytest.mark.timeout(60)
async def test_submits_use_a_recent_view_and_reload_a_stale_one(plane: JobPlane) -> None:
    assert plane.plane.db is not None
    now = [1000.0]
    market = Market(plane.plane.db, fresh_seconds=1.0, stale_seconds=5.0, clock=lambda: now[0])
    spec = types_pb2.JobSpec(gpu_count=1, allow_simulated=True, allow_unverified=True)
    try:
        empty = await market.view()
        assert await market.dearest_match(spec) is None
        host = await scripted_host(plane, gpus=2, price=3_000_000)
        try:
            now[0] += 0.5  # fresh: used as it is, no read
            assert await market.view() is empty
            now[0] += 1.0  # past fresh, within stale: used while a reload runs behind it
            assert await market.view() is empty
            background = market._background
            assert background is not None
            reloaded = await background
            assert await market.view() is reloaded
            assert await market.dearest_match(spec) == 3_000_000
            now[0] += 10.0  # past stale: read before use
            read = await market.view()
            assert read is not reloaded
            assert read.loaded_at == now[0]
            market.invalidate()  # a host connected to this process: read at once
            assert await market.view() is not read
            # Concurrent readers after an invalidation share one load.
            market.invalidate()
            views = await asyncio.gather(*(market.view() for _ in range(5)))
            assert len({id(v) for v in views}) == 1
        finally:
            await host.close()
    finally:
        await market.close()


@pytest.mark.timeout(60)
async def test_quotes_read_again_only_after_gpus_changed_here(plane: JobPlane) -> None:
    """A quote shows free GPUs: it waits for a view loaded after the last placement or end of
    an attempt on this replica (`touched`), else it uses the view as submits do, so quoting
    costs no database read per request while GPUs stay as they are."""
    assert plane.plane.db is not None
    now = [1000.0]
    market = Market(plane.plane.db, fresh_seconds=1.0, stale_seconds=5.0, clock=lambda: now[0])
    try:
        first = await market.quote_view()
        now[0] += 0.5
        assert await market.quote_view() is first  # fresh and nothing changed: no read
        now[0] += 1.0
        assert await market.quote_view() is first  # past fresh: served, reloaded behind it
        background = market._background
        assert background is not None
        behind = await background
        market.touched()  # a placement here: the next quote reads, whatever the view's age
        now[0] += 0.01
        touched = await market.quote_view()
        assert touched is not behind
        assert touched.loaded_at >= now[0]
        assert await market.quote_view() is touched
        market.touched()
        now[0] += 0.1
        views = await asyncio.gather(*(market.quote_view() for _ in range(5)))
        assert len({id(v) for v in views}) == 1  # concurrent quotes share one read
        assert views[0] is not touched
        assert await market.view() is views[0]  # submits see the same view
    finally:
        await market.close()


@pytest.mark.timeout(60)
async def test_a_placement_shows_in_the_next_quote(plane: JobPlane) -> None:
    """The scheduler taking GPUs tells the market (Notifier.gpus_changed): a quote right
    after a job started counts the GPUs it took as busy."""
    host = await scripted_host(plane, gpus=2, price=1_000_000)
    try:
        spec = {"gpu_count": 1, "allow_simulated": True, "allow_unverified": True}
        before = await quote(plane, **spec)
        assert [(o.host_id, o.free_gpu_count) for o in before.offers] == [(host.host_id, 2)]
        job = await plane.submit(gpu_count=1)
        await host.next_dispatch()
        assert (await plane.get(job.job_id)).state != types_pb2.JOB_STATE_QUEUED
        after = await quote(plane, **spec)
        assert [(o.host_id, o.free_gpu_count) for o in after.offers] == [(host.host_id, 1)]
    finally:
        await host.close()


async def quote(plane: JobPlane, **spec: object) -> jobs_pb2.Quote:
    request = jobs_pb2.SubmitJobRequest(
        spec=types_pb2.JobSpec(
            image="gpuplane-test/busybox:1",
            max_duration_seconds=600,
            **spec,  # type: ignore[arg-type]
        ),
        dry_run=True,
    )
    reply = await plane.jobs.SubmitJob(request, metadata=plane.auth(plane.consumer_key))
    return reply.quote


@pytest.mark.timeout(60)
async def test_a_slow_view_is_quoted_for_ten_reads_of_its_age_though_gpus_changed(
    plane: JobPlane,
) -> None:
    """Where reading the market is slow (REUSE_MIN_HOSTS hosts or more), a stream of
    placements must not make every quote reread it, nor wait for a read: such a view is quoted
    until it is REUSE_FACTOR read-times old, changes or not, then while a new one loads behind
    it (up to STALE_SECONDS old); a small fleet's view is reread before the quote. Submits use
    a large fleet's view as fresh for as long, even after a host connected."""
    assert plane.plane.db is not None
    now = [1000.0]
    market = Market(plane.plane.db, fresh_seconds=100.0, stale_seconds=500.0, clock=lambda: now[0])
    try:
        slow = MarketView.of(large_fleet(), now[0], load_seconds=0.1)
        market._view = slow
        market.touched()
        now[0] += REUSE_FACTOR * slow.load_seconds - 0.01
        assert await market.quote_view() is slow  # recent for its cost: no read
        assert market._background is None
        now[0] += 0.02
        # Old for its cost and GPUs changed: still quoted, while a read runs behind it.
        assert await market.quote_view() is slow
        background = market._background
        assert background is not None
        reread = await background
        assert reread is not slow
        assert not reread.slow  # this plane's few hosts
        market.touched()
        now[0] += 0.01
        assert await market.quote_view() is not reread  # a small fleet's view is reread first
        slow = MarketView.of(large_fleet(), now[0], load_seconds=0.1)
        market._view = slow
        market.touched()
        now[0] += 500.0  # past STALE_SECONDS: the quote waits for a read
        assert await market.quote_view() is not slow
    finally:
        await market.close()
    # Submits too use a slow view as fresh for ten reads of its age (no reload behind it).
    market = Market(plane.plane.db, fresh_seconds=1.0, stale_seconds=5.0, clock=lambda: now[0])
    try:
        slow = MarketView.of(large_fleet(), now[0], load_seconds=0.2)
        market._view = slow
        now[0] += 1.5  # past fresh, within 10 × 0.2 s
        assert await market.view() is slow
        assert market._background is None
        market.invalidate()  # a host connected: a slow view is kept while it may be reused
        assert await market.view() is slow
        now[0] += 0.6  # past both: served while a reload runs behind it
        assert await market.view() is slow
        assert market._background is not None
        assert await market._background is not slow
    finally:
        await market.close()


def large_fleet() -> CapacityIndex:
    """An index of REUSE_MIN_HOSTS hosts (no GPUs needed: their number is what counts)."""
    index = CapacityIndex()
    for n in range(REUSE_MIN_HOSTS):
        index.add_host(HostEntry(f"host-{n}", 1, "eu", {}, False, verified=True))
    return index
