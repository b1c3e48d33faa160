"""Gateway figures: latency and requests per second of a small GET through the services gateway
(control plane in its own process, a real daemon, one busybox httpd replica), each beside the
same GET straight to a busybox httpd on loopback, a connection per request either way."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from gpuplane.v1 import services_pb2, services_pb2_grpc, types_pb2

from bench.jobpath import job_stack
from bench.load import percentile
from bench.machine import whole_machine_millicores
from bench.registry import Measurement, RunContext, benchmark

REQUESTS = 200
WORKERS = 8
PAGE = b"hello from a replica\n"
PORT = 8080
SERVE = (
    f"mkdir -p /tmp/www && echo 'hello from a replica' > /tmp/www/index.html && "
    f"exec httpd -f -p {PORT} -h /tmp/www"
)


async def get(port: int, path: str, key: str = "") -> bytes:
    """One GET on a connection of its own (HTTP/1.0); the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"GET {path} HTTP/1.0\r\nHost: bench\r\n{auth}\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"not a 200: {head[:80]!r}")
    return body


async def measure(port: int, path: str, key: str = "") -> tuple[list[float], float]:
    """Sequential latencies of REQUESTS GETs, then requests per second of WORKERS at once."""
    for _ in range(10):  # warm-up
        await get(port, path, key)
    samples = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        await get(port, path, key)
        samples.append(time.perf_counter() - started)
    left = REQUESTS

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await get(port, path, key)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return samples, REQUESTS / (time.perf_counter() - started)


def _details(samples: list[float], rate: float) -> dict[str, float | int | str]:
    in_us = sorted(int(s * 1e6) for s in samples)
    return {
        "requests": len(in_us),
        "p50_ms": round(percentile(in_us, 0.50) / 1000, 3),
        "p99_ms": round(percentile(in_us, 0.99) / 1000, 3),
        "requests_per_s": round(rate, 1),
        "workers": WORKERS,
    }


@asynccontextmanager
async def local_httpd() -> AsyncIterator[int]:
    from devstack.ports import free_port

    busybox = shutil.which("busybox") or "busybox"
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "index.html").write_bytes(PAGE)
        port = free_port()
        proc = subprocess.Popen([busybox, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", root])
        try:
            for _ in range(100):
                try:
                    await get(port, "/")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            yield port
        finally:
            proc.kill()
            proc.wait()


@benchmark(
    "http_direct_latency",
    unit="ms",
    better="lower",
    description="p50 of a small GET straight to busybox httpd on loopback (a connection per "
    "request); details: requests per second with 8 callers",
)
async def http_direct_latency(ctx: RunContext) -> Measurement:
    async with local_httpd() as port:
        samples, rate = await measure(port, "/")
    return Measurement(statistics.median(samples) * 1000, _details(samples, rate))


@benchmark(
    "gateway_latency",
    unit="ms",
    better="lower",
    floor="http_direct_latency",
    description="p50 of the same GET through the services gateway to a busybox httpd replica "
    "(gateway → tunnel → daemon → container); the issue's target: at most 2 ms added; "
    "details: requests per second with 8 callers, and their ratio to direct (target 0.5)",
)
async def gateway_latency(ctx: RunContext) -> Measurement:
    from devstack.ports import free_port

    gateway_port = free_port()
    os.environ["GPUPLANE_GATEWAY_ADDRESS"] = f"127.0.0.1:{gateway_port}"
    try:
        async with job_stack(ctx, daemon_process=True) as stack:
            key = stack.consumer[0][1].removeprefix("Bearer ")
            await _deploy(stack.channel, stack.consumer, stack.image)
            samples, rate = await measure(gateway_port, "/s/bench/", key)
    finally:
        del os.environ["GPUPLANE_GATEWAY_ADDRESS"]
    details = _details(samples, rate)
    direct = ctx.results.get("http_direct_latency")
    if direct is not None and direct.figure is not None:
        added = statistics.median(samples) * 1000 - direct.figure
        details["added_p50_ms"] = round(added, 3)
        details["added_target_met"] = "yes" if added <= 2.0 else "no"
        direct_rate = float(direct.details.get("requests_per_s", 0) or 0)
        if direct_rate:
            details["throughput_ratio"] = round(rate / direct_rate, 3)
            details["throughput_target_met"] = "yes" if rate / direct_rate >= 0.5 else "no"
    return Measurement(statistics.median(samples) * 1000, details)


async def _deploy(
    channel: grpc.aio.Channel, consumer: tuple[tuple[str, str], ...], image: str
) -> None:
    stub = services_pb2_grpc.ServiceServiceStub(channel)
    spec = types_pb2.JobSpec(
        image=image,
        args=["sh", "-c", SERVE],
        gpu_count=1,
        cpu_millicores=whole_machine_millicores(),  # as the floor's program has
        max_price_per_gpu_hour_micro_credits=10_000_000,
        allow_simulated=True,
        allow_unverified=True,
    )
    request = services_pb2.DeployServiceRequest(
        name="bench", spec=spec, port=PORT, replicas=1, health_path="/"
    )
    await stub.DeployService(request, metadata=consumer)
    get_request = services_pb2.GetServiceRequest(service="bench")
    for _ in range(1200):
        service = (await stub.GetService(get_request, metadata=consumer)).service
        if service.ready_replicas == 1:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the bench service did not become ready: {service}")
