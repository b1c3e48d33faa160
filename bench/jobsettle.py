"""Settlement on the job path: running jobs' FINISHED reports applied through the JobService's
own apply_report (the job's transaction: states, GPUs, host, the hold settled by
ledger/holds.py) on PostgreSQL by 32 concurrent clients; every job checked charged once."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy import text

from bench.ledger import _deadlocks, _ms
from bench.machine import busy_seconds, cpu_ticks, per_item_us, postgres_seconds, steal_percent
from bench.registry import Measurement, RunContext, benchmark
from controlplane.db.engine import Database
from controlplane.jobs.service import JobService
from controlplane.ledger.service import LedgerService
from controlplane.server import ControlPlane
from controlplane.settings import Settings
from devstack.factories import Client, new_gpus, new_job, new_online_host, new_tenant
from devstack.factories import new_token as new_registration_token

Kind = messaging_pb2.JobReportKind
CLIENTS = 32
# Jobs are made and settled in rounds of up to ROUND (a fleet of 8 hosts × 64 GPUs) until
# the settlements have taken --duration; a short duration makes smaller rounds.
ROUND = 512
JOBS_PER_SECOND = 2000
MIN_JOBS = 64
GPUS_PER_HOST = 64
PRICE = 3_600_000  # micro-credits per GPU-hour: 1 micro-credit per ms
RUN_TIME_MS = 60_000  # what each job reports: a charge of 60,000 micro-credits
SETUP_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class Attempt:
    job_id: str
    attempt: int
    host_id: str


def round_size(duration: float) -> int:
    """Jobs per round: ROUND, fewer for a duration too short to need as many."""
    return max(MIN_JOBS, min(ROUND, int(JOBS_PER_SECOND * duration)))


async def _gather_limited(
    items: Sequence[object], work: Callable[[int], Awaitable[object]], limit: int
) -> None:
    """Runs work(i) for every index of `items`, `limit` at a time."""
    queue = list(range(len(items)))

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    await asyncio.gather(*(worker() for _ in range(limit)))


@dataclass(frozen=True, slots=True)
class Plane:
    """The running plane's database and JobService, and a client of its gRPC API."""

    db: Database
    jobs: JobService
    client: Client
    # The PostgreSQL cluster's data directory (its CPU is read from its processes).
    pg_data: Path


@asynccontextmanager
async def _plane(ctx: RunContext, database: str) -> AsyncIterator[Plane]:
    """An in-process control plane on its own PostgreSQL database (its JobService is what
    the figure drives). Hosts never heartbeat here, so liveness and the dispatch timeout are
    set past the run."""
    cluster = await ctx.resources.postgres()
    nats = await ctx.resources.nats()
    s3 = await ctx.resources.s3()
    name = await asyncio.to_thread(cluster.create_database, database)
    hour_ms = 3_600_000
    settings = Settings(
        data_dir=ctx.workdir / database,
        database_url=cluster.url(name),
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        nats_url=nats.url,
        s3_endpoint=s3.endpoint,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        heartbeat_timeout_ms=hour_ms,
        dispatch_ack_timeout_ms=hour_ms,
        scheduler_interval_ms=50,
        allow_simulated_by_default=True,
        allow_unverified_by_default=True,  # simulated hosts are never verified
        # The reports claim a minute of run time at once: the clock bound (jobs/clock.py)
        # would cap them; settlement is what is measured here.
        run_time_slack_ms=86_400_000,
        allow_plaintext=True,
    )
    plane = ControlPlane(settings)
    await plane.start()
    try:
        assert plane.admin_key_file is not None
        assert plane.db is not None
        assert plane.jobs is not None
        admin_key = Path(plane.admin_key_file).read_text().strip()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            yield Plane(plane.db, plane.jobs, Client(channel, admin_key), cluster.data_dir)
    finally:
        await plane.stop(grace=0)


async def fleet(plane: Plane, gpus: int) -> str:
    """A funded consumer and a provider with enough 64-GPU hosts for `gpus` 1-GPU jobs at
    once, registered as daemons register; the consumer's key."""
    client = plane.client
    consumer = await new_tenant(client, "bench-consumer", micro_credits=10**15)
    provider = await new_tenant(client, "bench-provider", types_pb2.ROLE_PROVIDER)
    hosts = math.ceil(gpus / GPUS_PER_HOST)
    token = await new_registration_token(client, provider.tenant_id, max_uses=hosts)
    for n in range(hosts):
        await new_online_host(
            client.channel,
            token.secret,
            gpus=new_gpus(GPUS_PER_HOST, prefix=f"b{n}"),
            price_per_gpu_hour_micro_credits=PRICE,
        )
    return consumer.key


async def running_jobs(plane: Plane, consumer_key: str, count: int) -> list[Attempt]:
    """`count` RUNNING 1-GPU jobs made as clients and daemons make them: SubmitJob, the
    scheduler's placement on the fleet's free GPUs, then each attempt's RUNNING report
    through apply_report."""
    client = plane.client

    async def submit(_: int) -> None:
        await new_job(
            client,
            consumer_key,
            gpu_count=1,
            max_duration_seconds=3600,
            max_price_per_gpu_hour_micro_credits=PRICE,
        )

    await _gather_limited(range(count), submit, SETUP_CONCURRENCY)
    attempts = await _placed(plane.db, count)
    running = [_report(a, Kind.JOB_REPORT_KIND_RUNNING, seq=1) for a in attempts]

    async def run(i: int) -> None:
        if not await plane.jobs.apply_report(running[i], running[i].host_id):
            raise RuntimeError(f"RUNNING report of {running[i].job_id} not applied")

    await _gather_limited(running, run, SETUP_CONCURRENCY)
    await _outbox_drained(plane.db)
    return attempts


async def _placed(db: Database, count: int, timeout: float = 120.0) -> list[Attempt]:
    """Waits for the scheduler to place all `count` jobs; their attempts."""
    deadline = time.monotonic() + timeout
    while True:
        async with db.read() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT a.job_id, a.attempt, a.host_id FROM job_attempts a "
                        "JOIN jobs j ON j.id = a.job_id AND j.attempt = a.attempt "
                        "WHERE j.state = 'scheduled'"
                    )
                )
            ).all()
        if len(rows) == count:
            return [Attempt(*row) for row in rows]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(rows)} of {count} jobs placed in {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def _outbox_drained(db: Database, timeout: float = 120.0) -> None:
    """Waits until the relay published every dispatch, so the run measures settlement alone."""
    deadline = time.monotonic() + timeout
    while True:
        async with db.read() as session:
            left = await session.scalar(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            )
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} dispatches still unpublished")
        await asyncio.sleep(0.2)


def _report(attempt: Attempt, kind: int, seq: int) -> messaging_pb2.JobReport:
    report = messaging_pb2.JobReport(
        job_id=attempt.job_id,
        attempt=attempt.attempt,
        host_id=attempt.host_id,
        seq=seq,
        kind=kind,  # type: ignore[arg-type]
    )
    if kind == Kind.JOB_REPORT_KIND_FINISHED:
        report.exit_code = 0
        report.run_time_ms = RUN_TIME_MS
        report.stop_reason = messaging_pb2.STOP_REASON_COMPLETED
    return report


async def settle_jobs(
    plane: Plane, attempts: Sequence[Attempt], clients: int
) -> tuple[float, list[float]]:
    """Applies every attempt's FINISHED report, `clients` at a time; (seconds, latencies)."""
    queue = [_report(a, Kind.JOB_REPORT_KIND_FINISHED, seq=2) for a in reversed(attempts)]
    latencies: list[float] = []

    async def client() -> None:
        while queue:
            report = queue.pop()
            started = time.perf_counter()
            if not await plane.jobs.apply_report(report, report.host_id):
                raise RuntimeError(f"FINISHED report of {report.job_id} not applied")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, latencies


async def check_charged_once(db: Database, attempts: Sequence[Attempt]) -> None:
    """Every job SUCCEEDED and charged exactly its cost once (one CHARGE and one FEE
    transfer, the hold posted with the rest released), each attempt counted once by its
    host, and the ledger balances (the bench's plane ran these jobs alone)."""
    ids = {a.job_id for a in attempts}
    async with db.read() as session:
        jobs = (await session.execute(text("SELECT id, state, charged FROM jobs"))).all()
        charges = (
            await session.execute(
                text(
                    "SELECT job_id, kind, count(*), sum(amount) FROM transfers "
                    "WHERE kind IN ('charge', 'fee', 'release') GROUP BY job_id, kind"
                )
            )
        ).all()
        holds = (await session.execute(text("SELECT job_id, state FROM holds"))).all()
        completed = await session.scalar(text("SELECT sum(completed_attempts) FROM hosts"))
    ours = [j for j in jobs if j.id in ids]
    wrong = [j for j in ours if j.state != "succeeded" or j.charged != RUN_TIME_MS]
    if wrong or len(ours) != len(ids):
        raise RuntimeError(f"{len(wrong)} jobs not SUCCEEDED, {RUN_TIME_MS} charged: {wrong[:3]}")
    per_job: dict[str, dict[str, tuple[int, int]]] = {}
    for job_id, kind, number, amount in charges:
        per_job.setdefault(job_id, {})[kind] = (number, amount)
    for job_id in ids:
        moves = per_job.get(job_id, {})
        counts = {kind: moves.get(kind, (0, 0))[0] for kind in ("charge", "fee", "release")}
        total = moves.get("charge", (0, 0))[1] + moves.get("fee", (0, 0))[1]
        if counts != {"charge": 1, "fee": 1, "release": 1} or total != RUN_TIME_MS:
            raise RuntimeError(f"job {job_id} charged {moves}, not once {RUN_TIME_MS}")
    if any(state != "posted" for job_id, state in holds if job_id in ids):
        raise RuntimeError("a settled job's hold is not posted")
    if completed != len(ids):  # the hosts' reliability counts every attempt once
        raise RuntimeError(f"hosts count {completed} completed attempts, not {len(ids)}")
    report = await LedgerService(db).check()
    if not report.consistent:
        raise RuntimeError(f"ledger inconsistent after the run: {report}")


@benchmark(
    "job_settlements_per_s",
    unit="settle/s",
    better="higher",
    floor="pg_tx",
    minimum=3000,  # issue #16's target, as for settlements_per_s
    description=f"jobs settled per second on the job path: rounds of up to {ROUND} RUNNING "
    "1-GPU jobs (made by SubmitJob, RegisterHost and the scheduler, untimed) get their "
    "FINISHED report through JobService.apply_report (the job's transaction: states, GPUs, "
    f"host, the hold settled) from {CLIENTS} concurrent clients, in-process control plane on "
    "PostgreSQL, until the settlements took --duration; afterwards every job is checked "
    "SUCCEEDED and charged exactly once and the ledger balanced; details: p50/p99, process "
    "CPU, the bench's PostgreSQL's CPU and machine CPU (all processes) per settlement, "
    "deadlocks (any fails it)",
)
async def job_settlements_per_s(ctx: RunContext) -> Measurement:
    async with _plane(ctx, "bench_job_settle") as plane:
        size = round_size(ctx.duration)
        consumer_key = await fleet(plane, size)
        # Untimed set-up between rounds; the rounds stop once the settlements took
        # --duration, or when another round might not fit the benchmark's time.
        give_up = time.monotonic() + ctx.duration * 2 + 60
        settled: list[Attempt] = []
        seconds, latencies, cpu = 0.0, [], 0.0
        busy: float | None = 0.0 if busy_seconds() is not None else None
        postgres: float | None = 0.0 if postgres_seconds(plane.pg_data) is not None else None
        deadlocks_before = await _deadlocks(plane.db)
        ticks = cpu_ticks()
        while not settled or (seconds < ctx.duration and time.monotonic() < give_up):
            attempts = await running_jobs(plane, consumer_key, size)
            started_cpu, started_busy = time.process_time(), busy_seconds()
            started_pg = postgres_seconds(plane.pg_data)
            took, round_latencies = await settle_jobs(plane, attempts, CLIENTS)
            cpu += time.process_time() - started_cpu
            ended_busy, ended_pg = busy_seconds(), postgres_seconds(plane.pg_data)
            if busy is not None and started_busy is not None and ended_busy is not None:
                busy += ended_busy - started_busy
            if postgres is not None and started_pg is not None and ended_pg is not None:
                postgres += ended_pg - started_pg
            seconds += took
            latencies += round_latencies
            settled += attempts
        steal = steal_percent(ticks, cpu_ticks())
        await check_charged_once(plane.db, settled)
        deadlocks = await _deadlocks(plane.db) - deadlocks_before
        if deadlocks:
            raise RuntimeError(f"{deadlocks} deadlocks")
        return Measurement(
            len(settled) / seconds,
            {
                "clients": CLIENTS,
                "jobs": len(settled),
                "rounds": len(settled) // size,
                "p50_ms": _ms(latencies, 0.5),
                "p99_ms": _ms(latencies, 0.99),
                # CPU of this process (control plane and clients) per settlement
                "process_cpu_us": round(cpu / len(settled) * 1e6),
                # CPU of every process (PostgreSQL's backends too) per settlement (-1: unknown)
                "machine_cpu_us": per_item_us(0.0, busy, len(settled)),
                # CPU of this bench's PostgreSQL alone per settlement: unlike machine_cpu_us,
                # not moved by other work on a shared machine (-1: unknown)
                "pg_cpu_us": per_item_us(0.0, postgres, len(settled)),
                "cpu_steal_pct": -1 if steal is None else steal,
                "deadlocks": deadlocks,
                "retries": sum(plane.db.retries.values()),
            },
        )
