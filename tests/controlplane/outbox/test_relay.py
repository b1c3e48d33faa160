"""Outbox relays of two replicas on one PostgreSQL database publish every row once, and a
relay that fails mid-batch hands the rest back at once (real NATS JetStream)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from typing import Any

import nats
import pytest
from sqlalchemy import func, select

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.outbox.models import OutboxMessage
from controlplane.outbox.relay import OutboxRelay
from controlplane.outbox.repository import OutboxRepository
from messaging.subjects import dispatch_subject

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


class CountingJetStream:
    """The real JetStream context, counting what it is asked to publish; optionally fails
    the publish numbered `fail_at` (1-based), as a NATS outage would."""

    def __init__(self, js: Any, fail_at: int = 0) -> None:
        self.js = js
        self.fail_at = fail_at
        self.published: Counter[str] = Counter()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        if self.fail_at and sum(self.published.values()) + 1 == self.fail_at:
            self.fail_at = 0
            raise nats.errors.TimeoutError
        self.published[headers["Nats-Msg-Id"]] += 1
        return await self.js.publish(subject, payload, headers=headers)


async def enqueue(db: Database, count: int) -> list[str]:
    subject = dispatch_subject(f"relay-{secrets.token_hex(4)}")
    ids = [f"{subject}.{i}" for i in range(count)]
    async with db.transaction() as session:
        repo = OutboxRepository(session)
        for msg_id in ids:
            repo.enqueue(subject, msg_id, b"x", utcnow())
    return ids


async def unpublished(db: Database) -> int:
    async with db.read() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
            )
            or 0
        )


async def test_two_relays_publish_each_row_once(db: Database, jetstream: Any) -> None:
    ids = await enqueue(db, 300)
    one, two = CountingJetStream(jetstream), CountingJetStream(jetstream)
    relays = [OutboxRelay(db, one, batch=16), OutboxRelay(db, two, batch=16)]  # type: ignore[arg-type]
    while await unpublished(db):
        await asyncio.gather(*(relay.run_once() for relay in relays))
    both = one.published + two.published
    assert sorted(both) == sorted(ids)
    assert set(both.values()) == {1}, "a row was published by both relays"
    assert one.published, "the relays did not share the work"
    assert two.published, "the relays did not share the work"


async def test_a_failed_batch_is_handed_back_at_once(db: Database, jetstream: Any) -> None:
    ids = await enqueue(db, 10)
    failing = CountingJetStream(jetstream, fail_at=4)
    relay = OutboxRelay(db, failing)  # type: ignore[arg-type]
    # The batch is published concurrently: the one failed publish fails only its row.
    assert await relay.run_once() == 9
    assert await unpublished(db) == 1
    # That row is free again: another relay takes it now, not after the lease.
    other = CountingJetStream(jetstream)
    assert await OutboxRelay(db, other).run_once() == 1  # type: ignore[arg-type]
    assert sorted(failing.published + other.published) == sorted(ids)
    assert await unpublished(db) == 0


async def test_a_relay_told_rows_are_pending_leases_without_looking_first(
    db: Database, jetstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Woken by a commit of its own process, the relay leases at once (one read fewer per
    batch); otherwise it looks first, and finds nothing without a write transaction."""
    looks: list[bool] = []
    original = OutboxRepository.any_pending

    async def counted(self: OutboxRepository, now: Any) -> bool:
        looks.append(found := await original(self, now))
        return found

    monkeypatch.setattr(OutboxRepository, "any_pending", counted)
    while await unpublished(db):  # rows other tests left
        await OutboxRelay(db, jetstream).run_once()
    ids = await enqueue(db, 5)
    looks.clear()
    counting = CountingJetStream(jetstream)
    relay = OutboxRelay(db, counting)  # type: ignore[arg-type]
    assert await relay.run_once(pending=True) == 5
    assert looks == []
    assert sorted(counting.published) == sorted(ids)
    assert await relay.run_once() == 0
    assert looks == [False]
