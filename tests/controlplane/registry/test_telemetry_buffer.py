"""The in-memory telemetry buffer on its own: validation, bounded history, faults, recovery and
job usage attribution (no servers)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import registry_pb2, types_pb2

from controlplane.registry.models import Gpu
from controlplane.registry.telemetry import (
    MAX_GPUS_PER_HOST,
    VANISHED,
    HealthChange,
    TelemetryBuffer,
)
from controlplane.registry.utilization import AttemptUtilizationBook

GIB = 1 << 30
HOST = "host_a"
UUIDS = ("GPU-a-0", "GPU-a-1")


def rows(healthy: bool = True) -> list[Gpu]:
    return [
        Gpu(
            uuid=uuid,
            host_id=HOST,
            index=i,
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 * GIB,
            healthy=healthy,
            unhealthy_reason="" if healthy else "XID 79 at 2026-01-01T00:00:00Z",
        )
        for i, uuid in enumerate(UUIDS)
    ]


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def sample(uuid: str = UUIDS[0], **fields: Any) -> types_pb2.GpuTelemetry:
    fields.setdefault("utilization_gpu_percent", 50)
    fields.setdefault("memory_used_bytes", 10 * GIB)
    fields.setdefault("temperature_celsius", 60)
    fields.setdefault("power_draw_milliwatts", 300_000)
    fields.setdefault("sm_clock_mhz", 1_800)
    return types_pb2.GpuTelemetry(gpu_uuid=uuid, **fields)


def batch(*samples: types_pb2.GpuTelemetry, at: float | None = None) -> registry_pb2.TelemetryBatch:
    return registry_pb2.TelemetryBatch(time=stamp(at or time.time()), samples=samples)


def both(at: float, **fields: Any) -> registry_pb2.TelemetryBatch:
    return batch(*(sample(u, **fields) for u in UUIDS), at=at)


@pytest.fixture
def buffer() -> TelemetryBuffer:
    telemetry = TelemetryBuffer(AttemptUtilizationBook(10), history=3, ignored_xids=(13,))
    telemetry.attach(HOST, rows(), time.time())
    return telemetry


def test_history_is_bounded_and_oldest_first(buffer: TelemetryBuffer) -> None:
    start = time.time() - 10
    for i in range(5):
        outcome = buffer.apply(HOST, both(start + i, utilization_gpu_percent=i), time.time())
        assert outcome.accepted == 2
        assert not outcome.rejected
    series = buffer.hosts[HOST].gpus[UUIDS[0]]
    assert [s.utilization_gpu_percent for s in series.history()] == [2, 3, 4]
    assert series.latest is not None
    assert series.latest.utilization_gpu_percent == 4


BAD: list[tuple[dict[str, Any], str]] = [
    ({"utilization_gpu_percent": 101}, "utilization"),
    ({"utilization_memory_percent": 250}, "utilization"),
    ({"temperature_celsius": 151}, "temperature"),
    ({"power_draw_milliwatts": 2_000_001}, "power"),
    ({"memory_used_bytes": 80 * GIB + 1}, "memory"),
    ({"sm_clock_mhz": 100_000}, "clock"),
    ({"time": stamp(time.time() + 3600)}, "time"),
    ({"time": Timestamp(seconds=-5)}, "time"),
    ({"xid_events": [types_pb2.XidEvent(xid=79)] * 17}, "xids"),
    ({"processes": [types_pb2.GpuProcess(pid=1)] * 65}, "processes"),
    ({"processes": [types_pb2.GpuProcess(pid=1, used_memory_bytes=81 * GIB)]}, "processes"),
    ({"processes": [types_pb2.GpuProcess(pid=1, job_id="j" * 41)]}, "processes"),
]


@pytest.mark.parametrize(("fields", "reason"), BAD)
def test_implausible_samples_are_counted_never_stored(
    buffer: TelemetryBuffer, fields: dict[str, Any], reason: str
) -> None:
    outcome = buffer.apply(HOST, batch(sample(**fields), sample(UUIDS[1])), time.time())
    assert outcome.rejected == {reason: 1}
    assert outcome.accepted == 1
    assert not buffer.hosts[HOST].gpus[UUIDS[0]].recent
    assert not outcome.changes  # a GPU with a bad sample is present: not vanished


def test_unknown_duplicate_out_of_order_and_oversized(buffer: TelemetryBuffer) -> None:
    now = time.time()
    outcome = buffer.apply(
        HOST, batch(sample(), sample(), sample(UUIDS[1]), sample("GPU-other"), at=now), now
    )
    assert outcome.accepted == 2
    assert outcome.rejected == {"duplicate_gpu": 1, "unknown_gpu": 1}
    replay = buffer.apply(HOST, both(now), now)
    assert replay.rejected == {"out_of_order": 2}
    huge = batch(*(sample(f"GPU-{i}") for i in range(MAX_GPUS_PER_HOST + 1)))
    assert buffer.apply(HOST, huge, now).rejected == {"batch_too_large": MAX_GPUS_PER_HOST + 1}
    assert buffer.apply("host_unknown", both(now), now).rejected == {"unknown_host": 2}


def test_faults_xid_ecc_growth_and_vanished(buffer: TelemetryBuffer) -> None:
    now = time.time()
    ignored = types_pb2.XidEvent(xid=13)
    first = buffer.apply(
        HOST,
        batch(sample(xid_events=[ignored], ecc_uncorrected_errors=3), sample(UUIDS[1]), at=now),
        now,
    )
    assert first.changes == []
    grown = buffer.apply(
        HOST, batch(sample(ecc_uncorrected_errors=5), sample(UUIDS[1]), at=now + 1), now
    )
    assert grown.changes == [HealthChange(HOST, UUIDS[0], False, "uncorrectable ECC errors 3 → 5")]
    xid = types_pb2.XidEvent(xid=79, time=Timestamp(seconds=1_790_000_000))
    again = buffer.apply(HOST, batch(sample(UUIDS[1], xid_events=[xid]), at=now + 2), now)
    assert again.changes == [
        HealthChange(HOST, UUIDS[1], False, "XID 79 at 2026-09-21T14:13:20Z"),
    ]
    # GPU 0 was missing from that batch: already unhealthy, so no new change, fault renewed.
    vanished = buffer.apply(HOST, batch(sample(UUIDS[1]), at=now + 3), now)
    assert vanished.changes == []
    fresh = TelemetryBuffer(AttemptUtilizationBook(10))
    fresh.attach(HOST, rows(), now)
    gone = fresh.apply(HOST, batch(sample(), at=now), now)
    assert gone.changes == [HealthChange(HOST, UUIDS[1], False, VANISHED)]


def test_recovery_needs_a_clean_period_and_samples_after_the_fault() -> None:
    buffer = TelemetryBuffer(AttemptUtilizationBook(10))
    start = time.time()
    buffer.attach(HOST, rows(healthy=False), start)  # unhealthy in the database
    series = buffer.hosts[HOST].gpus[UUIDS[0]]
    assert not series.healthy
    assert not series.recover(start + 100, clean_period=10)  # no sample since the fault
    buffer.apply(HOST, both(start + 1), start + 1)
    assert not series.recover(start + 5, clean_period=10)  # not clean long enough
    assert series.recover(start + 11, clean_period=10)
    assert series.healthy
    assert series.reason == ""
    # Recovered but not yet written, and still unhealthy: both wait for the monitor.
    assert {s.uuid for _, s in buffer.unsettled()} == set(UUIDS)


def test_usage_mean_utilization_and_peak_memory_per_attempt(buffer: TelemetryBuffer) -> None:
    buffer.set_assignments({UUIDS[0]: ("job_1", 1), UUIDS[1]: ("job_1", 1)})
    now = time.time()
    procs = [
        types_pb2.GpuProcess(pid=1, used_memory_bytes=3 * GIB, job_id="job_1"),
        types_pb2.GpuProcess(pid=2, used_memory_bytes=4 * GIB, job_id="job_1"),
        types_pb2.GpuProcess(pid=3, used_memory_bytes=9 * GIB, job_id="other"),
    ]
    buffer.apply(
        HOST,
        batch(
            sample(utilization_gpu_percent=40, processes=procs),
            sample(UUIDS[1], utilization_gpu_percent=80, memory_used_bytes=5 * GIB),
            at=now,
        ),
        now,
    )
    usage = buffer.utilization.get("job_1", 1)
    assert usage is not None
    assert usage.mean_utilization_percent == 60
    assert usage.peak_memory_bytes == 7 * GIB  # its processes on GPU 0, not the other job's
    # Unassigned GPU: attributed through its processes and the daemon's running jobs.
    buffer.set_assignments({})
    buffer.set_running(HOST, [registry_pb2.RunningJob(job_id="other", attempt=2)])
    buffer.apply(HOST, batch(sample(processes=procs), sample(UUIDS[1]), at=now + 1), now)
    other = buffer.utilization.get("other", 2)
    assert other is not None
    assert other.peak_memory_bytes == 9 * GIB
    assert other.samples == 1


def test_usage_book_is_bounded() -> None:
    book = AttemptUtilizationBook(2)
    for i in range(3):
        book.record((f"job_{i}", 1), 10, 0)
    assert len(book) == 2
    assert book.get("job_0", 1) is None
    assert book.get("job_2", 1) is not None
