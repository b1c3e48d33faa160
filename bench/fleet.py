"""Fleet figures: FLEET_HOSTS simulated hosts (bench.hostsim, each on its own channel and
connection) all registering and connecting at once, as after a control-plane restart: how
long until every one is connected, hosts falsely declared lost, control-plane CPU per connect
and WhoAmI p99 during the storm; beside the same simulators against a bare server (the
floor)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
from gpuplane.v1 import admin_pb2, admin_pb2_grpc, registry_pb2, registry_pb2_grpc, types_pb2

from bench.hostsim import HostSpec, spawn
from bench.load import percentile, process_cpu_seconds
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from bench.telemetry import Stack, telemetry_stack

FLEET_HOSTS = 1000
GPUS_PER_HOST = 8
SIM_PROCESSES = 4
# Hosts keep heartbeating (every 2 s, the daemon's default) this long after the storm: a host
# falsely declared lost shows up here.
SETTLE_SECONDS = 10.0
WHOAMI_EVERY = 0.02


async def _storm(
    ctx: RunContext, target: str, token: str, hosts: int | None = None
) -> tuple[float, list[Any]]:
    """Starts the simulators together (`hosts`, default FLEET_HOSTS, each heartbeating every
    2 s and sending telemetry every 5 s, the daemon's defaults); returns the seconds until
    all of them were connected and the processes (still running: close their stdin to stop
    them)."""
    hosts = hosts or FLEET_HOSTS
    shares = [hosts // SIM_PROCESSES + (i < hosts % SIM_PROCESSES) for i in range(SIM_PROCESSES)]
    specs = [
        HostSpec(target=target, token=token, hosts=n, gpus=GPUS_PER_HOST, batches_per_second=0.2)
        for n in shares
        if n
    ]
    started = time.monotonic()
    with (ctx.workdir / "fleet-hostsim.log").open("ab") as log:
        children = [await spawn(spec, log) for spec in specs]
    for child in children:
        assert child.stdout is not None
        if not await asyncio.wait_for(child.stdout.readline(), 900):
            raise RuntimeError("a host simulator died while connecting (fleet-hostsim.log)")
    return time.monotonic() - started, children


async def _stop(children: list[Any]) -> None:
    for child in children:
        child.stdin.close()
    for child in children:
        await asyncio.wait_for(child.communicate(), 60)


@benchmark(
    "fleet_connect_floor",
    unit="s",
    better="lower",
    description=f"{FLEET_HOSTS} simulated hosts registering and connecting at once to a bare "
    "grpc.aio server answering RegisterHost and Connect's hello with fixed replies",
)
async def fleet_connect_floor(ctx: RunContext) -> Measurement:
    async with ServerProcess("registry", ctx.workdir / "fleet-floor.log") as server:
        ready = await server.start()
        seconds, children = await _storm(ctx, f"127.0.0.1:{ready['port']}", "gpr_floor")
        await _stop(children)
    return Measurement(seconds, {"hosts": FLEET_HOSTS})


async def _lost(stack: Stack) -> set[str]:
    """Hosts the control plane says are lost now."""
    registry = registry_pb2_grpc.RegistryServiceStub(stack.channel)
    request = registry_pb2.ListHostsRequest(page_size=1000, states=[types_pb2.HOST_STATE_LOST])
    lost: set[str] = set()
    while True:
        page = await registry.ListHosts(request, metadata=stack.admin, timeout=60)
        lost.update(h.host_id for h in page.hosts)
        if not page.next_page_token:
            return lost
        request.page_token = page.next_page_token


async def _whoami(stack: Stack, latencies: list[int]) -> None:
    """WhoAmI every WHOAMI_EVERY seconds until cancelled; latencies in µs."""
    call = admin_pb2_grpc.AdminServiceStub(stack.channel).WhoAmI
    while True:
        started = time.perf_counter()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(admin_pb2.WhoAmIRequest(), metadata=stack.consumer, timeout=30)
            latencies.append(round((time.perf_counter() - started) * 1e6))
        await asyncio.sleep(WHOAMI_EVERY)


@benchmark(
    "fleet_reconnect",
    unit="s",
    better="lower",
    floor="fleet_connect_floor",
    description=f"{FLEET_HOSTS} simulated hosts × {GPUS_PER_HOST} GPUs registering and "
    "connecting at once to one control plane (PostgreSQL), as after a restart: seconds until "
    "all are connected; hosts falsely declared lost (during the storm and "
    f"{SETTLE_SECONDS:g} s after), control-plane CPU per connect, WhoAmI p99 meanwhile",
)
async def fleet_reconnect(ctx: RunContext) -> Measurement:
    async with telemetry_stack(ctx, "fleet", postgres=True) as stack:
        pid = stack.pid
        latencies: list[int] = []
        probe = asyncio.create_task(_whoami(stack, latencies))
        cpu = process_cpu_seconds(pid)
        try:
            seconds, children = await _storm(ctx, stack.address, stack.token)
            cpu = process_cpu_seconds(pid) - cpu
            storm = sorted(latencies)
            lost = await _lost(stack)
            await asyncio.sleep(SETTLE_SECONDS)
            lost |= await _lost(stack)
            await _stop(children)
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
    return Measurement(
        seconds,
        {
            "hosts": FLEET_HOSTS,
            "falsely_lost": len(lost),
            "cpu_ms_per_connect": round(cpu * 1000 / FLEET_HOSTS, 2),
            "whoami_p99_ms": round(percentile(storm, 0.99) / 1000, 1) if storm else "none",
            "connects_per_s": round(FLEET_HOSTS / seconds),
        },
    )
