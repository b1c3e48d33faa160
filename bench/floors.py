"""Floors: what the raw ingredients cost on this machine (gRPC, PostgreSQL, JetStream, Docker)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from bench.load import LoadSpec, percentile, run_load
from bench.machine import busy_seconds, cpu_ticks, steal_percent
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from bench.servers import ECHO_METHOD

ECHO_PAYLOAD = os.urandom(32)


@benchmark(
    "grpc_echo_qps",
    unit="calls/s",
    better="higher",
    description="bare grpc.aio unary echo server (own process) under closed-loop load from "
    "the bench client processes",
)
async def grpc_echo_qps(ctx: RunContext) -> Measurement:
    async with ServerProcess("echo", ctx.workdir / "echo-server.log") as server:
        ready = await server.start()
        spec = LoadSpec(
            target=f"127.0.0.1:{ready['port']}",
            method=ECHO_METHOD,
            request_hex=ECHO_PAYLOAD.hex(),
            concurrency=ctx.concurrency,
            duration=ctx.duration,
        )
        summary = await run_load(spec, ctx.client_processes, server_pid=server.pid)
    details = summary.details()
    details["clients"] = f"{ctx.client_processes} processes × {ctx.concurrency} callers"
    return Measurement(summary.qps, details)


def _latency_details(samples: list[float]) -> dict[str, float | int | str]:
    """p50/p99/max in ms of latencies given in seconds."""
    in_us = sorted(int(s * 1e6) for s in samples)
    return {
        "count": len(in_us),
        "p50_ms": round(percentile(in_us, 0.50) / 1000, 3),
        "p99_ms": round(percentile(in_us, 0.99) / 1000, 3),
        "max_ms": round(in_us[-1] / 1000, 3) if in_us else 0.0,
    }


@benchmark(
    "pg_tx",
    unit="tx/s",
    better="higher",
    description="one psycopg transaction on one connection: BEGIN; UPDATE a row; INSERT; COMMIT "
    "(devstack PostgreSQL: fsync and synchronous_commit off)",
)
async def pg_tx(ctx: RunContext) -> Measurement:
    import psycopg

    cluster = await ctx.resources.postgres()
    database = await asyncio.to_thread(cluster.create_database, "bench_pg_tx")

    def measure() -> list[float]:
        with psycopg.connect(cluster.dsn(database), autocommit=True) as conn:
            conn.execute("CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute(
                "CREATE TABLE entry (id bigserial PRIMARY KEY, account_id int NOT NULL, "
                "amount bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("INSERT INTO account VALUES (1, 0)")
            samples: list[float] = []
            warm_until = time.monotonic() + min(0.5, ctx.duration / 4)
            end = warm_until + ctx.duration
            while (now := time.monotonic()) < end:
                with conn.transaction():
                    conn.execute("UPDATE account SET balance = balance + 1 WHERE id = 1")
                    conn.execute("INSERT INTO entry (account_id, amount) VALUES (1, 1)")
                if now >= warm_until:
                    samples.append(time.monotonic() - now)
            return samples

    samples = await asyncio.to_thread(measure)
    return Measurement(len(samples) / ctx.duration, _latency_details(samples))


@benchmark(
    "jetstream_publish",
    unit="msgs/s",
    better="higher",
    description="nats-py js.publish of 256 bytes, awaiting each ack, to a file-backed stream",
)
async def jetstream_publish(ctx: RunContext) -> Measurement:
    import nats

    server = await ctx.resources.nats()
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        payload = os.urandom(256)
        samples: list[float] = []
        warm_until = time.monotonic() + min(0.5, ctx.duration / 4)
        end = warm_until + ctx.duration
        while (now := time.monotonic()) < end:
            await js.publish("bench.publish", payload)
            if now >= warm_until:
                samples.append(time.monotonic() - now)
        await js.delete_stream("BENCH")
    finally:
        await client.close()
    return Measurement(len(samples) / ctx.duration, _latency_details(samples))


@benchmark(
    "docker_run",
    unit="ms",
    better="lower",
    description="median of `docker run --rm` (create, start, wait, remove; network none) of the "
    "busybox test image running `true`, through the Docker SDK",
)
async def docker_run(ctx: RunContext) -> Measurement:
    from devstack import TEST_IMAGE

    _, client = await ctx.resources.docker()

    def measure() -> list[float]:
        client.containers.run(TEST_IMAGE, ["true"], remove=True, network_mode="none")  # warm-up
        samples: list[float] = []
        end = time.monotonic() + ctx.duration
        while len(samples) < 3 or (len(samples) < 20 and time.monotonic() < end):
            started = time.monotonic()
            client.containers.run(TEST_IMAGE, ["true"], remove=True, network_mode="none")
            samples.append(time.monotonic() - started)
        return samples

    try:
        samples = await asyncio.to_thread(measure)
    finally:
        client.close()
    return Measurement(statistics.median(samples) * 1000, _latency_details(samples))


# The parallel job floor and figure (bench/jobpath.py job_throughput) run this many jobs,
# this many at once (the daemon's max_concurrent_jobs there).
PARALLEL_JOBS = 200
PARALLEL_AT_ONCE = 8


def cpu_per_job_ms(busy_before: float | None, busy_after: float | None, jobs: int) -> float:
    """Machine CPU (all processes, /proc/stat) per job in ms between two busy_seconds()
    readings; -1 where unknown."""
    if busy_before is None or busy_after is None or jobs <= 0:
        return -1.0
    return round((busy_after - busy_before) / jobs * 1000, 1)


@benchmark(
    "docker_run_parallel",
    unit="jobs/s",
    better="higher",
    description=f"{PARALLEL_JOBS} `docker run --rm` (network none) of the busybox test image "
    f"running `true`, {PARALLEL_AT_ONCE} at once through the Docker SDK; machine CPU per job "
    "(all processes, /proc/stat) in its details",
)
async def docker_run_parallel(ctx: RunContext) -> Measurement:
    from concurrent.futures import ThreadPoolExecutor

    from devstack import TEST_IMAGE

    _, client = await ctx.resources.docker()

    def one(_: int) -> None:
        client.containers.run(TEST_IMAGE, ["true"], remove=True, network_mode="none")

    def measure() -> tuple[float, float | None, float | None, str]:
        with ThreadPoolExecutor(PARALLEL_AT_ONCE) as pool:
            list(pool.map(one, range(PARALLEL_AT_ONCE)))  # warm-up
            ticks, busy, started = cpu_ticks(), busy_seconds(), time.monotonic()
            list(pool.map(one, range(PARALLEL_JOBS)))
            elapsed = time.monotonic() - started
            return elapsed, busy, busy_seconds(), str(steal_percent(ticks, cpu_ticks()))

    try:
        elapsed, busy_before, busy_after, steal = await asyncio.to_thread(measure)
    finally:
        client.close()
    return Measurement(
        PARALLEL_JOBS / elapsed,
        {
            "jobs": PARALLEL_JOBS,
            "at_once": PARALLEL_AT_ONCE,
            "seconds": round(elapsed, 2),
            "cpu_per_job_ms": cpu_per_job_ms(busy_before, busy_after, PARALLEL_JOBS),
            "steal_pct": steal,
        },
    )
