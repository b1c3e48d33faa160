"""Fleet scale: one control plane (PostgreSQL) with 1,000, 4,000 and 10,000 simulated hosts ×
8 GPUs (bench.hostsim, each host on its own connection, heartbeating every 2 s and sending
telemetry every 5 s as the daemon does by default, all connecting at once), then a steady
window with requests: how long until all were connected, control-plane memory per connected
host, heartbeat processing lag, CPU, hosts falsely declared lost, and the latencies of WhoAmI,
a dry-run quote and SubmitJob beside the same calls on the same control plane before the
hosts came (its idle figures)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable

import grpc
from gpuplane.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

from bench import fleet
from bench.load import percentile, process_cpu_seconds, process_rss_bytes
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from bench.telemetry import Stack, metrics_text, paced_submits, telemetry_stack

# Seconds of each window (idle, then steady with the fleet connected).
IDLE_SECONDS = 10.0
STEADY_SECONDS = 30.0
SUBMITS_PER_SECOND = 10
# One caller each, back to back with this pause: WhoAmI and a dry-run quote.
PROBE_EVERY = 0.05
# The bar with 4,000 hosts on this machine.
MAX_CONNECT_SECONDS_4K = 30.0
# A quote any simulated host could take (the bench hosts are simulated, 8 × H100 each).
QUOTE = jobs_pb2.SubmitJobRequest(
    spec=types_pb2.JobSpec(
        image="gpuplane-test/busybox:1",
        command=["true"],
        gpu_count=1,
        max_duration_seconds=60,
        max_price_per_gpu_hour_micro_credits=4_000_000,
        allow_simulated=True,
        allow_unverified=True,
    ),
    dry_run=True,
)
LAG = "gpuplane_heartbeat_processing_lag_seconds"


async def lag_buckets(stack: Stack) -> dict[float, float]:
    """The heartbeat processing lag histogram's cumulative buckets now ({le: count})."""
    text = await metrics_text(stack)
    pattern = rf'^{LAG}_bucket\{{le="([^"]+)"\}} (\S+)$'
    return {float(le): float(count) for le, count in re.findall(pattern, text, re.M)}


def lag_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound under which a fraction `q` of the heartbeats processed between the
    two reads fell ("≤ 25 ms"), or "none" when none was."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if total <= 0:
        return "none"
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return "> 30 s" if bound == float("inf") else f"≤ {bound * 1000:g} ms"
    return "none"


UNKNOWN = "?"


async def _lost(stack: Stack) -> set[str]:
    """The hosts the control plane says are lost; {UNKNOWN} when it could not answer (an
    overloaded control plane's figures are reported, not lost with the whole run)."""
    try:
        return await fleet._lost(stack)
    except grpc.aio.AioRpcError:
        return {UNKNOWN}


async def _timed(call: Callable[[], Awaitable[object]], latencies: list[int]) -> None:
    """Calls back to back (PROBE_EVERY apart) until cancelled; latencies in µs. A failed call
    counts as its time to failure."""
    while True:
        started = time.perf_counter()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call()
        latencies.append(round((time.perf_counter() - started) * 1e6))
        await asyncio.sleep(PROBE_EVERY)


def _ms(latencies: list[int], q: float) -> float | str:
    if not latencies:
        return "none"
    return round(percentile(sorted(latencies), q) / 1000, 1)


async def _window(stack: Stack, seconds: float) -> dict[str, float | str | int]:
    """WhoAmI and quotes back to back, submits at SUBMITS_PER_SECOND, for `seconds`: p99s."""
    whoami: list[int] = []
    quotes: list[int] = []
    jobs = jobs_pb2_grpc.JobServiceStub(stack.channel)
    probes = [
        asyncio.create_task(fleet._whoami(stack, whoami)),
        asyncio.create_task(
            _timed(lambda: jobs.SubmitJob(QUOTE, metadata=stack.consumer, timeout=60), quotes)
        ),
    ]
    try:
        submits, errors = await paced_submits(stack, SUBMITS_PER_SECOND, seconds)
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
    return {
        "whoami_p99_ms": _ms(whoami, 0.99),
        "quote_p50_ms": _ms(quotes, 0.50),
        "quote_p99_ms": _ms(quotes, 0.99),
        "submit_p99_ms": _ms(submits, 0.99),
        "submit_errors": errors,
    }


async def fleet_at_scale(ctx: RunContext, hosts: int) -> Measurement:
    """The figure for `hosts`; first the same simulators against the bare server that
    answers RegisterHost and the hello with fixed replies (the floor: what the simulators and
    the machine allow)."""
    async with ServerProcess("registry", ctx.workdir / f"scale-{hosts}-floor.log") as server:
        ready = await server.start()
        floor, children = await fleet._storm(ctx, f"127.0.0.1:{ready['port']}", "gpr_floor", hosts)
        await fleet._stop(children)
    async with telemetry_stack(ctx, f"scale-{hosts}", postgres=True) as stack:
        pid = stack.pid
        await _window(stack, 2.0)  # warm-up
        idle = await _window(stack, IDLE_SECONDS)
        rss = process_rss_bytes(pid)
        seconds, children = await fleet._storm(ctx, stack.address, stack.token, hosts)
        try:
            lost = await _lost(stack)
            lag = await lag_buckets(stack)
            cpu = process_cpu_seconds(pid)
            started = time.monotonic()
            steady = await _window(stack, max(ctx.duration, STEADY_SECONDS))
            cpu = (process_cpu_seconds(pid) - cpu) / (time.monotonic() - started)
            lag_after = await lag_buckets(stack)
            after = process_rss_bytes(pid)
            lost |= await _lost(stack)
        finally:
            await fleet._stop(children)
    details: dict[str, float | int | str] = {
        "hosts": hosts,
        "gpus": hosts * fleet.GPUS_PER_HOST,
        "falsely_lost": len(lost) if UNKNOWN not in lost else "unknown (ListHosts failed)",
        "bare_server_s": round(floor, 1),
        "kib_per_host": round((after - rss) / 1024 / hosts, 1),
        "rss_mib": round(after / 2**20),
        "cpu_percent_steady": round(cpu * 100),
        "heartbeat_lag_p50": lag_quantile(lag, lag_after, 0.50),
        "heartbeat_lag_p99": lag_quantile(lag, lag_after, 0.99),
    }
    for key, value in steady.items():
        details[key] = value
        details[f"idle_{key}"] = idle[key]
    return Measurement(seconds, details)


def _describe(hosts: int) -> str:
    return (
        f"{hosts:,} simulated hosts × {fleet.GPUS_PER_HOST} GPUs (each on its own connection, "
        "heartbeats every 2 s, telemetry every 5 s) connecting at once to one control plane "
        "(PostgreSQL): seconds until all are connected (beside the same simulators against a bare "
        "server); then "
        f"{STEADY_SECONDS:g} s with WhoAmI and dry-run quotes back to back and "
        f"{SUBMITS_PER_SECOND} submits/s: their p99 beside the idle control plane's, memory "
        "per host, heartbeat lag, CPU, hosts falsely lost"
    )


@benchmark(
    "fleet_scale_1k",
    unit="s",
    better="lower",
    description=_describe(1_000),
    allowance=300.0,
)
async def fleet_scale_1k(ctx: RunContext) -> Measurement:
    return await fleet_at_scale(ctx, 1_000)


@benchmark(
    "fleet_scale_4k",
    unit="s",
    better="lower",
    maximum=MAX_CONNECT_SECONDS_4K,
    description=_describe(4_000),
    allowance=600.0,
)
async def fleet_scale_4k(ctx: RunContext) -> Measurement:
    return await fleet_at_scale(ctx, 4_000)


@benchmark(
    "fleet_scale_10k",
    unit="s",
    better="lower",
    description=_describe(10_000),
    allowance=1200.0,
)
async def fleet_scale_10k(ctx: RunContext) -> Measurement:
    return await fleet_at_scale(ctx, 10_000)
