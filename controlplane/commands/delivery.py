"""Delivers stored host commands on the Connect streams this replica holds, until acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from datetime import timedelta

import nats
from gpuplane.v1 import registry_pb2
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.models import HostCommand
from controlplane.commands.repository import ABOUT_ATTEMPTS, MOOT, CommandRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.ledger.batch import GroupCommit
from controlplane.registry.streams import HostStreams
from messaging.subjects import COMMANDS_STORED_SUBJECT

log = logging.getLogger(__name__)

Outgoing = list[tuple[str, registry_pb2.ControlMessage]]
# How often each replica closes the cancels of attempts that ended meanwhile.
MOOT_SWEEP_SECONDS = 60.0
# A tunnel command older than this is closed as moot instead of sent: its client has given up
# (it waits a few seconds), so a daemon that connects later must not open it.
TUNNEL_TTL = timedelta(seconds=30)


def replica_name() -> str:
    """This process's name in host_stream_holders: host, pid and a random suffix (several
    in-process control planes share a pid in tests)."""
    return f"{socket.gethostname()[:64]}/{os.getpid()}/{secrets.token_hex(4)}"


class CommandDelivery:
    """Each replica delivers the commands of the hosts whose Connect stream it holds (the
    host_stream_holders row it writes when a stream opens): all unacknowledged ones when
    the stream opens, then those due, polled every `poll_interval` (at once for a command
    stored by this process, or by another that said so over NATS: `listen`). A delivered
    command is due again after `resend_after`, doubling per delivery up to `resend_cap`,
    until the daemon acknowledges it."""

    def __init__(
        self,
        db: Database,
        streams: HostStreams,
        *,
        replica: str | None = None,
        poll_interval: float = 0.5,
        resend_after: float = 2.0,
        resend_cap: float = 60.0,
        batch: int = 500,
    ) -> None:
        self.db = db
        self.streams = streams
        self.replica = replica or replica_name()
        self.poll_interval = poll_interval
        self.resend_after = resend_after
        self.resend_cap = max(resend_cap, resend_after)
        self.batch = batch
        self.delivered = 0
        self._publishing: set[asyncio.Task[None]] = set()
        # Streams closed here whose holder rows are not yet deleted: one statement for all
        # of them (release_closed), so a thousand daemons dropping at once cost one write.
        self._closed: set[str] = set()
        self._holders = asyncio.Lock()  # a release never deletes a claim made meanwhile
        # Streams opened here, their holder rows written together (opened).
        self._opening = GroupCommit(self._open_batch, max_batch=1000, max_in_flight=1, min_batch=1)

    async def opened(self, host_id: str) -> None:
        """The host's Connect stream opened here: this replica delivers its commands from
        now on, starting with every unacknowledged one. Streams opening together (a fleet
        reconnecting) are recorded in one transaction (GroupCommit: what opens while one is
        written goes in the next)."""
        await self._opening(host_id)

    async def _open_batch(self, opening: Sequence[str]) -> list[None]:
        """GroupCommit's batch: holder rows for these streams, and their unacknowledged
        commands sent."""
        hosts = list(dict.fromkeys(opening))

        async def work(session: AsyncSession) -> Outgoing:
            repo = CommandRepository(session)
            await repo.hold_streams(hosts, self.replica, utcnow())
            return await self._take(repo, await repo.unacked_of(hosts))

        async with self._holders:
            self._closed.difference_update(hosts)
            outgoing = await self.db.run(work)
        self._send(outgoing)
        return [None] * len(opening)

    def closed(self, host_id: str) -> None:
        """The host's stream here ended (and no newer one of it is open here): its holder row
        goes at the delivery loop's next turn (release_closed)."""
        self._closed.add(host_id)
        self.streams.pending.set()

    async def release_closed(self) -> None:
        """Deletes the holder rows of the streams closed since the last call, in one
        statement; on a database error they are kept for the next call."""
        if not self._closed:
            return
        async with self._holders:
            closed, self._closed = self._closed, set()
            try:
                async with self.db.transaction() as session:
                    await CommandRepository(session).release_streams(closed, self.replica)
            except BaseException:
                self._closed |= closed
                raise

    async def deliver_due(self) -> int:
        """Sends the due commands of the hosts whose streams this replica holds; returns how
        many were sent."""
        now = utcnow()
        async with self.db.read() as session:
            if not await CommandRepository(session).any_due(self.replica, now):
                return 0  # the usual case, without a write transaction
        async with self.db.transaction() as session:
            repo = CommandRepository(session)
            outgoing = await self._take(repo, await repo.due(self.replica, now, self.batch))
        return self._send(outgoing)

    async def close_moot(self) -> int:
        """Closes the cancels of attempts that are no longer live, whichever host they are
        for (those of hosts that stay away are never delivered, so never closed there)."""
        now = utcnow()
        async with self.db.transaction() as session:
            repo = CommandRepository(session)
            return await repo.close_moot(now) + await repo.expire("tunnel", now - TUNNEL_TTL, now)

    async def run(self) -> None:
        """The replica's delivery loop (background.py); every `MOOT_SWEEP_SECONDS` it also
        closes moot cancels."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            self.streams.pending.clear()  # before looking: a wake-up meanwhile is kept
            await self.release_closed()
            if loop.time() >= next_sweep:
                await self.close_moot()
                next_sweep = loop.time() + MOOT_SWEEP_SECONDS
            while await self.deliver_due() >= self.batch:
                pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self.streams.pending.wait()

    async def listen(self, nc: Client) -> None:
        """While NATS is connected (background.py): tells the other replicas whenever this
        one stores a command, and looks at once when another says so about a host whose
        stream is open here. Only latency depends on it; the poll finds every row."""

        async def heard(message: Msg) -> None:
            self.streams.woken(message.data.decode(errors="replace"))

        subscription = await nc.subscribe(COMMANDS_STORED_SUBJECT, cb=heard)
        self.streams.announce = lambda host_id: self._announce(nc, host_id)
        try:
            await asyncio.Event().wait()
        finally:
            self.streams.announce = None
            with contextlib.suppress(nats.errors.Error):  # closed: it went with the connection
                await subscription.unsubscribe()

    def _announce(self, nc: Client, host_id: str) -> None:
        task = asyncio.create_task(nc.publish(COMMANDS_STORED_SUBJECT, host_id.encode()))
        self._publishing.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info(
                "commands stored: not announced (%s); replicas find them by polling",
                task.exception(),
            )

    async def _take(self, repo: CommandRepository, rows: Sequence[HostCommand]) -> Outgoing:
        """The rows to send now, marked delivered once more; a cancel (or a resync about one
        attempt) whose attempt already ended is closed as moot instead."""
        now = utcnow()
        about = [(r.job_id, r.attempt or 0) for r in rows if r.kind in ABOUT_ATTEMPTS and r.job_id]
        live = await repo.live_among(about)
        outgoing: Outgoing = []
        gone: set[str] = set()
        for row in rows:
            if row.kind == "tunnel" and row.created_at < now - TUNNEL_TTL:
                row.acked_at, row.answer = now, MOOT
                continue
            if row.kind in ABOUT_ATTEMPTS and row.job_id and (row.job_id, row.attempt) not in live:
                row.acked_at, row.answer = now, MOOT
                continue
            if not self.streams.connected(row.host_id):
                gone.add(row.host_id)  # closed here, its release not yet written
                continue
            message = registry_pb2.ControlMessage.FromString(row.payload)
            message.command_id = row.id
            row.deliveries += 1
            backoff = self.resend_after * 2 ** min(row.deliveries - 1, 16)
            row.due_at = now + timedelta(seconds=min(self.resend_cap, backoff))
            outgoing.append((row.host_id, message))
        if gone:
            await repo.release_streams(gone, self.replica)
        return outgoing

    def _send(self, outgoing: Outgoing) -> int:
        """After the transaction that marked them delivered committed."""
        sent = sum(self.streams.send(host_id, message) for host_id, message in outgoing)
        self.delivered += sent
        return sent
