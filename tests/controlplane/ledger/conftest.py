"""Fixtures: a migrated ledger database (SQLite and PostgreSQL) and its services."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.jobs.notify import Notifier
from controlplane.jobs.service import JobPolicy, JobService
from controlplane.ledger.holds import AttemptCost
from controlplane.ledger.models import Hold
from controlplane.ledger.service import LedgerService
from controlplane.registry.service import HostStreams

CREDIT = 1_000_000
FEE_BP = 1000


@dataclass
class Ledger:
    db: Database
    service: LedgerService

    @staticmethod
    def tenant(name: str) -> str:
        """A fresh tenant id (tests share a database across examples)."""
        return f"{name}-{uuid.uuid4().hex[:10]}"

    async def funded(self, name: str, credits: int = 100) -> str:
        tenant = self.tenant(name)
        await self.service.deposit(tenant, credits * CREDIT, "test", f"fund-{tenant}")
        return tenant

    async def hold(
        self, tenant: str, amount: int, *, job_id: str | None = None, expires_in: float = 3600
    ) -> Hold:
        expires = utcnow() + timedelta(seconds=expires_in)
        return await self.service.hold_credit(
            tenant, amount, f"test-{uuid.uuid4().hex}", expires, job_id=job_id
        )

    def jobs(self) -> JobService:
        policy = JobPolicy(
            fee_basis_points=FEE_BP,
            default_max_price=CREDIT,
            allow_simulated_by_default=True,
            allow_unverified_by_default=True,
        )
        return JobService(self.db, policy, HostStreams(), Notifier())


def cost(provider: str, micro_credits: int, attempt: int = 1) -> AttemptCost:
    return AttemptCost(provider, attempt, micro_credits, FEE_BP)


async def open_ledger(url: str) -> Ledger:
    await asyncio.to_thread(migrate.upgrade, url)
    db = Database(url)
    return Ledger(db, LedgerService(db, min_payout=CREDIT))


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    opened = await open_ledger(url)
    try:
        yield opened
    finally:
        await opened.db.close()


@pytest.fixture
async def pg_ledger(pg_url: str) -> AsyncIterator[Ledger]:
    opened = await open_ledger(pg_url)
    try:
        yield opened
    finally:
        await opened.db.close()
