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

from bench.floors import PARALLEL_JOBS, cpu_per_job_ms
from bench.machine import busy_seconds, cpu_ticks, steal_percent
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from daemon.channel import PLAINTEXT, open_channel

if TYPE_CHECKING:
    from daemon.agent import Agent
    from devstack import DockerEngine, S3Server

SAMPLES = 20
THROUGHPUT_JOBS = PARALLEL_JOBS
# Machine CPU per job (job_throughput) may exceed bare `docker run`'s by this much.
CPU_OVER_BARE_MS = 50.0
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
    """Control plane (own process) + one daemon with 8 simulated GPUs + a funded consumer,
    on a NATS server of its own (no other benchmark's streams, consumers or backlog). The
    daemon runs in the bench's process, or with `daemon_process` in one of its own (as in
    production: a tunnel's daemon side then does not share the bench client's event loop)."""
    from devstack import TEST_IMAGE, NatsServer

    s3 = await ctx.resources.s3()
    engine, client = await ctx.resources.docker()
    client.close()
    # A data dir per stack: a second stack on the first one's database would place jobs on
    # the first one's daemon, stopped but not yet timed out.
    suffix = str(time.monotonic_ns())
    nats = NatsServer(ctx.workdir / f"jobpath-nats-{suffix}")
    await asyncio.to_thread(nats.start)
    try:
        async with _plane(ctx, nats.url, s3, engine, suffix, TEST_IMAGE, daemon_process) as stack:
            yield stack
    finally:
        await asyncio.to_thread(nats.stop)


@asynccontextmanager
async def _plane(
    ctx: RunContext,
    nats_url: str,
    s3: S3Server,
    engine: DockerEngine,
    suffix: str,
    image: str,
    daemon_process: bool,
) -> AsyncIterator[Stack]:
    from devstack.factories import Client, bearer, new_tenant, new_token

    server = ServerProcess(
        "controlplane",
        ctx.workdir / f"jobpath-controlplane-{suffix}.log",
        f"--data-dir={ctx.workdir / f'jobpath-controlplane-{suffix}'}",
        f"--nats-url={nats_url}",
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
                    jobs_pb2_grpc.JobServiceStub(channel), bearer(consumer.key), image, channel
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


TERMINAL = {
    types_pb2.JOB_STATE_SUCCEEDED,
    types_pb2.JOB_STATE_FAILED,
    types_pb2.JOB_STATE_CANCELLED,
    types_pb2.JOB_STATE_TIMED_OUT,
    types_pb2.JOB_STATE_REJECTED,
}


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _sequential(
    ctx: RunContext, first: types_pb2.JobState.ValueType
) -> dict[str, float | int | str]:
    """SAMPLES jobs one after another: p50/p99 of SubmitJob → `first` (WatchJob), each
    awaited to SUCCEEDED before the next is submitted."""
    samples: list[float] = []
    async with job_stack(ctx) as stack:
        for _ in range(SAMPLES):
            started = time.perf_counter()
            reply = await stack.jobs.SubmitJob(
                jobs_pb2.SubmitJobRequest(spec=_spec(stack, ["true"])), metadata=stack.consumer
            )
            event = await _until(stack, reply.job.job_id, {first, *TERMINAL})
            if event.state != first:
                raise RuntimeError(f"job {reply.job.job_id} ended {event.state} before {first}")
            samples.append(time.perf_counter() - started)
            if first != types_pb2.JOB_STATE_SUCCEEDED:
                await _until(stack, reply.job.job_id, {types_pb2.JOB_STATE_SUCCEEDED})
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 1),
        "p99_ms": round(_percentile(samples, 0.99) * 1000, 1),
        "samples": len(samples),
    }


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
    details = await _sequential(ctx, types_pb2.JOB_STATE_RUNNING)
    return Measurement(float(details["p50_ms"]), details)


@benchmark(
    "submit_to_succeeded",
    unit="ms",
    better="lower",
    floor="docker_run",
    target=1.2,
    description=f"p50 of SubmitJob → SUCCEEDED (WatchJob) over {SAMPLES} sequential 1-GPU "
    "busybox `true` jobs (placement, dispatch, container, log and manifest upload, "
    "settlement), vs bare `docker run` of the same container",
)
async def submit_to_succeeded(ctx: RunContext) -> Measurement:
    details = await _sequential(ctx, types_pb2.JOB_STATE_SUCCEEDED)
    return Measurement(float(details["p50_ms"]), details)


@benchmark(
    "job_throughput",
    unit="jobs/s",
    better="higher",
    floor="docker_run_parallel",
    target=0.9,
    description=f"{THROUGHPUT_JOBS} trivial 1-GPU jobs submitted at once to one daemon with 8 "
    "GPUs, until all SUCCEEDED (placement, dispatch, container, upload, settlement), vs the "
    "same containers by bare `docker run` 8 at once; machine CPU per job beside bare's, "
    f"at most +{CPU_OVER_BARE_MS:g} ms (cpu_target)",
)
async def job_throughput(ctx: RunContext) -> Measurement:
    async with job_stack(ctx) as stack:
        ticks, busy, started = cpu_ticks(), busy_seconds(), time.perf_counter()
        replies = await asyncio.gather(
            *(
                stack.jobs.SubmitJob(
                    jobs_pb2.SubmitJobRequest(spec=_spec(stack, ["true"])),
                    metadata=stack.consumer,
                )
                for _ in range(THROUGHPUT_JOBS)
            )
        )
        events = await asyncio.gather(*(_until(stack, r.job.job_id, TERMINAL) for r in replies))
        elapsed = time.perf_counter() - started
        cpu = cpu_per_job_ms(busy, busy_seconds(), THROUGHPUT_JOBS)
        steal = str(steal_percent(ticks, cpu_ticks()))
    failed = sum(1 for e in events if e.state != types_pb2.JOB_STATE_SUCCEEDED)
    if failed:
        raise RuntimeError(f"{failed} of {THROUGHPUT_JOBS} jobs did not succeed")
    details: dict[str, float | int | str] = {
        "jobs": THROUGHPUT_JOBS,
        "seconds": round(elapsed, 2),
        "cpu_per_job_ms": cpu,
    }
    bare = ctx.results.get("docker_run_parallel")
    bare_cpu = bare.details.get("cpu_per_job_ms") if bare is not None else None
    if isinstance(bare_cpu, float) and bare_cpu >= 0 and cpu >= 0:
        over = cpu - bare_cpu
        verdict = "ok" if over <= CPU_OVER_BARE_MS else "MISSED"
        details["bare_cpu_per_job_ms"] = bare_cpu
        details["cpu_target"] = f"+{over:.0f} ms <= +{CPU_OVER_BARE_MS:g} {verdict}"
    details["steal_pct"] = steal
    return Measurement(THROUGHPUT_JOBS / elapsed, details)
