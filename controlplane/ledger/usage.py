"""Usage reports: GPU time and cost per job or per day/month, from attempts and transfers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from controlplane.auth.principal import Principal, Role
from controlplane.errors import InvalidArgument
from controlplane.ledger.repository import LedgerRepository
from controlplane.paging import PageRequest, page_of, time_cursor, time_token

# A report aggregates in memory; past this many attempts it asks for a narrower range.
MAX_REPORT_ATTEMPTS = 20_000


class UsageGrouping(StrEnum):
    JOB = "job"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class UsageScope:
    """Whose usage a report covers: exactly one of the two is set."""

    # The consumer whose jobs count, or the provider whose hosts ran them.
    tenant_id: str | None
    provider_tenant_id: str | None


def readable_usage(caller: Principal, tenant_id: str) -> UsageScope:
    """The usage `caller` may read for `tenant_id` ("" for its own): a provider sees the jobs
    its hosts ran; anyone else the jobs the tenant submitted."""
    tenant = caller.require_tenant(tenant_id)
    if caller.role is Role.PROVIDER:
        return UsageScope(tenant_id=None, provider_tenant_id=tenant)
    return UsageScope(tenant_id=tenant, provider_tenant_id=None)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    # Exactly one of these: the consumer whose jobs count, or the provider whose hosts ran them.
    tenant_id: str | None
    provider_tenant_id: str | None
    job_id: str | None
    start: datetime | None
    end: datetime | None
    grouping: UsageGrouping
    # Newest first; a page token resumes strictly after the last row of the previous page.
    page: PageRequest


@dataclass(slots=True)
class UsageRow:
    job_id: str
    period_start: datetime | None
    gpu_time_ms: int = 0
    cost: int = 0
    host_id: str = ""
    gpu_model: str = ""
    # Mean GPU utilisation; 0 where no telemetry covered the job (not recorded yet).
    avg_gpu_utilization_percent: int = 0
    job_count: int = 0
    started_at: datetime | None = None
    hosts: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[datetime, str]:
        if self.period_start is not None:
            return self.period_start, ""
        assert self.started_at is not None
        return self.started_at, self.job_id


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: list[UsageRow]
    total_gpu_time_ms: int
    total_cost: int
    # The token of the next page, "" on the last.
    next_cursor: str


def period_of(when: datetime, grouping: UsageGrouping) -> datetime:
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if grouping == UsageGrouping.MONTH else day


async def usage_report(repo: LedgerRepository, query: UsageQuery) -> UsageReport:
    """GPU time (GPU count × run time of attempts that were not lost) and net cost (charges
    minus refunds) of the matching started jobs, grouped by job or by the UTC day/month the
    job started, newest first."""
    after = time_cursor(query.page.token)
    attempts = await repo.usage_attempts(
        query.tenant_id,
        query.provider_tenant_id,
        query.job_id,
        query.start,
        query.end,
        MAX_REPORT_ATTEMPTS + 1,
    )
    if len(attempts) > MAX_REPORT_ATTEMPTS:
        raise InvalidArgument(
            "start_time", f"more than {MAX_REPORT_ATTEMPTS} attempts match: narrow the time range"
        )
    names = await repo.gpu_names([a.gpu_uuids[0] for a in attempts if a.gpu_uuids])
    jobs: dict[str, UsageRow] = {}
    for a in attempts:
        row = jobs.setdefault(a.job_id, UsageRow(a.job_id, None, job_count=1))
        row.started_at = a.started_at
        if a.lost:
            continue
        row.gpu_time_ms += a.run_time_ms * len(a.gpu_uuids)
        row.host_id = a.host_id  # attempts come in order: the last one that ran
        row.gpu_model = names.get(a.gpu_uuids[0], "") if a.gpu_uuids else ""
    costs = await repo.net_charges(list(jobs))
    for row in jobs.values():
        row.cost = costs.get(row.job_id, 0)
    rows = list(jobs.values())
    if query.grouping != UsageGrouping.JOB:
        periods: dict[datetime, UsageRow] = {}
        for job in rows:
            assert job.started_at is not None
            start = period_of(job.started_at, query.grouping)
            group = periods.setdefault(start, UsageRow("", start))
            group.gpu_time_ms += job.gpu_time_ms
            group.cost += job.cost
            group.job_count += 1
            group.hosts.add(job.host_id)
            group.models.add(job.gpu_model)
        for group in periods.values():
            group.host_id = next(iter(group.hosts)) if len(group.hosts) == 1 else ""
            group.gpu_model = next(iter(group.models)) if len(group.models) == 1 else ""
        rows = list(periods.values())
    rows.sort(key=lambda r: r.key, reverse=True)
    total_ms = sum(r.gpu_time_ms for r in rows)
    total_cost = sum(r.cost for r in rows)
    if after is not None:
        rows = [r for r in rows if r.key < after]
    page = page_of(rows, query.page.limit, lambda r: time_token(*r.key))
    return UsageReport(page.items, total_ms, total_cost, page.next_cursor)
