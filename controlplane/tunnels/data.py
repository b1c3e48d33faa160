"""The replica's tunnel data port: raw connections claimed by one-time tokens, spliced in pairs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from pathlib import Path

from controlplane.settings import Settings
from messaging.rawpath import Link

log = logging.getLogger(__name__)


class Standing:
    """Accepted connections a daemon keeps open for one port of one attempt (the services
    gateway's): at most `limit` idle at a time, taken one per request."""

    def __init__(self, token: str, limit: int) -> None:
        self.token = token
        self.limit = limit
        self.idle: collections.deque[Link] = collections.deque()
        self.arrived = asyncio.Event()
        self.closed = False

    def add(self, link: Link) -> bool:
        if self.closed or len(self.idle) >= self.limit:
            return False
        link.on_lost = self._lost
        self.idle.append(link)
        self.arrived.set()
        return True

    def _lost(self, link: Link) -> None:
        """An idle connection went away: its daemon let the pool go (the attempt ended, or
        the daemon stops), so this one ends too and the next stream asks again."""
        with contextlib.suppress(ValueError):
            self.idle.remove(link)
            self.close()

    async def take(self, timeout: float) -> Link | None:
        """An idle connection (its daemon has not connected it into the container yet), or
        None when none came within `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                while self.idle:
                    link = self.idle.popleft()
                    if not link.closing and not link.eof:
                        link.on_lost = None
                        return link
                    link.close()
                if self.closed:
                    return None
                self.arrived.clear()
                await self.arrived.wait()

    def close(self) -> None:
        """No more connections: the idle ones close, so their daemon stops keeping them."""
        self.closed = True
        while self.idle:
            self.idle.popleft().close()
        self.arrived.set()


class DataPort:
    """Listens for raw tunnel connections. Each writes a token first: a one-time token this
    replica gave a client (PortForward with raw), a tunnel id a daemon got in its command, or
    a standing pool's id. A token nobody expects (wrong, already used, expired) closes the
    connection without a byte; an expected one is answered with ACCEPTED and handed over."""

    def __init__(self, context: ssl.SSLContext | None, claim_timeout: float = 5.0) -> None:
        self.context = context
        self.claim_timeout = claim_timeout
        self._expected: dict[str, asyncio.Future[Link]] = {}
        self._standing: dict[str, Standing] = {}
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()
        self.port = 0
        # Connections refused and accepted (tests).
        self.refused = self.accepted = 0

    @property
    def tls(self) -> bool:
        return self.context is not None

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._link, host.strip("[]") or None, int(port), ssl=self.context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for standing in self._standing.values():
            standing.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._server.wait_closed()
            self._server = None

    def _link(self) -> Link:
        link = Link(self._claimed)
        self._links.add(link)
        loop = asyncio.get_running_loop()
        late = loop.call_later(self.claim_timeout, self._late, link)

        def gone(_: object) -> None:
            late.cancel()
            self._links.discard(link)

        link.lost.add_done_callback(gone)
        return link

    def _late(self, link: Link) -> None:
        if not link.token:
            self.refused += 1
            link.abort()

    def _claimed(self, link: Link, token: str) -> None:
        """The token is read: hands the link to whoever expects it (who closes it), else
        closes it."""
        self._links.discard(link)
        waiting = self._expected.pop(token, None)
        if waiting is not None and not waiting.done():
            link.accept()
            self.accepted += 1
            waiting.set_result(link)
            return
        standing = self._standing.get(token)
        if standing is not None and standing.add(link):
            link.accept()
            self.accepted += 1
            return
        self.refused += 1
        link.abort()

    def expect(self, token: str) -> asyncio.Future[Link]:
        """The one connection that will present `token` (at most once)."""
        future: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        self._expected[token] = future
        return future

    def forget(self, token: str) -> None:
        """`token` is no longer good; a connection it brought is closed."""
        future = self._expected.pop(token, None)
        if future is not None and not future.done():
            future.cancel()
        elif future is not None and not future.cancelled():
            future.result().close()

    def standing(self, token: str, limit: int) -> Standing:
        pool = self._standing[token] = Standing(token, limit)
        return pool

    def drop_standing(self, pool: Standing) -> None:
        if self._standing.get(pool.token) is pool:
            del self._standing[pool.token]
        pool.close()


async def arrival(future: asyncio.Future[Link], timeout: float) -> Link | None:
    """The expected link, or None when it did not come within `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            return await asyncio.shield(future)
    return None


def server_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """The data port's TLS: the gRPC API's certificate and key, and, when the API requires
    client certificates, the same CA for the data port's clients."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(client_ca_file))
    return context


def data_port_for(settings: Settings) -> DataPort | None:
    """The data port the settings ask for (TLS when the gRPC API serves TLS), not started."""
    if not settings.tunnel_data_address:
        return None
    context = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        ca = settings.tls_client_ca_file if settings.tls_client_auth == "require" else None
        context = server_context(settings.tls_cert_file, settings.tls_key_file, ca)
    return DataPort(context, claim_timeout=settings.serving.tunnel_open_timeout_seconds)
