"""Usage reports: GPU time, utilisation and cost per job, day, month, GPU model or provider,
from attempts (their stored utilisation included) and transfers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from controlplane.auth.principal import Principal, Role
from controlplane.errors import InvalidArgument, PermissionDenied
from controlplane.ledger.repository_usage import UsageRepository
from controlplane.ledger.transfers import REVENUE
from controlplane.paging import PageRequest, page_of, time_cursor, time_token
from controlplane.registry.utilization import Measured, combined_basis_points, percent_of

# A report aggregates in memory; past this many attempts it asks for a narrower range.
MAX_REPORT_ATTEMPTS = 20_000


class UsageGrouping(StrEnum):
    JOB = "job"
    DAY = "day"
    MONTH = "month"
    GPU_MODEL = "gpu-model"
    PROVIDER = "provider"


# Groupings whose rows gather attempts (a job retried elsewhere may count in two rows).
BY_ATTEMPT = (UsageGrouping.GPU_MODEL, UsageGrouping.PROVIDER)


@dataclass(frozen=True, slots=True)
class UsageScope:
    """Whose usage a report covers: at most one of the two is set (neither: every tenant's,
    the platform-wide report, for admins)."""

    # The consumer whose jobs count, or the provider whose hosts ran them.
    tenant_id: str | None
    provider_tenant_id: str | None


def readable_usage(caller: Principal, tenant_id: str, all_tenants: bool = False) -> UsageScope:
    """The usage `caller` may read for `tenant_id` ("" for its own): a provider sees the jobs
    its hosts ran; anyone else the jobs the tenant submitted; an admin every tenant's with
    `all_tenants`."""
    if all_tenants:
        if not caller.is_admin:
            raise PermissionDenied("all_tenants: only admins may read the platform-wide report")
        if tenant_id:
            raise InvalidArgument("all_tenants", "give either tenant_id or all_tenants")
        return UsageScope(tenant_id=None, provider_tenant_id=None)
    tenant = caller.require_tenant(tenant_id)
    if caller.role is Role.PROVIDER:
        return UsageScope(tenant_id=None, provider_tenant_id=tenant)
    return UsageScope(tenant_id=tenant, provider_tenant_id=None)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    # At most one of these: the consumer whose jobs count, or the provider whose hosts ran
    # them; neither for every tenant's.
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
    # The platform's part of `cost`: fees less what refunds took back from revenue.
    fee: int = 0
    host_id: str = ""
    gpu_model: str = ""
    provider_tenant_id: str = ""
    # Mean GPU utilisation weighted by GPU time, over the attempts telemetry covered.
    avg_gpu_utilization_basis_points: int = 0
    utilized_gpu_time_ms: int = 0
    job_count: int = 0
    # The newest start among the row's jobs (orders rows that are not periods).
    started_at: datetime | None = None
    # The name of a GPU-model or provider row (its page-token key).
    name: str = ""
    hosts: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    providers: set[str] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)
    measured: list[Measured] = field(default_factory=list)

    @property
    def avg_gpu_utilization_percent(self) -> int:
        return percent_of(self.avg_gpu_utilization_basis_points)

    @property
    def key(self) -> tuple[datetime, str]:
        if self.period_start is not None:
            return self.period_start, ""
        assert self.started_at is not None
        return self.started_at, self.name or self.job_id


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: list[UsageRow]
    total_gpu_time_ms: int
    total_cost: int
    # The token of the next page, "" on the last.
    next_cursor: str
    total_utilized_gpu_time_ms: int = 0
    total_fee: int = 0


@dataclass(frozen=True, slots=True)
class AttemptUsage:
    """One attempt as a report counts it."""

    job_id: str
    started_at: datetime  # the job's
    host_id: str
    provider_tenant_id: str
    gpu_model: str
    gpu_time_ms: int  # 0 when lost
    cost: int  # its part of the job's net cost
    fee: int  # its part of the job's net fee
    measured: Measured
    lost_to_provider: bool  # a lost attempt: never charged

    @property
    def utilized_gpu_time_ms(self) -> int:
        bp = self.measured.basis_points
        return (2 * self.gpu_time_ms * bp + 10_000) // 20_000


def period_of(when: datetime, grouping: UsageGrouping) -> datetime:
    day = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if grouping == UsageGrouping.MONTH else day


def split_cost(net: int, charged: Sequence[int], fallback: int = -1) -> list[int]:
    """A job's net cost over its attempts in proportion to what each was charged, rounding
    down, the rest on the last charged attempt (all of it on attempt index `fallback`, the
    last by default, when none was charged)."""
    gross = sum(charged)
    if not charged:
        return []
    if gross <= 0:
        parts = [0] * len(charged)
        parts[fallback] = net
        return parts
    parts = [net * c // gross for c in charged]
    last = max(i for i, c in enumerate(charged) if c)
    parts[last] += net - sum(parts)
    return parts


def attempt_usages(
    attempts: Sequence[Any], names: dict[str, str], costs: dict[str, tuple[int, int]]
) -> list[AttemptUsage]:
    """The attempts (ordered by job, then attempt) with GPU model, paid GPU time, their part
    of the job's net cost and their stored utilisation."""
    by_job: dict[str, list[Any]] = {}
    for a in attempts:
        by_job.setdefault(a.job_id, []).append(a)
    out: list[AttemptUsage] = []
    for job_id, rows in by_job.items():
        net, fee = costs.get(job_id, (0, 0))
        charged = [0 if a.lost else a.charged for a in rows]
        # Nothing charged (a net of 0, in practice): on the last attempt that was not lost.
        kept = max((i for i, a in enumerate(rows) if not a.lost), default=-1)
        parts = zip(split_cost(net, charged, kept), split_cost(fee, charged, kept), strict=True)
        for a, (cost, fee_part) in zip(rows, parts, strict=True):
            paid = 0 if a.lost else a.run_time_ms * len(a.gpu_uuids)
            out.append(
                AttemptUsage(
                    job_id=job_id,
                    started_at=a.started_at,
                    host_id=a.host_id,
                    provider_tenant_id=a.provider_tenant_id or "",
                    gpu_model=names.get(a.gpu_uuids[0], "") if a.gpu_uuids else "",
                    gpu_time_ms=paid,
                    cost=cost,
                    fee=fee_part,
                    measured=Measured(
                        paid,
                        a.gpu_utilization_sum,
                        a.gpu_utilization_samples,
                        a.peak_gpu_memory_bytes,
                    ),
                    lost_to_provider=a.lost,
                )
            )
    return out


def _group_key(a: AttemptUsage, grouping: UsageGrouping) -> tuple[datetime | None, str]:
    """(period start, name or job id) of the row an attempt counts in."""
    if grouping is UsageGrouping.JOB:
        return None, a.job_id
    if grouping is UsageGrouping.GPU_MODEL:
        return None, a.gpu_model
    if grouping is UsageGrouping.PROVIDER:
        return None, a.provider_tenant_id
    return period_of(a.started_at, grouping), ""


def group_usage(attempts: Sequence[AttemptUsage], grouping: UsageGrouping) -> list[UsageRow]:
    """One row per job, period, GPU model or provider. Lost attempts count only towards
    their job (per GPU model or provider they are left out: never charged, nothing used)."""
    rows: dict[tuple[datetime | None, str], UsageRow] = {}
    for a in attempts:
        if a.lost_to_provider and grouping in BY_ATTEMPT:
            continue
        period, name = _group_key(a, grouping)
        row = rows.get((period, name))
        if row is None:
            job_id = a.job_id if grouping is UsageGrouping.JOB else ""
            row = rows[(period, name)] = UsageRow(job_id, period, name=name)
        row.jobs.add(a.job_id)
        if row.started_at is None or a.started_at > row.started_at:
            row.started_at = a.started_at
        row.cost += a.cost
        row.fee += a.fee
        if a.lost_to_provider:
            continue
        row.gpu_time_ms += a.gpu_time_ms
        row.utilized_gpu_time_ms += a.utilized_gpu_time_ms
        row.measured.append(a.measured)
        row.hosts.add(a.host_id)
        row.models.add(a.gpu_model)
        row.providers.add(a.provider_tenant_id)
        if grouping is UsageGrouping.JOB:
            # Attempts come in order: the last one that ran names the job's host and model.
            row.host_id, row.gpu_model = a.host_id, a.gpu_model
            row.provider_tenant_id = a.provider_tenant_id
    for row in rows.values():
        row.job_count = len(row.jobs)
        # The same figure as GetJob's for a job (jobs/efficiency.job_basis_points).
        row.avg_gpu_utilization_basis_points = combined_basis_points(row.measured)
        if grouping is not UsageGrouping.JOB:
            row.host_id = _only(row.hosts)
            row.gpu_model = _only(row.models)
            row.provider_tenant_id = _only(row.providers)
    return list(rows.values())


def _only(values: set[str]) -> str:
    return next(iter(values)) if len(values) == 1 else ""


async def usage_report(repo: UsageRepository, query: UsageQuery) -> UsageReport:
    """GPU time (GPU count × run time of attempts that were not lost), utilisation and net
    cost (charges minus refunds) of the matching started jobs, grouped by job, by the UTC
    day/month the job started, or by the GPU model or provider of each attempt, newest
    first (rows that are not periods: by their newest job's start). A provider sees only
    the attempts its hosts ran, with their part of each job's cost."""
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
    costs = await repo.net_charges(list({a.job_id: None for a in attempts}), REVENUE)
    counted = attempt_usages(attempts, names, costs)
    if query.provider_tenant_id is not None:
        # A provider's report: only what ran on its own hosts (its part of each job's cost).
        counted = [a for a in counted if a.provider_tenant_id == query.provider_tenant_id]
    rows = group_usage(counted, query.grouping)
    rows.sort(key=lambda r: r.key, reverse=True)
    total_ms = sum(r.gpu_time_ms for r in rows)
    total_cost = sum(r.cost for r in rows)
    total_used = sum(r.utilized_gpu_time_ms for r in rows)
    total_fee = sum(r.fee for r in rows)
    if after is not None:
        rows = [r for r in rows if r.key < after]
    page = page_of(rows, query.page.limit, lambda r: time_token(*r.key))
    return UsageReport(page.items, total_ms, total_cost, page.next_cursor, total_used, total_fee)
