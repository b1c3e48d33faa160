"""Metering and settlement of a job's attempts against its hold, shared by the job paths."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.repository import CommandRepository
from controlplane.db.engine import Database
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.notify import Notifier
from controlplane.jobs.outcomes import CANCEL_TEXTS
from controlplane.jobs.policy import JobPolicy, MarketPrices
from controlplane.ledger import service as ledger
from controlplane.ledger.holds import NOTHING, AttemptCost, Charged, Settle
from controlplane.ledger.models import HoldState
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.service import LedgerService
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.streams import HostStreams

StopReason = messaging_pb2.StopReason


@dataclass(frozen=True, slots=True)
class Settling:
    """A job's hold to resolve: the final cost of `attempt` (None: nothing ran to charge)."""

    job: Job
    attempt: JobAttempt | None
    cost: AttemptCost | None
    outcome: HoldState | None = None


class JobBilling:
    """The base of JobService: what every job path (submit and cancel, reports, lost
    attempts, hold expiry) needs, with the hold's metering and settlement."""

    def __init__(
        self,
        db: Database,
        policy: JobPolicy,
        streams: HostStreams,
        notifier: Notifier,
        ledger: LedgerService | None = None,
        prices: MarketPrices | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.streams = streams
        self.notifier = notifier
        # Holds are placed, charged and settled through it, inside the job's transaction.
        self.ledger = ledger or LedgerService(db)
        # Holds are priced on it; without one a hold assumes the max price or the ceiling.
        self.prices = prices
        # Counts a report whose run time was capped at what this control plane observed,
        # and a resync sent to a host whose running list disagreed (the metrics).
        self.on_report_capped: Callable[[], None] | None = None
        self.on_resync: Callable[[], None] | None = None
        # jobs/reconcile.py: when the next check is due (monotonic), and the differences the
        # last one saw per host (acted on only when the next one sees them again).
        self._next_reconcile = 0.0
        self._reconcile_suspects: dict[str, set[tuple[str, int]]] = {}
        # jobs/reconcile.PeriodicResync: its period (seconds, 0: off) and next round.
        self.resync_interval = 60.0
        self._next_periodic_resync = 0.0

    @staticmethod
    def _cancel_command(
        job: Job,
        stop_reason: messaging_pb2.StopReason.ValueType = StopReason.STOP_REASON_CANCELLED,
        text: str = "",
    ) -> registry_pb2.ControlMessage:
        """Asks the job's host to stop it, saying why (`text`: the reason's usual one)."""
        cancel = registry_pb2.CancelCommand(
            job_id=job.id,
            attempt=job.attempt,
            reason=text or CANCEL_TEXTS[stop_reason],
            stop_reason=stop_reason,
        )
        return registry_pb2.ControlMessage(cancel=cancel)

    @staticmethod
    async def _command(
        session: AsyncSession, job: Job, message: registry_pb2.ControlMessage, now: datetime
    ) -> None:
        """Stores a command about the job's current attempt for its host, in the caller's
        transaction: delivered from whichever replica holds the host's stream, re-sent until
        the daemon acknowledges it (controlplane/commands). Wake the delivery after commit
        (`streams.wake(host)`)."""
        if job.host_id:
            await CommandRepository(session).issue(
                job.host_id, message, now, job_id=job.id, attempt=job.attempt
            )

    async def _finish_attempts(
        self,
        session: AsyncSession,
        ended: Sequence[tuple[Job, JobAttempt]],
        now: datetime,
        holds: Mapping[str, str] | None = None,
    ) -> None:
        """Charges attempts that just ended (what metering has not), frees their GPUs and
        resolves their jobs' holds, the rest back to available: a few statements however
        many attempts (GPUs, one per host, holds). The jobs' and attempts' changes are
        written once, at commit (none of the statements here reads them). `holds`: the ids of
        jobs' holds the caller read already, by job id."""
        if not ended:
            return
        registry = RegistryRepository(session)
        with session.no_autoflush:
            # Each host counts the attempts that ended on it, and each in its reliability: a
            # completed one for it, a lost one against.
            providers = await registry.end_attempts(
                Counter(attempt.host_id for _, attempt in ended),
                [(attempt.host_id, not attempt.lost) for _, attempt in ended],
                now,
                release=[(job.id, attempt.attempt) for job, attempt in ended],
            )
            settling: list[Settling] = []
            for job, attempt in ended:
                provider = providers.get(attempt.host_id)
                cost = None
                if provider is not None and not attempt.lost:
                    cost = await self._cost(session, job, attempt, provider)
                settling.append(Settling(job, attempt, cost))
            await self._settle_many(session, settling, holds)

    async def _cost(
        self, session: AsyncSession, job: Job, attempt: JobAttempt, provider: str
    ) -> AttemptCost:
        """What the attempt has cost so far, at the placement's price, for at most the spec's
        max_duration and its budget's run time (time limits are exact: the daemon's kill
        latency is never charged) and never more than its budget, with the platform fee an
        operator set (else the settings')."""
        fee = await self.ledger.fees.current(session)
        billable = billable_ms(job, attempt)
        cost = ledger.charge_for(job.price_per_gpu_hour, job.gpu_count, billable)
        return AttemptCost(
            provider_tenant_id=provider,
            attempt=attempt.attempt,
            cost=budget_charge(cost, billable, attempt.budget, attempt.budget_ms),
            fee_basis_points=self.policy.fee_basis_points if fee is None else fee,
        )

    async def _meter(self, session: AsyncSession, job: Job, attempt: JobAttempt) -> Charged:
        """Metered charging of a running attempt: the increment since its last charge, capped
        at the hold. Keys name the attempt and its cumulative run time, so a replay of the
        same report (or an older run time) charges nothing."""
        hold = await LedgerRepository(session).hold_of_job(job.id)
        host = await RegistryRepository(session).get_host(attempt.host_id)
        if hold is None or host is None or attempt.lost:
            return NOTHING
        cost = await self._cost(session, job, attempt, host.provider_tenant_id)
        key = f"job/{job.id}/{attempt.attempt}/meter/{attempt.run_time_ms}"
        charged = await self.ledger.charge(session, hold.id, cost, key)
        attempt.charged += charged.amount
        job.charged += charged.amount
        return charged

    async def _settle(
        self,
        session: AsyncSession,
        job: Job,
        attempt: JobAttempt | None,
        cost: AttemptCost | None,
        outcome: HoldState | None = None,
    ) -> None:
        """Resolves the job's hold once: the final charge of `cost` (if any), the rest
        released. A replay (the hold already resolved) moves nothing."""
        await self._settle_many(session, [Settling(job, attempt, cost, outcome)])

    async def _settle_many(
        self,
        session: AsyncSession,
        settling: Sequence[Settling],
        known: Mapping[str, str] | None = None,
    ) -> None:
        """Resolves each job's hold once (see _settle), all in one `settle_many`; the holds'
        ids are read unless `known` (by job id) has them all."""
        holds = dict(known or {})
        if missing := [s.job.id for s in settling if s.job.id not in holds]:
            holds |= await LedgerRepository(session).hold_ids_of_jobs(missing)
        requests, owners = [], []
        for s in settling:
            if (hold_id := holds.get(s.job.id)) is None:
                continue
            number = s.attempt.attempt if s.attempt is not None else s.job.attempt
            key, release_key = f"job/{s.job.id}/{number}/final", f"job/{s.job.id}/release"
            requests.append(Settle(hold_id, s.cost, key, release_key, s.outcome))
            owners.append(s)
        if not requests:
            return
        resolutions = await self.ledger.settle_many(session, requests)
        for s, resolution in zip(owners, resolutions, strict=True):
            assert resolution is not None  # its hold was just read in this transaction
            if s.attempt is not None:
                s.attempt.charged += resolution.charged.amount
            if not resolution.replay:
                s.job.charged = resolution.posted


def billable_ms(job: Job, attempt: JobAttempt) -> int:
    """The attempt's run time as charged: capped at the spec's max_duration and at the run
    time its budget pays for."""
    limits = [attempt.run_time_ms]
    if max_ms := types_pb2.JobSpec.FromString(job.spec).max_duration_seconds * 1000:
        limits.append(max_ms)
    if attempt.budget_ms is not None:
        limits.append(attempt.budget_ms)
    return min(limits)


def budget_charge(cost: int, billable_ms: int, budget: int | None, run_ms: int | None) -> int:
    """What an attempt is charged: `cost` (its billable run time at its price), at most its
    budget; exactly its budget once it has run the budget's whole time (that run time was
    rounded down, so its cost can fall a micro-credit or so short of the budget)."""
    if budget is None:
        return cost
    if run_ms is not None and billable_ms >= run_ms:
        return budget
    return min(cost, budget)
