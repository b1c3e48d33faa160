"""A job's efficiency: per attempt and in total, the GPU time paid, the part its GPUs were
busy, and the credits paid for idle GPUs, from the utilisation stored per attempt."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controlplane.auth.principal import Principal
from controlplane.db.engine import Database
from controlplane.errors import NotFound
from controlplane.jobs.models import JobAttempt
from controlplane.jobs.repository import JobRepository
from controlplane.ledger.repository_usage import UsageRepository
from controlplane.registry.utilization import (
    BASIS_POINTS,
    Measured,
    combined_basis_points,
    mean_basis_points,
)


@dataclass(frozen=True, slots=True)
class AttemptEfficiency:
    """One attempt's figures, or the job's total (attempt 0)."""

    attempt: int
    host_id: str
    gpu_model: str
    gpu_count: int
    attempt_state: str
    paid_gpu_time_ms: int  # GPU count × run time; 0 for a lost attempt (never charged)
    utilized_gpu_time_ms: int  # paid × mean utilisation
    basis_points: int  # mean GPU utilisation, 10,000 = 100 %
    peak_memory_bytes: int
    samples: int
    charged: int  # micro-credits
    idle: int  # charged × (1 − utilisation), micro-credits; 0 without telemetry


@dataclass(frozen=True, slots=True)
class JobEfficiency:
    job_id: str
    attempts: list[AttemptEfficiency]
    total: AttemptEfficiency


def scaled(amount: int, basis_points: int) -> int:
    """`amount` × basis_points / 10,000, rounded half up (amounts are never negative here)."""
    return (2 * amount * basis_points + BASIS_POINTS) // (2 * BASIS_POINTS)


def measured_of(attempt: JobAttempt) -> Measured:
    """An attempt's stored measurement with the GPU time it was paid for (0 when lost)."""
    paid = 0 if attempt.lost else attempt.run_time_ms * len(attempt.gpu_uuids)
    return Measured(
        paid,
        attempt.gpu_utilization_sum,
        attempt.gpu_utilization_samples,
        attempt.peak_gpu_memory_bytes,
    )


def job_basis_points(attempts: Iterable[JobAttempt]) -> int:
    """The job's utilisation: its charged attempts', weighted by paid GPU time (GetJob,
    GetUsage and GetJobEfficiency all use this)."""
    return combined_basis_points(measured_of(a) for a in attempts if not a.lost)


def attempt_efficiency(attempt: JobAttempt, gpu_model: str) -> AttemptEfficiency:
    m = measured_of(attempt)
    bp = mean_basis_points(m.utilization_sum, m.samples)
    return AttemptEfficiency(
        attempt=attempt.attempt,
        host_id=attempt.host_id,
        gpu_model=gpu_model,
        gpu_count=len(attempt.gpu_uuids),
        attempt_state=attempt.state,
        paid_gpu_time_ms=m.gpu_time_ms,
        utilized_gpu_time_ms=scaled(m.gpu_time_ms, bp),
        basis_points=bp,
        peak_memory_bytes=m.peak_memory_bytes,
        samples=m.samples,
        charged=attempt.charged,
        idle=attempt.charged - scaled(attempt.charged, bp) if m.samples else 0,
    )


def efficiency_of(
    job_id: str, attempts: Sequence[JobAttempt], names: Mapping[str, str]
) -> JobEfficiency:
    """Per attempt and in total; `names` maps GPU uuids to their model."""
    rows = [
        attempt_efficiency(a, names.get(a.gpu_uuids[0], "") if a.gpu_uuids else "")
        for a in attempts
    ]
    models = {r.gpu_model for r in rows if r.paid_gpu_time_ms}
    # The total is of the charged attempts: a lost one's samples are behind no figure of it.
    kept = [r for r, a in zip(rows, attempts, strict=True) if not a.lost]
    total = AttemptEfficiency(
        attempt=0,
        host_id="",
        gpu_model=next(iter(models)) if len(models) == 1 else "",
        gpu_count=max((r.gpu_count for r in rows), default=0),
        attempt_state="",
        paid_gpu_time_ms=sum(r.paid_gpu_time_ms for r in rows),
        utilized_gpu_time_ms=sum(r.utilized_gpu_time_ms for r in rows),
        basis_points=job_basis_points(attempts),
        peak_memory_bytes=max((r.peak_memory_bytes for r in kept), default=0),
        samples=sum(r.samples for r in kept),
        charged=sum(r.charged for r in rows),
        idle=sum(r.idle for r in rows),
    )
    return JobEfficiency(job_id, rows, total)


class Efficiency:
    """GetJobEfficiency's service: reads the job if the caller may see it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def of_job(self, caller: Principal, job_id: str) -> JobEfficiency:
        async with self.db.read() as session:
            repo = JobRepository(session)
            if await repo.get_readable(caller, job_id) is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            attempts = await repo.attempts(job_id)
            uuids = [a.gpu_uuids[0] for a in attempts if a.gpu_uuids]
            names = await UsageRepository(session).gpu_names(uuids)
        return efficiency_of(job_id, attempts, names)
