"""Per-attempt GPU utilisation measured from telemetry: the sample mean and peak memory, kept
in memory as unwritten increments and added to the attempt's row by `GpuMonitor.flush`.

Every control plane adds what it measured (a sum, a count, a maximum), so increments from
several processes or from before a restart combine; what any replica reads is the stored row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BASIS_POINTS = 10_000  # 100 % utilisation


@dataclass(slots=True)
class GpuUtilization:
    """Running aggregates over the telemetry samples of one attempt's GPUs: each sample of
    each of its GPUs counts once (a sample mean; daemons sample at a fixed period, so it
    weighs time evenly)."""

    utilization_sum: int = 0  # of utilization_gpu_percent, 0..100 per sample
    samples: int = 0
    # The most memory the attempt's processes held on any one of its GPUs at any sample.
    peak_memory_bytes: int = 0

    @property
    def mean_utilization_percent(self) -> int:
        return (mean_basis_points(self.utilization_sum, self.samples) + 50) // 100

    def add(self, other: GpuUtilization) -> None:
        self.utilization_sum += other.utilization_sum
        self.samples += other.samples
        self.peak_memory_bytes = max(self.peak_memory_bytes, other.peak_memory_bytes)


def mean_basis_points(utilization_sum: int, samples: int) -> int:
    """The sample mean in basis points (10,000 = 100 %), rounded half up; 0 without samples."""
    if samples <= 0:
        return 0
    return (utilization_sum * 100 * 2 + samples) // (2 * samples)


def percent_of(basis_points: int) -> int:
    """Whole percent for display and the older `*_percent` fields, rounded half up."""
    return (basis_points + 50) // 100


@dataclass(frozen=True, slots=True)
class Measured:
    """One attempt's stored measurement with the GPU time it was paid for (0 when lost)."""

    gpu_time_ms: int
    utilization_sum: int
    samples: int
    peak_memory_bytes: int

    @property
    def basis_points(self) -> int:
        return mean_basis_points(self.utilization_sum, self.samples)


def combined_basis_points(parts: Iterable[Measured]) -> int:
    """The utilisation of several attempts together: weighted by paid GPU time (utilised GPU
    time ÷ paid GPU time), so `jobs efficiency`, `jobs get` and `ledger usage` agree; where
    no GPU time is paid yet (a running job before its first run-time report) the plain
    sample mean of all of them."""
    measured = [p for p in parts if p.samples]
    paid = sum(p.gpu_time_ms for p in measured)
    if paid:
        used = sum(p.gpu_time_ms * p.basis_points for p in measured)
        return (2 * used + paid) // (2 * paid)
    return mean_basis_points(
        sum(p.utilization_sum for p in measured), sum(p.samples for p in measured)
    )


# (job id, attempt, the host whose telemetry measured it).
MeasuredKey = tuple[str, int, str]


class AttemptUtilizationBook:
    """Unwritten GpuUtilization increments by (job id, attempt, host): kept per host, so a
    host that names another host's job in its heartbeats measures only under its own name,
    which the flush writes only to an attempt placed on that host. Past `max_attempts`
    entries the oldest is dropped (only between two flushes can it fill)."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max(1, max_attempts)
        self._book: dict[MeasuredKey, GpuUtilization] = {}

    def record(
        self, key: tuple[str, int], utilization: int, memory_bytes: int, host_id: str = ""
    ) -> None:
        entry = (key[0], key[1], host_id)
        measured = self._book.get(entry)
        if measured is None:
            if len(self._book) >= self.max_attempts:
                del self._book[next(iter(self._book))]
            measured = self._book[entry] = GpuUtilization()
        measured.utilization_sum += utilization
        measured.samples += 1
        if memory_bytes > measured.peak_memory_bytes:
            measured.peak_memory_bytes = memory_bytes

    def get(self, job_id: str, attempt: int) -> GpuUtilization | None:
        """What this process has not written yet for the attempt, from any host (a scan:
        for tests and debugging, not the ingest path)."""
        found = [m for (j, a, _), m in self._book.items() if (j, a) == (job_id, attempt)]
        if not found:
            return None
        merged = GpuUtilization()
        for measured in found:
            merged.add(measured)
        return merged

    def attempts(self) -> set[tuple[str, int]]:
        """The attempts with unwritten increments."""
        return {(job_id, attempt) for job_id, attempt, _ in self._book}

    def take(self) -> dict[MeasuredKey, GpuUtilization]:
        """Every unwritten increment, leaving the book empty (for one flush)."""
        taken, self._book = self._book, {}
        return taken

    def give_back(self, taken: dict[MeasuredKey, GpuUtilization]) -> None:
        """Increments a failed flush could not write: merged with what arrived meanwhile."""
        for key, measured in taken.items():
            current = self._book.get(key)
            if current is None:
                self._book[key] = measured
            else:
                current.add(measured)

    def __len__(self) -> int:
        return len(self._book)
