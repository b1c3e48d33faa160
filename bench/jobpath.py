"""Job-path figures: submit → container running latency and whole-path job throughput, against
a control plane in its own process and a real daemon on the bench's private Docker engine."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from gpuplane.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from pydantic import SecretStr

from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from daemon.channel import PLAINTEXT, open_channel

if TYPE_CHECKING:
    from daemon.agent import Agent
    from devstack import DockerEngine, S3Server

SAMPLES = 20
THROUGHPUT_JOBS = 40
DAEMON_GPUS = "8xA100-80GB"


@dataclass
class Stack:
    jobs: jobs_pb2_grpc.JobServiceAsyncStub
    consumer: tuple[tuple[str, str], ...]
    image: str
    # The consumer's channel to the control plane (other services: tunnels).
    channel: grpc.aio.Channel


@asynccontextmanager
async def job_stack(ctx: RunContext, daemon_process: bool = False) -> AsyncIterator[Stack]:
    """Control plane (own process) + one daemon with 8 simulated GPUs + a funded consumer.
    The daemon runs in the bench's process, or with `daemon_process` in one of its own (as in
    production: a tunnel's daemon side then does not share the bench client's event loop)."""
    from devstack import TEST_IMAGE
    from devstack.factories import Client, bearer, new_tenant, new_token

    nats = await ctx.resources.nats()
    s3 = await ctx.resources.s3()
    engine, client = await ctx.resources.docker()
    client.close()
    # A data dir per stack: a second stack on the first one's database would place jobs on
    # the first one's daemon, stopped but not yet timed out.
    suffix = str(time.monotonic_ns())
    server = ServerProcess(
        "controlplane",
        ctx.workdir / f"jobpath-controlplane-{suffix}.log",
        f"--data-dir={ctx.workdir / f'jobpath-controlplane-{suffix}'}",
        f"--nats-url={nats.url}",
        f"--s3-endpoint={s3.endpoint}",
        f"--s3-access-key={s3.access_key}",
        f"--s3-secret-key={s3.secret_key}",
    )
    async with server:
        ready = await server.start()
        address = f"127.0.0.1:{ready['port']}"
        async with open_channel(address, PLAINTEXT) as channel:  # as the CLI opens it
            plane = Client(channel, ready["admin_key"])
            consumer = await new_tenant(plane, f"bench-consumer-{suffix}", micro_credits=10**12)
            provider = await new_tenant(plane, f"bench-provider-{suffix}", types_pb2.ROLE_PROVIDER)
            token = await new_token(plane, provider.tenant_id)
            if daemon_process:
                daemon = _daemon_process(ctx, engine, address, suffix)
                await daemon.start(secret=token.secret)
            else:
                agent = await _daemon(ctx, engine, s3, address, token.secret, suffix)
            try:
                yield Stack(
                    jobs_pb2_grpc.JobServiceStub(channel), bearer(consumer.key), TEST_IMAGE, channel
                )
            finally:
                if daemon_process:
                    await daemon.stop()
                else:
                    await agent.stop()


async def _daemon(
    ctx: RunContext, engine: DockerEngine, s3: S3Server, address: str, token: str, suffix: str
) -> Agent:
    """A started daemon with DAEMON_GPUS on the bench's Docker engine, registered by `token`."""
    from daemon.agent import Agent
    from daemon.settings import DaemonSettings

    agent = Agent(
        DaemonSettings(
            control_plane=address,
            plaintext=True,
            registration_token=SecretStr(token),
            data_dir=ctx.workdir / f"jobpath-daemon-{suffix}",
            simulate_gpus=DAEMON_GPUS,
            gpu_device_requests="always",
            docker_host=engine.base_url,
            max_concurrent_jobs=8,
        )
    )
    await agent.start()
    return agent


def _daemon_process(
    ctx: RunContext, engine: DockerEngine, address: str, suffix: str
) -> ServerProcess:
    """The same daemon as _daemon's, as `python -m bench.servers daemon` (not started)."""
    return ServerProcess(
        "daemon",
        ctx.workdir / f"jobpath-daemon-{suffix}.log",
        f"--data-dir={ctx.workdir / f'jobpath-daemon-{suffix}'}",
        f"--control-plane={address}",
        f"--simulate-gpus={DAEMON_GPUS}",
        f"--docker-host={engine.base_url}",
        "--max-concurrent-jobs=8",
    )


def _spec(stack: Stack, command: list[str]) -> types_pb2.JobSpec:
    return types_pb2.JobSpec(
        image=stack.image,
        command=command,
        gpu_count=1,
        max_duration_seconds=120,
        max_price_per_gpu_hour_micro_credits=10_000_000,
        allow_simulated=True,
        allow_unverified=True,
    )


async def _until(stack: Stack, job_id: str, states: set[types_pb2.JobState.ValueType]) -> Any:
    """Follows WatchJob until the job reaches one of `states`; returns that event."""
    watch = stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=stack.consumer)
    async for event in watch:
        if event.state in states:
            watch.cancel()
            return event
    raise RuntimeError(f"job {job_id} ended without reaching {states}")


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@benchmark(
    "submit_to_running",
    unit="ms",
    better="lower",
    floor="docker_run",
    target=2.0,
    description="p50 of SubmitJob → RUNNING (WatchJob) for a 1-GPU busybox job through control "
    "plane, outbox, JetStream, daemon and Docker, vs bare `docker run` of the same image",
)
async def submit_to_running(ctx: RunContext) -> Measurement:
    samples: list[float] = []
    async with job_stack(ctx) as stack:
        for _ in range(SAMPLES):
            started = time.perf_counter()
            reply = await stack.jobs.SubmitJob(
                jobs_pb2.SubmitJobRequest(spec=_spec(stack, ["true"])), metadata=stack.consumer
            )
            await _until(stack, reply.job.job_id, {types_pb2.JOB_STATE_RUNNING})
            samples.append(time.perf_counter() - started)
            await _until(stack, reply.job.job_id, {types_pb2.JOB_STATE_SUCCEEDED})
    return Measurement(
        statistics.median(samples) * 1000,
        {
            "p50_ms": round(statistics.median(samples) * 1000, 1),
            "p99_ms": round(_percentile(samples, 0.99) * 1000, 1),
            "samples": len(samples),
        },
    )


@benchmark(
    "job_throughput",
    unit="jobs/s",
    better="higher",
    description=f"{THROUGHPUT_JOBS} trivial 1-GPU jobs submitted at once to one daemon with 8 "
    "GPUs, until all SUCCEEDED (placement, dispatch, container, upload, settlement)",
)
async def job_throughput(ctx: RunContext) -> Measurement:
    async with job_stack(ctx) as stack:
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(
                stack.jobs.SubmitJob(
                    jobs_pb2.SubmitJobRequest(spec=_spec(stack, ["true"])),
                    metadata=stack.consumer,
                )
                for _ in range(THROUGHPUT_JOBS)
            )
        )
        terminal = {
            types_pb2.JOB_STATE_SUCCEEDED,
            types_pb2.JOB_STATE_FAILED,
            types_pb2.JOB_STATE_CANCELLED,
            types_pb2.JOB_STATE_TIMED_OUT,
        }
        events = await asyncio.gather(*(_until(stack, r.job.job_id, terminal) for r in replies))
        elapsed = time.perf_counter() - started
    failed = sum(1 for e in events if e.state != types_pb2.JOB_STATE_SUCCEEDED)
    if failed:
        raise RuntimeError(f"{failed} of {THROUGHPUT_JOBS} jobs did not succeed")
    return Measurement(
        THROUGHPUT_JOBS / elapsed, {"jobs": THROUGHPUT_JOBS, "seconds": round(elapsed, 2)}
    )
