"""Publishes committed outbox rows to JetStream, oldest first, exactly the committed ones.

A row is marked published only after JetStream acknowledged it; a crash in between leads to
a re-publish with the same Nats-Msg-Id, which JetStream's de-duplication window drops.
Every control-plane replica runs a relay: each leases its batch first (row locks skipped,
then a lease time), so two relays never publish the same row while both are alive."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from nats.js import JetStreamContext

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.outbox.repository import OutboxRepository

log = logging.getLogger(__name__)

# How long a relay holds a leased batch; publishing one takes milliseconds. A relay that
# died mid-batch delays those rows this long; one that overruns it is harmless (dedup).
DEFAULT_LEASE = timedelta(seconds=10)


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        js: JetStreamContext,
        batch: int = 1024,
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        self.db = db
        self.js = js
        self.batch = batch
        self.lease = lease

    async def run_once(self, pending: bool = False) -> int:
        """Publishes one batch; returns how many rows were published. Unless the caller
        knows rows are `pending`, it looks first without a write transaction."""
        now = utcnow()
        if not pending:
            async with self.db.read() as session:
                if not await OutboxRepository(session).any_pending(now):
                    return 0  # the common case, without a write transaction
        async with self.db.transaction() as session:
            rows = [
                (r.id, r.subject, r.msg_id, r.payload)
                for r in await OutboxRepository(session).lease(self.batch, now, now + self.lease)
            ]
        if not rows:
            return 0
        # No network call inside a transaction: lease, publish, then mark in a new one.
        # The batch is published concurrently (JetStream acks each message on its own), so
        # a batch costs about one round trip instead of one per message.
        outcomes: list[object] = []
        try:
            outcomes = await asyncio.gather(
                *(
                    self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
                    for _, subject, msg_id, payload in rows
                ),
                return_exceptions=True,
            )
        finally:
            published = [
                row[0]
                for row, outcome in zip(rows, outcomes, strict=False)
                if not isinstance(outcome, BaseException)
            ]
            unpublished = [row[0] for row in rows if row[0] not in set(published)]
            async with self.db.transaction() as session:
                repo = OutboxRepository(session)
                if published:
                    await repo.mark_published(published, utcnow())
                if unpublished:
                    await repo.release(unpublished)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            log.warning("publishing %d outbox row(s) failed: %s", len(failed), failed[0])
        return len(published)
