"""Pairs a client's tunnel with the daemon's call back, and relays frames one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gpuplane.v1 import tunnels_pb2

from controlplane.errors import FailedPrecondition, NotFound, Unavailable
from messaging.rawpath import Link

Frame = tunnels_pb2.TunnelFrame
# Largest data frame either way: bounded chunks keep every hop's memory bounded.
MAX_CHUNK = 256 * 1024


class Handoff:
    """One frame at a time from a writer to a reader: a put waits until the reader took the
    last one, so nothing queues up between the two calls (gRPC's flow control does the rest).
    Either side ending wakes the other (`wake`), so each wait is one awaited event."""

    def __init__(self) -> None:
        self._slot: list[Frame | None] = []
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    async def put(self, item: Frame | None, gone: asyncio.Event) -> bool:
        """Awaits room; False (not put) once the reader is `gone`. Data waiting behind data
        joins it while both fit in one frame (MAX_CHUNK): fewer, larger frames for the next
        hop, and still at most one frame's bytes held here."""
        if not gone.is_set() and self._joined(item):
            return True
        while self._slot and not gone.is_set():
            self.writable.clear()
            await self.writable.wait()
        if gone.is_set():
            return False
        self._slot.append(item)
        self.readable.set()
        return True

    def _joined(self, item: Frame | None) -> bool:
        """Appends a data frame to the data frame waiting in the slot, if both fit in one."""
        if not self._slot or item is None or item.WhichOneof("msg") != "data":
            return False
        waiting = self._slot[0]
        if waiting is None or waiting.WhichOneof("msg") != "data":
            return False
        if len(waiting.data) + len(item.data) > MAX_CHUNK:
            return False
        self._slot[0] = Frame(data=waiting.data + item.data)
        return True

    def empty(self) -> bool:
        return not self._slot

    def take(self) -> Frame | None:
        item = self._slot.pop()
        self.readable.clear()
        self.writable.set()
        return item

    def wake(self) -> None:
        """Wakes both sides to look again (the other side ended)."""
        self.readable.set()
        self.writable.set()


@dataclass(eq=False)
class Pipe:
    """One tunnel on this replica: the client's call on one side, the daemon's on the other,
    a Handoff each way. A side that stops reading stops the other side's reads, and gRPC's
    flow control then the peer's writes: nothing grows without bound."""

    tunnel_id: str
    host_id: str
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    to_daemon: Handoff = field(default_factory=Handoff)
    from_daemon: Handoff = field(default_factory=Handoff)
    # The client's side is done (it ended, or went away): the daemon's call ends.
    client_done: asyncio.Event = field(default_factory=asyncio.Event)
    # The daemon's call ended or broke.
    daemon_done: asyncio.Event = field(default_factory=asyncio.Event)
    # This replica is stopping: the client's call ends with UNAVAILABLE.
    closing: bool = False
    # Frames, and their data bytes, relayed from the daemon (for tests).
    relayed: int = 0
    relayed_bytes: int = 0
    # The client's side failed (a bad request): the client's call ends with it at once.
    failure: Exception | None = None
    # A raw tunnel (controlplane/tunnels/raw.py): the daemon's raw connection to the data
    # port, presenting tunnel_id, and the token the client's presents.
    daemon_link: asyncio.Future[Link] | None = None
    client_token: str = ""
    client_link: asyncio.Future[Link] | None = None

    def fail(self, error: Exception) -> None:
        self.failure = error
        self.from_daemon.wake()

    def end_client(self) -> None:
        self.client_done.set()
        self.to_daemon.wake()
        self.from_daemon.wake()

    def end_daemon(self) -> None:
        self.daemon_done.set()
        self.to_daemon.wake()
        self.from_daemon.wake()

    async def from_host(self) -> AsyncIterator[Frame]:
        """The daemon's frames, in order, until it ends; raises Unavailable when its call
        broke (or this replica is stopping) and FailedPrecondition when it refused."""
        while True:
            while self.from_daemon.empty() and not self._ended():
                await self.from_daemon.readable.wait()
                if self.from_daemon.empty():
                    self.from_daemon.readable.clear()
            if self.failure is not None:
                raise self.failure
            if self.closing:
                raise Unavailable("the control plane is shutting down; connect again")
            if self.from_daemon.empty():  # nothing came: the daemon's call is gone
                raise Unavailable("the host's daemon went away (the tunnel broke); try again")
            frame = self.from_daemon.take()
            if frame is None:
                return
            if frame.WhichOneof("msg") == "error":
                raise FailedPrecondition(f"the host could not open the tunnel: {frame.error}")
            self.relayed += 1
            self.relayed_bytes += len(frame.data)
            yield frame

    def _ended(self) -> bool:
        return self.daemon_done.is_set() or self.closing or self.failure is not None

    async def to_host(self) -> AsyncIterator[Frame]:
        """The client's frames for the daemon's call, until the client is done."""
        while True:
            while self.to_daemon.empty() and not self.client_done.is_set():
                await self.to_daemon.readable.wait()
                if self.to_daemon.empty():
                    self.to_daemon.readable.clear()
            if self.to_daemon.empty():
                return
            frame = self.to_daemon.take()
            if frame is None:
                return
            yield frame


class TunnelBroker:
    """The tunnels this replica waits for or relays, by their random id."""

    def __init__(self) -> None:
        self._pipes: dict[str, Pipe] = {}
        self.closing = False

    def expect(self) -> Pipe:
        """A new tunnel with an unguessable id (192 random bits); its host is set once known
        (until then no daemon can claim it)."""
        pipe = Pipe(secrets.token_urlsafe(24), host_id="", closing=self.closing)
        self._pipes[pipe.tunnel_id] = pipe
        return pipe

    def forget(self, pipe: Pipe) -> None:
        pipe.end_client()
        self._pipes.pop(pipe.tunnel_id, None)

    def claim(self, tunnel_id: str, host_id: str) -> Pipe:
        """The daemon of `host_id` called back for `tunnel_id`: only the host the tunnel was
        made for, only once (anything else is as unknown as a wrong id)."""
        pipe = self._pipes.get(tunnel_id)
        if pipe is None or not host_id or pipe.host_id != host_id or pipe.arrived.is_set():
            raise NotFound("tunnel_id: no tunnel waits for this host under that id")
        pipe.arrived.set()
        return pipe

    def close(self) -> None:
        """This replica is stopping: every tunnel's client gets UNAVAILABLE."""
        self.closing = True
        for pipe in self._pipes.values():
            pipe.closing = True
            pipe.from_daemon.wake()
            pipe.arrived.set()

    @property
    def open_count(self) -> int:
        return len(self._pipes)


async def wait_arrival(pipe: Pipe, timeout: float) -> None:
    """Waits for the daemon's call back; UNAVAILABLE after `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await pipe.arrived.wait()
    if pipe.closing:
        raise Unavailable("the control plane is shutting down; connect again")
    if not pipe.arrived.is_set():
        raise Unavailable(
            f"the host did not open the tunnel within {timeout:g}s (its daemon may be "
            "disconnected or busy); try again"
        )
