"""GPU monitoring from the Connect stream: telemetry received, GPU health kept in the database
(written only when it changes), recovery after a clean period, and per-attempt GPU utilisation
(written in batches, every flush interval and when the process stops)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpuplane.v1 import registry_pb2
from sqlalchemy.exc import SQLAlchemyError

from controlplane.db.engine import Database
from controlplane.jobs.repository import JobRepository
from controlplane.registry.models import Gpu
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.telemetry import HealthChange, TelemetryBuffer
from controlplane.registry.utilization import AttemptUtilizationBook

log = logging.getLogger(__name__)

# XIDs that NVIDIA's Kubernetes device plugin also ignores: raised by the application on the
# GPU (illegal address, page fault, ...), not by the GPU. A consumer's kernel must not be able
# to take a provider's GPU out of service.
APPLICATION_XIDS = (13, 31, 43, 45, 68, 109)


@dataclass(frozen=True)
class MonitorPolicy:
    history: int = 60
    clean_period_seconds: float = 600.0
    max_clock_skew_seconds: float = 60.0
    ignored_xids: tuple[int, ...] = APPLICATION_XIDS
    usage_max_attempts: int = 100_000
    # A host whose Connect stream closed is forgotten here after this long (unless it is back).
    forget_after_seconds: float = 15.0
    # Measured GPU utilisation is added to the attempts' rows this often (one batch).
    usage_flush_seconds: float = 5.0


class GpuMonitor:
    """Owns the telemetry of the hosts connected to this process. Ingest is in memory; the
    database is written only when a GPU's health changes."""

    def __init__(self, db: Database, policy: MonitorPolicy) -> None:
        self.db = db
        self.policy = policy
        self.utilization = AttemptUtilizationBook(policy.usage_max_attempts)
        self.buffer = TelemetryBuffer(
            self.utilization,
            history=policy.history,
            max_clock_skew=policy.max_clock_skew_seconds,
            ignored_xids=policy.ignored_xids,
        )
        self._flushed_at = time.monotonic()
        # Totals since start, read by the metrics collector.
        self.accepted_samples = 0
        self.rejected_samples: Counter[str] = Counter()

    async def attach(self, host_id: str, rows: Sequence[Gpu] | None = None) -> None:
        """Starts keeping telemetry for a host that connected (its GPUs as stored: `rows`,
        when the caller read them already, else from the database)."""
        if rows is None:
            async with self.db.read() as session:
                rows = await RegistryRepository(session).gpus_of([host_id])
        self.buffer.attach(host_id, rows, time.time())

    def detach(self, host_id: str) -> None:
        """The host's stream closed: its data stays until it is lost or the grace passes."""
        self.buffer.detach(host_id, time.time())

    def forget(self, host_ids: Iterable[str]) -> None:
        """Drops lost hosts' telemetry (and so their metric series)."""
        for host_id in host_ids:
            self.buffer.forget(host_id)

    def running(self, host_id: str, jobs: Iterable[registry_pb2.RunningJob]) -> None:
        self.buffer.set_running(host_id, jobs)

    async def record_batch(self, host_id: str, batch: registry_pb2.TelemetryBatch) -> None:
        """Keeps one telemetry batch; invalid samples are counted and dropped."""
        if host_id not in self.buffer.hosts:
            await self.attach(host_id)
        outcome = self.buffer.apply(host_id, batch, time.time())
        self.accepted_samples += outcome.accepted
        if outcome.rejected:
            self.rejected_samples.update(outcome.rejected)
            log.debug("host %s: telemetry samples rejected: %s", host_id, dict(outcome.rejected))
        if outcome.changes:
            await self._write_health(outcome.changes)

    async def flush(self) -> int:
        """Adds the GPU utilisation measured since the last flush to the attempts' rows, in
        one statement; on a database error the increments stay here for the next flush.
        Returns the count of attempts written."""
        self._flushed_at = time.monotonic()
        taken = self.utilization.take()
        if not taken:
            return 0
        try:
            async with self.db.transaction() as session:
                await JobRepository(session).add_utilization(taken)
        except SQLAlchemyError:
            log.exception(
                "storing GPU utilisation of %d attempts failed; retrying later", len(taken)
            )
            self.utilization.give_back(taken)
            return 0
        return len(taken)

    async def maintain(self) -> None:
        """Periodic: GPUs clean for the clean period recover, unwritten health changes are
        retried, measured utilisation is written every flush interval and as soon as an
        attempt ends, GPU → job assignments are refreshed and long-detached hosts forgotten."""
        now = time.time()
        changes: list[HealthChange] = []
        for host_id, series in self.buffer.unsettled():
            series.recover(now, self.policy.clean_period_seconds)
            if series.healthy != series.stored_healthy:
                changes.append(HealthChange(host_id, series.uuid, series.healthy, series.reason))
        if changes:
            await self._write_health(changes)
        if time.monotonic() - self._flushed_at >= self.policy.usage_flush_seconds:
            await self.flush()
        stale = [
            h.host_id
            for h in self.buffer.hosts.values()
            if h.detached_at is not None and now - h.detached_at > self.policy.forget_after_seconds
        ]
        self.forget(stale)
        if self.buffer.hosts:
            async with self.db.read() as session:
                allocated = await RegistryRepository(session).allocated_gpus()
            self.buffer.set_assignments({uuid: (job, attempt) for uuid, job, attempt in allocated})
        if self._ended_measured():
            await self.flush()  # an attempt's last increments are written once it has ended

    def _ended_measured(self) -> bool:
        """Whether an attempt with unwritten increments is no longer placed on a GPU here nor
        named by its host's heartbeats (it ended, or its host left this process)."""
        if not len(self.utilization):
            return False
        current: set[tuple[str, int]] = set()
        for host in self.buffer.hosts.values():
            current.update(host.assignments.values())
            current.update(host.running.items())
        return any(key not in current for key in self.utilization.attempts())

    async def _write_health(self, changes: list[HealthChange]) -> None:
        """Writes health changes; on failure they stay pending and maintain() retries them."""
        try:
            async with self.db.transaction() as session:
                repo = RegistryRepository(session)
                jobs = {
                    c.uuid: await repo.set_gpu_health(c.uuid, c.host_id, c.healthy, c.reason)
                    for c in changes
                }
        except SQLAlchemyError:
            log.exception("storing GPU health changes failed; retrying later")
            return
        for change in changes:
            host = self.buffer.hosts.get(change.host_id)
            series = host.gpus.get(change.uuid) if host is not None else None
            if series is not None and series.healthy == change.healthy:
                series.stored_healthy = change.healthy
            job = jobs[change.uuid]
            if change.healthy:
                log.info("GPU %s of host %s is healthy again", change.uuid, change.host_id)
            elif job:
                log.warning(
                    "GPU %s of host %s is unhealthy (%s); job %s runs on it and is left running",
                    change.uuid,
                    change.host_id,
                    change.reason,
                    job,
                )
            else:
                log.warning(
                    "GPU %s of host %s is unhealthy (%s)",
                    change.uuid,
                    change.host_id,
                    change.reason,
                )
