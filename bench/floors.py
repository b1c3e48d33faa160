"""Floors: what the raw ingredients cost on this machine (gRPC, PostgreSQL, JetStream, Docker)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from bench.load import LoadSpec, percentile, run_load
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
