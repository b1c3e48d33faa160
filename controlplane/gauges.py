"""Fleet gauges from the database: jobs and hosts by state, the outbox backlog, commands not
yet acknowledged by their daemons, the ledger's totals. Every replica refreshes them, so any
one scraped tells the whole marketplace."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.models import HostCommand
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.gateway.repository import RouteRepository
from controlplane.jobs.models import Job
from controlplane.jobs.states import JobState
from controlplane.ledger.models import Account, Hold, Transfer
from controlplane.ledger.states import HoldState
from controlplane.ledger.transfers import AccountKind, TransferKind
from controlplane.metrics import LedgerTotals, Metrics
from controlplane.outbox.models import OutboxMessage
from controlplane.registry.models import Host
from controlplane.registry.states import HostState


@dataclass(frozen=True)
class FleetCounts:
    """Jobs and hosts by state (every state, those with no row at 0), the outbox backlog and
    the commands not yet acknowledged, each with its oldest row's age in seconds."""

    jobs: dict[JobState, int]
    hosts: dict[HostState, int]
    outbox_backlog: int
    outbox_oldest_seconds: float
    commands_unacked: int
    commands_oldest_seconds: float


async def fleet(db: Database) -> FleetCounts:
    """The fleet's counts, in one read transaction (AdminService.GetFleetStatus)."""
    async with db.read() as session:
        return await read_fleet(session)


async def read_fleet(session: AsyncSession) -> FleetCounts:
    """The fleet's counts in `session`: a few grouped counts over indexed columns."""
    jobs = dict((await session.execute(select(Job.state, func.count()).group_by(Job.state))).all())
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
    return FleetCounts(
        jobs={state: int(jobs.get(state.value, 0)) for state in JobState},
        hosts={state: int(hosts.get(state.value, 0)) for state in HostState},
        outbox_backlog=int(backlog),
        outbox_oldest_seconds=_age(oldest),
        commands_unacked=int(unacked),
        commands_oldest_seconds=_age(oldest_command),
    )


async def refresh(db: Database, metrics: Metrics) -> None:
    """Reads the counts and the ledger's totals in one read transaction and sets the gauges;
    every state is set, those with no row to 0, so a state that empties does not keep its
    last count."""
    async with db.read() as session:
        counts = await read_fleet(session)
        ledger = await _ledger(session)
        replicas = await service_replicas(session)
    metrics.record_ledger(ledger)
    for job_state, jobs in counts.jobs.items():
        metrics.jobs.labels(job_state.value).set(jobs)
    for host_state, hosts in counts.hosts.items():
        metrics.hosts.labels(host_state.value).set(hosts)
    metrics.service_replicas.clear()  # a deleted service's series go
    for service_id, by_state in replicas.items():
        for replica_state, count in by_state.items():
            metrics.service_replicas.labels(service_id, replica_state).set(count)
    metrics.outbox_backlog.set(counts.outbox_backlog)
    metrics.outbox_oldest_seconds.set(counts.outbox_oldest_seconds)
    metrics.commands_unacked.set(counts.commands_unacked)
    metrics.commands_oldest_seconds.set(counts.commands_oldest_seconds)


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


async def service_replicas(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Each service not deleted: its desired replicas, those RUNNING, and those of them
    ready (their latest probe passed)."""
    repo = RouteRepository(session)
    services = await repo.services(None)
    rows = await repo.replicas(None)
    counts = {s.id: {"desired": s.desired_replicas, "running": 0, "ready": 0} for s in services}
    for row in rows:
        if row.service_id in counts and row.state == JobState.RUNNING.value:
            counts[row.service_id]["running"] += 1
            counts[row.service_id]["ready"] += int(row.ready)
    return counts


def _age(since: datetime | None) -> float:
    return max(0.0, (utcnow() - since).total_seconds()) if since is not None else 0.0
