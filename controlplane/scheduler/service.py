"""Scheduling cycles: load capacity and the queue, plan (planner.py, pure), then commit every
placement of the cycle in one transaction together with its dispatch message in the outbox,
so a placement is never published without its row nor committed without its message."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import Conflict
from controlplane.jobs.budget import AttemptBudget, attempt_budget
from controlplane.jobs.models import Job
from controlplane.jobs.notify import Notifier
from controlplane.jobs.states import Placement, schedule_jobs
from controlplane.scheduler.capacity import (
    SCHEDULABLE_HOST_STATES,
    Capacity,
    Durations,
    capacity_snapshot,
    epoch,
    load_capacity,
    reusable,
)
from controlplane.scheduler.demand import Demand, Policy, demand_of
from controlplane.scheduler.fairshare import FairShare, FairShareConfig
from controlplane.scheduler.feasibility import Feasibility
from controlplane.scheduler.planner import Placed, Plan, PlannerConfig, plan_cycle
from controlplane.scheduler.repository import SchedulerRepository
from messaging.subjects import dispatch_msg_id, dispatch_subject
from storage.grants import attempt_grant
from storage.layout import attempt_prefix
from storage.objects import ObjectStore

__all__ = ["SCHEDULABLE_HOST_STATES", "Scheduler", "SchedulerPolicy", "capacity_snapshot"]

log = logging.getLogger(__name__)

# Time a placed attempt may wait for its daemon before it counts as lost.
DISPATCH_GRACE = timedelta(minutes=10)

# Called inside every placement transaction before anything is written: raises (a domain
# error) when this process may no longer place jobs (a stale scheduling leader), so the
# transaction rolls back and nothing is committed.
Fence = Callable[[AsyncSession], Awaitable[None]]
# Called inside the cycle's transaction with the queued jobs (locked by it) that no
# registered host could ever run, each with why (JobService.reject_unsatisfiable).
Reject = Callable[[AsyncSession, list[tuple[Job, str]], datetime], Awaitable[None]]


# An idle cycle (nothing queued) is one plain read; it checks the scheduling term (fence) at
# most this often, so a leader cut off from its lock still learns it within a second while
# idle, and cycles woken by every batch of finished jobs cost no lock.
IDLE_FENCE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    default_policy: int = Policy.PLACEMENT_POLICY_CHEAPEST
    fair_share: FairShareConfig = field(default_factory=FairShareConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    # Queued jobs one cycle considers: in all, and per tenant and priority (their oldest).
    batch: int = 5000
    per_tenant: int = 1000
    # A queued job no registered host could ever run is rejected once it is this old (a
    # host being registered meanwhile saves it).
    reject_after_s: float = 300.0


@dataclass(slots=True)
class CycleStats:
    """The last cycle, for logs and metrics."""

    considered: int = 0
    placed: int = 0
    reservations: int = 0
    seconds: float = 0.0


class Scheduler:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        bucket: str,
        batch: int = 5000,
        fence: Fence | None = None,
        policy: SchedulerPolicy | None = None,
        reject: Reject | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        self.db = db
        self.notifier = notifier
        self.bucket = bucket
        # Signs each dispatch's storage grant; without it (a scheduler alone, in benchmarks)
        # dispatches carry none.
        self.store = store
        self.fence = fence
        # Without it (a scheduler alone, in benchmarks) unsatisfiable jobs just wait.
        self.reject = reject
        self.policy = policy or SchedulerPolicy(batch=batch)
        self.fair = FairShare(self.policy.fair_share)
        self.durations = Durations()
        self.last = CycleStats()
        # Whether the last cycle left jobs another cycle at once could place (run_once).
        self.more = False
        # Called with each cycle's stats (metrics), when set.
        self.on_cycle: Callable[[CycleStats], None] | None = None
        self._seeded = False
        self._fenced_at = -IDLE_FENCE_SECONDS  # monotonic time of the last fenced cycle
        # The capacity index kept between cycles while its read was slow (capacity.reusable:
        # the planner takes the GPUs it places from it, a failed cycle throws it away, and
        # repository.allocate never places on a GPU, host or price that changed since), when
        # its read began (monotonic) and how long it took; `loads` counts reads.
        self._capacity: Capacity | None = None
        self._loaded_at = 0.0
        self._load_seconds = 0.0
        self.loads = 0

    def reset(self) -> None:
        """Forgets in-memory state (fair share, the capacity index); the next cycle seeds it
        from history and reads the capacity afresh."""
        self.fair = FairShare(self.policy.fair_share)
        self._seeded = False
        self._capacity = None

    async def run_once(self) -> int:
        """One scheduling cycle; returns how many jobs were placed. `more` says afterwards
        whether another cycle at once could place more."""
        self.more = False
        try:
            return await self._cycle()
        except BaseException:
            self._capacity = None  # the plan took GPUs from it that were not placed
            raise

    async def _cycle(self) -> int:
        started = time.perf_counter()
        now = utcnow()
        async with self.db.transaction() as session:
            repo = SchedulerRepository(session)
            idle = not await repo.any_queued(now)
            if idle and time.monotonic() - self._fenced_at < IDLE_FENCE_SECONDS:
                return 0  # nothing to place, and the term was checked a moment ago
            if self.fence is not None:
                await self.fence(session)
            self._fenced_at = time.monotonic()
            if idle:
                return 0
            jobs = await repo.queued(now, self.policy.per_tenant, self.policy.batch)
            if not jobs:
                return 0
            capacity = await self._capacity_index(session)
            if not self._seeded:
                await self._seed(repo, now)
            self.fair.weights = await repo.weights({job.tenant_id for job in jobs})
            self.fair.advance(now.timestamp(), capacity.running)
            specs = {job.id: types_pb2.JobSpec.FromString(job.spec) for job in jobs}
            asked = [self._demand(job, specs[job.id]) for job in jobs]
            feasible = Feasibility(session, capacity.index)
            queue = await self._avoid_lost_hosts(repo, jobs, asked, feasible)
            plan = plan_cycle(
                capacity.index,
                queue,
                self.fair,
                capacity.running,
                now.timestamp(),
                self.policy.planner,
            )
            by_id = {j.id: j for j in jobs}
            rejected = await self._unsatisfiable(by_id, asked, plan, feasible, now)
            for job_id in rejected:
                plan.reasons.pop(job_id, None)
            await self._commit(repo, plan, by_id, specs, now)
            # A cycle sees a window of the queue (`policy.batch`, `per_tenant` per tenant):
            # jobs past it could still be placed at once while GPUs are free (or by a job
            # asking for none). With every GPU taken the next cycle could place nothing, so
            # it waits for a wake-up (a GPU freed, a job submitted) or the period instead of
            # planning the whole queue again for nothing.
            self.more = bool(plan.placed) and (
                capacity.index.free_total > 0 or any(p.demand.gpu_count == 0 for p in plan.placed)
            )
            if rejected and self.reject is not None:
                await self.reject(session, [(by_id[j], why) for j, why in rejected.items()], now)
        for placed in plan.placed:  # committed: a kept index counts them as running
            tenant = placed.demand.tenant_id
            capacity.running[tenant] = capacity.running.get(tenant, 0) + placed.demand.gpu_count
        self.last = CycleStats(
            len(jobs), len(plan.placed), len(plan.reservations), time.perf_counter() - started
        )
        if self.on_cycle is not None:
            self.on_cycle(self.last)
        for job_id in [p.demand.job_id for p in plan.placed] + list(rejected):
            self.notifier.job_changed(job_id)
        if plan.placed:
            self.notifier.gpus_changed(freed=False)
            self.notifier.outbox.set()
            log.info(
                "placed %d of %d queued job(s) in %.0f ms",
                len(plan.placed),
                len(jobs),
                self.last.seconds * 1000,
            )
        return len(plan.placed)

    async def _capacity_index(self, session: AsyncSession) -> Capacity:
        """The capacity this cycle plans on: the kept index while it may be reused
        (capacity.reusable), else one read now."""
        kept, now = self._capacity, time.monotonic()
        if kept is not None and reusable(
            len(kept.index.hosts), self._loaded_at, self._load_seconds, now
        ):
            return kept
        capacity = await load_capacity(session, self.durations)
        self._capacity, self._loaded_at = capacity, now
        self._load_seconds = time.monotonic() - now
        self.loads += 1
        return capacity

    def _demand(self, job: Job, spec: types_pb2.JobSpec) -> Demand:
        since = job.created_at if job.not_before is None else max(job.created_at, job.not_before)
        return demand_of(
            job.id,
            job.tenant_id,
            spec,
            since.timestamp(),
            default_policy=self.policy.default_policy,
        )

    async def _avoid_lost_hosts(
        self,
        repo: SchedulerRepository,
        jobs: Sequence[Job],
        asked: list[Demand],
        feasible: Feasibility,
    ) -> list[Demand]:
        """A retry goes to another host than those its job lost attempts on, while some other
        registered host could run it within its max price (else anywhere: waiting for a host
        that may never come would be worse than trying the same one again)."""
        lost_on = await repo.lost_on_hosts([j.id for j in jobs if j.attempt > 1])
        if not lost_on:
            return asked
        queue = []
        for demand in asked:
            avoid = lost_on.get(demand.job_id, set()) - demand.exclude
            if avoid:
                avoiding = replace(demand, exclude=demand.exclude | avoid)
                if await feasible.ever(avoiding, priced=True):
                    demand = avoiding
            queue.append(demand)
        return queue

    async def _unsatisfiable(
        self,
        jobs: dict[str, Job],
        asked: list[Demand],
        plan: Plan,
        feasible: Feasibility,
        now: datetime,
    ) -> dict[str, str]:
        """Job id → why, for the unplaced jobs past the grace that no registered host could
        ever run (feasibility.py says what counts)."""
        if self.reject is None:
            return {}
        placed = {p.demand.job_id for p in plan.placed}
        due = now.timestamp() - self.policy.reject_after_s
        rejected: dict[str, str] = {}
        for demand in asked:
            job = jobs[demand.job_id]
            if demand.job_id in placed or epoch(job.created_at) > due:
                continue
            if not await feasible.ever(demand):
                rejected[demand.job_id] = await feasible.why_never(demand)
        return rejected

    async def _seed(self, repo: SchedulerRepository, now: datetime) -> None:
        """Fair share starts from the GPU time of attempts that ended recently (this process
        just became the scheduler: another may have led before)."""
        half_life = self.policy.fair_share.half_life_s
        since = now - timedelta(seconds=4 * half_life)
        for tenant, uuids, run_ms, finished in await repo.finished_gpu_time(since):
            age = max(0.0, (now - finished).total_seconds())
            self.fair.seed(tenant, len(uuids or []) * run_ms / 1000 * 0.5 ** (age / half_life))
        self._seeded = True

    async def _commit(
        self,
        repo: SchedulerRepository,
        plan: Plan,
        jobs: dict[str, Job],
        specs: dict[str, types_pb2.JobSpec],
        now: datetime,
    ) -> None:
        """Writes the plan with a few statements, whatever its size (no ORM unit of work:
        the loaded jobs are only read); the rows come from the job and attempt machines'
        batch form (jobs/states.schedule_jobs), which checks every job's edge."""
        rows = [
            (uuid, p.demand.job_id, jobs[p.demand.job_id].attempt, p.price)
            for p in plan.placed
            for uuid in p.gpu_uuids
        ]
        gpu_less = {p.host_id: p.price for p in plan.placed if not p.gpu_uuids}
        if await repo.allocate(rows, SCHEDULABLE_HOST_STATES) != len(rows) or not (
            await repo.hosts_at(gpu_less, SCHEDULABLE_HOST_STATES)
        ):
            # A GPU was taken or fell sick, or its host left or changed its price, since the
            # index was read: roll the whole cycle back (run_once drops the index).
            raise Conflict("GPU allocation raced; retrying the cycle")
        budgets = {
            p.demand.job_id: attempt_budget(
                specs[p.demand.job_id],
                jobs[p.demand.job_id].charged,
                p.price,
                jobs[p.demand.job_id].gpu_count,
            )
            for p in plan.placed
        }
        placed_rows = schedule_jobs([_placement(jobs, p, budgets) for p in plan.placed], now)
        messages = []
        for placed in plan.placed:
            job = jobs[placed.demand.job_id]
            messages.append(self._dispatch(job, specs[job.id], placed, budgets[job.id], now))
            self.durations.remember(job.id, placed.demand.max_duration_s)
        await repo.place(placed_rows.jobs, placed_rows.attempts, placed_rows.events, messages)
        await repo.set_reasons(
            {
                job_id: reason[:1000]
                for job_id, reason in plan.reasons.items()
                if jobs[job_id].state_reason != reason[:1000]
            }
        )

    def _dispatch(
        self,
        job: Job,
        spec: types_pb2.JobSpec,
        placed: Placed,
        budget: AttemptBudget | None,
        now: datetime,
    ) -> dict[str, object]:
        """The outbox row of the placement's DispatchMessage: with its price and, for a job
        with a budget, the attempt's budget and the run time it pays for."""
        deadline = Timestamp()
        deadline.FromDatetime(now + DISPATCH_GRACE + timedelta(seconds=spec.max_duration_seconds))
        message = messaging_pb2.DispatchMessage(
            job_id=job.id,
            attempt=job.attempt,
            tenant_id=job.tenant_id,
            spec=spec,
            gpu_uuids=placed.gpu_uuids,
            results_prefix=attempt_prefix(job.id, job.attempt),
            bucket=self.bucket,
            deadline=deadline,
            price_per_gpu_hour_micro_credits=placed.price,
            budget_micro_credits=budget.amount if budget else 0,
            budget_run_time_ms=budget.run_ms if budget else 0,
        )
        if self.store is not None:
            message.storage.CopyFrom(
                attempt_grant(
                    self.store,
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    attempt=job.attempt,
                    inputs=spec.inputs,
                    deadline=deadline.ToDatetime(UTC),
                    now=now,
                )
            )
        return {
            "subject": dispatch_subject(placed.host_id),
            "msg_id": dispatch_msg_id(job.id, job.attempt),
            "payload": message.SerializeToString(),
            "created_at": now,
        }


def _placement(
    jobs: dict[str, Job], placed: Placed, budgets: dict[str, AttemptBudget | None]
) -> Placement:
    job_id = placed.demand.job_id
    budget = budgets[job_id]
    return Placement(
        jobs[job_id],
        placed.host_id,
        placed.gpu_uuids,
        placed.price,
        budget=budget.amount if budget else None,
        budget_ms=budget.run_ms if budget else None,
    )
