"""Per-attempt GPU utilisation measured from telemetry: mean utilisation and peak memory, in memory.

Kept by the control-plane process that holds the host's Connect stream, so it is lost on
restart and another replica shows none; bounded by a count of attempts (oldest dropped).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GpuUtilization:
    """Running aggregates over the telemetry samples of one attempt's GPUs."""

    utilization_sum: int = 0
    samples: int = 0
    # The most memory the attempt's processes held on any one of its GPUs at any sample.
    peak_memory_bytes: int = 0

    @property
    def mean_utilization_percent(self) -> int:
        if not self.samples:
            return 0
        return (self.utilization_sum + self.samples // 2) // self.samples


class AttemptUtilizationBook:
    """GpuUtilization by (job id, attempt); past `max_attempts` entries the oldest is dropped."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max(1, max_attempts)
        self._book: dict[tuple[str, int], GpuUtilization] = {}

    def record(self, key: tuple[str, int], utilization: int, memory_bytes: int) -> None:
        measured = self._book.get(key)
        if measured is None:
            if len(self._book) >= self.max_attempts:
                del self._book[next(iter(self._book))]
            measured = self._book[key] = GpuUtilization()
        measured.utilization_sum += utilization
        measured.samples += 1
        if memory_bytes > measured.peak_memory_bytes:
            measured.peak_memory_bytes = memory_bytes

    def get(self, job_id: str, attempt: int) -> GpuUtilization | None:
        return self._book.get((job_id, attempt))

    def __len__(self) -> int:
        return len(self._book)
