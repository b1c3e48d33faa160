"""The gateway's routing table kept from the control plane's change stream, not per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.exc import SQLAlchemyError

from controlplane.bus import Bus
from controlplane.db.engine import Database
from controlplane.errors import DomainError
from controlplane.gateway.repository import RouteRepository
from controlplane.gateway.routes import RouteTable, read_routes
from controlplane.services.service import PREFIX, REPLICA_PREFIX
from messaging.subjects import ROUTES_CHANGED_SUBJECT

log = logging.getLogger(__name__)
Listener = Callable[[str], None]


API_KEY_PREFIX = "key_"


def routable(ref: str) -> bool:
    """Whether a changed id may move a route (a service's, or a replica's job's) or a
    cached credential (an API key's, revoked)."""
    return ref.startswith((f"{PREFIX}_", f"{REPLICA_PREFIX}_", API_KEY_PREFIX))


class RouteFeed:
    """The control plane's stream of route changes: the id of each service that changed
    (ServiceService.touched: deploy, scale, stop, start, delete, a replica's readiness, its
    keys) and of each replica's job that changed (Notifier: running, ended, cancelled, a lost
    host), after their commits, and of each API key revoked (AuthService). Every replica
    feeds it and tells the others over core NATS (`ROUTES_CHANGED_SUBJECT`), since the change
    may be committed on a replica that serves no gateway; its subscribers (this process's
    gateway, its API-key cache) hear both."""

    def __init__(self) -> None:
        self.subscribers: list[Listener] = []
        # Tags this process's announcements, so it does not hear its own twice.
        self.origin = secrets.token_hex(4)
        self._announce: Callable[[str], None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        # Set each time the NATS subscription starts: changes meanwhile may have been missed.
        self.on_gap: list[Callable[[], None]] = []

    def changed(self, ref: str) -> None:
        """A change committed here: told to the subscribers, then to the other replicas."""
        if not routable(ref):
            return
        self._tell(ref)
        if self._announce is not None:
            self._announce(ref)

    def _tell(self, ref: str) -> None:
        for subscriber in self.subscribers:
            subscriber(ref)

    async def follow(self, bus: Bus) -> None:
        """Listens (below) whenever NATS is connected; a failed subscription is retried, and
        its gap healed by the subscribers' full reload when it starts again."""
        while True:
            await bus.ready.wait()
            if bus.nc is not None:
                try:
                    await self.listen(bus.nc)
                except (nats.errors.Error, OSError) as error:
                    log.info("route changes: NATS subscription failed (%s); retrying", error)
            await asyncio.sleep(1.0)

    async def listen(self, nc: Client) -> None:
        """While NATS is connected: announces this replica's changes and hears the others'."""

        async def heard(message: Msg) -> None:
            origin, _, ref = message.data.decode(errors="replace").partition(" ")
            if origin != self.origin and routable(ref):
                self._tell(ref)

        subscription = await nc.subscribe(ROUTES_CHANGED_SUBJECT, cb=heard)
        self._announce = lambda ref: self._publish(nc, ref)
        for gap in self.on_gap:
            gap()
        try:
            await asyncio.Event().wait()
        finally:
            self._announce = None
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    def _publish(self, nc: Client, ref: str) -> None:
        data = f"{self.origin} {ref}".encode()
        task = asyncio.create_task(nc.publish(ROUTES_CHANGED_SUBJECT, data))
        self._publishing.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("route change not announced (%s); gateways resync", task.exception())


class RouteWatcher:
    """Keeps `table`: loads every route at start, then rereads only the services the feed
    names (a replica's job is mapped to its service), at once; everything again after a
    gap in the feed (its NATS subscription restarted, a failed read) and every
    `resync_seconds`, which bounds how stale a missed change can leave a route."""

    def __init__(
        self, db: Database, table: RouteTable, feed: RouteFeed, resync_seconds: float
    ) -> None:
        self.db = db
        self.table = table
        self.resync_seconds = resync_seconds
        self.loaded = asyncio.Event()
        self._services: set[str] = set()
        self._jobs: set[str] = set()
        self._wake = asyncio.Event()
        self._full = True
        feed.subscribers.append(self.heard)
        feed.on_gap.append(self.resync)

    def heard(self, ref: str) -> None:
        if ref.startswith(f"{PREFIX}_"):
            self._services.add(ref)
        elif ref.startswith(f"{REPLICA_PREFIX}_"):
            self._jobs.add(ref)
        else:
            return
        self._wake.set()

    def resync(self) -> None:
        self._full = True
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        full_at = loop.time()
        while True:
            self._wake.clear()
            if self._full or loop.time() >= full_at:
                self._full = False
                full_at = loop.time() + self.resync_seconds
                ok = await self._guarded(self.load_all())
            else:
                ok = await self._guarded(self.refresh())
            if not ok:
                self._full = True
                await asyncio.sleep(1.0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(full_at - loop.time(), 0.0)):
                    await self._wake.wait()

    async def load_all(self) -> None:
        # Cleared before reading: a change heard during the load is read again after it.
        self._services.clear()
        self._jobs.clear()
        async with self.db.read() as session:
            routes = await read_routes(session, None)
        self.table.replace(routes)
        self.loaded.set()

    async def refresh(self) -> None:
        """Rereads the routes of the services heard of since the last read."""
        services, jobs = self._services, self._jobs
        self._services, self._jobs = set(), set()
        if not services and not jobs:
            return
        async with self.db.read() as session:
            if jobs:
                services |= await RouteRepository(session).services_of_jobs(sorted(jobs))
            routes = await read_routes(session, sorted(services))
        self.table.update(services, routes)

    @staticmethod
    async def _guarded(read: Awaitable[None]) -> bool:
        try:
            await read
        except (SQLAlchemyError, OSError, DomainError) as error:
            log.warning("gateway routes: read failed (%s); loading them all again", error)
            return False
        return True
