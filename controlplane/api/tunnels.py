"""TunnelService (exec, port-forward for consumers) and TunnelRelayService (the daemon's side)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from controlplane.auth.principal import current_principal
from controlplane.errors import DomainError, InvalidArgument
from controlplane.tunnels import raw
from controlplane.tunnels.broker import MAX_CHUNK, Frame, Pipe, TunnelBroker
from controlplane.tunnels.service import TunnelService

Context = Any
T = tunnels_pb2
MAX_ARGV = 1000
MAX_ARGV_BYTES = 64 * 1024
MAX_TERMINAL = 10_000


def check_size(field: str, size: tunnels_pb2.TerminalSize) -> None:
    if size.rows > MAX_TERMINAL or size.cols > MAX_TERMINAL:
        raise InvalidArgument(field, f"rows and cols must be at most {MAX_TERMINAL}")


def check_chunk(field: str, data: bytes) -> bytes:
    if len(data) > MAX_CHUNK:
        raise InvalidArgument(field, f"at most {MAX_CHUNK} bytes per message")
    return data


def exec_start(first: tunnels_pb2.ExecRequest | None) -> tunnels_pb2.ExecStart:
    """The validated first request of Exec."""
    if first is None or first.WhichOneof("msg") != "start":
        raise InvalidArgument("start", "the first request of Exec must be start")
    start = first.start
    if not start.job_id:
        raise InvalidArgument("start.job_id", "required")
    if not start.command or not start.command[0]:
        raise InvalidArgument("start.command", "required: the program and its arguments")
    if len(start.command) > MAX_ARGV or sum(len(a) for a in start.command) > MAX_ARGV_BYTES:
        raise InvalidArgument(
            "start.command", f"at most {MAX_ARGV} arguments, {MAX_ARGV_BYTES} bytes in all"
        )
    if any("\0" in a for a in start.command):
        raise InvalidArgument("start.command", "arguments cannot contain NUL")
    check_size("start.size", start.size)
    return start


def forward_start(first: tunnels_pb2.PortForwardRequest | None) -> tunnels_pb2.PortForwardStart:
    """The validated first request of PortForward."""
    if first is None or first.WhichOneof("msg") != "start":
        raise InvalidArgument("start", "the first request of PortForward must be start")
    if not first.start.job_id:
        raise InvalidArgument("start.job_id", "required")
    if not 1 <= first.start.port <= 65535:
        raise InvalidArgument("port", f"must be 1..65535, not {first.start.port}")
    return first.start


def exec_frame(request: tunnels_pb2.ExecRequest) -> Frame | None:
    kind = request.WhichOneof("msg")
    if kind == "stdin":
        return Frame(data=check_chunk("stdin", request.stdin))
    if kind == "resize":
        check_size("resize", request.resize)
        return Frame(resize=request.resize)
    if kind == "stdin_closed":
        return Frame(close_write=True)
    raise InvalidArgument("start", "only the first request may be start")


def forward_frame(request: tunnels_pb2.PortForwardRequest) -> Frame | None:
    kind = request.WhichOneof("msg")
    if kind == "data":
        return Frame(data=check_chunk("data", request.data))
    if kind == "close_write":
        return Frame(close_write=True)
    raise InvalidArgument("start", "only the first request may be start")


async def pump_client(pipe: Pipe, frames: AsyncIterator[Frame | None]) -> None:
    """The client's requests, one at a time, to the daemon's call; a bad one ends the
    client's call with its error at once (not when the daemon next says something)."""
    try:
        async for frame in frames:
            if frame is not None and not await pipe.to_daemon.put(frame, pipe.daemon_done):
                return
    except DomainError as error:
        pipe.fail(error)
        raise


class TunnelServicer(tunnels_pb2_grpc.TunnelServiceServicer):
    def __init__(self, tunnels: TunnelService) -> None:
        self.tunnels = tunnels

    async def Exec(
        self, request_iterator: AsyncIterator[tunnels_pb2.ExecRequest], context: Context
    ) -> AsyncIterator[tunnels_pb2.ExecResponse]:
        start = exec_start(await anext(aiter(request_iterator), None))
        frames = (exec_frame(r) async for r in request_iterator)
        async with self.tunnels.open(current_principal(), start.job_id, start) as pipe:
            async for frame in relay(pipe, frames):
                kind = frame.WhichOneof("msg")
                if kind == "data":
                    yield T.ExecResponse(stdout=frame.data)
                elif kind == "stderr":
                    yield T.ExecResponse(stderr=frame.stderr)
                elif kind == "exit_code":
                    yield T.ExecResponse(exit_code=frame.exit_code)
                    return

    async def PortForward(
        self, request_iterator: AsyncIterator[tunnels_pb2.PortForwardRequest], context: Context
    ) -> AsyncIterator[tunnels_pb2.PortForwardResponse]:
        start = forward_start(await anext(aiter(request_iterator), None))
        if start.raw:
            async for response in self._raw_forward(start, request_iterator):
                yield response
            return
        frames = (forward_frame(r) async for r in request_iterator)
        async with self.tunnels.open(current_principal(), start.job_id, start.port) as pipe:
            async for frame in relay(pipe, frames):
                kind = frame.WhichOneof("msg")
                if kind == "data":
                    yield T.PortForwardResponse(data=frame.data)
                elif kind == "close_write":
                    yield T.PortForwardResponse(close_write=True)

    async def _raw_forward(
        self, start: tunnels_pb2.PortForwardStart, requests: AsyncIterator[object]
    ) -> AsyncIterator[tunnels_pb2.PortForwardResponse]:
        """The raw data path: where to connect, then the tunnel's lifetime (raw.py)."""
        tunnels = self.tunnels
        async with tunnels.open(current_principal(), start.job_id, start.port, raw=True) as pipe:
            link, path = await raw.daemon_ready(tunnels, pipe)
            try:
                where = T.RawPath(address=path.address, token=path.token, tls=path.tls)
                yield T.PortForwardResponse(raw_path=where)
                await raw.relay_raw(tunnels, pipe, link, requests)
            finally:
                link.close()


async def relay(pipe: Pipe, frames: AsyncIterator[Frame | None]) -> AsyncIterator[Frame]:
    """The daemon's frames while the client's go the other way; a client mistake (a bad
    request) ends the call with its INVALID_ARGUMENT."""
    pump = asyncio.create_task(pump_client(pipe, frames))
    try:
        async for frame in pipe.from_host():
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                break
            yield frame
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


class TunnelRelayServicer(tunnels_pb2_grpc.TunnelRelayServiceServicer):
    """The daemon's call back: paired with the tunnel that waits for it (for its own host
    only), then frames both ways until either side ends."""

    def __init__(self, broker: TunnelBroker) -> None:
        self.broker = broker

    async def Tunnel(
        self, request_iterator: AsyncIterator[Frame], context: Context
    ) -> AsyncIterator[Frame]:
        host_id = current_principal().principal_id
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "tunnel_id":
            raise InvalidArgument("tunnel_id", "the first frame of Tunnel must name the tunnel")
        pipe = self.broker.claim(first.tunnel_id, host_id)
        reader = asyncio.create_task(self._read(pipe, request_iterator))
        try:
            async for frame in pipe.to_host():
                yield frame  # awaited: the daemon's flow control holds the client back
        finally:
            pipe.end_daemon()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    @staticmethod
    async def _read(pipe: Pipe, request_iterator: AsyncIterator[Frame]) -> None:
        """The daemon's frames, one at a time, to the client; None once it ended after its
        last word."""
        finished = False  # an exit code, a close_write or an error: the daemon's last word
        try:
            async for frame in request_iterator:
                kind = frame.WhichOneof("msg")
                if kind in ("data", "stderr"):
                    check_chunk("data", frame.data or frame.stderr)
                finished = kind in ("exit_code", "close_write", "error")
                if not await pipe.from_daemon.put(frame, pipe.client_done):
                    return
            if finished:  # else its call was cut off (a cancelled call reads as ended)
                await pipe.from_daemon.put(None, pipe.client_done)
        finally:
            pipe.end_daemon()
