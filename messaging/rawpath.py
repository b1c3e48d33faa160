"""Raw tunnel connections: the data port's handshake, and splicing two connections together."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

# What a connection to a tunnel data port writes first: its token (32 ASCII characters,
# 192 random bits: secrets.token_urlsafe(24)). The port answers ACCEPTED once it took it, and
# closes a connection whose token is wrong, used or late without a byte.
TOKEN_LEN = 32
ACCEPTED = b"+"
# A side's write buffer above this pauses the reads of the side feeding it; bytes a side
# holds before it has a peer are bounded by it too.
HIGH_WATER = 1024 * 1024
# Bytes read per call by the stream pumps (CLI, daemon, gateway).
CHUNK = 256 * 1024
# The pipe each splice(2) thread moves bytes through.
PIPE_SIZE = 1024 * 1024


class Refused(ConnectionError):
    """The data port closed the connection without accepting its token."""


async def connect(
    address: str, token: str, context: ssl.SSLContext | None, server_name: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the data port at host:port, its token accepted."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    reader, writer = await asyncio.open_connection(
        host,
        int(port),
        ssl=context,
        server_hostname=(server_name or host) if context is not None else None,
        limit=HIGH_WATER,
    )
    writer.write(token.encode("ascii"))
    try:
        answer = await reader.readexactly(1)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        raise Refused(f"the tunnel data port at {address} refused the connection") from None
    if answer != ACCEPTED:
        writer.close()
        raise Refused(f"the tunnel data port at {address} answered {answer!r}")
    return reader, writer


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """`reader`'s bytes to `writer` until end-of-file, then a half-close (a full close where
    the transport cannot half-close, as TLS)."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    else:
        writer.close()


async def splice_streams(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Both ways between two stream pairs until both ends are done (or one breaks); each
    write awaits its drain, so a slow reader holds the other side's reads back."""
    tasks = [asyncio.create_task(pump(a[0], b[1])), asyncio.create_task(pump(b[0], a[1]))]
    try:
        for done in asyncio.as_completed(tasks):
            await done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer in (a, b):
            writer.close()


class Link(asyncio.Protocol):
    """One accepted connection of a data port. It reads its token first (`on_token`), holds
    what follows (at most HIGH_WATER: its reads pause) until `pair` gives it a peer, then
    writes every read straight to the peer: the peer's write buffer above its high-water mark
    pauses this side's reads (and resumes them below the low one). End-of-file one way is a
    half-close the other way; both done, or either connection lost, closes both."""

    def __init__(self, on_token: Callable[[Link, str], None] | None) -> None:
        self.on_token = on_token
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        # No on_token: a connection whose handshake is done (or that has none).
        self.token = "" if on_token is not None else "-"
        self.held = bytearray()
        self.peer: Link | None = None
        self.eof = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Called once the connection is gone (a standing pool forgets it).
        self.on_lost: Callable[[Link], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        if not self.token:
            self.head += data
            if len(self.head) < TOKEN_LEN:
                return
            token, data = bytes(self.head[:TOKEN_LEN]), bytes(self.head[TOKEN_LEN:])
            self.head.clear()
            self.token = token.decode("ascii", "replace")
            assert self.on_token is not None
            self.on_token(self, self.token)
            if self.peer is not None or self.closing:
                if data and self.peer is not None:
                    self.data_received(data)
                return
        self.held += data
        if len(self.held) >= HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None and self.on_lost is not None:
            self.close()  # idle in a standing pool: its daemon let it go
        if self.peer is not None:
            self.peer.shut_write()
            if self.peer.eof:
                self.close()
                self.peer.close()
        return True  # keep the other direction open

    def shut_write(self) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.peer is not None:
            self.peer.close()
        if self.on_lost is not None:
            self.on_lost(self)

    def accept(self) -> None:
        assert self.transport is not None
        self.transport.write(ACCEPTED)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def pair(a: Link, b: Link) -> None:
    """Splices two accepted links: what each held goes to the other first."""
    a.peer, b.peer = b, a
    for one, other in ((a, b), (b, a)):
        assert other.transport is not None
        assert one.transport is not None
        if one.held:
            other.transport.write(bytes(one.held))
            one.held.clear()
        if one.eof:
            other.shut_write()
        if not one.closing:
            one.transport.resume_reading()
    if a.eof and b.eof:
        a.close()
        b.close()
    elif a.closing or b.closing:
        (b if a.closing else a).close()


async def spliced(a: Link, b: Link) -> None:
    """Waits until both links of a pair are gone."""
    await asyncio.gather(a.lost, b.lost)


async def splice_plain(a: socket.socket, b: socket.socket, first: bytes = b"") -> None:
    """Both ways between two non-blocking sockets on the event loop (Links: no task per
    direction, each read written straight to the other side under its high-water mark), with
    `first` sent to `b` before anything; until both are done. Cheaper than splice_sockets'
    threads for short exchanges (a gateway request)."""
    loop = asyncio.get_running_loop()
    _, one = await loop.create_connection(lambda: Link(None), sock=a)
    try:
        _, other = await loop.create_connection(lambda: Link(None), sock=b)
    except BaseException:
        one.abort()
        raise
    one.held += first  # as if `a` had just said it: it goes to `b` first
    pair(one, other)
    try:
        await spliced(one, other)
    finally:
        one.abort()
        other.abort()


async def connect_socket(address: str, token: str) -> socket.socket:
    """A plaintext connection to the data port, its token accepted: a blocking socket for
    splice_sockets."""
    loop = asyncio.get_running_loop()
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:  # an address: no resolver round trip (a thread) per connection
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        where: tuple[Any, ...] = (host, int(port))
    except ValueError:
        infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        family, _, _, _, where = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, where)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(sock, token.encode("ascii"))
        if await loop.sock_recv(sock, 1) != ACCEPTED:
            raise Refused(f"the tunnel data port at {address} refused the connection")
    except BaseException:
        sock.close()
        raise
    return sock


def _move(src: socket.socket, dst: socket.socket) -> bool:
    """src → dst through a pipe with splice(2) (the bytes stay in the kernel) until src's
    end-of-file (then dst is half-closed: True) or an error (False). Blocking: a thread."""
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while True:
            moved = os.splice(src.fileno(), write_end, PIPE_SIZE)
            if not moved:
                break
            while moved:
                moved -= os.splice(read_end, dst.fileno(), moved)
        dst.shutdown(socket.SHUT_WR)
        return True
    except OSError:
        return False
    finally:
        os.close(read_end)
        os.close(write_end)


async def splice_sockets(a: socket.socket, b: socket.socket) -> None:
    """Both ways between two plain sockets, a thread each way moving bytes with splice(2):
    a full pipe blocks its thread, so a slow reader holds the other side back by the socket
    buffers and one pipe. End-of-file one way half-closes the other; an error either way (or
    cancelling this) shuts both down. The sockets are closed on the way out."""
    loop = asyncio.get_running_loop()
    for sock in (a, b):
        sock.setblocking(True)

    def run(src: socket.socket, dst: socket.socket) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = loop.create_future()

        def settle(ok: bool) -> None:
            if not future.done():
                future.set_result(ok)

        def work() -> None:
            loop.call_soon_threadsafe(settle, _move(src, dst))

        threading.Thread(target=work, name="splice", daemon=True).start()
        return future

    ways = [run(a, b), run(b, a)]
    try:
        for way in asyncio.as_completed(ways):
            if not await way:
                break
    finally:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        await asyncio.shield(asyncio.gather(*ways))
        a.close()
        b.close()


def _detach(link: Link) -> socket.socket | None:
    """The link's connection as a socket of its own (the event loop lets go of it), or None
    when its transport still has bytes to write (then it stays on the loop)."""
    transport = link.transport
    if transport is None or transport.is_closing() or transport.get_write_buffer_size():
        return None
    transport.pause_reading()
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    transport.abort()  # closes the loop's descriptor; the duplicate keeps the connection
    return sock


async def splice_links(a: Link, b: Link, kernel: bool) -> None:
    """Splices two accepted links until both ways are done: with `kernel` (plaintext) their
    sockets leave the event loop for splice_sockets (what either held goes first), else they
    are paired on the loop (TLS)."""
    one = _detach(a) if kernel else None
    other = _detach(b) if one is not None else None
    if one is None or other is None:
        if one is not None:  # cannot happen after a plain accept; kept correct anyway
            one.close()
            b.close()
            return
        pair(a, b)
        await spliced(a, b)
        return
    loop = asyncio.get_running_loop()
    for sock in (one, other):
        sock.setblocking(False)
    try:
        if a.held:
            await loop.sock_sendall(other, bytes(a.held))
        if b.held:
            await loop.sock_sendall(one, bytes(b.held))
    except BaseException:
        one.close()
        other.close()
        raise
    await splice_sockets(one, other)
