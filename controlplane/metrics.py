"""Prometheus metrics of one control-plane process and the HTTP endpoint that serves them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.jobs.spending import TenantSpend
from controlplane.registry.monitor import GpuMonitor
from messaging.exposition import GpuSampleFamilies, MetricsServer, add_standard_collectors

if TYPE_CHECKING:
    from controlplane.registry.service import RegistryService


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """One read of the ledger, integer micro-credits."""

    # Account balances summed by account kind.
    balances: dict[str, int] = field(default_factory=dict)
    # Micro-credits moved by each transfer kind since the ledger began.
    transferred: dict[str, int] = field(default_factory=dict)
    holds: int = 0
    held: int = 0


class Metrics:
    """One registry per control plane, so several can live in one process (tests)."""

    # This process: RPCs (named as go-grpc-prometheus names them), whether it serves, dropped
    # daemon reports.
    rpcs_started: Counter
    rpcs: Counter
    rpc_seconds: Histogram
    stream_seconds: Histogram
    up: Gauge
    grpc_server_restarts: Counter
    reports_dropped: Counter
    reports_capped: Counter
    resyncs: Counter
    # Scheduling on this replica.
    scheduler_leader: Gauge
    scheduler_cycle_seconds: Histogram
    jobs_placed: Counter
    # Fleet gauges, refreshed from the database by every replica (controlplane.gauges).
    jobs: Gauge
    hosts: Gauge
    outbox_backlog: Gauge
    outbox_oldest_seconds: Gauge
    # Monthly spending limits (jobs/spending.py), from this replica's checks.
    tenant_spend_ratio: Gauge
    spending_alerts: Counter
    spending_limit_stops: Counter

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        add_standard_collectors(self.registry, "gpuplane_build")
        self._add_rpc_metrics()
        self._add_process_metrics()
        self._add_scheduler_metrics()
        self._add_fleet_gauges()
        self._add_spending_metrics()
        self._ledger = LedgerCollector()
        self.registry.register(self._ledger)
        self._telemetry: TelemetryCollector | None = None
        self._server = MetricsServer(self.registry)

    def _add_rpc_metrics(self) -> None:
        # The names and labels of go-grpc-prometheus (the grpc-ecosystem dashboards' queries).
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpcs_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            labels,
            registry=self.registry,
        )
        self.rpcs = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status code.",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Handling time of unary RPCs (streaming ones: gpuplane_rpc_stream_duration_seconds).",
            labels,
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.stream_seconds = Histogram(
            "gpuplane_rpc_stream_duration_seconds",
            "How long streaming RPCs stayed open (a daemon's Connect stream, log follows).",
            labels,
            registry=self.registry,
            buckets=(0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
        )

    def _add_process_metrics(self) -> None:
        self.up = Gauge("gpuplane_up", "1 while this control plane serves.", registry=self.registry)
        self.grpc_server_restarts = Counter(
            "gpuplane_grpc_server_restarts_total",
            "Times grpc.aio stopped this control plane's gRPC server by itself (its loop "
            "accepting calls failed) and a fresh one took its ports (api/keeper.py).",
            registry=self.registry,
        )
        self.reports_dropped = Counter(
            "gpuplane_job_reports_dropped_total",
            "Daemon reports dropped unapplied, by reason (foreign_host: the subject's host "
            "is not the host of the attempt; unsigned, bad_signature, no_host_key: not signed by "
            "the host's registered key; seq_jump: its seq is implausibly far ahead).",
            ["reason"],
            registry=self.registry,
        )
        self.reports_capped = Counter(
            "gpuplane_job_reports_capped_total",
            "Daemon reports whose run time exceeded what this control plane observed (plus "
            "the slack) and was capped.",
            registry=self.registry,
        )
        self.heartbeat_lag = Histogram(
            "gpuplane_heartbeat_processing_lag_seconds",
            "From a daemon's heartbeat (its own timestamp) to this control plane processing it "
            "(clock skew between the two included; a negative lag counts as 0).",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.loop_lag = Gauge(
            "gpuplane_event_loop_lag_seconds",
            "The longest this process's event loop ran late over the last 10 s (what was "
            "ready, a heartbeat read included, waited that long); loss checks discount it.",
            registry=self.registry,
        )
        self.resyncs = Counter(
            "gpuplane_host_resyncs_total",
            "Resyncs stored for hosts whose heartbeats' running list disagreed with their "
            "live attempts.",
            registry=self.registry,
        )

    def _add_scheduler_metrics(self) -> None:
        self.scheduler_leader = Gauge(
            "gpuplane_scheduler_leader",
            "1 while this control plane is the scheduling leader, else 0.",
            registry=self.registry,
        )
        self.scheduler_cycle_seconds = Histogram(
            "gpuplane_scheduler_cycle_seconds",
            "Scheduling cycle time on the leader (load, plan, commit), cycles that placed or "
            "explained at least one job.",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs_placed = Counter(
            "gpuplane_jobs_placed_total",
            "Job attempts placed by this replica's scheduler.",
            registry=self.registry,
        )

    def _add_fleet_gauges(self) -> None:
        self.jobs = Gauge(
            "gpuplane_jobs",
            "Jobs by state (queued = the queue depth).",
            ["state"],
            registry=self.registry,
        )
        self.hosts = Gauge("gpuplane_hosts", "Hosts by state.", ["state"], registry=self.registry)
        self.service_replicas = Gauge(
            "gpuplane_service_replicas",
            "Replicas of each service not deleted (service id): desired, running, ready "
            "(running and its health probe passed).",
            ["service", "state"],
            registry=self.registry,
        )
        self.outbox_backlog = Gauge(
            "gpuplane_outbox_unpublished",
            "Outbox messages (dispatch, control) committed but not yet published to NATS.",
            registry=self.registry,
        )
        self.outbox_oldest_seconds = Gauge(
            "gpuplane_outbox_oldest_unpublished_seconds",
            "Age of the oldest unpublished outbox message (0 when none).",
            registry=self.registry,
        )
        self.commands_unacked = Gauge(
            "gpuplane_host_commands_unacked",
            "Commands to daemons (cancel, drain) stored but not yet acknowledged.",
            registry=self.registry,
        )
        self.commands_oldest_seconds = Gauge(
            "gpuplane_host_commands_oldest_unacked_seconds",
            "Age of the oldest unacknowledged command to a daemon (0 when none).",
            registry=self.registry,
        )
        # The ledger, in integer micro-credits (controlplane.gauges reads them).
        self.ledger_balances = Gauge(
            "gpuplane_ledger_balance_micro_credits",
            "Sum of the ledger's account balances, by account kind (available, held, earnings, "
            "revenue, external).",
            ["kind"],
            registry=self.registry,
        )
        self.ledger_unbalanced = Gauge(
            "gpuplane_ledger_imbalance_micro_credits",
            "Sum of all account balances; double entry keeps it 0, anything else is a ledger "
            "fault (run `gpuplane ledger check`).",
            registry=self.registry,
        )
        self.holds_outstanding = Gauge(
            "gpuplane_ledger_holds_outstanding",
            "Holds not yet posted, voided or expired.",
            registry=self.registry,
        )
        self.holds_outstanding_amount = Gauge(
            "gpuplane_ledger_holds_outstanding_micro_credits",
            "What the outstanding holds hold.",
            registry=self.registry,
        )

    def _add_spending_metrics(self) -> None:
        self.tenant_spend_ratio = Gauge(
            "gpuplane_tenant_spend_ratio",
            "A limited tenant's month (charges, and what its running jobs have run up) as a "
            "fraction of its monthly spending limit.",
            ["tenant"],
            registry=self.registry,
        )
        self.spending_alerts = Counter(
            "gpuplane_spending_alerts_total",
            "Spending-limit thresholds crossed (each recorded once per tenant and month), by "
            "percent.",
            ["percent"],
            registry=self.registry,
        )
        self.spending_limit_stops = Counter(
            "gpuplane_spending_limit_stops_total",
            "Jobs asked to stop (on a host) or cancelled (queued) because their tenant reached "
            "its monthly spending limit.",
            registry=self.registry,
        )

    def record_spending(self, spends: Sequence[TenantSpend]) -> None:
        """One check of every limited tenant: the ratios replace the last check's."""
        self.tenant_spend_ratio.clear()
        for spend in spends:
            if spend.monthly_limit:  # else removed while the check ran
                self.tenant_spend_ratio.labels(spend.tenant_id).set(spend.ratio)
            for percent in spend.alerts:
                self.spending_alerts.labels(str(percent)).inc()
            self.spending_limit_stops.inc(len(spend.stopped))

    def record_ledger(self, totals: LedgerTotals) -> None:
        """One read of the ledger (controlplane.gauges): balances, transfer totals, holds."""
        for kind, balance in totals.balances.items():
            self.ledger_balances.labels(kind).set(balance)
        self.ledger_unbalanced.set(sum(totals.balances.values()))
        self.holds_outstanding.set(totals.holds)
        self.holds_outstanding_amount.set(totals.held)
        self._ledger.totals = dict(totals.transferred)

    def watch_telemetry(self, monitor: GpuMonitor) -> None:
        """Exports the GPU telemetry `monitor` keeps (once per process)."""
        if self._telemetry is None:
            self._telemetry = TelemetryCollector(monitor)
            self.registry.register(self._telemetry)

    def watch_liveness(self, registry: RegistryService) -> None:
        """Exports the heartbeat processing lag and the event-loop lag of `registry`."""
        registry.on_heartbeat_lag = self.heartbeat_lag.observe
        self.loop_lag.set_function(lambda: registry.loop_lag.largest(10.0))

    def serve(self, addr: str) -> int:
        """Starts /metrics on `addr` ("host:port", port 0 picks one); returns the port."""
        return self._server.serve(addr)

    def stop(self) -> None:
        self._server.stop()


class LedgerCollector(Collector):
    """What each transfer kind (deposit, charge, fee, payout, ...) has moved, as the last
    refresh read it: counters, since transfers are only ever appended."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gpuplane_ledger_transferred_micro_credits",
            "Micro-credits moved by the ledger's transfers since it began, by transfer kind.",
            labels=["kind"],
        )
        for kind, amount in sorted(self.totals.items()):
            family.add_metric([kind], amount)
        yield family


class TelemetryCollector(Collector):
    """Per-GPU gauges from the latest sample of every GPU whose host is connected here, read
    at scrape time: receiving telemetry touches no metric, and a host's series vanish when it
    is forgotten (lost), so cardinality follows the connected hosts."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        labels = ["host", "gpu"]
        samples = GpuSampleFamilies("gpuplane_", labels)
        healthy = GaugeMetricFamily(
            "gpuplane_gpu_healthy", "1 while the GPU is healthy, else 0.", labels=labels
        )
        # This runs on the HTTP server's thread: copy the containers before walking them.
        for host in list(self.monitor.buffer.hosts.values()):
            for uuid, series in list(host.gpus.items()):
                key = [host.host_id, uuid]
                healthy.add_metric(key, 1.0 if series.healthy else 0.0)
                latest = series.latest
                if latest is None:
                    continue
                samples.add(key, latest)
        yield from samples.families()
        yield healthy
        accepted = CounterMetricFamily(
            "gpuplane_telemetry_samples", "GPU telemetry samples accepted."
        )
        accepted.add_metric([], self.monitor.accepted_samples)
        yield accepted
        rejected = CounterMetricFamily(
            "gpuplane_telemetry_rejected_samples",
            "GPU telemetry samples rejected as invalid, by reason.",
            labels=["reason"],
        )
        for reason, count in list(self.monitor.rejected_samples.items()):
            rejected.add_metric([reason], count)
        yield rejected
        hosts = GaugeMetricFamily(
            "gpuplane_telemetry_hosts", "Hosts whose telemetry this process keeps."
        )
        hosts.add_metric([], len(self.monitor.buffer.hosts))
        yield hosts
