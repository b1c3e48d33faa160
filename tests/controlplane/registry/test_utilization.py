"""The arithmetic of utilisation (sample means, GPU-time weighting, idle credits, cost split)
and the in-memory book of unwritten increments a flush takes and, on failure, gives back."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from controlplane.jobs.efficiency import efficiency_of, job_basis_points
from controlplane.jobs.models import JobAttempt
from controlplane.ledger.usage import split_cost
from controlplane.registry.utilization import (
    AttemptUtilizationBook,
    GpuUtilization,
    Measured,
    combined_basis_points,
    mean_basis_points,
    percent_of,
)

HOUR = 3_600_000


def attempt(number: int, run_ms: int, util: list[int], charged: int, **kw: Any) -> JobAttempt:
    row = SimpleNamespace(
        attempt=number,
        host_id=kw.get("host", "h1"),
        gpu_uuids=kw.get("gpus", ["GPU-1"]),
        state=kw.get("state", "succeeded"),
        lost=kw.get("lost", False),
        run_time_ms=run_ms,
        charged=charged,
        gpu_utilization_sum=sum(util),
        gpu_utilization_samples=len(util),
        peak_gpu_memory_bytes=kw.get("peak", 0),
    )
    return cast(JobAttempt, row)


def test_means_round_half_up_in_basis_points() -> None:
    assert mean_basis_points(0, 0) == 0
    assert mean_basis_points(200, 3) == 6667  # 66.666… %
    assert mean_basis_points(100, 3) == 3333
    assert mean_basis_points(300, 3) == 10_000
    assert [percent_of(bp) for bp in (0, 49, 50, 6667, 10_000)] == [0, 0, 1, 67, 100]
    assert GpuUtilization(utilization_sum=140, samples=2).mean_utilization_percent == 70


def test_attempts_combine_weighted_by_paid_gpu_time() -> None:
    an_hour_at_70 = Measured(HOUR, 140, 2, 0)
    half_an_hour_at_30 = Measured(HOUR // 2, 300, 10, 0)  # more samples weigh nothing more
    assert combined_basis_points([an_hour_at_70, half_an_hour_at_30]) == 5667
    # Nothing paid yet (a running job before its first run-time report): the sample mean.
    assert combined_basis_points([Measured(0, 140, 2, 0), Measured(0, 20, 2, 0)]) == 4000
    # An attempt without telemetry is neither busy nor idle.
    assert combined_basis_points([an_hour_at_70, Measured(HOUR, 0, 0, 0)]) == 7000
    assert combined_basis_points([]) == 0


def test_efficiency_per_attempt_and_total_leaves_lost_attempts_unpaid() -> None:
    attempts = [
        attempt(1, HOUR, [90, 90], 0, lost=True, state="lost", host="h0", peak=99),
        attempt(2, HOUR, [80, 60], 2_000_000, gpus=["GPU-1", "GPU-2"], peak=5),
        attempt(3, HOUR // 2, [], 500_000, gpus=["GPU-3"]),
    ]
    names = {"GPU-1": "NVIDIA A100", "GPU-3": "NVIDIA A100"}
    found = efficiency_of("job_1", attempts, names)
    lost, measured, blind = found.attempts
    assert (lost.paid_gpu_time_ms, lost.utilized_gpu_time_ms, lost.idle) == (0, 0, 0)
    assert lost.basis_points == 9000  # measured, but never charged
    assert (measured.paid_gpu_time_ms, measured.utilized_gpu_time_ms) == (
        2 * HOUR,
        2 * HOUR * 7 // 10,
    )
    assert (measured.basis_points, measured.idle, measured.gpu_count) == (7000, 600_000, 2)
    assert (blind.samples, blind.idle, blind.utilized_gpu_time_ms) == (0, 0, 0)
    total = found.total
    assert total.paid_gpu_time_ms == 2 * HOUR + HOUR // 2
    assert total.utilized_gpu_time_ms == 2 * HOUR * 7 // 10
    assert (total.basis_points, total.charged, total.idle) == (7000, 2_500_000, 600_000)
    assert (total.samples, total.peak_memory_bytes, total.gpu_model) == (2, 5, "NVIDIA A100")
    assert total.basis_points == job_basis_points(attempts)


@given(
    net=st.integers(0, 10**15),
    charged=st.lists(st.integers(0, 10**12), min_size=1, max_size=6),
)
def test_a_jobs_cost_splits_over_its_attempts_exactly(net: int, charged: list[int]) -> None:
    parts = split_cost(net, charged)
    assert sum(parts) == net
    assert all(p >= 0 for p in parts)
    assert all(p == 0 for p, c in zip(parts, charged, strict=True) if c == 0 and any(charged))
    if not any(charged):
        assert split_cost(net, charged, 0)[0] == net


def test_a_failed_flush_gives_its_increments_back_merged_with_new_ones() -> None:
    book = AttemptUtilizationBook(max_attempts=10)
    book.record(("job_a", 1), 50, 3)
    book.record(("job_a", 1), 70, 9)
    taken = book.take()
    assert len(book) == 0
    assert taken[("job_a", 1, "")] == GpuUtilization(120, 2, 9)
    book.record(("job_a", 1), 10, 4)  # arrived while the flush failed
    book.record(("job_b", 1), 20, 1)
    book.give_back(taken)
    assert book.get("job_a", 1) == GpuUtilization(130, 3, 9)
    assert book.get("job_b", 1) == GpuUtilization(20, 1, 1)


def test_the_book_is_bounded_between_flushes() -> None:
    book = AttemptUtilizationBook(max_attempts=2)
    for n in range(3):
        book.record((f"job_{n}", 1), 10, 1)
    assert len(book) == 2
    assert book.get("job_0", 1) is None


def test_increments_are_kept_per_host() -> None:
    book = AttemptUtilizationBook(max_attempts=10)
    book.record(("job_a", 1), 80, 5, "host_1")
    book.record(("job_a", 1), 0, 9, "host_2")  # another host claiming the same attempt
    assert set(book.take()) == {("job_a", 1, "host_1"), ("job_a", 1, "host_2")}
