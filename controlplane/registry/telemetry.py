"""In-memory GPU telemetry: each sample validated, the latest and a bounded history kept per GPU,
GPU faults seen in the samples, and samples attributed to the jobs on the GPUs. No I/O."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from gpuplane.v1 import registry_pb2, types_pb2

from controlplane.registry.models import Gpu
from controlplane.registry.utilization import AttemptUtilizationBook

# Bounds on what one host may make this process keep, whatever its daemon sends.
MAX_GPUS_PER_HOST = 64
MAX_PROCESSES_PER_SAMPLE = 64
MAX_XIDS_PER_SAMPLE = 16
MAX_JOB_ID_LENGTH = 40
# Physical plausibility. The wire types are unsigned integers, so values are never NaN or < 0.
MAX_UTILIZATION_PERCENT = 100
MAX_TEMPERATURE_CELSIUS = 150
MAX_POWER_MILLIWATTS = 2_000_000
MAX_SM_CLOCK_MHZ = 10_000
MAX_EPOCH_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the Timestamp range
VANISHED = "GPU vanished from telemetry"
QUARANTINED = "quarantined by its host (not clean after an attempt)"
MAX_QUARANTINE_REASON = 200

JobKey = tuple[str, int]


class Rejection(StrEnum):
    """Why a sample was dropped (the label of gpuplane_telemetry_rejected_samples_total)."""

    UNKNOWN_HOST = "unknown_host"  # the host's telemetry is not attached in this process
    UNKNOWN_GPU = "unknown_gpu"  # not a GPU registered to this host
    DUPLICATE_GPU = "duplicate_gpu"  # a second sample of one GPU in one batch
    BATCH_TOO_LARGE = "batch_too_large"  # more samples than a host may have GPUs
    TIME = "time"  # malformed, or too far in the future
    OUT_OF_ORDER = "out_of_order"  # not newer than the GPU's latest sample (replay, clock jump)
    UTILIZATION = "utilization"
    TEMPERATURE = "temperature"
    POWER = "power"
    MEMORY = "memory"  # memory used above the GPU's total
    CLOCK = "clock"
    PROCESSES = "processes"  # too many, more memory than the GPU has, or a malformed job id
    XIDS = "xids"  # too many XID events in one sample


@dataclass(frozen=True, slots=True)
class HealthChange:
    host_id: str
    uuid: str
    healthy: bool
    reason: str


class GpuSeries:
    """One GPU's recent samples and health as this process sees it. Samples are kept encoded:
    bytes are not tracked by the garbage collector, so a full history of every GPU adds
    nothing to the collector's pauses (protobuf objects would, by the hundred thousand)."""

    __slots__ = (
        "uuid",
        "memory_total",
        "recent",
        "last_time",
        "last_ecc_uncorrected",
        "healthy",
        "stored_healthy",
        "reason",
        "last_fault",
        "last_seen",
    )

    def __init__(self, row: Gpu, history: int, now: float) -> None:
        self.uuid = row.uuid
        self.memory_total = row.memory_total_bytes
        self.recent: deque[bytes] = deque(maxlen=history)  # encoded GpuTelemetry
        self.last_time = 0.0  # the daemon's time of the latest sample, for ordering
        self.last_ecc_uncorrected: int | None = None
        self.healthy = row.healthy
        self.stored_healthy = row.healthy  # what the database says; written when they differ
        self.reason = row.unhealthy_reason
        # Receive times: of the last fault (None while healthy) and the last accepted sample.
        self.last_fault: float | None = None if row.healthy else now
        self.last_seen = 0.0

    @property
    def latest(self) -> types_pb2.GpuTelemetry | None:
        return types_pb2.GpuTelemetry.FromString(self.recent[-1]) if self.recent else None

    def history(self) -> list[types_pb2.GpuTelemetry]:
        """The kept samples, oldest first."""
        return [types_pb2.GpuTelemetry.FromString(raw) for raw in self.recent]

    def fault(self, reason: str, now: float) -> bool:
        """Records a fault; True when it turns a healthy GPU unhealthy."""
        self.last_fault = now
        if not self.healthy:
            return False
        self.healthy, self.reason = False, reason
        return True

    def recover(self, now: float, clean_period: float) -> bool:
        """Healthy again after `clean_period` without a fault and with samples since the last."""
        fault = self.last_fault
        if self.healthy or fault is None or now - fault < clean_period or self.last_seen <= fault:
            return False
        self.healthy, self.reason, self.last_fault = True, "", None
        return True


@dataclass(eq=False)
class HostTelemetry:
    host_id: str
    gpus: dict[str, GpuSeries]
    # GPU uuid → (job, attempt) placed on it, refreshed from the database.
    assignments: dict[str, JobKey] = field(default_factory=dict)
    # Job → attempt the daemon says it runs (heartbeats), to attribute its processes.
    running: dict[str, int] = field(default_factory=dict)
    detached_at: float | None = None


@dataclass
class BatchOutcome:
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    changes: list[HealthChange] = field(default_factory=list)


def _seconds(ts: object) -> float:
    seconds: int = ts.seconds  # type: ignore[attr-defined]
    nanos: int = ts.nanos  # type: ignore[attr-defined]
    if not 0 <= nanos < 1_000_000_000 or not 0 <= seconds <= MAX_EPOCH_SECONDS:
        return -1.0
    return seconds + nanos / 1e9


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check(
    sample: types_pb2.GpuTelemetry, series: GpuSeries, when: float, latest_allowed: float
) -> Rejection | None:
    """Why `sample` (taken at `when`) must be dropped, or None when it is plausible."""
    if not 0 < when <= latest_allowed:
        return Rejection.TIME
    if when <= series.last_time:
        return Rejection.OUT_OF_ORDER
    if (
        sample.utilization_gpu_percent > MAX_UTILIZATION_PERCENT
        or sample.utilization_memory_percent > MAX_UTILIZATION_PERCENT
    ):
        return Rejection.UTILIZATION
    if sample.temperature_celsius > MAX_TEMPERATURE_CELSIUS:
        return Rejection.TEMPERATURE
    if sample.power_draw_milliwatts > MAX_POWER_MILLIWATTS:
        return Rejection.POWER
    if sample.memory_used_bytes > series.memory_total:
        return Rejection.MEMORY
    if sample.sm_clock_mhz > MAX_SM_CLOCK_MHZ:
        return Rejection.CLOCK
    if len(sample.xid_events) > MAX_XIDS_PER_SAMPLE:
        return Rejection.XIDS
    processes = sample.processes
    if processes:
        if len(processes) > MAX_PROCESSES_PER_SAMPLE:
            return Rejection.PROCESSES
        total = 0
        for process in processes:
            total += process.used_memory_bytes
            if len(process.job_id) > MAX_JOB_ID_LENGTH:
                return Rejection.PROCESSES
        if total > series.memory_total:
            return Rejection.PROCESSES
    return None


class TelemetryBuffer:
    """Hosts' telemetry by host id. Lives on the event loop; the metrics thread only reads."""

    def __init__(
        self,
        utilization: AttemptUtilizationBook,
        *,
        history: int = 60,
        max_clock_skew: float = 60.0,
        ignored_xids: Iterable[int] = (),
    ) -> None:
        self.utilization = utilization
        self.history = max(1, history)
        self.max_clock_skew = max_clock_skew
        self.ignored_xids = frozenset(ignored_xids)
        self.hosts: dict[str, HostTelemetry] = {}

    def attach(self, host_id: str, rows: Sequence[Gpu], now: float) -> HostTelemetry:
        """Starts (or refreshes) a host's telemetry from its registered GPUs."""
        host = self.hosts.get(host_id)
        old = host.gpus if host is not None else {}
        gpus: dict[str, GpuSeries] = {}
        for row in rows[:MAX_GPUS_PER_HOST]:
            series = old.get(row.uuid)
            if series is None:
                series = GpuSeries(row, self.history, now)
            else:
                series.memory_total = row.memory_total_bytes
                series.stored_healthy = row.healthy
                if not row.healthy and series.healthy:
                    series.healthy, series.reason, series.last_fault = (
                        False,
                        row.unhealthy_reason,
                        now,
                    )
            gpus[row.uuid] = series
        if host is None:
            host = self.hosts[host_id] = HostTelemetry(host_id, gpus)
        host.gpus = gpus
        host.detached_at = None
        return host

    def detach(self, host_id: str, now: float) -> None:
        host = self.hosts.get(host_id)
        if host is not None:
            host.detached_at = now

    def forget(self, host_id: str) -> None:
        self.hosts.pop(host_id, None)

    def set_running(self, host_id: str, running: Iterable[registry_pb2.RunningJob]) -> None:
        host = self.hosts.get(host_id)
        if host is not None:
            host.running = {r.job_id: r.attempt for r in running}

    def set_assignments(self, assignments: dict[str, JobKey]) -> None:
        """GPU uuid → (job, attempt) for every GPU in use (from the database)."""
        for host in self.hosts.values():
            host.assignments = {u: assignments[u] for u in host.gpus if u in assignments}

    def unsettled(self) -> Iterator[tuple[str, GpuSeries]]:
        """GPUs unhealthy here or not yet stored as they are, with their host id."""
        for host in list(self.hosts.values()):
            for series in host.gpus.values():
                if not series.healthy or series.healthy != series.stored_healthy:
                    yield host.host_id, series

    def apply(self, host_id: str, batch: registry_pb2.TelemetryBatch, now: float) -> BatchOutcome:
        """Validates and keeps one batch (one sampling round of every GPU of the host)."""
        outcome = BatchOutcome()
        host = self.hosts.get(host_id)
        samples = batch.samples
        if host is None or len(samples) > MAX_GPUS_PER_HOST:
            why = Rejection.UNKNOWN_HOST if host is None else Rejection.BATCH_TOO_LARGE
            outcome.rejected[why] += len(samples)
            return outcome
        gpus = host.gpus
        batch_time = _seconds(batch.time) if batch.HasField("time") else now
        latest_allowed = now + self.max_clock_skew
        seen: set[str] = set()
        for sample in samples:
            uuid = sample.gpu_uuid
            series = gpus.get(uuid)
            if series is None:
                outcome.rejected[Rejection.UNKNOWN_GPU] += 1
                continue
            if uuid in seen:
                outcome.rejected[Rejection.DUPLICATE_GPU] += 1
                continue
            seen.add(uuid)
            when = _seconds(sample.time) if sample.HasField("time") else batch_time
            rejection = check(sample, series, when, latest_allowed)
            if rejection is not None:
                outcome.rejected[rejection] += 1
                continue
            # Cheap tests first: most samples carry no XID and no uncorrected ECC error.
            ecc = sample.ecc_uncorrected_errors
            if sample.xid_events or ecc or sample.quarantine_reason:
                self._faults(host_id, series, sample, when, now, outcome)
            series.last_ecc_uncorrected = ecc
            series.recent.append(sample.SerializeToString())
            series.last_time = when
            series.last_seen = now
            outcome.accepted += 1
            if host.assignments or host.running:
                self._attribute(host, uuid, sample)
        if len(seen) < len(gpus):
            for uuid, series in gpus.items():
                if uuid not in seen and series.fault(VANISHED, now):
                    outcome.changes.append(HealthChange(host_id, uuid, False, VANISHED))
        return outcome

    def _faults(
        self,
        host_id: str,
        series: GpuSeries,
        sample: types_pb2.GpuTelemetry,
        when: float,
        now: float,
        outcome: BatchOutcome,
    ) -> None:
        """The host's quarantine, an XID event or growing uncorrectable ECC errors make the
        GPU unhealthy (not offered until it recovers)."""
        reason = ""
        if sample.quarantine_reason:
            # The host's own word that the GPU is not clean: shown, never trusted as text.
            said = sample.quarantine_reason[:MAX_QUARANTINE_REASON]
            said = "".join(c if c.isprintable() else "\ufffd" for c in said)
            reason = f"{QUARANTINED}: {said}"
        for xid in () if reason else sample.xid_events:
            if xid.xid not in self.ignored_xids:
                at = _seconds(xid.time) if xid.HasField("time") else when
                reason = f"XID {xid.xid} at {iso(at if at > 0 else when)}"
                break
        before, after = series.last_ecc_uncorrected, sample.ecc_uncorrected_errors
        if not reason and before is not None and after > before:
            reason = f"uncorrectable ECC errors {before} → {after}"
        if reason and series.fault(reason, now):
            outcome.changes.append(HealthChange(host_id, series.uuid, False, reason))

    def _attribute(self, host: HostTelemetry, uuid: str, sample: types_pb2.GpuTelemetry) -> None:
        """Counts the sample for the attempt on the GPU: placed there, or owning its processes."""
        key = host.assignments.get(uuid)
        processes = sample.processes
        if key is None:
            key = next(
                ((p.job_id, host.running[p.job_id]) for p in processes if p.job_id in host.running),
                None,
            )
            if key is None:
                return
        memory = sample.memory_used_bytes
        if processes and any(p.job_id for p in processes):
            job_id = key[0]
            memory = sum(p.used_memory_bytes for p in processes if p.job_id == job_id)
        self.utilization.record(key, sample.utilization_gpu_percent, memory, host.host_id)
