"""Telemetry figures: GPU samples/s one control-plane process ingests over real Connect streams
from simulated hosts (bench.hostsim, own processes), and SubmitJob p99 while it ingests at the
target rate, against the same stack with the hosts connected but sending no telemetry."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from gpuplane.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)

from bench.hostsim import HostSpec, spawn
from bench.load import percentile
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess

HOSTS = 200
GPUS_PER_HOST = 8
TARGET_SAMPLES_PER_SECOND = 20_000
# The rate: SubmitJob p99 at most MAX_SUBMIT_P99_MS at this many submits a second.
SUBMITS_PER_SECOND = 200
MAX_SUBMIT_P99_MS = 10.0
CREDIT = 1_000_000
# Never placed: the simulated bench hosts are not allowed for this spec.
SUBMIT = jobs_pb2.SubmitJobRequest(
    spec=types_pb2.JobSpec(
        image="gpuplane-test/busybox:1",
        command=["true"],
        gpu_count=1,
        max_duration_seconds=60,
        max_price_per_gpu_hour_micro_credits=CREDIT,
    )
)


@dataclass
class Stack:
    address: str
    metrics_port: int
    admin: tuple[tuple[str, str], ...]
    consumer: tuple[tuple[str, str], ...]
    token: str
    channel: grpc.aio.Channel
    # The control plane's process id.
    pid: int = 0


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@asynccontextmanager
async def telemetry_stack(
    ctx: RunContext, name: str, postgres: bool = False
) -> AsyncIterator[Stack]:
    """A control plane in its own process (default settings; SQLite, or PostgreSQL), a funded
    consumer and an unlimited registration token for the simulated hosts."""
    from devstack.factories import Client, new_tenant, new_token

    nats = await ctx.resources.nats()
    s3 = await ctx.resources.s3()
    database = ""
    if postgres:
        cluster = await ctx.resources.postgres()
        db_name = await asyncio.to_thread(
            cluster.create_database, f"bench_{name}".replace("-", "_")
        )
        database = cluster.url(db_name)
    server = ServerProcess(
        "controlplane",
        ctx.workdir / f"{name}-controlplane.log",
        f"--data-dir={ctx.workdir / f'{name}-controlplane'}",
        f"--database-url={database}",
        f"--nats-url={nats.url}",
        f"--s3-endpoint={s3.endpoint}",
        f"--s3-access-key={s3.access_key}",
        f"--s3-secret-key={s3.secret_key}",
    )
    async with server:
        ready = await server.start()
        address = f"127.0.0.1:{ready['port']}"
        admin = _auth(ready["admin_key"])
        async with grpc.aio.insecure_channel(address) as channel:
            plane = Client(channel, ready["admin_key"])
            provider = await new_tenant(plane, "bench-provider", types_pb2.ROLE_PROVIDER)
            token = await new_token(plane, provider.tenant_id)
            consumer = await new_tenant(plane, "bench-consumer", micro_credits=10**12)
            yield Stack(
                address,
                ready["metrics_port"],
                admin,
                _auth(consumer.key),
                token.secret,
                channel,
                server.pid,
            )


@asynccontextmanager
async def simulated_hosts(
    ctx: RunContext, stack: Stack, batches_per_second: float
) -> AsyncIterator[list[dict[str, Any]]]:
    """HOSTS hosts over the bench's client processes, connected and sending until the block
    ends; the list is filled with each process's HostReport afterwards."""
    processes = max(1, ctx.client_processes)
    shares = [HOSTS // processes + (i < HOSTS % processes) for i in range(processes)]
    children = []
    log = (ctx.workdir / "hostsim.log").open("ab")
    try:
        for share in shares:
            spec = HostSpec(
                target=stack.address,
                token=stack.token,
                hosts=share,
                gpus=GPUS_PER_HOST,
                batches_per_second=batches_per_second,
            )
            children.append(await spawn(spec, log))
    finally:
        log.close()
    reports: list[dict[str, Any]] = []
    try:
        for child in children:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 120)
            if not line:
                raise RuntimeError("a host simulator died while connecting (see hostsim.log)")
        yield reports
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        for child in children:
            out, _ = await asyncio.wait_for(child.communicate(), 60)
            if out.strip():
                reports.append(json.loads(out.strip().splitlines()[-1]))


async def metrics_text(stack: Stack, timeout: float = 30.0) -> str:
    """The control plane's /metrics page now."""
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


async def accepted_samples(stack: Stack) -> tuple[float, float]:
    """(accepted, rejected) telemetry samples so far, from the control plane's /metrics."""
    text = await metrics_text(stack, timeout=10)
    accepted = re.search(r"^gpuplane_telemetry_samples_total (\S+)$", text, re.M)
    rejected = re.findall(r"^gpuplane_telemetry_rejected_samples_total\{.*\} (\S+)$", text, re.M)
    return float(accepted.group(1)) if accepted else 0.0, sum(float(v) for v in rejected)


@benchmark(
    "telemetry_ingest",
    unit="samples/s",
    better="higher",
    minimum=TARGET_SAMPLES_PER_SECOND,
    description=f"GPU telemetry samples/s one control plane accepts from {HOSTS} simulated hosts "
    f"× {GPUS_PER_HOST} GPUs, one Connect stream each, sending batches as fast as they are "
    f"taken (target ≥ {TARGET_SAMPLES_PER_SECOND:,})",
)
async def telemetry_ingest(ctx: RunContext) -> Measurement:
    async with (
        telemetry_stack(ctx, "ingest") as stack,
        simulated_hosts(ctx, stack, 0.0) as reports,
    ):
        await asyncio.sleep(1.0)  # warm-up
        before, rejected_before = await accepted_samples(stack)
        started = time.monotonic()
        await asyncio.sleep(ctx.duration)
        after, rejected_after = await accepted_samples(stack)
        elapsed = time.monotonic() - started
    rate = (after - before) / elapsed
    sent = sum(r["sent_samples"] for r in reports)
    seconds = max((r["seconds"] for r in reports), default=1.0)
    return Measurement(
        rate,
        {
            "hosts": HOSTS,
            "gpus_per_host": GPUS_PER_HOST,
            "host_processes": len(reports),
            "sent_per_s": round(sent / seconds),
            "rejected": int(rejected_after - rejected_before),
            "errors": sum(r["errors"] for r in reports),
        },
    )


async def drain_all(stack: Stack) -> int:
    """Drains every host: the scheduler then has no capacity to match queued jobs against."""
    registry = registry_pb2_grpc.RegistryServiceStub(stack.channel)
    listed = await registry.ListHosts(
        registry_pb2.ListHostsRequest(page_size=500), metadata=stack.admin
    )
    await asyncio.gather(
        *(
            registry.DrainHost(
                registry_pb2.DrainHostRequest(host_id=h.host_id), metadata=stack.admin
            )
            for h in listed.hosts
        )
    )
    return len(listed.hosts)


async def paced_submits(stack: Stack, rate: float, duration: float) -> tuple[list[int], int]:
    """SubmitJob at a fixed rate (open loop: one call every 1/rate s, whatever the latency),
    each job cancelled right after by an admin (whose key no rate limit applies to, so the
    consumer's key carries only the submits) so the queue stays short; returns latencies
    (µs), errors (submits and cancels that failed)."""
    jobs = jobs_pb2_grpc.JobServiceStub(stack.channel)
    latencies: list[int] = []
    errors = [0]

    async def one() -> None:
        started = time.perf_counter()
        try:
            reply = await jobs.SubmitJob(SUBMIT, metadata=stack.consumer, timeout=30)
        except grpc.aio.AioRpcError:
            errors[0] += 1
            return
        latencies.append(int((time.perf_counter() - started) * 1e6))
        cancel = jobs_pb2.CancelJobRequest(job_id=reply.job.job_id)
        try:
            await jobs.CancelJob(cancel, metadata=stack.admin, timeout=30)
        except grpc.aio.AioRpcError:  # an overloaded control plane: counted, not fatal
            errors[0] += 1

    tasks = []
    due = time.monotonic()
    end = due + duration
    while due < end:
        tasks.append(asyncio.create_task(one()))
        due += 1 / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    await asyncio.gather(*tasks)
    return latencies, errors[0]


async def _submit_p99(ctx: RunContext, name: str, batches_per_second: float) -> Measurement:
    async with (
        telemetry_stack(ctx, name, postgres=True) as stack,
        simulated_hosts(ctx, stack, batches_per_second) as _,
    ):
        # Every SubmitJob wakes the scheduler, whose cycle matches all queued jobs against all
        # hosts. Drained hosts and cancelled jobs keep that cycle short, so what is compared
        # is SubmitJob itself, with and without telemetry.
        if await drain_all(stack) != HOSTS:
            raise RuntimeError("not every simulated host registered")
        await paced_submits(stack, SUBMITS_PER_SECOND, 1.0)  # warm-up
        before, _rejected = await accepted_samples(stack)
        started = time.monotonic()
        latencies, errors = await paced_submits(stack, SUBMITS_PER_SECOND, max(ctx.duration, 20))
        after, _rejected = await accepted_samples(stack)
        ingest = (after - before) / (time.monotonic() - started)
    if not latencies:
        raise RuntimeError("no SubmitJob succeeded")
    latencies.sort()
    p99 = percentile(latencies, 0.99) / 1000
    return Measurement(
        p99,
        {
            "count": len(latencies),
            "errors": errors,
            "p50_ms": round(percentile(latencies, 0.50) / 1000, 3),
            "p99_ms": round(p99, 3),
            "max_ms": round(latencies[-1] / 1000, 3),
            "ingest_samples_per_s": round(ingest),
            "submits_per_s": SUBMITS_PER_SECOND,
            "hosts": f"{HOSTS} × {GPUS_PER_HOST} GPUs connected, drained",
        },
    )


@benchmark(
    "submit_p99_idle",
    unit="ms",
    better="lower",
    maximum=MAX_SUBMIT_P99_MS,
    description=f"SubmitJob p99 at {SUBMITS_PER_SECOND}/s (open loop, each job then cancelled) "
    f"on a control plane (PostgreSQL) with {HOSTS} simulated hosts connected, drained and "
    "heartbeating but sending no telemetry",
)
async def submit_p99_idle(ctx: RunContext) -> Measurement:
    return await _submit_p99(ctx, "submit-idle", -1.0)


@benchmark(
    "submit_p99_under_ingest",
    unit="ms",
    better="lower",
    floor="submit_p99_idle",
    target=2.0,
    description=f"SubmitJob p99 as submit_p99_idle, while the {HOSTS} hosts send "
    f"{TARGET_SAMPLES_PER_SECOND:,} GPU samples/s of telemetry",
)
async def submit_p99_under_ingest(ctx: RunContext) -> Measurement:
    rate = TARGET_SAMPLES_PER_SECOND / (HOSTS * GPUS_PER_HOST)
    return await _submit_p99(ctx, "submit-ingest", rate)
