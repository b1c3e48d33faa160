"""Tunnel figures: a 1-byte echo's round trip through Exec and bytes per second through
PortForward (control plane and daemon each in its own process, a busybox container), each beside
the same over a direct loopback TCP connection to the same program (busybox nc running cat)."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gpuplane.v1 import jobs_pb2, tunnels_pb2, tunnels_pb2_grpc, types_pb2

from bench.jobpath import Stack, job_stack
from bench.load import percentile
from bench.machine import whole_machine_millicores
from bench.registry import Measurement, RunContext, benchmark
from bench.resources import ServerProcess
from bench.servers import ECHO_STREAM_METHOD
from daemon.channel import PLAINTEXT, open_channel
from gpuplane_cli.terminal import CHUNK as CLI_CHUNK
from messaging.rawpath import connect

T = tunnels_pb2
ECHOES = 300
# Bytes each way per throughput figure: about a second at loopback speeds (32 MiB took 20-70
# ms and 256 MiB 0.2-0.5 s: windows short enough for a scheduler hiccup to move the figure
# by a third).
VOLUME = 1024 * 1024 * 1024
# The same for the gRPC-framed paths, 5-10x slower: as long a window with less.
FRAMED_VOLUME = 256 * 1024 * 1024
# Per write and read by the application, direct or through the tunnel alike.
CHUNK = 64 * 1024
# What the CLI reads off its local connection per PortForward request.
FRAME = CLI_CHUNK
ECHO_PORT = 7000
SCRIPT = f"(nc -ll -p {ECHO_PORT} -e cat &) && sleep 3600"
Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[], Awaitable[bytes]]


def _latencies(samples: list[float]) -> dict[str, float | int | str]:
    in_us = sorted(int(s * 1e6) for s in samples)
    return {
        "echoes": len(in_us),
        "p50_ms": round(percentile(in_us, 0.50) / 1000, 3),
        "p99_ms": round(percentile(in_us, 0.99) / 1000, 3),
    }


async def _rtts(send: Send, receive: Receive, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await send(b"x")
        got = b""
        while not got:
            got = await receive()
        samples.append(time.perf_counter() - started)
    return samples


async def _throughput(send: Send, receive: Receive, volume: int) -> float:
    """MB/s of `volume` bytes sent and echoed back, both directions at once."""
    chunk = bytes(CHUNK)

    async def writer() -> None:
        for _ in range(volume // CHUNK):
            await send(chunk)

    started = time.perf_counter()
    task = asyncio.create_task(writer())
    got = 0
    while got < volume:
        got += len(await receive())
    await task
    return volume / (time.perf_counter() - started) / 1e6


class _LocalEcho:
    """busybox nc running cat on a loopback port: the direct-TCP floor's server."""

    def __init__(self, relays: int = 0, workdir: Path | None = None) -> None:
        # Bare relays (bench.servers relay) between the client and the echo, each in its
        # own process: the tunnels' ceiling.
        self.relays = relays
        self.workdir = workdir
        self.servers: list[ServerProcess] = []

    async def __aenter__(self) -> tuple[Send, Receive]:
        from devstack.ports import free_port

        busybox = shutil.which("busybox") or "busybox"
        port = free_port()
        self.proc = subprocess.Popen([busybox, "nc", "-ll", "-p", str(port), "-e", "cat"])
        for hop in range(self.relays):
            assert self.workdir is not None
            log = self.workdir / f"relay-{hop}.log"
            server = ServerProcess("relay", log, f"--target=127.0.0.1:{port}")
            self.servers.append(server)
            port = (await server.start())["port"]
        for _ in range(100):
            try:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("busybox nc did not listen")

        async def send(data: bytes) -> None:
            self.writer.write(data)
            await self.writer.drain()

        return send, lambda: self.reader.read(CHUNK)

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        for server in self.servers:
            await server.stop()
        self.proc.kill()
        self.proc.wait()


@benchmark(
    "tcp_echo_rtt",
    unit="ms",
    better="lower",
    description="p50 round trip of 1 byte to busybox `nc -e cat` over a direct loopback TCP "
    "connection",
)
async def tcp_echo_rtt(ctx: RunContext) -> Measurement:
    async with _LocalEcho() as (send, receive):
        samples = await _rtts(send, receive, ECHOES)
        details = _latencies(samples)
        details["throughput_mb_s"] = round(await _throughput(send, receive, VOLUME), 1)
    return Measurement(statistics.median(samples) * 1000, details)


@benchmark(
    "exec_echo_rtt",
    unit="ms",
    better="lower",
    floor="tcp_echo_rtt",
    description="p50 round trip of 1 byte to `cat` run by Exec (client → control plane → "
    "daemon → docker exec and back); the issue's target: at most 2 ms added to the floor",
)
async def exec_echo_rtt(ctx: RunContext) -> Measurement:
    async with _tunnel_stack(ctx) as (stack, job_id):
        stop = asyncio.Event()
        start = T.ExecStart(job_id=job_id, command=["cat"], stdin=True)
        outgoing: asyncio.Queue[T.ExecRequest] = asyncio.Queue(1)

        async def requests() -> AsyncIterator[T.ExecRequest]:
            yield T.ExecRequest(start=start)
            while not stop.is_set():
                yield await outgoing.get()

        stub = tunnels_pb2_grpc.TunnelServiceStub(stack.channel)
        call = stub.Exec(requests(), metadata=stack.consumer)

        async def send(data: bytes) -> None:
            await outgoing.put(T.ExecRequest(stdin=data))

        async def receive() -> bytes:
            response = await call.read()
            return bytes(getattr(response, "stdout", b""))

        await _rtts(send, receive, 20)  # warm-up
        samples = await _rtts(send, receive, ECHOES)
        stop.set()
        call.cancel()
    return _added(ctx, samples, "tcp_echo_rtt")


def _added(ctx: RunContext, samples: list[float], floor: str) -> Measurement:
    details = _latencies(samples)
    direct = ctx.results.get(floor)
    if direct is not None and direct.figure is not None:
        added = statistics.median(samples) * 1000 - direct.figure
        details["added_p50_ms"] = round(added, 3)
        details["added_target_met"] = "yes" if added <= 2.0 else "no"
    return Measurement(statistics.median(samples) * 1000, details)


@benchmark(
    "port_forward_throughput",
    unit="MB/s",
    better="higher",
    floor="tcp_throughput",
    target=0.5,
    description="bytes echoed per second by busybox `nc -e cat` in the container through a "
    "raw PortForward (client → the control plane's tunnel data port → daemon, spliced; gRPC "
    "sets it up), both directions at once, vs the same over direct loopback TCP",
)
async def port_forward_throughput(ctx: RunContext) -> Measurement:
    async with _tunnel_stack(ctx) as (stack, job_id):
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[T.PortForwardRequest]:
            start = T.PortForwardStart(job_id=job_id, port=ECHO_PORT, raw=True)
            yield T.PortForwardRequest(start=start)
            await stop.wait()

        stub = tunnels_pb2_grpc.TunnelServiceStub(stack.channel)
        call = stub.PortForward(requests(), metadata=stack.consumer)
        first = await call.read()
        assert isinstance(first, T.PortForwardResponse)
        reader, writer = await connect(first.raw_path.address, first.raw_path.token, None)

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def receive() -> bytes:
            return await reader.read(CHUNK)

        await _rtts(send, receive, 5)
        rate = await _throughput(send, receive, VOLUME)
        writer.close()
        stop.set()
        call.cancel()
    details: dict[str, float | int | str] = {"megabytes": VOLUME // 1_000_000, "chunk_bytes": CHUNK}
    frames = ctx.results.get("port_forward_frames_throughput")
    if frames is not None and frames.figure:
        details["vs_in_band_frames"] = round(rate / frames.figure, 2)
    chain = ctx.results.get("relay_chain_throughput")
    if chain is not None and chain.figure:
        details["vs_relay_chain"] = round(rate / chain.figure, 3)
    return Measurement(rate, details)


@benchmark(
    "port_forward_frames_throughput",
    unit="MB/s",
    better="higher",
    floor="tcp_throughput",
    description="the same as port_forward_throughput over PortForward's in-band `data` "
    "messages (grpcurl's way; the bytes cross two gRPC hops), for comparison",
)
async def port_forward_frames_throughput(ctx: RunContext) -> Measurement:
    async with _tunnel_stack(ctx) as (stack, job_id):
        local = _LocalSocket()

        async def requests() -> AsyncIterator[T.PortForwardRequest]:
            yield T.PortForwardRequest(start=T.PortForwardStart(job_id=job_id, port=ECHO_PORT))
            while data := await local.read():
                yield T.PortForwardRequest(data=data)

        stub = tunnels_pb2_grpc.TunnelServiceStub(stack.channel)
        call = stub.PortForward(requests(), metadata=stack.consumer)

        async def receive() -> bytes:
            response = await call.read()
            return bytes(getattr(response, "data", b""))

        await _rtts(local.write, receive, 5)
        rate = await _throughput(local.write, receive, FRAMED_VOLUME)
        call.cancel()
    details: dict[str, float | int | str] = {"megabytes": FRAMED_VOLUME // 1_000_000}
    details.update(chunk_bytes=CHUNK, frame_bytes=FRAME)
    bare = ctx.results.get("grpc_stream_throughput")
    if bare is not None and bare.figure:
        details["vs_one_bare_grpc_hop"] = round(rate / bare.figure, 2)
    return Measurement(rate, details)


class _LocalSocket:
    """The application's connection to `gpuplane port-forward` as the CLI sees it: the
    application writes CHUNK at a time into a bounded buffer (a socket's), the CLI reads what
    has arrived, up to FRAME (gpuplane_cli.terminal.CHUNK), per PortForward request."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.changed = asyncio.Condition()

    async def write(self, data: bytes) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.buffer) < FRAME)
            self.buffer += data
            self.changed.notify_all()

    async def read(self) -> bytes:
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.buffer))
            data = bytes(self.buffer[:FRAME])
            del self.buffer[:FRAME]
            self.changed.notify_all()
            return data


@benchmark(
    "grpc_stream_throughput",
    unit="MB/s",
    better="higher",
    description="bytes echoed per second by a bare grpc.aio bidirectional stream (server in "
    "its own process, raw bytes, messages as large as a tunnel's frames): one gRPC hop, the "
    "most a relay built on grpc.aio could move; PortForward crosses two",
)
async def grpc_stream_throughput(ctx: RunContext) -> Measurement:
    async with ServerProcess("echo", ctx.workdir / "echo-stream-server.log") as server:
        ready = await server.start()
        async with open_channel(f"127.0.0.1:{ready['port']}", PLAINTEXT) as channel:
            method = channel.stream_stream(ECHO_STREAM_METHOD, None, None)
            call: Any = method()  # type: ignore[call-arg]
            local = _LocalSocket()

            async def pump() -> None:
                while data := await local.read():
                    await call.write(data)

            async def receive() -> bytes:
                data: bytes = await call.read()
                return data

            pumping = asyncio.create_task(pump())
            rate = await _throughput(local.write, receive, FRAMED_VOLUME)
            pumping.cancel()
            call.cancel()
    details: dict[str, float | int | str] = {"megabytes": FRAMED_VOLUME // 1_000_000}
    details.update(chunk_bytes=CHUNK, frame_bytes=FRAME)
    return Measurement(rate, details)


@benchmark(
    "tcp_throughput",
    unit="MB/s",
    better="higher",
    description="bytes echoed per second by busybox `nc -e cat` over direct loopback TCP "
    "(both directions at once)",
)
async def tcp_throughput(ctx: RunContext) -> Measurement:
    async with _LocalEcho() as (send, receive):
        rate = await _throughput(send, receive, VOLUME)
    return Measurement(rate, {"megabytes": VOLUME // 1_000_000, "chunk_bytes": CHUNK})


@benchmark(
    "relay_chain_throughput",
    unit="MB/s",
    better="higher",
    description="the same echo as tcp_throughput through two bare TCP relays in their own "
    "processes (accept, connect on, splice(2) both ways: no handshake, no event loop): three "
    "loopback connections in a row as a raw port-forward has (client → control plane → "
    "daemon → container), so the most any such relay could reach on this machine",
)
async def relay_chain_throughput(ctx: RunContext) -> Measurement:
    async with _LocalEcho(relays=2, workdir=ctx.workdir) as (send, receive):
        rate = await _throughput(send, receive, VOLUME)
    details: dict[str, float | int | str] = {"megabytes": VOLUME // 1_000_000, "relays": 2}
    direct = ctx.results.get("tcp_throughput")
    if direct is not None and direct.figure:
        details["vs_tcp_throughput"] = round(rate / direct.figure, 3)
    return Measurement(rate, details)


@asynccontextmanager
async def _tunnel_stack(ctx: RunContext) -> AsyncIterator[tuple[Stack, str]]:
    """A job stack with one running job serving the echo on ECHO_PORT."""
    async with job_stack(ctx, daemon_process=True) as stack:
        spec = types_pb2.JobSpec(
            image=stack.image,
            command=["sh", "-c", SCRIPT],
            gpu_count=1,
            cpu_millicores=whole_machine_millicores(),  # as the floor's program has
            max_duration_seconds=600,
            max_price_per_gpu_hour_micro_credits=10_000_000,
            allow_simulated=True,
            allow_unverified=True,
        )
        request = jobs_pb2.SubmitJobRequest(spec=spec)
        reply = await stack.jobs.SubmitJob(request, metadata=stack.consumer)
        job_id = reply.job.job_id
        for _ in range(600):
            got = await stack.jobs.GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), metadata=stack.consumer
            )
            if got.job.state == types_pb2.JOB_STATE_RUNNING:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"job {job_id} did not start")
        await asyncio.sleep(0.5)  # nc listens a moment after the container runs
        yield stack, job_id
