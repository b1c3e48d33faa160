"""Raw port-forwards: the client's and the daemon's data-port connections, spliced; the gRPC
calls on either side keep the set-up, the errors and the lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.errors import InvalidArgument, Unavailable
from controlplane.tunnels.broker import Pipe
from controlplane.tunnels.data import arrival
from controlplane.tunnels.service import TunnelService
from messaging.rawpath import Link, splice_links

# After the daemon's call ended cleanly, how long the splice may take to flush and close.
_END_GRACE = 5.0


@dataclass(frozen=True)
class RawPath:
    """Where the client connects, and what it writes first there."""

    address: str
    token: str
    tls: bool


async def _said(pipe: Pipe) -> None:
    """Returns when the daemon's call ended after its last word; raises its error, or
    Unavailable when the call broke (or this replica is stopping)."""
    async for _ in pipe.from_host():
        pass


async def daemon_ready(tunnels: TunnelService, pipe: Pipe) -> tuple[Link, RawPath]:
    """The daemon's raw connection (it connected into the container first), and a one-time
    token for the client's; raises what the daemon said instead (FAILED_PRECONDITION), or
    UNAVAILABLE when it neither connected nor said anything in time."""
    assert pipe.daemon_link is not None
    assert tunnels.data is not None
    came = asyncio.create_task(arrival(pipe.daemon_link, tunnels.open_timeout))
    said = asyncio.create_task(_said(pipe))
    try:
        await asyncio.wait({came, said}, return_when=asyncio.FIRST_COMPLETED)
        link = came.result() if came.done() else None
        if link is None:
            if said.done():
                said.result()  # raises what the daemon said
            raise Unavailable("the host's daemon did not open the tunnel's data connection")
    finally:
        for task in (came, said):
            task.cancel()
        await asyncio.gather(came, said, return_exceptions=True)
    pipe.client_token = secrets.token_urlsafe(24)
    # Expected before the client hears of it: it may connect before this call goes on.
    pipe.client_link = tunnels.data.expect(pipe.client_token)
    return link, RawPath(tunnels.data_address, pipe.client_token, tunnels.data.tls)


async def relay_raw(
    tunnels: TunnelService, pipe: Pipe, daemon: Link, requests: AsyncIterator[object]
) -> None:
    """Waits for the client's connection, splices it with the daemon's, and returns once
    both are done; the daemon's call breaking, this replica stopping or a client mistake
    ends it with that error. Either way both connections are closed on the way out."""
    assert tunnels.data is not None
    assert pipe.client_link is not None
    client = await arrival(pipe.client_link, tunnels.open_timeout)
    if client is None:
        daemon.close()
        raise Unavailable("the client did not connect to the tunnel data port in time")
    splice = asyncio.create_task(splice_links(client, daemon, kernel=not tunnels.data.tls))
    said = asyncio.create_task(_said(pipe))
    asked = asyncio.create_task(_no_data(requests))
    try:
        await asyncio.wait({splice, said, asked}, return_when=asyncio.FIRST_COMPLETED)
        if splice.done():
            return
        if asked.done():
            asked.result()  # a client mistake
            await asyncio.wait({splice, said}, return_when=asyncio.FIRST_COMPLETED)
        if said.done():
            said.result()  # the call broke: UNAVAILABLE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(splice), _END_GRACE)
            return
        await splice
    finally:
        client.close()
        daemon.close()
        for task in (splice, said, asked):
            task.cancel()
        await asyncio.gather(splice, said, asked, return_exceptions=True)


async def _no_data(requests: AsyncIterator[object]) -> None:
    """The client's requests after `start`: none carry data on a raw tunnel (its requests
    ending means nothing: the raw connection carries the bytes and the half-close)."""
    async for _ in requests:
        raise InvalidArgument("data", "a raw port-forward's bytes go over its data connection")
