"""Raw port-forwards (PortForwardStart.raw) through the control plane's tunnel data port and a
real daemon into a busybox container: bytes, half-close, tokens, lifetime, back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web
from gpuplane.v1 import jobs_pb2, tunnels_pb2, types_pb2

from controlplane.errors import FailedPrecondition
from controlplane.gateway.transport import Transport
from controlplane.tunnels.service import TunnelService
from controlplane.tunnels.standing import STANDING
from daemon.channel import ChannelSecurity
from daemon.rawpath import StandingPool
from devstack import DockerEngine, NatsServer, S3Server
from gpuplane_cli import rawforward
from messaging.rawpath import CHUNK, Refused, connect
from tests.controlplane.scheduler.planes import until
from tests.e2e.test_tunnels import peak_rss
from tests.e2e.tunnelstack import (
    ECHO_PORT,
    HTTP_PORT,
    INDEX,
    TunnelStack,
    tunnel_stack,
    wait_listening,
)

T = tunnels_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]
Call = grpc.aio.StreamStreamCall[T.PortForwardRequest, T.PortForwardResponse]


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[TunnelStack]:
    data_dir = tmp_path_factory.mktemp("raw-tunnels")
    async with tunnel_stack(data_dir, nats_server, s3_server, docker_engine, test_image) as s:
        await wait_listening(s, HTTP_PORT)
        await wait_listening(s, ECHO_PORT)
        yield s


async def open_raw(
    stack: TunnelStack, port: int, more: list[T.PortForwardRequest] | None = None
) -> tuple[Call, T.RawPath, asyncio.Event]:
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[T.PortForwardRequest]:
        start = T.PortForwardStart(job_id=stack.job.job_id, port=port, raw=True)
        yield T.PortForwardRequest(start=start)
        for request in more or []:
            yield request
        await stop.wait()

    call = stack.tunnels.PortForward(
        requests(), metadata=stack.plane.auth(stack.plane.consumer_key)
    )
    first = await call.read()
    assert isinstance(first, T.PortForwardResponse)
    assert first.WhichOneof("msg") == "raw_path"
    assert len(first.raw_path.token) == 32
    assert not first.raw_path.tls
    return call, first.raw_path, stop


def tunnels_of(stack: TunnelStack) -> TunnelService:
    tunnels = stack.plane.plane.tunnels
    assert tunnels is not None
    assert tunnels.data is not None
    return tunnels


async def test_http_through_a_raw_port_forward_with_a_half_close(stack: TunnelStack) -> None:
    call, path, stop = await open_raw(stack, HTTP_PORT)
    reader, writer = await connect(path.address, path.token, None)
    writer.write(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
    writer.write_eof()  # the half-close reaches httpd, which still answers
    reply = await asyncio.wait_for(reader.read(), 10)
    assert reply.startswith(b"HTTP/1.")
    assert reply.endswith(INDEX)
    writer.close()
    # Both ways done: the call ends cleanly, and nothing is left on the control plane.
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK
    stop.set()
    await until(lambda: tunnels_of(stack).broker.open_count == 0, 10, "the tunnel is forgotten")


async def test_bytes_both_ways_through_the_echo(stack: TunnelStack) -> None:
    call, path, stop = await open_raw(stack, ECHO_PORT)
    reader, writer = await connect(path.address, path.token, None)
    volume = 8 * 1024 * 1024
    block = bytes(range(256)) * 256

    async def send() -> None:
        for _ in range(volume // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = bytearray()
    while data := await asyncio.wait_for(reader.read(CHUNK), 10):
        got += data
    await sender
    assert len(got) == volume
    assert got[: len(block)] == block
    assert got[-len(block) :] == block
    writer.close()
    stop.set()
    call.cancel()


async def test_a_token_is_good_once_and_wrong_ones_get_nothing(stack: TunnelStack) -> None:
    data = tunnels_of(stack).data
    assert data is not None
    call, path, stop = await open_raw(stack, ECHO_PORT)
    refused = data.refused
    with pytest.raises(Refused):  # someone else's guess
        await connect(path.address, "x" * 32, None)
    reader, writer = await connect(path.address, path.token, None)
    with pytest.raises(Refused):  # the same token again
        await connect(path.address, path.token, None)
    # A daemon's side: a tunnel id nobody waits for is refused as well.
    with pytest.raises(Refused):
        await connect(path.address, "t" * 32, None)
    assert data.refused == refused + 3
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"ping\n"
    writer.close()
    stop.set()
    call.cancel()


async def test_a_late_client_is_unavailable_and_its_token_dies(stack: TunnelStack) -> None:
    tunnels = tunnels_of(stack)
    timeout, tunnels.open_timeout = tunnels.open_timeout, 0.3
    try:
        call, path, stop = await open_raw(stack, ECHO_PORT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "data port" in (caught.value.details() or "")
        with pytest.raises(Refused):
            await connect(path.address, path.token, None)
        stop.set()
    finally:
        tunnels.open_timeout = timeout


async def test_data_requests_on_a_raw_call_are_invalid(stack: TunnelStack) -> None:
    call, path, stop = await open_raw(stack, ECHO_PORT, [T.PortForwardRequest(data=b"x")])
    reader, writer = await connect(path.address, path.token, None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data" in (caught.value.details() or "")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the connection went with it
    writer.close()
    stop.set()


async def test_nothing_listening_is_failed_precondition(stack: TunnelStack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await open_raw(stack, 9)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing listens" in (caught.value.details() or "")


async def test_cancelling_the_call_closes_the_connections(stack: TunnelStack) -> None:
    call, path, stop = await open_raw(stack, ECHO_PORT)
    reader, writer = await connect(path.address, path.token, None)
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"a"
    call.cancel()
    stop.set()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 10)
    writer.close()
    agent = stack.agent
    assert agent is not None

    def serving() -> bool:
        return any("Tunnels.serve" in repr(t.get_coro()) for t in agent._tasks)

    await until(lambda: not serving(), 20, "the daemon's side of the tunnel ended")
    assert tunnels_of(stack).broker.open_count == 0


async def test_the_daemons_side_breaking_is_unavailable(stack: TunnelStack) -> None:
    call, path, stop = await open_raw(stack, ECHO_PORT)
    reader, writer = await connect(path.address, path.token, None)
    assert stack.agent is not None
    serving = [t for t in stack.agent._tasks if "Tunnels.serve" in repr(t.get_coro())]
    assert len(serving) == 1
    serving[0].cancel()  # as when the daemon dies: its call and connection break
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    stop.set()


async def test_a_client_that_stops_reading_stalls_the_path_not_memory(stack: TunnelStack) -> None:
    """The client writes into the echo and never reads: every hop's buffer fills to its
    mark, then the client's writes stop being taken; memory here (control plane and daemon
    run in this process) stays flat."""
    call, path, stop = await open_raw(stack, ECHO_PORT)
    reader, writer = await connect(path.address, path.token, None)
    block = bytes(CHUNK)
    written = 0

    async def flood() -> None:
        nonlocal written
        while True:
            writer.write(block)
            await writer.drain()
            written += len(block)

    flooding = asyncio.create_task(flood())
    await asyncio.sleep(1.5)
    stalled, rss = written, peak_rss()
    await asyncio.sleep(1.5)
    assert written == stalled  # nothing more is taken
    assert peak_rss() - rss < 32 * 1024 * 1024
    assert written < 128 * 1024 * 1024  # socket buffers and high-water marks, no more
    flooding.cancel()
    # Reading again drains it: the path was stalled, not broken.
    assert len(await asyncio.wait_for(reader.read(CHUNK), 10)) > 0
    writer.close()
    stop.set()
    call.cancel()


async def cli_forward(stack: TunnelStack, chunks: list[bytes]) -> bytes:
    """The CLI's forward of `chunks` to the echo; what came back."""
    got = bytearray()

    async def read() -> bytes:
        return chunks.pop(0) if chunks else b""

    async def write(data: bytes) -> None:
        got.extend(data)

    async def close_write() -> None:
        return None

    await asyncio.wait_for(
        rawforward.forward(
            stack.tunnels,
            stack.plane.auth(stack.plane.consumer_key),
            ChannelSecurity(plaintext=True),
            (stack.job.job_id, ECHO_PORT),
            (read, write, close_write),
        ),
        30,
    )
    return bytes(got)


async def test_the_cli_forwards_over_the_raw_path(stack: TunnelStack) -> None:
    data = tunnels_of(stack).data
    assert data is not None
    accepted = data.accepted
    assert await cli_forward(stack, [b"raw ", b"path"]) == b"raw path"
    assert data.accepted == accepted + 2  # the daemon's connection and the CLI's


async def test_the_cli_falls_back_to_frames_when_the_data_port_is_out_of_reach(
    stack: TunnelStack,
) -> None:
    """A data port the daemon cannot reach (a NAT, a compose network): the raw attempt is
    FAILED_PRECONDITION, and the CLI's forward carries the bytes in-band instead."""
    tunnels = tunnels_of(stack)
    assert tunnels.data is not None
    accepted = tunnels.data.accepted
    address, tunnels.data_address = tunnels.data_address, "127.0.0.1:1"
    try:
        assert await cli_forward(stack, [b"first ", b"second"]) == b"first second"
    finally:
        tunnels.data_address = address
    assert tunnels.data.accepted == accepted  # nothing went raw


# ---- Raw streams for the control plane's own use (the services gateway's transport).


async def get_through(tunnels: TunnelService, job_id: str) -> bytes:
    async with tunnels.open_stream(job_id, HTTP_PORT) as (reader, writer):
        writer.write(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)


def pools(stack: TunnelStack) -> dict[str, StandingPool]:
    assert stack.agent is not None
    return stack.agent.tunnels.standing


async def test_streams_reuse_the_daemons_standing_connections(stack: TunnelStack) -> None:
    tunnels = tunnels_of(stack)
    for _ in range(3):
        reply = await get_through(tunnels, stack.job.job_id)
        assert reply.startswith(b"HTTP/1.")
        assert reply.endswith(INDEX)
    (pool,) = pools(stack).values()  # one command asked for one pool, used three times
    assert pool.served == 3
    assert pool.count == STANDING


async def test_a_stream_into_a_job_that_is_not_running(stack: TunnelStack) -> None:
    with pytest.raises(FailedPrecondition, match="not running"):
        await get_through(tunnels_of(stack), "job_nonexistent")


async def test_a_pool_its_daemon_let_go_is_asked_for_again(stack: TunnelStack) -> None:
    tunnels = tunnels_of(stack)
    await get_through(tunnels, stack.job.job_id)
    (before,) = pools(stack)
    assert stack.agent is not None
    keeping = [t for t in stack.agent._tasks if "keep_standing" in repr(t.get_coro())]
    for task in keeping:
        task.cancel()  # as when the daemon restarts: its standing connections close
    await until(lambda: not pools(stack), 10, "the daemon's pool ended")
    reply = await get_through(tunnels, stack.job.job_id)
    assert reply.endswith(INDEX)
    (after,) = pools(stack)
    assert after != before


async def test_a_large_answer_streams_to_a_slow_caller_without_buffering(
    stack: TunnelStack,
) -> None:
    """32 MiB through the gateway's transport to a caller that reads 64 KiB, then stalls:
    the answer is not gathered anywhere (memory here stays flat), then arrives whole."""
    size = 32 * 1024 * 1024
    _, _, code = await stack.exec(["dd", "if=/dev/zero", "of=/tmp/www/big", "bs=1M", "count=32"])
    assert code == 0
    transport = Transport(tunnels_of(stack))

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n"
        return await transport.exchange(stack.job.job_id, HTTP_PORT, raw)

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    address = site._server.sockets[0].getsockname()  # type: ignore[attr-defined]
    try:
        rss = peak_rss()
        reader, writer = await asyncio.open_connection(*address[:2])
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert f"Content-Length: {size}".encode() in head
        got = len(await reader.read(64 * 1024))
        await asyncio.sleep(1.5)  # every hop fills to its mark, then waits
        assert peak_rss() - rss < 16 * 1024 * 1024  # the answer is not gathered anywhere
        while data := await asyncio.wait_for(reader.read(1 << 20), 10):
            got += len(data)
        assert got == size
        writer.close()
    finally:
        await runner.cleanup()


async def test_the_replica_stopping_is_unavailable_and_closes_the_connection(
    stack: TunnelStack,
) -> None:
    call, path, stop = await open_raw(stack, ECHO_PORT)
    reader, writer = await connect(path.address, path.token, None)
    broker = tunnels_of(stack).broker
    broker.close()  # what ControlPlane.stop does first (the data port's listener aside)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (caught.value.details() or "")
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        broker.closing = False  # the module's stack goes on serving
    writer.close()
    stop.set()


async def test_a_pool_ends_with_its_attempt(stack: TunnelStack, test_image: str) -> None:
    """The workload stops: its daemon lets its standing connections go (it looks every few
    seconds), and a stream into it is FAILED_PRECONDITION, not a wait."""
    plane = stack.plane
    kept = len(pools(stack))
    script = f"nc -ll -p {ECHO_PORT} -e cat"
    job = await plane.submit(image=test_image, command=["sh", "-c", script], gpu_count=1)
    await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING], 60)
    tunnels = tunnels_of(stack)
    for _ in range(50):
        try:
            async with tunnels.open_stream(job.job_id, ECHO_PORT) as (reader, writer):
                writer.write(b"x")
                assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
            break
        except asyncio.IncompleteReadError:  # nc listens a moment after the start
            await asyncio.sleep(0.1)
    assert len(pools(stack)) == kept + 1
    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_CANCELLED], 30)
    await until(lambda: len(pools(stack)) == kept, 15, "the ended attempt's pool is let go")
    with pytest.raises(FailedPrecondition, match="not running"):
        async with tunnels.open_stream(job.job_id, ECHO_PORT):
            pass
