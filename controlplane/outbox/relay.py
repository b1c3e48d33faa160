"""Publishes committed outbox rows to JetStream, in order, exactly the committed ones.

A row is marked published only after JetStream acknowledged it; a crash in between leads to
a re-publish with the same Nats-Msg-Id, which JetStream's de-duplication window drops."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.outbox.repository import OutboxRepository

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, db: Database, js: JetStreamContext, batch: int = 256) -> None:
        self.db = db
        self.js = js
        self.batch = batch

    async def run_once(self) -> int:
        """Publishes one batch; returns how many rows were published."""
        async with self.db.read() as session:
            rows = [
                (r.id, r.subject, r.msg_id, r.payload)
                for r in await OutboxRepository(session).pending(self.batch)
            ]
        if not rows:
            return 0
        # No network call inside a transaction: read, publish, then mark in a new one.
        published: list[int] = []
        try:
            for row_id, subject, msg_id, payload in rows:
                await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
                published.append(row_id)
        finally:
            if published:
                async with self.db.transaction() as session:
                    await OutboxRepository(session).mark_published(published, utcnow())
        return len(published)
