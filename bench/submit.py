"""SubmitJob throughput: closed-loop submits from 32 callers, each its own consumer tenant and
key, against the control plane (own process) on PostgreSQL, beside one bare transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from gpuplane.v1 import jobs_pb2, types_pb2

from bench.load import LoadSpec, run_load
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess

CALLERS = 32
TARGET_SUBMITS_PER_SECOND = 2_000
# Never placed (no host is registered); cheap to hold: 1 GPU for 60 s at 1 credit an hour.
SUBMIT = jobs_pb2.SubmitJobRequest(
    spec=types_pb2.JobSpec(
        image="gpuplane-test/busybox:1",
        command=["true"],
        gpu_count=1,
        max_duration_seconds=60,
        max_price_per_gpu_hour_micro_credits=1_000_000,
    )
)


@dataclass
class SubmitStack:
    address: str
    server: ServerProcess
    # One funded consumer key per caller.
    keys: list[str]


@asynccontextmanager
async def submit_stack(ctx: RunContext, name: str, tenants: int) -> AsyncIterator[SubmitStack]:
    """A control plane in its own process on PostgreSQL (default settings) with `tenants`
    funded consumer tenants, one API key each."""
    from devstack.factories import Client, new_tenant

    nats = await ctx.resources.nats()
    s3 = await ctx.resources.s3()
    cluster = await ctx.resources.postgres()
    database = await asyncio.to_thread(cluster.create_database, f"bench_{name}")
    server = ServerProcess(
        "controlplane",
        ctx.workdir / f"{name}-controlplane.log",
        f"--data-dir={ctx.workdir / f'{name}-controlplane'}",
        f"--database-url={cluster.url(database)}",
        f"--nats-url={nats.url}",
        f"--s3-endpoint={s3.endpoint}",
        f"--s3-access-key={s3.access_key}",
        f"--s3-secret-key={s3.secret_key}",
    )
    async with server:
        ready = await server.start()
        address = f"127.0.0.1:{ready['port']}"
        async with grpc.aio.insecure_channel(address) as channel:
            plane = Client(channel, ready["admin_key"])
            consumers = [
                await new_tenant(plane, f"bench-submit-{i}", micro_credits=10**12)
                for i in range(tenants)
            ]
        yield SubmitStack(address, server, [c.key for c in consumers])


@benchmark(
    "submit_qps_32",
    unit="submits/s",
    better="higher",
    floor="pg_tx",
    minimum=TARGET_SUBMITS_PER_SECOND,
    description=f"SubmitJob/s from {CALLERS} closed-loop callers (each its own consumer tenant "
    "and API key, so per-key rate limits and holds apply as in production) against the control "
    "plane (own process, PostgreSQL, no hosts: the jobs stay queued), vs one bare transaction; "
    "details: control-plane CPU per submit",
)
async def submit_qps_32(ctx: RunContext) -> Measurement:
    async with submit_stack(ctx, "submit_qps", CALLERS) as stack:
        processes = max(1, ctx.client_processes)
        spec = LoadSpec(
            target=stack.address,
            method="/gpuplane.v1.JobService/SubmitJob",
            request_hex=SUBMIT.SerializeToString().hex(),
            callers_metadata=[[("authorization", f"Bearer {key}")] for key in stack.keys],
            concurrency=CALLERS // processes,
            duration=ctx.duration,
        )
        summary = await run_load(spec, processes, server_pid=stack.server.pid)
    if summary.calls == 0:
        raise RuntimeError(f"no SubmitJob succeeded: {summary.first_error or 'no answer'}")
    details = summary.details()
    details["clients"] = f"{processes} processes × {CALLERS // processes} callers"
    return Measurement(summary.qps, details)
