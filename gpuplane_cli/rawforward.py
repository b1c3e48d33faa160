"""One port-forward connection over the raw data path: PortForward (raw) says where, the bytes
go over a plain (or TLS) connection to the control plane's tunnel data port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from daemon.channel import ChannelSecurity
from messaging.rawpath import CHUNK, connect

T = tunnels_pb2
Read = Callable[[], Awaitable[bytes]]
Write = Callable[[bytes], Awaitable[None]]
CloseWrite = Callable[[], Awaitable[None]]
# A raw attempt that failed so is tried in-band: the daemon could not reach the data port
# (FAILED_PRECONDITION; anything else it said is said again), or this client could not.
_FALLBACK = frozenset({grpc.StatusCode.FAILED_PRECONDITION})


async def forward(
    stub: tunnels_pb2_grpc.TunnelServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    security: ChannelSecurity,
    target: tuple[str, int],
    local: tuple[Read, Write, CloseWrite],
) -> None:
    """Relays the local side (read, write, close_write) to port `target[1]` of workload
    `target[0]` until both ways are done; a failed call (the workload, the host, the control
    plane) raises its grpc error, and the raw connection closes with it."""
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[T.PortForwardRequest]:
        start = T.PortForwardStart(job_id=target[0], port=target[1], raw=True)
        yield T.PortForwardRequest(start=start)
        await stop.wait()

    call = stub.PortForward(requests(), metadata=metadata)
    try:
        try:
            first = await call.read()
            if not isinstance(first, T.PortForwardResponse) or not first.HasField("raw_path"):
                await _ended(call)  # the call's error, if it ended without saying where
                raise ConnectionError("the control plane did not open a raw port-forward")
            path = first.raw_path
            context = security.raw_context() if path.tls else None
            reader, writer = await connect(path.address, path.token, context, security.server_name)
        except (grpc.aio.AioRpcError, OSError) as error:
            if isinstance(error, grpc.aio.AioRpcError) and error.code() not in _FALLBACK:
                raise
            # The data port is out of reach (from here, or from the host: a NAT, a firewall,
            # a compose network): the bytes go in-band, as grpcurl's do. Nothing was read yet.
            stop.set()
            call.cancel()
            await forward_frames(stub, metadata, target, local)
            return
        try:
            await _relay(call, local, reader, writer)
        finally:
            writer.close()
    finally:
        stop.set()
        call.cancel()


async def forward_frames(
    stub: tunnels_pb2_grpc.TunnelServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    target: tuple[str, int],
    local: tuple[Read, Write, CloseWrite],
) -> None:
    """The same through PortForward's own `data` messages (two gRPC hops: slower)."""
    read, write, close_write = local

    async def requests() -> AsyncIterator[T.PortForwardRequest]:
        yield T.PortForwardRequest(start=T.PortForwardStart(job_id=target[0], port=target[1]))
        while data := await read():
            yield T.PortForwardRequest(data=data)
        yield T.PortForwardRequest(close_write=True)

    async for response in stub.PortForward(requests(), metadata=metadata):
        if response.WhichOneof("msg") == "data":
            await write(response.data)
        elif response.WhichOneof("msg") == "close_write":
            await close_write()


async def _relay(
    call: object,
    local: tuple[Read, Write, CloseWrite],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    read, write, close_write = local

    async def up() -> None:
        while data := await read():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def down() -> None:
        while data := await reader.read(CHUNK):
            await write(data)
        await close_write()

    tasks = [asyncio.ensure_future(c) for c in (up(), down(), _ended(call))]
    sending, receiving, ended = tasks
    try:
        while True:
            await asyncio.wait([t for t in tasks if not t.done()], return_when="FIRST_COMPLETED")
            for task in tasks:  # a failed call, or a broken connection, ends it
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            # Both ways done, or the call ended (both ways done at the control plane) and
            # everything from the container arrived.
            if receiving.done() and (sending.done() or ended.done()):
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ended(call: object) -> None:
    """Returns when the call ended cleanly; raises its error."""
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass
