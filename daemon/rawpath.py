"""Raw tunnels on the daemon: container bytes over a plain (or TLS) connection to the replica's
tunnel data port instead of gRPC frames, one per port-forward or standing for the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

import grpc
from gpuplane.v1 import tunnels_pb2

from messaging.rawpath import (
    CHUNK,
    HIGH_WATER,
    Refused,
    connect,
    connect_socket,
    splice_plain,
    splice_sockets,
    splice_streams,
)

if TYPE_CHECKING:
    from daemon.agent import Agent

log = logging.getLogger(__name__)
Frame = tunnels_pb2.TunnelFrame
Call: TypeAlias = "grpc.aio.StreamStreamCall[tunnels_pb2.TunnelFrame, tunnels_pb2.TunnelFrame]"
Streams: TypeAlias = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Standing connections a daemon keeps at most per command (the control plane asks for fewer).
MAX_STANDING = 16
# After its last word, how long the daemon waits for the control plane to end a call.
END_GRACE = 5.0
# How often an idle pool looks whether its attempt still runs.
CHECK_SECONDS = 2.0


def _server_name(agent: Agent) -> str:
    return agent.settings.channel_security().server_name


async def open_data(agent: Agent, command: tunnels_pb2.TunnelCommand) -> Streams:
    """A connection to the command's data port, its tunnel id accepted."""
    security = agent.settings.channel_security()
    context = security.raw_context() if command.data_tls else None
    return await connect(command.data_address, command.tunnel_id, context, security.server_name)


async def relay(call: Call, sock: socket.socket, data: Streams | socket.socket) -> None:
    """The container's socket spliced with the data connection until both ways are done
    (then the call says close_write and ends), or until the control plane ends the call (the
    client went away): the connections close. A plaintext data connection is a socket,
    spliced by the kernel (splice(2)); a TLS one goes through the event loop."""
    if isinstance(data, socket.socket):
        splice = asyncio.create_task(splice_sockets(sock, data))
    else:
        container = await asyncio.open_connection(sock=sock, limit=HIGH_WATER)
        splice = asyncio.create_task(splice_streams(container, data))
    ended = asyncio.create_task(_call_ended(call))
    try:
        await asyncio.wait({splice, ended}, return_when=asyncio.FIRST_COMPLETED)
        if splice.done():
            await call.write(Frame(close_write=True))
            await call.done_writing()
            # The control plane ends the call once its side is done too; cancelling it at
            # once could lose the close_write (the client would read UNAVAILABLE).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), END_GRACE)
    finally:
        for task in (splice, ended):
            task.cancel()
        await asyncio.gather(splice, ended, return_exceptions=True)
        sock.close()
        if isinstance(data, socket.socket):
            data.close()
        else:
            data[1].close()


async def _call_ended(call: Call) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            pass


class StandingPool:
    """Keeps `count` accepted connections to a data port for one port of one attempt: the
    first bytes on one (a gateway request) connect it into the container, and another is
    opened in its place. Ends when the data port refuses the id (the replica forgot the
    pool), or the attempt no longer runs here."""

    def __init__(
        self,
        agent: Agent,
        command: tunnels_pb2.TunnelCommand,
        connect_container: Callable[[], Awaitable[socket.socket]],
        running: Callable[[], bool],
    ) -> None:
        self.agent = agent
        self.command = command
        self.connect_container = connect_container
        # Whether the attempt still runs here: looked at every CHECK_SECONDS while idle.
        self.running = running
        self.count = min(command.standing, MAX_STANDING)
        self.done = asyncio.Event()
        self.idle = 0
        self.served = 0
        self.wanted = asyncio.Event()

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self.done.is_set():
                while self.idle < self.count:
                    self.idle += 1
                    task = asyncio.create_task(self._one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                self.wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wanted.wait(), CHECK_SECONDS)
                if not self.running():  # the attempt ended: its connections go too
                    self._end()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _end(self) -> None:
        self.done.set()
        self.wanted.set()

    async def _one(self) -> None:
        """One standing connection: waits for its first bytes, then serves them; another
        takes its place as soon as it is no longer idle (an end-of-file first: the replica
        let it go; refused: the replica forgot the pool, which ends)."""
        data: Streams | socket.socket | None = None
        idle = True
        ended = True  # anything unforeseen ends the pool (never a loop of failures)
        try:
            if self.command.data_tls:
                data = await open_data(self.agent, self.command)
                first = await data[0].read(CHUNK)
            else:
                data = await connect_socket(self.command.data_address, self.command.tunnel_id)
                first = await asyncio.get_running_loop().sock_recv(data, CHUNK)
            idle = ended = False
            self.idle -= 1
            self.wanted.set()
            if first:
                await self._serve(first, data)
        except (Refused, OSError) as exc:
            if idle:
                log.info("standing tunnel %s… ended: %s", self.command.tunnel_id[:6], exc)
        except asyncio.CancelledError:
            ended = False
            raise
        finally:
            if idle:
                self.idle -= 1
                self.wanted.set()
            if ended:
                self._end()
            if isinstance(data, socket.socket):
                data.close()
            elif data is not None:
                data[1].close()

    async def _serve(self, first: bytes, data: Streams | socket.socket) -> None:
        try:
            sock = await self.connect_container()
        except (OSError, RuntimeError) as exc:
            log.info("standing tunnel %s…: %s", self.command.tunnel_id[:6], exc)
            if isinstance(exc, RuntimeError):  # the attempt is gone: so is the pool
                self._end()
            return
        self.served += 1
        if isinstance(data, socket.socket):
            await splice_plain(data, sock, first)
            return
        container = await asyncio.open_connection(sock=sock, limit=HIGH_WATER)
        container[1].write(first)
        await splice_streams(container, data)
