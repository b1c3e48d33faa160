"""Scheduler figures: pure placement decisions/s on the in-memory index (10,000 hosts × 8 GPUs,
100,000 queued jobs), and jobs placed and published/s through the whole control plane
(PostgreSQL transaction + outbox + JetStream) against the raw JetStream publish floor."""

from __future__ import annotations

import asyncio
import random
import time

import nats
from gpuplane.v1 import types_pb2
from nats.js import JetStreamContext

from bench.registry import Measurement, RunContext, benchmark
from controlplane.auth.models import Tenant
from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.jobs.models import Job
from controlplane.jobs.notify import Notifier
from controlplane.outbox.relay import OutboxRelay
from controlplane.registry.models import Gpu, Host
from controlplane.scheduler.demand import Demand
from controlplane.scheduler.fairshare import FairShare
from controlplane.scheduler.index import CapacityIndex, HostEntry
from controlplane.scheduler.planner import plan_cycle
from controlplane.scheduler.service import Scheduler
from messaging.subjects import DISPATCH_STREAM, ensure_streams

GIB = 1 << 30
HOSTS = 10_000
GPUS_PER_HOST = 8
QUEUED = 100_000
TARGET_DECISIONS = 10_000
TARGET_PUBLISHED = 1_500
PLACED_HOSTS = 500
MODELS = (
    ("NVIDIA H100 80GB HBM3", 80 * GIB, "9.0"),
    ("NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0"),
    ("NVIDIA A100-SXM4-40GB", 40 * GIB, "8.0"),
    ("NVIDIA L4", 24 * GIB, "8.9"),
    ("NVIDIA GeForce RTX 4090", 24 * GIB, "8.9"),
)


def market(seed: int = 1) -> tuple[CapacityIndex, list[Demand]]:
    """A marketplace of HOSTS hosts (one model each, prices, locations, labels, reliability)
    and QUEUED jobs of mixed shapes, constraints, policies, priorities and 20 tenants."""
    rng = random.Random(seed)
    index = CapacityIndex()
    for n in range(HOSTS):
        gpu_class = index.gpu_class(*rng.choice(MODELS))
        host = HostEntry(
            f"host-{n:05d}",
            rng.randrange(500_000, 4_000_000, 10_000),
            rng.choice(["eu-west", "us-east", "ap-south", ""]),
            {"tier": rng.choice(["a", "b"])},
            False,
            rng.randrange(900, 1001),
            verified=True,
        )
        host.free = {gpu_class.id: [f"host-{n:05d}-gpu{i}" for i in range(GPUS_PER_HOST)]}
        index.add_host(host)
    now = time.time()
    jobs = [
        Demand(
            job_id=f"job-{n:06d}",
            tenant_id=f"tenant-{rng.randrange(20)}",
            priority=rng.choice([0, 0, 0, 1]),
            gpu_count=rng.choice([1, 1, 1, 2, 2, 4, 8]),
            gpu_models=rng.choice([(), (), ("h100",), ("a100",), ("l4", "4090")]),
            min_vram_bytes=rng.choice([0, 0, 40 * GIB]),
            min_cc=(0, 0),
            max_price=rng.choice([0, 0, 3_000_000, 1_000_000]),
            locations=frozenset({"eu-west"}) if rng.random() < 0.2 else frozenset(),
            host_labels=(("tier", "a"),) if rng.random() < 0.1 else (),
            exclude=frozenset(),
            allow_simulated=False,
            policy=rng.choice([1, 2, 3, 4]),
            max_duration_s=3600.0,
            queued_since=now - rng.uniform(0, 60),
        )
        for n in range(QUEUED)
    ]
    return index, jobs


@benchmark(
    "placement_decisions",
    unit="decisions/s",
    better="higher",
    minimum=TARGET_DECISIONS,
    description=f"pure scheduling decisions/s: one cycle over {QUEUED:,} queued jobs (mixed "
    f"shapes, constraints, 4 policies, 20 tenants) on {HOSTS:,} hosts × {GPUS_PER_HOST} GPUs "
    f"in memory, fair share and reservations on (target ≥ {TARGET_DECISIONS:,})",
)
async def placement_decisions(ctx: RunContext) -> Measurement:
    index, jobs = await asyncio.to_thread(market)
    started = time.perf_counter()
    plan = await asyncio.to_thread(plan_cycle, index, jobs, FairShare(), {}, time.time())
    seconds = time.perf_counter() - started
    rate = plan.decisions / seconds
    return Measurement(
        rate,
        {
            "decisions": plan.decisions,
            "placed": len(plan.placed),
            "gpus_left_free": index.free_total,
            "explained": len(plan.reasons),
            "reservations": len(plan.reservations),
            "cycle_s": round(seconds, 2),
        },
    )


async def _dispatch_messages(js: JetStreamContext) -> int:
    return int((await js.stream_info(DISPATCH_STREAM)).state.messages)


async def _queued_market(db: Database, hosts: int, tenants: int) -> int:
    """Online hosts × 8 free GPUs and as many queued 1-GPU jobs, written straight to the
    database (set-up, untimed); returns the job count."""
    now = utcnow()
    spec = types_pb2.JobSpec(
        image="gpuplane-test/busybox:1",
        command=["true"],
        gpu_count=1,
        max_duration_seconds=60,
        allow_simulated=True,
        allow_unverified=True,
    ).SerializeToString()
    count = hosts * GPUS_PER_HOST
    async with db.transaction() as session:
        session.add_all(
            [Tenant(id=f"bench-t{n}", name=f"bench-t{n}", created_at=now) for n in range(tenants)]
        )
        session.add(Tenant(id="bench-provider", name="bench-provider", created_at=now))
        await session.flush()
        session.add_all(
            Host(
                id=f"bench-h{n}",
                provider_tenant_id="bench-provider",
                machine_id=f"bench-m{n}",
                hostname=f"bench-{n}",
                state="online",
                simulated=True,
                price_per_gpu_hour=2_000_000,
                credential_hash=f"bench-{n}",
            )
            for n in range(hosts)
        )
        await session.flush()
        session.add_all(
            Gpu(
                uuid=f"bench-h{h}-gpu{g}",
                host_id=f"bench-h{h}",
                index=g,
                name="NVIDIA A100-SXM4-80GB",
                memory_total_bytes=80 * GIB,
                compute_capability="8.0",
            )
            for h in range(hosts)
            for g in range(GPUS_PER_HOST)
        )
        session.add_all(
            Job(
                id=f"bench-j{n:06d}",
                tenant_id=f"bench-t{n % tenants}",
                spec=spec,
                state="queued",
                state_reason="waiting for the scheduler",
                attempt=1,
                gpu_count=1,
                created_at=now,
                updated_at=now,
            )
            for n in range(count)
        )
    return count


@benchmark(
    "jobs_placed_published",
    unit="jobs/s",
    better="higher",
    floor="jetstream_publish",
    target=TARGET_PUBLISHED / 4000,
    minimum=TARGET_PUBLISHED,
    description=f"queued 1-GPU jobs placed (scheduling cycles: PostgreSQL transaction with "
    f"outbox rows) and their dispatch messages published to JetStream by the outbox relay, "
    f"per second: {PLACED_HOSTS} online hosts × {GPUS_PER_HOST} GPUs, as many jobs from "
    f"8 tenants (target ≥ {TARGET_PUBLISHED:,} jobs/s)",
)
async def jobs_placed_published(ctx: RunContext) -> Measurement:
    cluster = await ctx.resources.postgres()
    name = await asyncio.to_thread(cluster.create_database, "bench_placement")
    url = cluster.url(name)
    await asyncio.to_thread(migrate.upgrade, url)
    nats_server = await ctx.resources.nats()
    connection = await nats.connect(nats_server.url)
    db = Database(url)
    try:
        js = connection.jetstream()
        await ensure_streams(js)
        count = await _queued_market(db, PLACED_HOSTS, 8)
        scheduler = Scheduler(db, Notifier(), "gpuplane")
        relay = OutboxRelay(db, js)
        before = await _dispatch_messages(js)
        placing_done = asyncio.Event()

        async def relay_loop() -> None:
            while True:
                if not await relay.run_once():
                    if placing_done.is_set():
                        return
                    await asyncio.sleep(0.005)

        started = time.perf_counter()
        relaying = asyncio.create_task(relay_loop())
        placed = cycles = 0
        while placed < count:
            cycles += 1
            placed += await scheduler.run_once()
            if cycles > 1000:
                raise RuntimeError(f"only {placed} of {count} placed")
        placed_at = time.perf_counter() - started
        placing_done.set()
        await asyncio.wait_for(relaying, 60)
        seconds = time.perf_counter() - started
        published = await _dispatch_messages(js) - before
        if published != count:
            raise RuntimeError(f"{published} of {count} dispatches in the stream")
    finally:
        await connection.close()
        await db.close()
    rate = count / seconds
    return Measurement(
        rate,
        {
            "jobs": count,
            "cycles": cycles,
            "placed_in_s": round(placed_at, 2),
            "published_in_s": round(seconds, 2),
        },
    )
