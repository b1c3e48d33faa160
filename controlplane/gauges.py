"""Fleet gauges from the database: jobs and hosts by state, the outbox backlog, commands not
yet acknowledged by their daemons, the ledger's totals. Every replica refreshes them, so any
one scraped tells the whole marketplace."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.models import HostCommand
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.jobs.models import Job
from controlplane.jobs.states import JobState
from controlplane.ledger.models import Account, Hold, Transfer
from controlplane.ledger.states import HoldState
from controlplane.ledger.transfers import AccountKind, TransferKind
from controlplane.metrics import LedgerTotals, Metrics
from controlplane.outbox.models import OutboxMessage
from controlplane.registry.models import Host
from controlplane.registry.states import HostState


async def refresh(db: Database, metrics: Metrics) -> None:
    """Reads the counts in one read transaction and sets the gauges; every state is set,
    those with no row to 0, so a state that empties does not keep its last count."""
    async with db.read() as session:
        jobs = dict(
            (await session.execute(select(Job.state, func.count()).group_by(Job.state))).all()
        )
        hosts = dict(
            (await session.execute(select(Host.state, func.count()).group_by(Host.state))).all()
        )
        backlog, oldest = (
            await session.execute(
                select(func.count(), func.min(OutboxMessage.created_at)).where(
                    OutboxMessage.published_at.is_(None)
                )
            )
        ).one()
        unacked, oldest_command = (
            await session.execute(
                select(func.count(), func.min(HostCommand.created_at)).where(
                    HostCommand.acked_at.is_(None)
                )
            )
        ).one()
        ledger = await _ledger(session)
    metrics.record_ledger(ledger)
    for job_state in JobState:
        metrics.jobs.labels(job_state.value).set(jobs.get(job_state.value, 0))
    for host_state in HostState:
        metrics.hosts.labels(host_state.value).set(hosts.get(host_state.value, 0))
    metrics.outbox_backlog.set(backlog)
    metrics.outbox_oldest_seconds.set(_age(oldest))
    metrics.commands_unacked.set(unacked)
    metrics.commands_oldest_seconds.set(_age(oldest_command))


async def _ledger(session: AsyncSession) -> LedgerTotals:
    """Balances by account kind (one row per account: small), holds still pending (the
    holds' state index) and each transfer kind's sum (a scan of the transfers, the one read
    here that grows with history)."""
    balances = dict(
        (
            await session.execute(
                select(Account.kind, func.coalesce(func.sum(Account.balance), 0)).group_by(
                    Account.kind
                )
            )
        ).all()
    )
    transferred = dict(
        (
            await session.execute(
                select(Transfer.kind, func.coalesce(func.sum(Transfer.amount), 0)).group_by(
                    Transfer.kind
                )
            )
        ).all()
    )
    holds, held = (
        await session.execute(
            select(
                func.count(), func.coalesce(func.sum(Hold.amount - Hold.posted_amount), 0)
            ).where(Hold.state == HoldState.PENDING.value)
        )
    ).one()
    return LedgerTotals(
        balances={k.value: int(balances.get(k.value, 0)) for k in AccountKind},
        transferred={k.value: int(transferred.get(k.value, 0)) for k in TransferKind},
        holds=int(holds),
        held=int(held),
    )


def _age(since: datetime | None) -> float:
    return max(0.0, (utcnow() - since).total_seconds()) if since is not None else 0.0
